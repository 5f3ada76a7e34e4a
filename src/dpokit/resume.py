"""Resume safety: a checkpoint says what made it, and `--resume` continues only the run it belongs to.

Every checkpoint folder holds `dpokit_checkpoint.json` (written last, before the folder is renamed into place): the
step, the resolved config, digests of the tokenizer and of the tokenized train and held-out data, and the size of
every file in the folder. It is plain JSON beside whatever holds the weights, so sharded (DCP) checkpoints carry it
alike. On `--resume`:
- checkpoints are the folders named exactly `step-N`; anything else (`step-2.bak`, `step-4.tmp`) is ignored;
- the newest one whose files are all there at their recorded size is used; an unusable one is named with the reason
  and the one before it is tried (also when loading it fails);
- the config must equal the checkpoint's except for `SAFE_TO_CHANGE` (logged), and the training data and tokenizer
  must have the checkpoint's digests; anything else is refused with the differences listed.
Checkpoints from before the record existed are accepted with their `dpokit_config.yaml`, their data unchecked (said).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError

from dpokit.config import RunConfig, to_dict
from dpokit.errors import UserError
from dpokit.reference import examples_digest, tokenizer_digest

RECORD = "dpokit_checkpoint.json"
SAFE_TO_CHANGE = frozenset(
    {
        "train.max_steps",
        "train.epochs",
        "train.eval_every",
        "train.save_every",
        "train.log_every",
        "train.eval_train",
        "train.max_nonfinite_steps",
        "train.output_dir",
        "train.device",
        "train.activation_checkpointing",
        "train.compile",
        "train.compile_memory_budget",
        "distributed.fsdp",
        "distributed.cpu_offload",
        "distributed.timeout_s",
        "data.train_path",
        "data.eval_path",
        "data.max_eval_examples",
    }
)
"""Settings a resumed run may change: where and how long it runs (on how many processes, sharded or not), what it
logs and evaluates, where the same data lives (the data itself is checked by digest). Changing the length changes a
linear or cosine schedule's remaining steps; that is logged."""
LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
    SafetensorError,
)
"""What reading a damaged checkpoint raises (safetensors, torch.load, pickle)."""


class ResumeError(UserError):
    """`--resume` cannot continue: nothing to resume, no usable checkpoint, or a run that does not match."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    record: dict[str, Any]
    """The checkpoint's record; a legacy checkpoint's holds its config only."""


def data_digests(tokenizer: Any, train: Sequence[Any], held_out: Sequence[Any]) -> dict[str, str]:
    """What a checkpoint's data is checked by: the tokenizer and the tokenized train and held-out examples."""
    return {
        "tokenizer": tokenizer_digest(tokenizer),
        "train_data": examples_digest(train),
        "eval_data": examples_digest(held_out),
    }


def seal(folder: Path, step: int, config: RunConfig, digests: dict[str, str]) -> None:
    """Write the record of a complete checkpoint folder (call it last, before the folder is renamed into place)."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RECORD
    }
    record = {"format": 1, "step": step, "config": to_dict(config), "digests": digests, "files": files}
    (folder / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")


def _problem(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a usable checkpoint folder, (None, why) for one that is not."""
    record_file = path / RECORD
    if not record_file.exists():
        legacy = path / "dpokit_config.yaml"
        if (path / "trainer_state.pt").exists() and legacy.exists():
            try:
                return {"config": yaml.safe_load(legacy.read_text(encoding="utf-8")), "legacy": True}, None
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                return None, "dpokit_config.yaml is unreadable"
        return None, f"no {RECORD} (an incomplete or foreign folder)"
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        files = dict(record["files"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None, f"{RECORD} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return None, f"{name} is missing"
        if file.stat().st_size != size:
            return None, f"{name} has {file.stat().st_size} of its {size} bytes (truncated or altered)"
    return record, None


def candidates(steps: Sequence[tuple[int, Path]]) -> tuple[list[Checkpoint], list[str]]:
    """The usable checkpoints, newest first, and one line for each unusable one."""
    good, bad = [], []
    for step, path in sorted(steps, reverse=True):
        record, problem = _problem(path)
        if record is None:
            bad.append(f"{path.name}: {problem}")
        else:
            good.append(Checkpoint(path, step, record))
    return good, bad


def _flat(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{k}": v for section, fields in raw.items() if isinstance(fields, dict) for k, v in fields.items()
    }


def check_config(checkpoint: Checkpoint, config: RunConfig) -> list[str]:
    """Refuse a config that differs from the checkpoint's beyond `SAFE_TO_CHANGE`; return the allowed changes.
    A setting the checkpoint does not record (added to dpokit since) is taken to have had its default."""
    now = _flat(to_dict(config))
    before = {k: v for k, v in _flat(to_dict(RunConfig())).items() if k in now}
    before |= _flat(checkpoint.record.get("config") or {})
    changed = [k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
    unsafe = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed if k not in SAFE_TO_CHANGE]
    if unsafe:
        raise ResumeError(
            f"--resume: the config differs from the one {checkpoint.path} was trained with ({'; '.join(unsafe)}). "
            "Put those settings back to continue that run, or start a new one (another train.output_dir, or "
            "--overwrite)"
        )
    notes = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed]
    if {"train.max_steps", "train.epochs"} & set(changed) and config.train.schedule != "constant":
        notes.append(f"the {config.train.schedule} schedule now spans the new length from step {checkpoint.step}")
    return notes


def check_data(checkpoint: Checkpoint, digests: dict[str, str], config: RunConfig) -> list[str]:
    """Refuse other training data or another tokenizer than the checkpoint's; note other held-out data."""
    recorded = checkpoint.record.get("digests")
    if not recorded:
        return [f"{checkpoint.path.name} records no data digest (an older dpokit wrote it): the data is not checked"]
    for part, what in (("tokenizer", f"tokenizer of model.path={config.model.path}"), ("train_data", "training data")):
        if recorded.get(part) != digests.get(part):
            raise ResumeError(
                f"--resume: the {what} differs from what {checkpoint.path} was trained on "
                f"(data.train_path={config.data.train_path}); resume with the same files, or start a new run "
                "(another train.output_dir, or --overwrite)"
            )
    if recorded.get("eval_data") != digests.get("eval_data"):
        return ["the held-out data differs from the checkpoint's: eval metrics before and after do not compare"]
    return []


def choose(steps: Sequence[tuple[int, Path]], config: RunConfig, checkpoint_dir: Path) -> list[Checkpoint]:
    """The checkpoints to try, newest first, after checking the config against the newest; refuse if none."""
    good, bad = candidates(steps)
    for line in bad:
        print(f"[resume] skipping {checkpoint_dir / line}")
    if not good:
        why = f": {'; '.join(bad)}" if bad else " (train.save_every=0 saves one only when a run is stopped)"
        raise ResumeError(
            f"--resume: no usable checkpoint in {checkpoint_dir}{why}; start again with --overwrite, or in another "
            "train.output_dir"
        )
    for note in check_config(good[0], config):
        print(f"[resume] changed since {good[0].path.name}: {note}")
    return good


def restore(
    checkpoints: Sequence[Checkpoint],
    config: RunConfig,
    digests: dict[str, str],
    load: Callable[[Path], tuple[int, int]],
) -> tuple[int, int]:
    """Load the newest checkpoint that loads (its config and data checked); one that fails to load is named and the
    one before it tried. Returns the step to continue from and the count of skipped (non-finite) steps."""
    failures = []
    for checkpoint in checkpoints:
        check_config(checkpoint, config)
        for note in check_data(checkpoint, digests, config):
            print(f"[resume] {note}")
        try:
            step, skipped = load(checkpoint.path)
        except LOAD_ERRORS as e:
            line = f"{checkpoint.path}: {type(e).__name__}: {str(e)[:160].splitlines()[0] if str(e) else ''}"
            print(f"[resume] cannot load {line}; trying the one before")
            failures.append(line)
            continue
        print(f"[resume] from {checkpoint.path} at step {step}")
        return step, skipped
    raise ResumeError(f"--resume: no checkpoint loads ({'; '.join(failures)}); start again with --overwrite")
