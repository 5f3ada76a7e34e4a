"""Counting every example that is loaded, skipped, truncated or dropped, so that nothing disappears silently."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

EXAMPLES_PER_REASON = 3


class DataError(ValueError):
    """Bad input a person can fix; the message names the file, the line and the field."""


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

    def note(self, kind: Counter[str], reason: str, source: str) -> None:
        kind[reason] += 1
        places = self.where.setdefault(reason, [])
        if len(places) < EXAMPLES_PER_REASON:
            places.append(source)

    def skip(self, reason: str, source: str) -> None:
        self.note(self.skipped, reason, source)

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
            "examples": self.where,
        }

    def lines(self) -> list[str]:
        """A short human-readable account, one line per count."""
        out = [f"rows loaded: {self.loaded}, records: {self.records}, examples kept: {self.kept}"]
        for title, counts in (("skipped", self.skipped), ("dropped", self.dropped), ("truncated", self.truncated)):
            for reason, n in sorted(counts.items()):
                places = ", ".join(self.where.get(reason, []))
                out.append(f"  {title} {reason}: {n}  (e.g. {places})")
        return out
