"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, Trackio.

Each gets the same metric names as metrics.jsonl (`loss`, `rewards/accuracies`, `eval/loss`, ...) at the same steps,
and the resolved config once at the start. Only the main process (rank 0) reports. `metrics.jsonl` is written
whatever `report_to` says; trackers are extra views of it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import yaml

from dpokit import distributed
from dpokit.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
"""Tracker name -> the package that must be installed for it."""


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def resolve(report_to: tuple[str, ...] | None) -> tuple[str, ...]:
    """The trackers a run reports to: `report_to` as given (each must be installed), or by default TensorBoard
    when it is installed and nothing otherwise."""
    if report_to is None:
        return ("tensorboard",) if installed("tensorboard") else ()
    missing = [name for name in report_to if not installed(name)]
    if missing:
        extras = ",".join(missing)
        raise UserError(
            f"train.report_to lists {', '.join(missing)}, which is not installed: pip install 'dpokit[{extras}]', "
            "or leave it out of train.report_to"
        )
    return tuple(dict.fromkeys(report_to))


class TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any], run_name: str, resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        if not resume:
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def _run_id(out: Path, name: str, resume: bool, new_id: str) -> str:
    """The tracker's run id, kept in the output folder so that `--resume` continues the same run."""
    path = out / f"{name}_run_id.json"
    if resume and path.exists():
        return str(json.loads(path.read_text(encoding="utf-8"))["id"])
    path.write_text(json.dumps({"id": new_id}), encoding="utf-8")
    return new_id


class WandB:
    """Weights & Biases; `WANDB_PROJECT` (default `dpokit`), `WANDB_MODE=offline` and the rest of its environment
    apply. The run lives in `<output_dir>/wandb`."""

    def __init__(self, out: Path, config: dict[str, Any], run_name: str, resume: bool) -> None:
        import wandb

        run_id = _run_id(out, "wandb", resume, uuid.uuid4().hex[:8])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dpokit"),
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """Trackio (a local-first tracker with the wandb calling convention); `TRACKIO_PROJECT` (default `dpokit`)."""

    def __init__(self, out: Path, config: dict[str, Any], run_name: str, resume: bool) -> None:
        import trackio

        self.trackio = trackio
        project = os.environ.get("TRACKIO_PROJECT", "dpokit")
        self.run = trackio.init(project=project, name=run_name, config=config, resume="allow" if resume else "never")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


OPENERS: dict[str, type[TensorBoard] | type[WandB] | type[Trackio]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "trackio": Trackio,
}


def open_trackers(names: tuple[str, ...], out: Path, config: dict[str, Any], resume: bool) -> list[Tracker]:
    """Start each tracker (none on ranks other than 0). The run is named after the output folder."""
    if not distributed.is_main():
        return []
    run_name = out.resolve().name
    return [OPENERS[name](out, config, run_name, resume) for name in names]
