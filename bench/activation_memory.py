"""The activation-memory probe of the benchmarks: the bytes autograd keeps for backward.

`project_llama1b.py` projects peak memory from it, and `tests/test_train.py` checks `train.compile_memory_budget`
with it (importing it as `bench.activation_memory`); the library itself never needs it.
"""

from __future__ import annotations

import torch


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
