"""The one place that turns model outputs into per-sequence completion log-probs.

log π(y|x) = Σ_t log softmax(logits_{t-1})[y_t] over completion tokens t (prompt tokens are not scored),
computed in fp32 whatever the model's dtype. Chosen and rejected (all K completions) go through one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor

from dpokit.config import ConfigError
from dpokit.data.collate import Batch
from dpokit.data.pack import PackedBatch


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


def _chunk_logps(hidden: Tensor, head: torch.nn.Module, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()  # (n, V), one chunk at a time
    logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, torch.log1p(-logp.exp().clamp(max=1.0 - 1e-6))


def chunked_token_logps(hidden: Tensor, head: torch.nn.Module, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """log π(target) and log(1 − π(target)) for hidden states (N, H) through the LM head (H -> V), `chunk`
    rows at a time. The head module itself is called (not its weight read), so LoRA adapters on it apply. Each
    chunk is checkpointed, so its (chunk, V) logits are recomputed in backward instead of kept:
    the full (N, V) logits never exist, in forward or backward."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    parts = [
        torch.utils.checkpoint.checkpoint(
            _chunk_logps, hidden[i : i + chunk], head, targets[i : i + chunk], use_reentrant=False
        )
        if torch.is_grad_enabled()
        else _chunk_logps(hidden[i : i + chunk], head, targets[i : i + chunk])
        for i in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _plain_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head, when logits are exactly head(hidden) = hidden @ weight.T (Llama, Mistral, Qwen, SmolLM, ...),
    a LoRA-wrapped head included."""
    config = model.config  # type: ignore[union-attr]
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ConfigError(f"{type(model).__name__} transforms its logits ({name}); use train.layout=padded")
    head = model.get_output_embeddings()  # type: ignore[operator]
    linear = getattr(head, "original_module", head)  # a peft modules_to_save wrapper holds a copy of the head
    linear = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear  # a LoRA layer, its Linear
    if not isinstance(linear, torch.nn.Linear) or linear.bias is not None:
        raise ConfigError(f"{type(model).__name__} has no plain linear LM head; use train.layout=padded")
    return head  # type: ignore[no-any-return]


def packed_sequence_logps(model: torch.nn.Module, batch: PackedBatch, chunk: int = 1024) -> SequenceLogps:
    """The same three (B, K) sums as `sequence_logps`, from the packed prefix-shared layout, computing the LM head
    only at completion positions and in chunks."""
    decoder = model.get_decoder()  # type: ignore[operator]
    flex = model.config._attn_implementation == "flex_attention"  # type: ignore[union-attr]
    mask = batch.block_mask() if flex else batch.dense_mask()
    hidden = decoder(
        input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state  # (R, T, H)
    scored = hidden.reshape(-1, hidden.shape[-1])[batch.predictor]  # (N, H)
    per_token, log1m = chunked_token_logps(scored, _plain_head(model), batch.targets, chunk)
    size = batch.num_examples * batch.num_completions
    zeros = per_token.new_zeros(size)
    logps = zeros.index_add(0, batch.segment, per_token)
    lengths = zeros.index_add(0, batch.segment, torch.ones_like(per_token))
    log1m_sums = zeros.index_add(0, batch.segment, log1m)
    shape = (batch.num_examples, batch.num_completions)
    return SequenceLogps(logps.view(shape), lengths.view(shape), log1m_sums.view(shape))


def batch_logps(model: torch.nn.Module, batch: Batch | PackedBatch, chunk: int = 1024) -> SequenceLogps:
    """Dispatch on the batch layout: padded (`collate`) or packed prefix-shared (`pack`)."""
    if isinstance(batch, PackedBatch):
        return packed_sequence_logps(model, batch, chunk)
    return sequence_logps(model, batch)


class LogpsModel(torch.nn.Module):
    """A causal LM as one module whose forward is batch -> SequenceLogps, in either layout.

    Every forward of the policy and the reference goes through this module's `__call__`. That is what a wrapper
    such as FSDP2 needs: this module is its root, so its pre-forward gathers the parameters no decoder layer owns
    (embedding, final norm, LM head) before the packed path runs the decoder and reads the head's weight, and its
    post-forward / post-backward hooks free and reduce them. Called from outside, the head's weight is a shard.
    """

    lm: Any
    """The Hugging Face causal LM (its state-dict keys are this module's, less the `lm.` prefix)."""

    def __init__(self, lm: torch.nn.Module, chunk: int = 1024, logps_of: Callable[..., SequenceLogps] | None = None):
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        """Completion tokens per LM-head chunk in the packed layout."""
        self.logps_of = logps_of
        """(lm, batch, chunk) -> SequenceLogps; None: `batch_logps` (a reward model passes its scores function)."""

    def forward(self, batch: Batch | PackedBatch) -> SequenceLogps:
        out = (self.logps_of or batch_logps)(self.lm, batch, self.chunk)
        # Fresh tensors, not views: FSDP hooks the outputs for backward, and an in-place op on a view would lose it.
        return SequenceLogps(*(t.clone() for t in out))
