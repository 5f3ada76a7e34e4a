"""`dpokit export RUN OUT [--merge]`: a run's model as a folder that other tools load.

RUN is a run folder (its `final/` is exported) or one checkpoint folder. Full weights are written as a Hugging Face
folder: copied from `final/`, or assembled from a checkpoint's shards (torch.distributed.checkpoint, written by any
number of processes). A LoRA run holds an adapter (PEFT's format): without --merge OUT gets the adapter (loads with
`PeftModel.from_pretrained(base, OUT)`); with --merge OUT gets the base model with the adapter merged into its
weights, a plain Hugging Face folder (`AutoModelForCausalLM.from_pretrained(OUT)`, no peft needed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dpokit.checkpoint import is_sharded_checkpoint, write_hf_folder
from dpokit.config import load_config
from dpokit.errors import UserError
from dpokit.model import DTYPES, is_adapter_folder, load_tokenizer
from dpokit.runfolder import check_new_folder

RUN_FILES_LEFT_OUT = ("trainer_state.pt",)
"""What a checkpoint holds for --resume only."""


def model_folder(run: Path) -> Path:
    """The folder holding the model: RUN/final for a run folder, else RUN itself (a checkpoint or final folder)."""
    folder = run / "final" if (run / "final").is_dir() else run
    if not (folder / "config.json").is_file() and not is_adapter_folder(folder):
        raise UserError(
            f"{run} holds no model: expected a run folder with final/, or a checkpoint folder with config.json "
            "(full weights) or adapter_config.json (LoRA)"
        )
    return folder


def export(run: str | Path, out: str | Path, merge: bool = False) -> Path:
    run, out = Path(run), Path(out)
    check_new_folder(str(out), "export OUT")
    folder = model_folder(run)
    adapter = is_adapter_folder(folder)
    if merge and not adapter:
        raise UserError(f"export --merge: {folder} holds full weights, not a LoRA adapter; nothing to merge")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge:
        from dpokit.lora import load_merged

        saved = folder / "dpokit_config.yaml"
        model_config = load_config(saved).model if saved.exists() else None
        attn = model_config.attn_implementation if model_config else "sdpa"
        dtype = DTYPES[model_config.dtype if model_config else "fp32"]
        load_merged(str(folder), attn, dtype).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(str(folder)).save_pretrained(tmp)
        if saved.exists():
            shutil.copy2(saved, tmp / saved.name)
    elif is_sharded_checkpoint(folder):  # sharded weights (DCP): assembled, written as one Hugging Face folder
        write_hf_folder(folder, tmp)
    else:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(*RUN_FILES_LEFT_OUT))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
