"""Records -> token ids with an explicit prompt/completion boundary, and the truncation policy.

Prompt and completions are tokenized separately and joined at token level, never by string concatenation, so
the boundary is exact. Rules:
- BOS appears at most once: the tokenizer adds it to the prompt (plain text) or the chat template renders it.
- EOS ends every completion exactly once (a chat template's end-of-turn token counts; what the template renders
  after it, such as a newline, is not trained).
- With a chat template, the rendered prompt (with the generation prompt) must be a token prefix of the rendered
  conversation; otherwise the example is refused with its location, never trained on a shifted boundary.
- Truncation: the prompt is cut first to `max_prompt_length` (its end kept, and its BOS), then each completion to
  what is left of `max_length` (its start kept). Every cut and every drop is counted in the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from dpokit.data.formats import Record
from dpokit.data.report import DataError, DataReport


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[tuple[int, ...], ...]
    """K completions, best first."""
    source: str

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(self.prompt_ids) + len(c) for c in self.completion_ids)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def encode_text(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Plain text: the prompt gets the tokenizer's special tokens (BOS), the completion none, then one EOS."""
    eos = tokenizer.eos_token_id
    prompt_ids = _strip_eos(_ids(tokenizer, prompt, True), eos) if prompt else []
    if not prompt_ids:
        # The first completion token needs a context to be scored; a BOS (or EOS, GPT-2 style) provides it.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        prompt_ids = [start]
    completion_ids = _strip_eos(_ids(tokenizer, completion, False), eos) + [eos]
    return prompt_ids, completion_ids


def encode_chat(
    tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]], source: str
) -> tuple[list[int], list[int]]:
    """Chat: render prompt (with generation prompt) and prompt + completion; the first must be a token prefix."""
    from jinja2.exceptions import TemplateError

    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except TemplateError as e:  # templates raise on conversations they do not take (roles out of order, ...)
        raise DataError(f"{source}: the model's chat template refuses this conversation: {e}", "chat_template") from e
    prompt_ids = _ids(tokenizer, prompt_text, False)
    full_ids = _ids(tokenizer, full_text, False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        around = full_text[len(prompt_text) - 40 : len(prompt_text) + 20]
        raise DataError(
            f"{source}: the chat template renders the prompt differently alone than inside the conversation, so "
            f"the prompt/completion boundary is not a token boundary. Prompt alone ends with "
            f"{prompt_text[-40:]!r}; the conversation reads {around!r} there. "
            "Use a chat template whose generation prompt is a prefix of the rendered assistant turn.",
            "chat_template_boundary",
        )
    completion_ids = full_ids[len(prompt_ids) :]
    eos = tokenizer.eos_token_id
    if eos in completion_ids:
        # Keep up to the last end-of-turn token: the template's trailing newline is not something to generate.
        last = len(completion_ids) - 1 - completion_ids[::-1].index(eos)
        completion_ids = completion_ids[: last + 1]
    else:
        completion_ids = completion_ids + [eos]
    return prompt_ids, completion_ids


def _dedupe_bos(ids: list[int], bos: int | None) -> list[int]:
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def tokenize_record(
    record: Record, tokenizer: Any, max_length: int, max_prompt_length: int, report: DataReport
) -> TokenizedExample | None:
    """Tokenize and truncate one record; None (with a counted reason) when nothing trainable is left."""
    encoded = []
    for completion in record.completions:
        if record.is_chat:
            if tokenizer.chat_template is None:
                raise DataError(
                    f"{record.source}: message-list rows need a tokenizer with a chat template", "no_chat_template"
                )
            encoded.append(encode_chat(tokenizer, record.prompt, completion, record.source))  # type: ignore[arg-type]
        else:
            encoded.append(encode_text(tokenizer, record.prompt, completion))  # type: ignore[arg-type]
    prompt_ids = _dedupe_bos(encoded[0][0], tokenizer.bos_token_id)
    if any(_dedupe_bos(p, tokenizer.bos_token_id) != prompt_ids for p, _ in encoded[1:]):
        raise DataError(
            f"{record.source}: the prompt tokenizes differently for different completions", "prompt_differs"
        )
    if len(prompt_ids) > max_prompt_length:
        report.truncate("prompt", record.source)
        head = prompt_ids[:1] if prompt_ids[0] == tokenizer.bos_token_id else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)) :]
    budget = max_length - len(prompt_ids)
    completions = [c for _, c in encoded]
    if any(len(c) > budget for c in completions):
        report.truncate("completion", record.source)
        completions = [c[:budget] for c in completions]
    if len(completions) > 1 and len({tuple(c) for c in completions}) < len(completions):
        report.drop("identical_after_truncation", record.source)
        return None
    return TokenizedExample(tuple(prompt_ids), tuple(tuple(c) for c in completions), record.source)


def tokenize_records(
    records: Iterable[Record],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    report: DataReport,
    desc: str = "tokenizing",
    on_error: str = "raise",
) -> list[TokenizedExample]:
    """Tokenize every record; one that cannot be tokenized stops here with its place (`on_error=raise`) or is
    skipped and counted by reason like a malformed row (`skip`)."""
    records = list(records)
    examples = []
    for record in tqdm(records, desc=desc, leave=False, disable=len(records) < 2000):
        try:
            example = tokenize_record(record, tokenizer, max_length, max_prompt_length, report)
        except DataError as e:
            if on_error == "raise":
                raise
            report.error(e, record.source)
            continue
        if example is not None:
            examples.append(example)
    report.kept += len(examples)
    return examples
