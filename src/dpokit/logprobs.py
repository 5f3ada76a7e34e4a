"""The one place that turns model outputs into per-sequence completion log-probs.

log π(y|x) = Σ_t log softmax(logits_{t-1})[y_t] over completion tokens t (prompt tokens are not scored),
computed in fp32 whatever the model's dtype. Chosen and rejected (all K completions) go through one forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dpokit.data.collate import Batch


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[targets] in fp32, without materialising the full log-softmax. (N, T, V), (N, T) -> (N, T)."""
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class SequenceLogps(NamedTuple):
    logps: Tensor
    """(B, K) Σ_t log π(y_t | x, y_<t) over completion tokens."""
    lengths: Tensor
    """(B, K) completion tokens."""
    log1m: Tensor
    """(B, K) Σ_t log(1 − π(y_t | x, y_<t)), the unlikelihood term (Welleck et al. 2019)."""


def sequence_logps(model: torch.nn.Module, batch: Batch) -> SequenceLogps:
    """Summed completion log-probs, lengths and unlikelihood sums, all (B, K), from one forward over all B·K rows."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits  # (B·K, T, V)
    per_token = token_logps(logits[:, :-1], batch.input_ids[:, 1:])  # (B·K, T-1)
    mask = batch.completion_mask[:, 1:].to(per_token.dtype)
    # log(1 − p) from log p; p is clamped below 1 so a certain token gives a large finite penalty, not −inf.
    log1m = torch.log1p(-per_token.exp().clamp(max=1.0 - 1e-6))
    shape = (batch.num_examples, batch.num_completions)
    return SequenceLogps(
        (per_token * mask).sum(dim=1).view(shape), mask.sum(dim=1).view(shape), (log1m * mask).sum(dim=1).view(shape)
    )
