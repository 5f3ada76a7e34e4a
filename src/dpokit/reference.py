"""The reference model π_ref, handled every way users need, behind one function: (batch, split) -> (B, K) log-probs.

- copy:        a frozen copy of the initial policy (the default; π_ref = the model DPO starts from); under LoRA
               no copy: the policy itself with its adapters disabled
- path:        another checkpoint, loaded frozen
- precomputed: log-probs written by `dpokit precompute-ref`, checked against a content hash of
               (reference weights, tokenizer, tokenized data, tokenization settings)
- none:        reference-free, log π_ref = 0
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dpokit import distributed
from dpokit.compat import check_reference
from dpokit.config import ConfigError, RunConfig
from dpokit.data.collate import Batch
from dpokit.data.pack import PackedBatch
from dpokit.data.tokenize import TokenizedExample
from dpokit.errors import UserError
from dpokit.logprobs import LogpsModel
from dpokit.lora import adapter_off_reference, base_state_dict, is_peft
from dpokit.model import DTYPES, load_model

ReferenceFn = Callable[[Batch | PackedBatch, str], Tensor]


class ReferenceMismatch(UserError, ValueError):
    """The precomputed reference log-probs were made for other weights, tokenizer, data or settings."""


def weights_digest(model: torch.nn.Module) -> str:
    """Content hash of the weights; of the frozen base model's weights under LoRA (what π_ref is)."""
    h = hashlib.sha256()
    state = base_state_dict(model) if is_peft(model) else model.state_dict()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((text + str(tokenizer.chat_template)).encode()).hexdigest()


def examples_digest(examples: Sequence[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt_ids, e.completion_ids]).encode())
    return h.hexdigest()


def cache_parts(
    weights: str | None,
    tokenizer: str,
    train: Sequence[TokenizedExample],
    held_out: Sequence[TokenizedExample],
    config: RunConfig,
) -> dict[str, str]:
    """Content digests of everything the reference log-probs depend on (weights None: not known yet)."""
    settings = f"max_length={config.data.max_length},max_prompt_length={config.data.max_prompt_length}"
    parts = {
        "tokenizer": tokenizer,
        "train_data": examples_digest(train),
        "eval_data": examples_digest(held_out),
        "settings": hashlib.sha256(settings.encode()).hexdigest(),
    }
    if weights is not None:
        parts["weights"] = weights
    return parts


@torch.no_grad()
def score(model: LogpsModel, batches: Sequence[Batch | PackedBatch], device: torch.device, autocast: Any) -> Tensor:
    """(N, K) log-probs of every example, in data order. With several processes each scores every N-th batch (the
    very batches one process would score, so the values are the same) and every process gets the whole."""
    model.eval()
    mine: dict[int, Tensor] = {}
    for i, batch in distributed.shard_batches(batches):
        with autocast():
            # A process with no batch left joins the others' collectives with a forward it throws away.
            logps = model((batch if batch is not None else batches[0]).to(device)).logps
        if batch is not None:
            mine[i] = logps.float().cpu()
    scored = {i: t for part in distributed.gather(mine) for i, t in part.items()}
    return torch.cat([scored[i] for i in range(len(batches))]) if batches else torch.zeros(0, 2)


def save_cache(path: str | Path, parts: dict[str, str], logps: dict[str, Tensor], info: dict[str, str]) -> None:
    """Write the cache atomically (a kill leaves the previous file or none, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {f"digest/{k}": v for k, v in parts.items()} | info
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in logps.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def cache_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a reference cache; a file that is not a readable safetensors file is named as such."""
    if Path(path).is_dir():
        raise ReferenceMismatch(f"reference.cache={path} is a folder; give the file precompute-ref writes")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise ReferenceMismatch(
            f"reference.cache={path} is not a readable safetensors file ({e}); it may be truncated: make it again "
            "with `dpokit precompute-ref`"
        ) from None


def is_cache(path: str | Path) -> bool:
    """Whether `path` is a reference cache precompute-ref wrote (so that writing it again replaces nothing else)."""
    try:
        return any(k.startswith("digest/") for k in cache_metadata(path))
    except ReferenceMismatch:
        return False


PART_NAMES = {
    "weights": "reference weights",
    "tokenizer": "tokenizer",
    "train_data": "training data",
    "eval_data": "held-out data",
    "settings": "tokenization settings (data.max_length, data.max_prompt_length)",
}


def check_cache(path: str | Path, parts: dict[str, str]) -> None:
    """Compare a cache's digests with this run's; raise naming every part that differs."""
    if not Path(path).exists():
        raise ConfigError(f"reference.cache '{path}' does not exist; make it with `dpokit precompute-ref`")
    meta = cache_metadata(path)
    differ = [PART_NAMES[k] for k, v in parts.items() if meta.get(f"digest/{k}") != v]
    if differ:
        raise ReferenceMismatch(
            f"reference.cache '{path}' (made from {meta.get('model', '?')} on {meta.get('data', '?')}) does not "
            f"match this run: other {', '.join(differ)}. Run `dpokit precompute-ref` again with this config."
        )


def load_cache(path: str | Path, parts: dict[str, str]) -> dict[str, Tensor]:
    check_cache(path, parts)
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def make_reference(
    config: RunConfig, policy: torch.nn.Module, cache_parts_fn: Callable[[], dict[str, str]], device: torch.device
) -> tuple[ReferenceFn, LogpsModel | None]:
    """Return (batch, split) -> reference log-probs (B, K), and the reference model (frozen, not yet placed on a
    device: the caller puts it there, sharded or whole, with `distributed.place`) if one is held."""
    mode = config.reference.mode
    if mode == "none":
        return (lambda batch, split: torch.zeros(batch.num_examples, batch.num_completions, device=device)), None
    if mode == "precomputed":
        assert config.reference.cache is not None
        cached = load_cache(config.reference.cache, cache_parts_fn())
        return (lambda batch, split: cached[split][batch.indices].to(device)), None
    if mode == "copy" and is_peft(policy):
        return adapter_off_reference(policy, config.train.logits_chunk), None
    if mode == "copy":
        lm = copy.deepcopy(policy)
    else:
        assert config.reference.path is not None
        dtype = DTYPES[config.model.dtype]
        lm = load_model(config.reference.path, None, config.model.attn_implementation, dtype)
        check_reference(config, policy, lm)
    reference = LogpsModel(lm, config.train.logits_chunk).eval().requires_grad_(False)

    @torch.no_grad()
    def reference_logps(batch: Batch | PackedBatch, split: str) -> Tensor:
        return reference(batch).logps

    return reference_logps, reference
