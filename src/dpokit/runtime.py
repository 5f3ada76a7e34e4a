"""What every command does before its real work: device, precision, seeds, tokenizer, data, batches."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dpokit.config import RunConfig
from dpokit.data.collate import Batch, collate
from dpokit.data.formats import Use
from dpokit.data.pack import PackedBatch, pack
from dpokit.data.prepare import PreparedData, prepare_data
from dpokit.data.tokenize import TokenizedExample
from dpokit.losses import LOSSES
from dpokit.model import load_tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """bf16 autocast on CUDA (weights stay fp32); plain fp32 elsewhere. Returns a context-manager factory."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ValueError("train.precision=bf16 needs a CUDA device; on CPU dpokit trains in fp32")
    if use_bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    # Set every run, both ways: the flag is process-wide and must not leak from one run into the next.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (dynamic shapes: packed rows change size every step). The layers
    share their code, so one compilation serves them all; a decoder without a `layers` list is compiled whole."""
    decoder = model.get_decoder()  # type: ignore[operator]
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        for layer in layers:
            layer.compile(dynamic=True)
    else:
        decoder.compile(dynamic=True)


def compiler_memory_budget(budget: float) -> contextlib.AbstractContextManager[None]:
    """While compiling, keep only `budget` of the default saved activations (AOTAutograd's memory-budget
    partitioner recomputes the cheapest operations in backward); 1.0 leaves the compiler's default."""
    if budget >= 1.0:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=budget)  # type: ignore[no-any-return]


class SavedActivations:
    """While active, counts the bytes autograd keeps for backward (each storage once, the model's parameters left
    out): how much memory a forward's activations hold until backward, on any device."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._keep, lambda t: t)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self._storages.clear()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())


def data_use(config: RunConfig) -> Use:
    return LOSSES[config.loss.name].data


def load_tokenizer_and_data(config: RunConfig) -> tuple[Any, PreparedData]:
    tokenizer = load_tokenizer(config.model.path, config.model.gguf_file)
    return tokenizer, prepare_data(config.data, tokenizer, data_use(config))


AnyBatch = Batch | PackedBatch
Collate = Callable[[Sequence[TokenizedExample], Sequence[int]], AnyBatch]
PACKED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
"""Model types that `train.layout=auto` packs: Llama-architecture decoders that honour a custom 4D attention mask and
have a plain linear LM head. The tests check the packed layout against the padded one on Llama (incl. SmolLM2) only."""


def resolve_layout(config: RunConfig, model: Any) -> str:
    if config.train.layout != "auto":
        return config.train.layout
    return "packed" if getattr(model.config, "model_type", None) in PACKED_MODEL_TYPES else "padded"


FLEX_BLOCK = 128
"""FlexAttention's block size: rows of the block-sparse layout are padded to a multiple of it."""


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
