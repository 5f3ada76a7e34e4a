"""The output folder of a run: claimed before anything loads, never shared, never written over by surprise.

Rules (issue 14):
- A folder that holds a previous run is used only with `--resume` (continue it) or `--overwrite` (replace what
  dpokit wrote there); a folder holding anything else is refused whatever the flags, since dpokit cannot tell what
  it may remove. `--overwrite` removes only the names in `WRITTEN`, and only once the new run starts writing.
- The files a run reads (model, reference, cache, data) never lie inside its output folder, and the output folder
  never lies inside the model it starts from.
- The folder is created and locked (`.dpokit-run`, an advisory lock held while the run lives) before any data or
  weights load, which also proves it writable; a run that fails before writing anything leaves no trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from dpokit import distributed
from dpokit.config import RunConfig
from dpokit.errors import UserError
from dpokit.hub import is_hub_id

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, the marker alone
    fcntl = None  # type: ignore[assignment]

MARKER = ".dpokit-run"
"""Marks a folder as a dpokit run folder, and is the lock file while a run uses it."""
WRITTEN = frozenset(
    {
        MARKER,
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "final",
        "final.tmp",
        "checkpoints",
        "tensorboard",
        "wandb",
        "wandb_run_id.json",
    }
)
"""Every name a run writes in its output folder: what `--overwrite` may remove, and nothing else."""


class OutputFolderError(UserError):
    """The output folder cannot be used as asked: it holds other files, a previous run, or another run's lock."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _absolute(path: str) -> Path:
    return Path(os.path.abspath(path))


def check_inputs_outside(config: RunConfig, out: Path) -> None:
    """Refuse a run whose output folder would hold (and could overwrite) what it reads, or sit inside its model."""
    given: dict[str, str | None] = {
        "model.path": config.model.path,
        "reference.path": config.reference.path,
        "reference.cache": config.reference.cache,
        "data.train_path": config.data.train_path,
        "data.eval_path": config.data.eval_path,
    }
    inputs = {key: value for key, value in given.items() if value and not is_hub_id(value)}
    for key, value in inputs.items():
        if _inside(_absolute(value).resolve(), out.resolve()):
            raise OutputFolderError(
                f"{key}={value} lies inside train.output_dir={config.train.output_dir}: a run never writes where its "
                "inputs are (it could replace them); choose another train.output_dir"
            )
    for key in ("model.path", "reference.path"):
        model = inputs.get(key)
        if model and not model.endswith(".gguf") and _inside(out.resolve(), _absolute(model).resolve()):
            raise OutputFolderError(
                f"train.output_dir={config.train.output_dir} lies inside {key}={model}: a run never writes into the "
                "model it reads; choose another train.output_dir"
            )


def _is_run_folder(names: set[str]) -> bool:
    """Marked, or (from before the marker existed) holding only names a run writes, its config among them."""
    return MARKER in names or (names <= WRITTEN and "config.yaml" in names and len(names) > 1)


def _foreign(out: Path) -> list[str]:
    """Names in `out` that no dpokit run wrote (none when it is a run folder, or empty)."""
    names = {p.name for p in out.iterdir()}
    return [] if not names or _is_run_folder(names) else sorted(names)


def previous_run(out: Path) -> str | None:
    """A short account of the run held in the run folder `out` ('a finished run', ...), or None if none."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not names - {MARKER} or not _is_run_folder(names):
        return None
    if (out / "summary.json").exists():
        return "a finished run"
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return f"an unfinished run (checkpoints: {', '.join(steps)})" if steps else "an unfinished run (no checkpoint)"


class RunFolder:
    """A claimed output folder. `begin()` when the run starts writing; `release()` when it ends, however."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out, self.overwrite = out, overwrite
        self.created: list[Path] = []
        self.made_marker = False
        self.previous_marker = b""
        self.started = False
        self._lock: int | None = None

    def lock(self) -> None:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.created = missing
            self.made_marker = not (self.out / MARKER).exists()
            self.previous_marker = b"" if self.made_marker else (self.out / MARKER).read_bytes()
            fd = os.open(self.out / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputFolderError(
                f"train.output_dir={self.out} cannot be written: {e.strerror}; choose a folder you can write to"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip()
                os.close(fd)
                self.made_marker = False
                raise OutputFolderError(
                    f"train.output_dir={self.out} is in use by another dpokit run ({holder or 'unknown'}); wait for "
                    "it to end or choose another train.output_dir"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._lock = fd

    def begin(self) -> None:
        """The run starts writing: with `--overwrite`, the previous run's files go now (not before the data loaded)."""
        if self.overwrite and not self.started:
            for name in sorted(WRITTEN - {MARKER}):
                path = self.out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        self.started = True

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing drops the lock
            self._lock = None
        if not self.started:
            # Nothing was written: leave the folder as it was found.
            if self.made_marker:
                with contextlib.suppress(FileNotFoundError):
                    (self.out / MARKER).unlink()
            elif (self.out / MARKER).exists():
                (self.out / MARKER).write_bytes(self.previous_marker)
            for folder in self.created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextlib.contextmanager
def claim(config: RunConfig, resume: bool = False, overwrite: bool = False) -> Iterator[RunFolder]:
    """Check and lock `train.output_dir` for one run (see the module docstring); release it when the run ends."""
    if resume and overwrite:
        raise OutputFolderError("--resume continues the run in train.output_dir and --overwrite replaces it: give one")
    out = _absolute(config.train.output_dir)
    folder = RunFolder(out, overwrite)
    if not distributed.is_main():
        folder.started = True  # the main process checks and locks; the others only write where it says
        yield folder
        return
    where = f"train.output_dir={config.train.output_dir}"
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{where} is a file, not a folder; choose a folder")
    check_inputs_outside(config, out)
    if out.is_dir() and (foreign := _foreign(out)):
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputFolderError(
            f"{where} holds files dpokit did not write ({shown}); a run needs a new or empty folder (or one of its "
            "own), so that nothing else is ever replaced"
        )
    folder.lock()  # after the checks that need no folder, before the one that must not race another run
    try:
        _check_previous(out, where, resume, overwrite)
        yield folder
    finally:
        folder.release()


def _check_previous(out: Path, where: str, resume: bool, overwrite: bool) -> None:
    previous = previous_run(out)
    if resume and previous is None:
        raise OutputFolderError(f"--resume: {where} holds no run to resume; run without --resume to start one")
    if previous is not None and not (resume or overwrite):
        raise OutputFolderError(
            f"{where} already holds {previous}; continue it with --resume, replace it with --overwrite, or choose "
            "another train.output_dir"
        )


def check_new_folder(path: str, what: str) -> Path:
    """A folder a command creates whole (e.g. `init-model --out`): it must not exist, or be empty."""
    out = _absolute(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputFolderError(
            f"{what} {path} already exists and is not an empty folder; choose a new folder (dpokit never replaces "
            "a model)"
        )
    check_creatable(out, f"{what} {path}")
    return out


def check_creatable(path: Path, what: str) -> None:
    """The folders above `path` that exist are folders (so that it can be made), checked before any work."""
    above = next(p for p in Path(os.path.abspath(path)).parents if p.exists())
    if not above.is_dir():
        raise OutputFolderError(f"{what} cannot be made: {above} is a file, not a folder")
