"""The harness of the bad-input suite (tests/test_bad_input.py): a case is a command line run in a fresh folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOST_WORK, RESUME, VALUES, CONTRADICTIONS, FILES, ENVIRONMENT, CONTENT = (
    "lost-work",
    "resume",
    "values",
    "contradictions",
    "files",
    "environment",
    "content",
)
CLASSES = (LOST_WORK, RESUME, VALUES, CONTRADICTIONS, FILES, ENVIRONMENT, CONTENT, "other")


@dataclass
class World:
    """The folder a case runs in (also the current folder): `data.jsonl`, and `run/` as the run's output folder."""

    root: Path
    model: Path
    """The tiny model (shared by every case; the suite checks that no case changes it)."""
    data: Path
    out: Path
    base_run: Callable[[], Path]
    """A finished run of `RUN_ARGS` with `BASE_RUN` (checkpoints step-1 and step-2), made once per session."""
    keep: list[object] = field(default_factory=list)
    """Whatever a case's setup must hold while the command runs (an open lock)."""

    @property
    def names(self) -> dict[str, str]:
        return {"root": str(self.root), "model": str(self.model), "data": str(self.data), "out": str(self.out)}

    def copy_run(self, to: Path | None = None) -> Path:
        target = to or self.out
        shutil.copytree(self.base_run(), target)
        return target


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    """The issue's class of failure."""
    argv: tuple[str, ...]
    """The command line; `{root}`, `{model}`, `{data}` and `{out}` are filled in."""
    expect: tuple[str, ...]
    """Texts the error line must contain (formatted like argv)."""
    setup: Callable[[World], None] | None = None
    code: int = 2
    said: str = "error"
    """Where the texts must appear: `error` (the one `dpokit X: error:` line on stderr) or `out` (stdout, for
    `validate`, which reports malformed rows there and exits 1)."""
    applies: Callable[[], bool] = lambda: True
    """Whether the case means anything on this machine (`train.device=cuda` is no fault where CUDA exists)."""


RUN_ARGS = (
    "model.path={model}",
    "data.train_path={data}",
    "train.output_dir={out}",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "train.batch_size=4",
    "train.micro_batch_size=4",
    "train.max_steps=1",
)
"""A run of one step on the tiny model: what every case starts from."""
BASE_RUN = ("train.max_steps=3", "train.save_every=1", "train.lr=1e-3")
"""What the base run adds: 3 steps with checkpoints at steps 1 and 2 (resume cases continue it)."""


def _run_args(command: str = "dpo") -> tuple[str, ...]:
    return (command, *RUN_ARGS)


def config_case(kind: str, name: str, *overrides: str, expect: tuple[str, ...] = (), command: str = "dpo") -> Case:
    """A run whose overrides hold the fault; by default the error must name every override's `key=value`."""
    return Case(name, kind, (*_run_args(command), *overrides), expect or overrides)


def yaml_case(name: str, content: bytes | str, *expect: str, kind: str = FILES) -> Case:
    def write(world: World) -> None:
        path = world.root / "config.yaml"
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    # A file that is not a config names the file; a bad value inside one names its key and value.
    names_file = ("{root}/config.yaml",) if kind == FILES else ()
    return Case(name, kind, ("dpo", "{root}/config.yaml"), (*names_file, *expect), write)
