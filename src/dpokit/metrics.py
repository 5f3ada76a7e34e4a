"""Training statistics: summed where they are computed, brought to the host once per step, averaged, written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpokit.tracking import Tracker

Stats = dict[str, Tensor | float]
"""Statistics summed over a batch's examples: tensors where they were computed (on the device), counts as numbers."""


def to_host(sums: Sequence[Stats]) -> dict[str, float]:
    """Add up the statistics of several batches where they lie and bring them to the host in one transfer (each
    `float(tensor)` would be a device synchronisation of its own)."""
    total: Stats = {}
    for stats in sums:
        for k, v in stats.items():
            total[k] = total[k] + v if k in total else v
    on_device = [k for k, v in total.items() if isinstance(v, Tensor)]
    if on_device:
        values = torch.stack([torch.as_tensor(total[k]).float() for k in on_device]).tolist()
        total |= dict(zip(on_device, values, strict=True))
    return {k: float(v) for k, v in total.items()}


def averaged(total: dict[str, float], per_token: bool) -> dict[str, float]:
    """Summed statistics -> means per example (the loss per completion token for SFT), and the token count."""
    sums = dict(total)
    examples, tokens = sums.pop("examples"), sums.pop("tokens")
    completion_tokens = sums.pop("completion_tokens")
    means = {k: v / examples for k, v in sums.items()}
    if per_token:
        means["loss"] = sums["loss"] / completion_tokens
    means["tokens"] = tokens
    return means


class MetricsLog:
    """metrics.jsonl always, and the trackers of `train.report_to` (dpokit.tracking). On resume, rows written after
    the checkpoint (by the run that was killed) are dropped, so that the file reads as one uninterrupted run. Not
    `enabled` (the processes other than 0 of a torchrun launch), it writes nothing."""

    file: Any = None
    trackers: Sequence[Tracker] = ()

    def __init__(self, out: Path, resume_step: int, trackers: Sequence[Tracker] = (), enabled: bool = True) -> None:
        if not enabled:
            return
        path = out / "metrics.jsonl"
        if resume_step and path.exists():
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if _complete_row(line, resume_step)]
            path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
        self.file = path.open("a" if resume_step else "w", encoding="utf-8")
        self.trackers = trackers

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def _complete_row(line: str, last_step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) <= last_step
    except (ValueError, KeyError, TypeError):
        return False  # a line cut short by a kill
