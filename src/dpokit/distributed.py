"""Every torch.distributed call lives here. In a single process each helper is a no-op, so the training loop
reads the same with one GPU or many (torchrun + FSDP2 come later and plug in here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; unchanged in a single process."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of a step's examples (every `world_size`-th, starting at `rank`)."""
    return list(items[rank() :: world_size()])
