"""Checkpoints: the model in Hugging Face format (safetensors) plus optimizer, scheduler, RNG and data position.
Under LoRA the model part is the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), which
`PeftModel.from_pretrained(base, folder)` loads.

A checkpoint is written to `<name>.tmp` and renamed into place, so a folder named `step-N` is always complete;
`--resume` takes the newest one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dpokit import distributed
from dpokit.config import RunConfig, save_config
from dpokit.errors import UserError
from dpokit.lora import is_peft, load_adapter_weights
from dpokit.resume import seal

STATE_FILE = "trainer_state.pt"
STEP_NAME = re.compile(r"step-(\d+)")
"""A checkpoint folder's name; anything else in checkpoints/ (`step-2.bak`, `step-4.tmp`) is not a checkpoint."""


class CheckpointMismatch(UserError):
    """The checkpoint --resume found was written for another model."""


def _write_model(model: Any, tokenizer: Any, out: Path, config: RunConfig) -> Path:
    """Model, tokenizer and config into `<out>.tmp`; the caller renames it into place once complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_config(config, tmp / "dpokit_config.yaml")
    return tmp


def save_model(model: Any, tokenizer: Any, out: Path, config: RunConfig) -> None:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads, atomically."""
    if not distributed.is_main():
        return
    tmp = _write_model(model, tokenizer, out, config)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def save_checkpoint(
    out: Path,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    step: int,
    config: RunConfig,
    skipped_steps: int = 0,
    digests: dict[str, str] | None = None,
) -> None:
    """A resumable checkpoint at `out` (e.g. runs/x/checkpoints/step-100); `digests` of the run's data go into its
    record (see resume.py)."""
    if not distributed.is_main():
        return
    tmp = _write_model(model, tokenizer, out, config)
    state = {
        "step": step,
        "skipped_steps": skipped_steps,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
        },
    }
    torch.save(state, tmp / STATE_FILE)
    seal(tmp, step, config, digests or {})
    if out.exists():  # a damaged checkpoint a resume went back past
        shutil.rmtree(out)
    tmp.rename(out)


def step_folders(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named like a checkpoint."""
    if not checkpoint_dir.is_dir():
        return []
    return [(int(m[1]), p) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := STEP_NAME.fullmatch(p.name))]


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = [(step, p) for step, p in step_folders(checkpoint_dir) if (p / STATE_FILE).exists()]
    return max(done)[1] if done else None


def _load_full_weights(path: Path, model: Any) -> None:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied embeddings are saved once; anything else missing means a wrong checkpoint.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointMismatch(
            f"checkpoint {path} does not match model.path's model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}): resume with the model this run started from, or use another train.output_dir"
        )


def load_training_state(path: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return the step to continue from and the
    number of updates skipped so far (non-finite steps)."""
    state = torch.load(path / STATE_FILE, weights_only=False)  # read before the model changes: a damaged file
    if is_peft(model):  # leaves it as it was, for the checkpoint before (resume.py)
        load_adapter_weights(model, path)  # an adapter checkpoint (PEFT's format): the frozen weights are the model's
    else:
        _load_full_weights(path, model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), int(state.get("skipped_steps", 0))
