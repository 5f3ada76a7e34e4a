"""The models a run trains with: the policy (LoRA adapters, activation checkpointing, compiled layers, FSDP2
placement) and its reference, a function from a batch to log-probs (reference.py's modes)."""

from __future__ import annotations

from typing import Any

import torch

from dpokit import distributed
from dpokit.compat import check_policy, check_reference_tokenizer
from dpokit.config import ConfigError, RunConfig
from dpokit.data.prepare import PreparedData
from dpokit.device import uses_bf16
from dpokit.logprobs import LogpsModel
from dpokit.lora import apply_lora
from dpokit.model import DTYPES, compile_layers, load_model
from dpokit.reference import ReferenceFn, cache_parts, check_cache, make_reference, tokenizer_digest, weights_digest
from dpokit.rm import load_reward_model, reward_logps


def load_models(
    config: RunConfig, device: torch.device, tokenizer: Any, data: PreparedData
) -> tuple[LogpsModel, ReferenceFn]:
    """The policy on `device` (sharded with FSDP2 when the run uses it), and the reference as a function
    (batch, split) -> log-probs. A precomputed reference cache is checked against the tokenizer and data before any
    weights load; the weights digest is added after."""
    data_parts: dict[str, str] = {}
    if config.reference.mode == "precomputed":
        data_parts = cache_parts(None, tokenizer_digest(tokenizer), data.train, data.eval, config)
        check_cache(str(config.reference.cache), data_parts)
    if config.reference.mode == "path":
        check_reference_tokenizer(config, tokenizer_digest(tokenizer))
    dtype = DTYPES[config.model.dtype]
    m = config.model
    if m.lora is not None and distributed.use_fsdp(config.distributed, device):
        raise ConfigError(
            "model.lora trains in one process for now: FSDP (several processes, or distributed.fsdp=on) does not "
            "shard adapters yet; launch one process, or train all weights"
        )
    if m.head == "score":
        lm = load_reward_model(m.path, m.dtype, m.attn_implementation)[0]
    else:
        lm = load_model(m.path, m.gguf_file, m.attn_implementation, dtype, m.revision)
    check_policy(config, tokenizer, lm, m.path)
    # Every training forward passes use_cache=False itself; the config keeps its value, so that the saved model
    # (and a checkpoint assembled from its config) generates with the KV cache.
    if m.lora is not None:  # adapters on the frozen model; π_ref (mode copy) is the same model with them disabled
        lm = apply_lora(lm, m.lora, m.path, m.revision)

    def reference_parts() -> dict[str, str]:
        # The weights digest of the model precompute-ref scored with: the initial policy, or reference.path.
        reference = lm if config.reference.path is None else load_model(config.reference.path, dtype=dtype)
        return data_parts | {"weights": weights_digest(reference)}

    reference_logps, reference = make_reference(config, lm, reference_parts, device)
    if config.train.activation_checkpointing:  # after the reference copy, which never runs backward
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.train.compile:  # before sharding, as torchtune does (compiling FSDP2-wrapped layers aborted here)
        compile_layers(lm)
        if reference is not None:
            compile_layers(reference.lm)
    # Sharded (or moved) last, from the whole weights each process loaded on the CPU.
    bf16 = uses_bf16(config.train.precision, device)
    if reference is not None:
        distributed.place(reference, device, config.distributed, frozen=True, bf16=bf16)
    # A reward model's scalar rewards stand where a policy's log-probs go (loss bradley_terry).
    policy = LogpsModel(lm, config.train.logits_chunk, reward_logps if m.head == "score" else None)
    distributed.place(policy, device, config.distributed, frozen=False, bf16=bf16)
    return policy, reference_logps
