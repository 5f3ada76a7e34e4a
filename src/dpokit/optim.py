"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch

from dpokit.config import RunConfig


def make_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = config.train
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.lr, weight_decay=t.weight_decay)
    # The fused kernel (one launch for every parameter) where there is one: CUDA.
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=params[0].is_cuda or None)


def make_scheduler(
    config: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over train.warmup_steps, then constant, linear or cosine decay to 0 at total_steps."""
    warmup, schedule = config.train.warmup_steps, config.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
