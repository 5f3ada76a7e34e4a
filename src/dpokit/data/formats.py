"""Adapters: rows -> typed records with the prompt and K completions in preference order.

Rows come from `readers.py` (JSON lines, JSON, Parquet, tab-separated text, `save_to_disk` folders). Row formats
(`data.format`; `auto` takes the first in `FORMATS` whose fields the first row has):

- pairs:          {prompt, responses: [...], pairs: [[winner, loser], ...]}
- ranking:        {prompt, responses: [...], ranking: [best, ..., worst]} (indices into responses)
- conversational: {prompt, chosen, rejected} as lists of {role, content} messages (chat template applies)
- standard:       {prompt, chosen, rejected} strings
- implicit:       {chosen, rejected} whole transcripts (Anthropic HH `\\n\\nHuman: … \\n\\nAssistant: …`, or
                  message lists), split at the last assistant turn
- completion:     {prompt, completion} (SFT)
- text:           {text} (SFT on plain text; `text_field` names another field, e.g. `review`)
- tldr:           {info: {post, title, subreddit}, summaries: [{text}, {text}], choice}: the comparisons of
                  openai/summarize-from-feedback (Stiennon et al. 2020), prompted as they were

Adding a row format: write one function `(row, RowContext) -> list[Record]` and add one `RowFormat` to `FORMATS`
(where it belongs in detection order), plus its name in `config.DataFormat`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dpokit.data.content import EmptyCompletion, Quirk, blank, check_messages, check_unicode
from dpokit.data.readers import iter_rows
from dpokit.data.report import DataError, DataReport
from dpokit.data.transcripts import Text, as_chat, split_implicit
from dpokit.hub import HubDataset

Use = Literal["pairs", "ranked", "sft"]


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


def _field(
    row: dict[str, Any],
    name: str,
    where: str,
    chat: bool | None = None,
    completion: bool = True,
    transcript: bool = False,
) -> Text:
    """A string (non-empty for completions), or (chat) a non-empty list of {role, content} messages. Raises
    `Quirk` for content that is well-formed but not to be trained on (content.py). A `transcript` (an
    implicit-prompt row's whole conversation) is checked as a completion only once split."""
    if name not in row:
        raise DataError(f"{where}: missing field '{name}'", "missing_field")
    value = row[name]
    if isinstance(value, str) and chat is not True:
        check_unicode(value, name, where)
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
            check_unicode(m["content"], f"{name}[{j}].content", where)
        check_messages(value, name, completion and not transcript)
        return value
    kind = "a list of messages" if chat else "a string"
    raise DataError(f"{where}: field '{name}' must be {kind}, got {type(value).__name__}", "wrong_type")


def _responses(row: dict[str, Any], where: str) -> tuple[Text, list[Text]]:
    prompt = _field(row, "prompt", where, completion=False)
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 completions", "wrong_type")
    chat = isinstance(prompt, list)
    return prompt, [
        _field({"response": r}, "response", f"{where} responses[{j}]", chat) for j, r in enumerate(responses)
    ]


def _indices(value: Any, n: int, name: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise DataError(f"{where}: field '{name}' must be a list of integer indices", "wrong_type")
    if any(not 0 <= i < n for i in value):
        raise DataError(f"{where}: field '{name}' has an index outside 0..{n - 1}", "bad_index")
    return value


@dataclass(frozen=True)
class RowContext:
    """What a row format needs besides the row: what the records are for, where the row is, where quirks go."""

    use: Use
    where: str
    report: DataReport
    text_field: str = "text"


def _preference(prompt: Text, chosen: Text, rejected: Text, ctx: RowContext) -> list[Record]:
    """One chosen/rejected pair (for SFT: the chosen completion alone); identical completions are skipped."""
    for name, text in ({"chosen": chosen} if ctx.use == "sft" else {"chosen": chosen, "rejected": rejected}).items():
        if blank(text):  # e.g. a transcript whose reply is a single space once split from its prompt
            raise EmptyCompletion(name)
    if ctx.use == "sft":
        return [Record(prompt, (chosen,), ctx.where)]
    return _pair_records(prompt, [(chosen, rejected)], ctx)


def _pair_records(prompt: Text, pairs: Iterable[tuple[Text, Text]], ctx: RowContext) -> list[Record]:
    """A record per (better, worse) pair, skipping and counting pairs whose two completions are the same."""
    records = []
    for better, worse in pairs:
        if better == worse:
            ctx.report.skip("identical_chosen_rejected", ctx.where)
            continue
        records.append(Record(prompt, (better, worse), ctx.where))
    return records


def _no_preference(kind: str, ctx: RowContext) -> None:
    if ctx.use != "sft":
        raise DataError(f"{ctx.where}: {kind} rows have no preference; use them with `dpokit sft`", "wrong_format")


# --- one function per row format -------------------------------------------------------------------------------
def pairs_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    prompt, responses = _responses(row, ctx.where)
    pairs = row["pairs"]
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise DataError(f"{ctx.where}: field 'pairs' must be a list of [winner, loser] index pairs", "wrong_type")
    if not pairs:
        raise Quirk("no_pairs")
    if ctx.use == "sft":
        winners = dict.fromkeys(_indices([p[0] for p in pairs], len(responses), "pairs", ctx.where))
        return [Record(prompt, (responses[w],), ctx.where) for w in winners]

    def indexed() -> Iterator[tuple[Text, Text]]:
        for w, lo in pairs:  # checked one pair at a time, as the records are made
            _indices([w, lo], len(responses), "pairs", ctx.where)
            yield responses[w], responses[lo]

    return _pair_records(prompt, indexed(), ctx)


def ranking_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    prompt, responses = _responses(row, ctx.where)
    ranking = _indices(row["ranking"], len(responses), "ranking", ctx.where)
    if len(set(ranking)) != len(ranking) or len(ranking) < 2:
        raise DataError(f"{ctx.where}: field 'ranking' must list at least 2 distinct response indices", "bad_index")
    ranked = [responses[i] for i in ranking]
    if ctx.use == "sft":
        return [Record(prompt, (ranked[0],), ctx.where)]
    if ctx.use == "ranked":
        return [Record(prompt, tuple(ranked), ctx.where)]
    return _pair_records(prompt, itertools.combinations(ranked, 2), ctx)


def conversational_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    chosen = _field(row, "chosen", ctx.where, chat=True)
    rejected = _field(row, "rejected", ctx.where, chat=True)
    return _preference(_field(row, "prompt", ctx.where, chat=True, completion=False), chosen, rejected, ctx)


def standard_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    chosen = _field(row, "chosen", ctx.where, chat=False)
    rejected = _field(row, "rejected", ctx.where, chat=False)
    return _preference(_field(row, "prompt", ctx.where, chat=False, completion=False), chosen, rejected, ctx)


def implicit_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    chosen = _field(row, "chosen", ctx.where, transcript=True)
    rejected = _field(row, "rejected", ctx.where, chat=isinstance(chosen, list), transcript=True)
    split = split_implicit(chosen, rejected, ctx.where)
    if split is None:
        ctx.report.skip("prompt_mismatch", ctx.where)
        return []
    return _preference(*split, ctx)


def completion_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    _no_preference("prompt/completion", ctx)
    prompt = _field(row, "prompt", ctx.where, completion=False)
    return [Record(prompt, (_field(row, "completion", ctx.where, chat=isinstance(prompt, list)),), ctx.where)]


def text_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    _no_preference("plain-text", ctx)
    return [Record("", (_field(row, ctx.text_field, ctx.where, chat=False),), ctx.where)]


def tldr_rows(row: dict[str, Any], ctx: RowContext) -> list[Record]:
    """A comparison of openai/summarize-from-feedback (Stiennon et al. 2020, arXiv 2009.01325): two summaries of a
    Reddit post (or a CNN/DailyMail article) and the labeller's `choice`. The prompt is the format of that project's
    TL;DR task (`query.format_str`), `SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:`
    (articles: `Article:\\n{article}\\n\\nTL;DR:`); each summary is its completion, after one space."""
    info, summaries, choice = row["info"], row["summaries"], row["choice"]
    if not isinstance(info, dict) or not isinstance(info.get("post") or info.get("article"), str):
        raise DataError(f"{ctx.where}: field 'info' must hold a 'post' (or an 'article') string", "wrong_type")
    listed = summaries if isinstance(summaries, list) else []
    texts = [s["text"] for s in listed if isinstance(s, dict) and isinstance(s.get("text"), str)]
    if not isinstance(summaries, list) or len(summaries) != 2 or len(texts) != 2:
        raise DataError(f"{ctx.where}: field 'summaries' must be a list of two {{text}} objects", "wrong_type")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise DataError(
            f"{ctx.where}: field 'choice' must be 0 or 1 (the preferred summary), got {choice!r}", "bad_index"
        )
    if info.get("post"):
        subreddit, title = info.get("subreddit", ""), info.get("title", "")
        prompt = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {info['post']}\n\nTL;DR:"
    else:
        prompt = f"Article:\n{info['article']}\n\nTL;DR:"
    if not all(t.strip() for t in texts):
        raise EmptyCompletion("summaries")
    chosen, rejected = " " + texts[choice].strip(), " " + texts[1 - choice].strip()
    return _preference(prompt, chosen, rejected, ctx)


# --- the table ---------------------------------------------------------------------------------------------------
TEXT = "text"
"""Stands for the field `data.text_field` names in a format's fields."""


@dataclass(frozen=True)
class RowFormat:
    name: str
    fields: tuple[str, ...]
    """The fields a row of this format has (all of them), in the order the docs list them."""
    to_records: Callable[[dict[str, Any], RowContext], list[Record]]
    matches: Callable[[dict[str, Any]], bool] = lambda row: True
    """For detection, when two formats share their fields: does this row belong to this one?"""

    def field_names(self, text_field: str) -> tuple[str, ...]:
        return tuple(text_field if f == TEXT else f for f in self.fields)


FORMATS: dict[str, RowFormat] = {
    f.name: f
    for f in (
        # Detection order: `auto` takes the first whose fields a row has (and that `matches` it), so a format
        # whose fields include another's comes before it: standard before implicit.
        RowFormat("pairs", ("prompt", "responses", "pairs"), pairs_rows),
        RowFormat("ranking", ("prompt", "responses", "ranking"), ranking_rows),
        RowFormat(
            "conversational",
            ("prompt", "chosen", "rejected"),
            conversational_rows,
            lambda row: isinstance(row["prompt"], list),
        ),
        RowFormat("standard", ("prompt", "chosen", "rejected"), standard_rows),
        RowFormat("implicit", ("chosen", "rejected"), implicit_rows),
        RowFormat("completion", ("prompt", "completion"), completion_rows),
        RowFormat("tldr", ("info", "summaries", "choice"), tldr_rows),
        RowFormat("text", (TEXT,), text_rows),
    )
}


def _require_object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "not_an_object")
    return row


def detect_format(row: Any, where: str, text_field: str = "text") -> str:
    keys = set(_require_object(row, where))
    for fmt in FORMATS.values():
        if keys.issuperset(fmt.field_names(text_field)) and fmt.matches(row):
            return fmt.name
    expected = dict.fromkeys("/".join(fmt.field_names(text_field)) for fmt in FORMATS.values())
    *others, last = expected
    raise DataError(
        f"{where}: cannot tell the format from fields {sorted(keys)}; expected {', '.join(others)} or {last}",
        "unknown_format",
    )


def sniff_format(path: str | Path | HubDataset, text_field: str = "text") -> str:
    """The format of the first well-formed row of a file."""
    for where, row in iter_rows(path):
        if not isinstance(row, DataError):
            return detect_format(row, where, text_field)
    raise DataError(f"{path}: no readable row", "empty_file")


def _check_fields(row: dict[str, Any], fmt: RowFormat, where: str, report: DataReport, text_field: str) -> None:
    """A field of another format (`text` included) is an error: a file holds one format. Other extra fields (ids,
    metadata) are read past and counted."""
    expected = set(fmt.field_names(text_field))
    for key in row:
        if key in expected:
            continue
        if key == text_field or any(key in other.fields for other in FORMATS.values()):
            raise DataError(
                f"{where}: unexpected field '{key}' in a {fmt.name} row (fields {sorted(expected)}); "
                "one file holds one format, or set data.format",
                "unexpected_field",
            )
        report.ignored_fields[str(key)] += 1


def row_to_records(
    row: Any, fmt: str, use: Use, where: str, report: DataReport, text_field: str = "text", chat: bool = False
) -> list[Record]:
    """Turn one row into records. Raises DataError for malformed rows; skips content quirks with a count.
    `chat`: render HH-style string transcripts as messages with the tokenizer's chat template."""
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format '{fmt}'; one of {', '.join(FORMATS)}")
    row_format = FORMATS[fmt]
    row = _require_object(row, where)
    _check_fields(row, row_format, where, report, text_field)
    records = row_format.to_records(row, RowContext(use, where, report, text_field))
    if chat:
        records = [Record(*as_chat(r.prompt, r.completions), r.source) if not r.is_chat else r for r in records]  # type: ignore[arg-type]
    return records


def load_records(
    path: str | Path | HubDataset,
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
        except Quirk as e:
            report.skip(e.reason, where)
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
