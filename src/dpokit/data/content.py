"""Content rules: what a well-formed row may still hold that must not be trained on.

A `Quirk` (an empty or whitespace-only completion, a completion that is not the assistant's, an unknown role, a row
with no pairs) is skipped and counted under its reason, like chosen == rejected; text that is not valid Unicode is a
malformed row (`DataError`). `formats.py` applies these rules to every row format; `validate` and training share
them, so they agree.
"""

from __future__ import annotations

from dpokit.data.report import DataError

Message = dict[str, str]
Text = str | list[Message]


class Quirk(Exception):
    """A well-formed row with nothing sound to train on: skipped and counted under `reason`, never trained on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EmptyCompletion(Quirk):
    """A completion that is empty or only whitespace (counted as `empty_<field>`)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"empty_{name}")


ROLES = ("system", "user", "assistant", "tool")
"""Message roles chat templates know; another (`human`, `gpt`) is counted as `unknown_role` and its row skipped."""


def check_messages(messages: list[Message], name: str, completion: bool) -> None:
    """Content rules of a message list: known roles; a completion is assistant turns only (else the other party's
    words would be trained as the model's), none of them empty."""
    if any(m["role"] not in ROLES for m in messages):
        raise Quirk("unknown_role")
    if completion and any(m["role"] != "assistant" for m in messages):
        raise Quirk("completion_not_assistant")
    if completion and any(not m["content"].strip() for m in messages):
        raise EmptyCompletion(name)


def check_unicode(text: str, name: str, where: str) -> None:
    """Text must be valid Unicode: JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: field '{name}' holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is not "
            "valid Unicode; fix the escape in the file",
            "invalid_unicode",
        ) from None


def blank(text: Text) -> bool:
    """Nothing but whitespace: a string, or every message of a list."""
    return not text.strip() if isinstance(text, str) else all(not m["content"].strip() for m in text)
