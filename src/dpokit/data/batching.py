"""From tokenized examples to the batches a step computes: which examples, in which order, in which layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dpokit.config import RunConfig
from dpokit.data.collate import Batch, collate
from dpokit.data.pack import PackedBatch, pack
from dpokit.data.tokenize import TokenizedExample

AnyBatch = Batch | PackedBatch
Collate = Callable[[Sequence[TokenizedExample], Sequence[int]], AnyBatch]
PACKED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
"""Model types that `train.layout=auto` packs: Llama-architecture decoders that honour a custom 4D attention mask and
have a plain linear LM head. The tests check the packed layout against the padded one on Llama (incl. SmolLM2) only."""
FLEX_BLOCK = 128
"""FlexAttention's block size: rows of the block-sparse layout are padded to a multiple of it."""


def step_examples(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a fresh seeded permutation each epoch, remainder dropped.
    The step number alone fixes the data position, which is what makes resuming exact."""
    steps_per_epoch = n // batch_size
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[offset * batch_size : (offset + 1) * batch_size]


def resolve_layout(config: RunConfig, model: Any) -> str:
    if config.train.layout != "auto":
        return config.train.layout
    if config.model.head == "score":  # the packed layout computes an LM head; a reward model scores one token
        return "padded"
    return "packed" if getattr(model.config, "model_type", None) in PACKED_MODEL_TYPES else "padded"


def collate_for(config: RunConfig, model: Any, pad_id: int) -> Collate:
    """How micro-batches are built: padded rows, or packed rows (dense mask); with FlexAttention, packed into as few
    rows as `train.pack_length` allows (one row when 0), since masked blocks cost nothing there."""
    layout, capacity = resolve_layout(config, model), config.train.pack_length
    if layout == "packed" and model.config._attn_implementation == "flex_attention":
        return lambda examples, indices: pack(examples, indices, pad_id, capacity or 2**62, FLEX_BLOCK)
    if layout == "packed":
        return lambda examples, indices: pack(examples, indices, pad_id, capacity)
    return lambda examples, indices: collate(examples, indices, pad_id)


def batches_in_order(examples: Sequence[TokenizedExample], size: int, make_batch: Collate) -> list[AnyBatch]:
    """Batches over the examples in data order (evaluation, precomputation)."""
    return [
        make_batch(examples[i : i + size], range(i, min(i + size, len(examples))))
        for i in range(0, len(examples), size)
    ]
