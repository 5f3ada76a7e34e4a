"""Adapters: data files -> typed records with the prompt and K completions in preference order.

Files: JSON lines (`.jsonl`, `.jsonl.gz`), JSON (`.json`, a list of rows), Parquet (`.parquet`), or a folder
written by `datasets.Dataset.save_to_disk`. Row formats (`data.format`, detected from the first row by `auto`):

- standard:       {prompt, chosen, rejected} strings
- conversational: the same fields as lists of {role, content} messages (chat template applies)
- implicit:       {chosen, rejected} whole transcripts (Anthropic HH `\\n\\nHuman: … \\n\\nAssistant: …`, or
                  message lists), split at the last assistant turn
- pairs:          {prompt, responses: [...], pairs: [[winner, loser], ...]}
- ranking:        {prompt, responses: [...], ranking: [best, ..., worst]} (indices into responses)
- completion:     {prompt, completion} (SFT)
- text:           {text} (SFT on plain text; `text_field` names another field, e.g. `review`)

Tab-separated `.tsv`/`.txt` files without a header read as text rows: the last field is the text.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dpokit.data.report import DataError, DataReport

Message = dict[str, str]
Text = str | list[Message]
Use = Literal["pairs", "ranked", "sft"]
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Record:
    """One prompt and its completions, best first. Strings, or message lists for chat-template rendering."""

    prompt: Text
    completions: tuple[Text, ...]
    source: str
    """`file:line` of the row it came from."""

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, row) for every row of a data file or `save_to_disk` folder. A row that cannot be
    parsed is yielded as a `DataError` so that the caller decides whether to raise or skip."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        import datasets

        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict folder; point data.train_path at one split's folder")
        for i, row in enumerate(table):
            yield f"{path}:{i + 1}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:{i + 1}", row
    elif path.suffix in (".tsv", ".txt"):
        # Tab-separated text without a header: the last field is the text, the others are kept as `fields`.
        with path.open("rb") as f:
            for i, raw in enumerate(f):
                where = f"{path}:{i + 1}"
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    yield where, DataError(f"{where}: bytes that are not UTF-8 at offset {e.start}", "not_utf8")
                    continue
                if line.strip():
                    *fields, text = line.split("\t")
                    yield where, {"text": text, "fields": fields}
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows (use .jsonl for one row per line)")
        for i, row in enumerate(data):
            yield f"{path}:{i + 1}", row
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            for i, raw in enumerate(f):
                where = f"{path}:{i + 1}"
                if not raw.strip():
                    continue
                try:
                    yield where, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield where, DataError(f"{where}: bytes that are not UTF-8 at offset {e.start}", "not_utf8")
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})", "invalid_json")
                except RecursionError:
                    yield where, DataError(f"{where}: invalid JSON: nested too deeply", "invalid_json")


def sniff_format(path: str | Path, text_field: str = "text") -> str:
    """The format of the first well-formed row of a file."""
    for where, row in iter_rows(path):
        if not isinstance(row, DataError):
            return detect_format(row, where, text_field)
    raise DataError(f"{path}: no readable row", "empty_file")


def detect_format(row: Any, where: str, text_field: str = "text") -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "not_an_object")
    keys = set(row)
    if {"prompt", "responses", "pairs"} <= keys:
        return "pairs"
    if {"prompt", "responses", "ranking"} <= keys:
        return "ranking"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    if {"chosen", "rejected"} <= keys:
        return "implicit"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if text_field in keys:
        return "text"
    raise DataError(
        f"{where}: cannot tell the format from fields {sorted(keys)}; expected prompt/chosen/rejected, "
        "chosen/rejected, prompt/responses/pairs, prompt/responses/ranking, prompt/completion or text",
        "unknown_format",
    )


FORMAT_FIELDS = {
    "standard": {"prompt", "chosen", "rejected"},
    "conversational": {"prompt", "chosen", "rejected"},
    "implicit": {"chosen", "rejected"},
    "pairs": {"prompt", "responses", "pairs"},
    "ranking": {"prompt", "responses", "ranking"},
    "completion": {"prompt", "completion"},
    "text": set(),
}
STRUCTURAL_FIELDS = set().union(*FORMAT_FIELDS.values(), {"text"})


def _check_fields(row: dict[str, Any], fmt: str, where: str, report: DataReport, text_field: str) -> None:
    """A field of another format is an error (a file holds one format); other extra fields are read past and counted."""
    expected = FORMAT_FIELDS.get(fmt, set()) | ({text_field} if fmt == "text" else set())
    for key in row:
        if key in expected:
            continue
        if key in STRUCTURAL_FIELDS or key == text_field:
            raise DataError(
                f"{where}: unexpected field '{key}' in a {fmt} row (fields {sorted(expected)}); "
                "one file holds one format, or set data.format",
                "unexpected_field",
            )
        report.ignored_fields[str(key)] += 1


class EmptyCompletion(Exception):
    """A completion that is an empty string: a content quirk, skipped and counted rather than trained on."""


def _field(row: dict[str, Any], name: str, where: str, chat: bool | None = None, completion: bool = True) -> Text:
    """A string (non-empty for completions), or (chat) a non-empty list of {role, content} messages."""
    if name not in row:
        raise DataError(f"{where}: missing field '{name}'", "missing_field")
    value = row[name]
    if isinstance(value, str) and chat is not True:
        if completion and not value.strip():
            raise EmptyCompletion(name)
        return value
    if isinstance(value, list) and chat is not False:
        if not value:
            raise DataError(f"{where}: field '{name}' is an empty message list", "empty_field")
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(
                    f"{where}: field '{name}[{j}]' must be a {{role, content}} message with string values", "wrong_type"
                )
        return value
    kind = "a list of messages" if chat else "a string"
    raise DataError(f"{where}: field '{name}' must be {kind}, got {type(value).__name__}", "wrong_type")


def _split_implicit(chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text] | None:
    """Split two whole transcripts at the last assistant turn; None when their prompts differ."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: implicit-prompt message lists must end with an assistant message", "malformed_transcript"
            )
        if chosen[:-1] != rejected[:-1]:
            return None
        return chosen[:-1], [chosen[-1]], [rejected[-1]]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = chosen.rfind(HH_ASSISTANT)
        if cut < 0:
            raise DataError(
                f"{where}: field 'chosen' has no '\\n\\nAssistant:' turn to split the prompt at", "malformed_transcript"
            )
        prompt = chosen[: cut + len(HH_ASSISTANT)]
        if not rejected.startswith(prompt):
            return None
        return prompt, chosen[len(prompt) :], rejected[len(prompt) :]
    raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists", "wrong_type")


def hh_messages(transcript: str) -> list[Message]:
    """`\n\nHuman: a\n\nAssistant: b` -> [{user: a}, {assistant: b}] (the last turn may be empty)."""
    messages: list[Message] = []
    for turn in transcript.split("\n\n"):
        for marker, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if turn.startswith(marker):
                messages.append({"role": role, "content": turn[len(marker) :].strip()})
                break
        else:
            if messages:  # a paragraph break inside a turn
                messages[-1]["content"] += "\n\n" + turn
    return messages


def _as_chat(prompt: str, completions: tuple[str, ...]) -> tuple[list[Message], tuple[list[Message], ...]]:
    """An HH prompt and its completions as messages, for rendering with the model's own chat template."""
    messages = hh_messages(prompt)
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]
    return messages, tuple([{"role": "assistant", "content": c.strip()}] for c in completions)


def _responses(row: dict[str, Any], where: str) -> tuple[Text, list[Text]]:
    prompt = _field(row, "prompt", where, completion=False)
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 completions", "wrong_type")
    chat = isinstance(prompt, list)
    return prompt, [_field({"r": r}, "r", f"{where} responses[{j}]", chat) for j, r in enumerate(responses)]


def _indices(value: Any, n: int, name: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise DataError(f"{where}: field '{name}' must be a list of integer indices", "wrong_type")
    if any(not 0 <= i < n for i in value):
        raise DataError(f"{where}: field '{name}' has an index outside 0..{n - 1}", "bad_index")
    return value


def row_to_records(
    row: Any, fmt: str, use: Use, where: str, report: DataReport, text_field: str = "text", chat: bool = False
) -> list[Record]:
    """Turn one row into records. Raises DataError for malformed rows; skips content quirks with a count.
    `chat`: render HH-style string transcripts as messages with the tokenizer's chat template."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "not_an_object")
    _check_fields(row, fmt, where, report, text_field)
    records = _row_to_records(row, fmt, use, where, report, text_field)
    if chat:
        records = [Record(*_as_chat(r.prompt, r.completions), r.source) if not r.is_chat else r for r in records]  # type: ignore[arg-type]
    return records


def _row_to_records(row: Any, fmt: str, use: Use, where: str, report: DataReport, text_field: str) -> list[Record]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "not_an_object")
    if fmt in ("standard", "conversational", "implicit"):
        chat = fmt == "conversational" if fmt != "implicit" else None
        chosen = _field(row, "chosen", where, chat)
        rejected = _field(row, "rejected", where, isinstance(chosen, list))
        if fmt == "implicit":
            split = _split_implicit(chosen, rejected, where)
            if split is None:
                report.skip("prompt_mismatch", where)
                return []
            prompt, chosen, rejected = split
        else:
            prompt = _field(row, "prompt", where, isinstance(chosen, list), completion=False)
        if use == "sft":
            return [Record(prompt, (chosen,), where)]
        if chosen == rejected:
            report.skip("identical_chosen_rejected", where)
            return []
        return [Record(prompt, (chosen, rejected), where)]
    if fmt == "pairs":
        prompt, responses = _responses(row, where)
        pairs = row["pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise DataError(f"{where}: field 'pairs' must be a list of [winner, loser] index pairs", "wrong_type")
        if use == "sft":
            winners = dict.fromkeys(_indices([p[0] for p in pairs], len(responses), "pairs", where))
            return [Record(prompt, (responses[w],), where) for w in winners]
        records = []
        for w, lo in pairs:
            _indices([w, lo], len(responses), "pairs", where)
            if responses[w] == responses[lo]:
                report.skip("identical_chosen_rejected", where)
                continue
            records.append(Record(prompt, (responses[w], responses[lo]), where))
        return records
    if fmt == "ranking":
        prompt, responses = _responses(row, where)
        ranking = _indices(row["ranking"], len(responses), "ranking", where)
        if len(set(ranking)) != len(ranking) or len(ranking) < 2:
            raise DataError(f"{where}: field 'ranking' must list at least 2 distinct response indices", "bad_index")
        ranked = [responses[i] for i in ranking]
        if use == "sft":
            return [Record(prompt, (ranked[0],), where)]
        if use == "ranked":
            return [Record(prompt, tuple(ranked), where)]
        records = []
        for a, b in itertools.combinations(ranked, 2):
            if a == b:
                report.skip("identical_chosen_rejected", where)
                continue
            records.append(Record(prompt, (a, b), where))
        return records
    if fmt == "completion":
        if use != "sft":
            raise DataError(
                f"{where}: prompt/completion rows have no preference; use them with `dpokit sft`", "wrong_format"
            )
        prompt = _field(row, "prompt", where, completion=False)
        return [Record(prompt, (_field(row, "completion", where, isinstance(prompt, list)),), where)]
    if fmt == "text":
        if use != "sft":
            raise DataError(f"{where}: plain-text rows have no preference; use them with `dpokit sft`", "wrong_format")
        return [Record("", (_field(row, text_field, where, False),), where)]
    raise DataError(f"{where}: unknown format '{fmt}'")


def load_records(
    path: str | Path,
    fmt: str = "auto",
    use: Use = "pairs",
    on_error: str = "raise",
    report: DataReport | None = None,
    text_field: str = "text",
    chat: bool = False,
) -> tuple[list[Record], DataReport]:
    """Read every row of `path` into records, counting what was skipped and why."""
    report = report if report is not None else DataReport()
    records: list[Record] = []
    for where, row in iter_rows(path):
        report.loaded += 1
        try:
            if isinstance(row, DataError):
                raise row
            if fmt == "auto":
                fmt = detect_format(row, where, text_field)
            records.extend(row_to_records(row, fmt, use, where, report, text_field, chat))
        except EmptyCompletion as e:
            report.skip(f"empty_{e}", where)
        except DataError as e:
            if on_error == "raise":
                raise
            report.error(e, where)
    report.records += len(records)
    return records, report


def record_texts(record: Record) -> list[str]:
    """All the text in a record (for training a tokenizer)."""
    parts = [record.prompt, *record.completions]
    return [m["content"] for p in parts for m in p] if record.is_chat else [str(p) for p in parts]  # type: ignore[index]
