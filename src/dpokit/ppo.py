"""PPO's arithmetic for RLHF, as Ziegler et al. 2019 (arXiv 1909.08593v2) and Stiennon et al. 2020 (arXiv
2009.01325v3) use it: per-token KL-penalised rewards, GAE, whitening, the clipped policy and value losses, and the
adaptive KL controller. Pure functions of tensors; the loop that drives them is `dpokit.ppo_train`.

Shapes: N episodes (prompt + sampled completion), L completion tokens, right-padded; `mask` (N, L) is 1 on real
completion tokens. Position t of every (N, L) tensor refers to completion token t: its log-prob under the policy
that sampled it, and the value of the state just before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """The population variance (divided by the count, as `tf.nn.moments` in Ziegler et al.'s code) over `mask`."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the masked entries; with `shift_mean=False` the mean is added back, so only
    the scale changes (how Ziegler et al. whiten rewards: a constant reward offset still reaches the value function).
    Masked-out entries come back as 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Ziegler et al. Eq. 2 spread over tokens: r_t = −β·(log π(y_t) − log π_ref(y_t)) at every completion token, plus
    the sequence's score at its last token. (N,), (N, L), (N, L), (N, L) -> rewards (N, L), per-token KL (N, L).
    Summed over t, the rewards are score − β·log π(y|x)/π_ref(y|x), the KL-regularised objective of one sample."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (N,) index of each completion's last token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438v6, Eq. 16):
    δ_t = r_t + γ·V_{t+1} − V_t, A_t = Σ_k (γλ)^k δ_{t+k}, the episode ending after its last real token (V = 0
    beyond it). Returns advantages and returns A_t + V_t, both (N, L), 0 where `mask` is 0."""
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347v2, Eq. 7), negated for minimisation and
    averaged over tokens: mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε)), ρ_t = exp(log π(y_t) − log π_old(y_t)).
    Returns the loss and the fraction of tokens where the clipped term was the larger (clipfrac)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).to(logps.dtype), mask)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    """The clipped value loss of Ziegler et al.'s code: ½·mean_t max((V_t − R_t)², (clip(V_t, V_old ± ε) − R_t)²).
    Returns the loss and the fraction of tokens where the clipped term was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).to(values.dtype), mask)


@dataclass
class KLController:
    """The KL coefficient β. With a `target`, Ziegler et al.'s adaptive controller (Sec. 2.2): after each batch,
    e = clip(KL / KL_target − 1, −0.2, 0.2) and β ← β·(1 + K_β·e), with K_β = episodes in the batch / `horizon`
    (their code's form of the paper's K_β = 0.1). Without a target, β stays fixed."""

    value: float
    target: float | None = None
    horizon: float = 10_000.0
    """Episodes over which β can change by a factor of about e^0.2 (Ziegler et al.: 10,000)."""

    def update(self, kl: float, episodes: int) -> float:
        """`kl`: the batch's mean sequence KL(π ‖ π_ref) (nats); returns the new β."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * episodes / self.horizon
        return self.value
