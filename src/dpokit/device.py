"""Where a run computes, in what precision, and from which seeds: the first thing `train` and `precompute-ref` do."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dpokit import distributed
from dpokit.config import ConfigError
from dpokit.errors import UserError


def pick_device(name: str) -> torch.device:
    """`train.device` as a torch device; one this machine does not have is refused before anything loads. `auto`:
    CUDA when there is a GPU, else CPU. Under torchrun each process takes the GPU of its local rank (`cuda` means that
    one; a fixed `cuda:N` would put every process on one GPU and is refused)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={name}, but CUDA is not available here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}); use train.device=cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name}, but Apple's MPS is not available here; use train.device=cpu or auto")
    if device.type != "cuda" or not distributed.launched():
        return device
    if device.index is not None and distributed.launched_world_size() > 1:
        raise ConfigError(
            f"train.device={name} would put every process on one GPU; use train.device=cuda (or auto): each "
            "process then takes the GPU of its local rank"
        )
    return torch.device("cuda", distributed.local_rank())


FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
"""Attention kernels that need a package of their own (and CUDA)."""


def check_attention(name: str, device: torch.device, backward: bool) -> None:
    """Refuse an attention kernel this machine cannot run, before any weights load: a FlashAttention kernel without
    its package or off CUDA, FlexAttention's backward on CPU."""
    package = FLASH_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"model.attn_implementation={name} needs the `{package}` package, which is not installed; install it "
            "(CUDA only) or use sdpa"
        )
    if package is not None and device.type != "cuda":
        raise ConfigError(f"model.attn_implementation={name} runs on CUDA only, and this run's device is {device}")
    if backward and name == "flex_attention" and device.type == "cpu":
        raise ConfigError(
            "model.attn_implementation=flex_attention trains on GPUs only: PyTorch has no FlexAttention backward on "
            "CPU. Use sdpa on CPU (precompute-ref, which runs no backward, accepts flex_attention anywhere)."
        )


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether `train.precision` computes in bf16 on this device (auto: on CUDA)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ConfigError(
            f"train.precision=bf16 needs a CUDA device, and this run's device is {device}: on CPU dpokit trains in "
            "fp32 (set train.precision=fp32 or auto)"
        )
    return use_bf16


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """bf16 autocast on CUDA (weights stay fp32); plain fp32 elsewhere. Returns a context-manager factory."""
    if uses_bf16(precision, device):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


class OutOfResources(UserError):
    """The machine ran out of memory or disk space during a run: a setting or the machine must change."""


@contextlib.contextmanager
def out_of_resources(micro_batch_size: int) -> Iterator[None]:
    """Turn running out of accelerator memory or disk space into one line that says what to change."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfResources(
            f"out of accelerator memory ({str(e).splitlines()[0][:200]}): lower train.micro_batch_size (now "
            f"{micro_batch_size}; train.batch_size and the result stay the same), or set "
            "train.activation_checkpointing=true or model.dtype=bf16"
        ) from e
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutOfResources(
            f"no space left on the device writing {e.filename or 'the output'}: free some space, then continue with "
            "--resume (a checkpoint is renamed into place only once complete, so the last one is intact)"
        ) from e


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    # Set every run, both ways: the flag is process-wide and must not leak from one run into the next.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
