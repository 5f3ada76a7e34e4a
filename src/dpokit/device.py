"""Where a run computes, in what precision, and from which seeds: the first thing `train` and `precompute-ref` do."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from typing import Any

import torch

from dpokit.config import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """bf16 autocast on CUDA (weights stay fp32); plain fp32 elsewhere. Returns a context-manager factory."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ConfigError(
            f"train.precision=bf16 needs a CUDA device, and this run's device is {device}: on CPU dpokit trains in "
            "fp32 (set train.precision=fp32 or auto)"
        )
    if use_bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    # Set every run, both ways: the flag is process-wide and must not leak from one run into the next.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
