"""Counting every example that is loaded, skipped, truncated or dropped, so that nothing disappears silently."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dpokit.errors import UserError

EXAMPLES_PER_REASON = 3


MAX_MESSAGES = 1000


class DataError(UserError, ValueError):
    """Bad input a person can fix; the message names the file, the line and the field. `reason` is the short
    name it is counted under when rows are skipped (`data.on_error=skip`)."""

    def __init__(self, message: str, reason: str = "malformed_row") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class DataReport:
    """Counts by reason. `skipped`: rows not turned into records (malformed, or content quirks such as
    chosen == rejected); `dropped`: tokenized examples left out (nothing left to train on);
    `truncated`: examples kept but cut to fit."""

    loaded: int = 0
    records: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: Counter[str] = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    """The full message of each malformed row (the first MAX_MESSAGES)."""
    ignored_fields: Counter[str] = field(default_factory=Counter)
    """Fields no format uses (ids, metadata): read past, counted by name."""

    def note(self, kind: Counter[str], reason: str, source: str) -> None:
        kind[reason] += 1
        places = self.where.setdefault(reason, [])
        if len(places) < EXAMPLES_PER_REASON:
            places.append(source)

    def skip(self, reason: str, source: str) -> None:
        self.note(self.skipped, reason, source)

    def error(self, error: DataError, source: str) -> None:
        """A malformed row that was skipped (data.on_error=skip)."""
        self.skip(error.reason, source)
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(str(error))

    def drop(self, reason: str, source: str) -> None:
        self.note(self.dropped, reason, source)

    def truncate(self, reason: str, source: str) -> None:
        self.note(self.truncated, reason, source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "records": self.records,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
            "truncated": dict(self.truncated),
            "ignored_fields": dict(self.ignored_fields),
            "examples": self.where,
        }

    def lines(self) -> list[str]:
        """A short human-readable account, one line per count."""
        out = [f"rows loaded: {self.loaded}, records: {self.records}, examples kept: {self.kept}"]
        for title, counts in (("skipped", self.skipped), ("dropped", self.dropped), ("truncated", self.truncated)):
            for reason, n in sorted(counts.items()):
                places = ", ".join(self.where.get(reason, []))
                out.append(f"  {title} {reason}: {n}  (e.g. {places})")
        if self.ignored_fields:
            out.append(f"  fields read past (no format uses them): {dict(self.ignored_fields)}")
        return out
