"""`dpokit precompute-ref`: reference log-probs for every train and held-out example, computed once and reused.

Under torchrun every process scores its share of the batches (the model sharded with FSDP2) and process 0 writes the
cache: the same file, values and content digests, as one process writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpokit import distributed
from dpokit.compat import check_policy, check_reference_tokenizer
from dpokit.config import ConfigError, RunConfig
from dpokit.data.batching import batches_in_order, collate_for
from dpokit.data.prepare import prepare_data
from dpokit.device import autocast_for, check_attention, pick_device, uses_bf16
from dpokit.logprobs import LogpsModel
from dpokit.losses import LOSSES
from dpokit.model import DTYPES, load_model, load_tokenizer
from dpokit.reference import cache_parts, is_cache, save_cache, score, tokenizer_digest, weights_digest
from dpokit.runfolder import check_creatable


def precompute_reference(config: RunConfig) -> Path:
    if not config.reference.cache:
        raise ConfigError("precompute-ref writes to reference.cache: set it, e.g. reference.cache=runs/ref.safetensors")
    cache = Path(config.reference.cache)
    if cache.is_dir() or (cache.exists() and not is_cache(cache)):
        raise ConfigError(
            f"reference.cache={cache} exists and is not a reference cache dpokit wrote; precompute-ref replaces only "
            "its own caches: choose another path"
        )
    check_creatable(cache, f"reference.cache={cache}")
    device = pick_device(config.train.device)
    check_attention(config.model.attn_implementation, device, backward=False)
    fsdp = distributed.use_fsdp(config.distributed, device)
    with distributed.process_group(device, config.distributed.timeout_s, single=fsdp):
        _precompute(config, cache, device)
    return Path(config.reference.cache)


def _precompute(config: RunConfig, cache: Path, device: torch.device) -> None:
    autocast = autocast_for(config.train.precision, device)

    def load() -> tuple:
        tokenizer = load_tokenizer(config.model.path, config.model.gguf_file, config.model.revision)
        data = prepare_data(config.data, tokenizer, LOSSES[config.loss.name].data)
        path = config.reference.path or config.model.path
        gguf, revision = (None, None) if config.reference.path else (config.model.gguf_file, config.model.revision)
        check_reference_tokenizer(config, tokenizer_digest(tokenizer))
        lm = load_model(path, gguf, config.model.attn_implementation, DTYPES[config.model.dtype], revision)
        check_policy(config, tokenizer, lm, path)
        return tokenizer, data, lm

    # Bad paths and bad data stop every process, each saying why (see distributed.agree).
    tokenizer, data, lm = distributed.agree(load)
    parts = cache_parts(weights_digest(lm), tokenizer_digest(tokenizer), data.train, data.eval, config)
    model = LogpsModel(lm, config.train.logits_chunk)
    distributed.place(model, device, config.distributed, frozen=True, bf16=uses_bf16(config.train.precision, device))
    size = config.train.micro_batch_size
    make_batch = collate_for(config, lm, tokenizer.pad_token_id)
    logps = {
        "train": score(model, batches_in_order(data.train, size, make_batch), device, autocast),
        "eval": score(model, batches_in_order(data.eval, size, make_batch), device, autocast),
    }
    if distributed.is_main():
        path = config.reference.path or config.model.path
        save_cache(cache, parts, logps, {"model": path, "data": config.data.train_path})
    distributed.barrier()
