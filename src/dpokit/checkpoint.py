"""Checkpoints and the final model.

A resumable checkpoint `checkpoints/step-N/` holds
    sharded/             model and optimizer state, a torch.distributed.checkpoint (DCP) folder: every process
                         writes its own shards, keyed by parameter name, so N processes' checkpoint resumes on M
    trainer_state.pt     step, skipped updates, scheduler and RNG state (process 0's)
    config.json, tokenizer files, dpokit_config.yaml
                         what `dpokit export` needs to turn the checkpoint into a Hugging Face folder
    dpokit_checkpoint.json   the record `--resume` checks (resume.py), written last
Under LoRA (one process) the model part is the adapter in PEFT's format (adapter_config.json,
adapter_model.safetensors), which `PeftModel.from_pretrained(base, folder)` loads, and the optimizer state is in
trainer_state.pt. A checkpoint is written into `step-N.tmp` and renamed once every process has finished, so a folder
named `step-N` is always complete (a kill during a save leaves the `.tmp`, which nothing reads).

The final model (`final/`) is one Hugging Face folder (safetensors, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads, written by process 0 from the gathered weights.
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
from dpokit.logprobs import LogpsModel
from dpokit.lora import is_peft, load_adapter_weights
from dpokit.resume import seal

STATE_FILE = "trainer_state.pt"
SHARDED = "sharded"
CONFIG_FILE = "dpokit_config.yaml"
STEP_NAME = re.compile(r"step-(\d+)")
"""A checkpoint folder's name; anything else in checkpoints/ (`step-2.bak`, `step-4.tmp`) is not a checkpoint."""


class CheckpointMismatch(UserError):
    """The checkpoint --resume found was written for another model."""


def is_sharded_checkpoint(folder: str | Path) -> bool:
    """A checkpoint whose weights are a DCP folder (`sharded/`), not a Hugging Face folder."""
    return (Path(folder) / SHARDED).is_dir()


def save_model(model: LogpsModel, tokenizer: Any, out: Path, config: RunConfig) -> None:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads (under LoRA: the adapter), atomically. Every
    process takes part (the weights are gathered from their shards); process 0 writes."""
    weights = {} if is_peft(model.lm) else distributed.full_state_dict(model)
    tmp = out.with_name(out.name + ".tmp")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        if is_peft(model.lm):
            model.lm.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            save_config(config, tmp / CONFIG_FILE)
        else:
            _write_hf_folder(model.lm, weights, tokenizer, tmp, config)
    distributed.commit(tmp, out)


def _write_hf_folder(lm: Any, weights: dict[str, torch.Tensor], tokenizer: Any, out: Path, config: Any) -> None:
    # A tied weight (the LM head = the embedding) is written once, under its first name, however it was gathered.
    first: dict[int, str] = {}
    for name, param in lm.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    tied = {name for name, param in lm.named_parameters(remove_duplicate=False) if first[id(param)] != name}
    state_dict = {n: t for name, t in weights.items() if (n := name.removeprefix("lm.")) not in tied}
    lm.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if isinstance(config, RunConfig):
        save_config(config, out / CONFIG_FILE)
    else:
        shutil.copyfile(config, out / CONFIG_FILE)


def save_checkpoint(
    out: Path,
    model: LogpsModel,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    step: int,
    config: RunConfig,
    skipped_steps: int = 0,
    digests: dict[str, str] | None = None,
) -> None:
    """A resumable checkpoint at `out` (e.g. runs/x/checkpoints/step-100); every process takes part. `digests` of
    the run's data go into its record (see resume.py)."""
    tmp = out.with_name(out.name + ".tmp")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    adapter = is_peft(model.lm)
    if not adapter:
        distributed.save_sharded(tmp / SHARDED, model, optimizer)
    if distributed.is_main():
        if adapter:
            model.lm.save_pretrained(tmp, safe_serialization=True)
        else:
            model.lm.config.save_pretrained(tmp)
            if getattr(model.lm, "generation_config", None) is not None:
                model.lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_config(config, tmp / CONFIG_FILE)
        state = {
            "step": step,
            "skipped_steps": skipped_steps,
            "world_size": distributed.world_size(),
            "scheduler": scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
        }
        if adapter:
            state["optimizer"] = optimizer.state_dict()
        torch.save(state, tmp / STATE_FILE)
        seal(tmp, step, config, digests or {})
    distributed.commit(tmp, out)  # replaces a damaged checkpoint a resume went back past


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
    """A checkpoint from before sharded checkpoints: the weights as a Hugging Face folder."""
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


def load_training_state(path: Path, model: LogpsModel, optimizer: Any, scheduler: Any) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint, however many processes wrote it; return the
    step to continue from and the number of updates skipped so far (non-finite steps)."""
    state = torch.load(path / STATE_FILE, weights_only=False)  # read before the model changes: a damaged file
    if is_sharded_checkpoint(path):  # leaves it as it was, for the checkpoint before (resume.py)
        distributed.load_sharded(path / SHARDED, model, optimizer)
    else:
        if is_peft(model.lm):  # an adapter checkpoint (PEFT's format): the frozen weights are the model's
            load_adapter_weights(model.lm, path)
        else:
            _load_full_weights(path, model.lm)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), int(state.get("skipped_steps", 0))


def assemble(checkpoint: Path, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None) -> Any:
    """The model of a sharded checkpoint, whole, in this process's CPU memory (its class from the checkpoint's
    config.json: a causal LM, or a sequence-classification reward model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    from dpokit.config import load_config
    from dpokit.model import DTYPES

    if dtype is None:
        dtype = DTYPES[load_config(checkpoint / CONFIG_FILE).model.dtype]
    config = AutoConfig.from_pretrained(checkpoint)
    reward = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    lm = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if (checkpoint / "generation_config.json").exists():  # from_config would derive one from config.json instead
        lm.generation_config = GenerationConfig.from_pretrained(checkpoint)
    distributed.load_sharded(checkpoint / SHARDED, LogpsModel(lm), None)
    return lm


def write_hf_folder(checkpoint: Path, out: Path) -> None:
    """A sharded checkpoint's model as a Hugging Face folder at `out` (safetensors, config, tokenizer)."""
    from transformers import AutoTokenizer

    lm = assemble(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    _write_hf_folder(lm, distributed.full_state_dict(LogpsModel(lm)), tokenizer, out, checkpoint / CONFIG_FILE)
