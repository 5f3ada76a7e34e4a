"""Is this local path a model? Checked before transformers reads it, so that a wrong or damaged model is one line
naming the file and what to do, never a traceback from deep inside a loader (nor a search of the Hub: transformers
treats a path it cannot use as a folder as a repository id).

A model is a folder written by `save_pretrained` (config.json, weights, tokenizer files), a folder holding a PEFT
adapter (adapter_config.json), or a `.gguf` file. config.json and the weights are checked only when weights are
loaded (`weights=True`): a tokenizer may come from a folder holding a tokenizer alone.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dpokit.errors import UserError

TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json"}
)
"""Any one of these makes a folder hold a tokenizer transformers can try."""
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class ModelError(UserError):
    """A model or tokenizer that cannot be used as given: a missing path, a tokenizer without an EOS token."""


def check_model_files(folder: str, gguf: str | None, given: str, weights: bool) -> None:
    """Refuse, naming the file, a local `model.path` that is not a model (see the module docstring)."""
    path = Path(folder)
    if gguf is not None:
        _check_gguf(path / gguf)
        return
    if path.is_file():
        raise ModelError(
            f"model path '{given}' is a file ({path.name}); give the folder that holds the model ({path.parent}), "
            "or a .gguf file"
        )
    names = {p.name for p in path.iterdir()}
    run = f" (a run folder: did you mean {given.rstrip('/')}/final?)" if (path / "final").is_dir() else ""
    if not names:
        raise ModelError(f"model folder '{given}' is empty; give a folder written by save_pretrained, or a .gguf file")
    if "adapter_config.json" in names:
        return  # a LoRA adapter: its base model is checked when it loads
    if weights and "config.json" not in names:
        raise ModelError(
            f"model folder '{given}' holds no config.json, so it is not a Hugging Face model folder (one written by "
            f"save_pretrained){run}; it holds {', '.join(sorted(names)[:5])}"
        )
    if "config.json" in names:
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{path / 'config.json'} is not valid JSON ({e}); copy the model again") from None
    if not weights and not names & TOKENIZER_FILES:
        raise ModelError(
            f"model folder '{given}' holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json){run}; save "
            "the tokenizer with the model (tokenizer.save_pretrained)"
        )
    if weights:
        _check_weights(path, given)


def _check_weights(path: Path, given: str) -> None:
    from safetensors import SafetensorError, safe_open

    files = [f for pattern in WEIGHT_PATTERNS for f in sorted(path.glob(pattern))]
    if not files and (path / "sharded" / ".metadata").is_file():
        return  # a training checkpoint: its weights are a torch.distributed.checkpoint folder (checkpoint.py)
    if not files:
        raise ModelError(
            f"model folder '{given}' holds no weights (model.safetensors or pytorch_model.bin); copy them into it, "
            "or give the folder that has them"
        )
    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), "pt"):  # reads the header, and checks that the file covers what it lists
                pass
        except (SafetensorError, OSError) as e:
            raise ModelError(
                f"{file} is damaged ({e}); it may be truncated: copy it again, or save the model again"
            ) from None


def _check_gguf(file: Path) -> None:
    if not file.is_file():
        raise ModelError(f"GGUF file {file} does not exist")
    with file.open("rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise ModelError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf model")


LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, struct.error)
"""What transformers' loaders raise for files they cannot use (damaged GGUF tensors, unknown model types, ...)."""


@contextmanager
def loading(given: str) -> Iterator[None]:
    """Turn a loader's complaint about the files into a one-line error naming the model."""
    try:
        yield
    except UserError:
        raise
    except LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"model '{given}' cannot be loaded ({type(e).__name__}: {first}); check that it is complete (copy it "
            "again) and is a causal language model"
        ) from e
