"""Preference losses as pure functions of per-sequence log-prob tensors.

Notation: for a prompt x with K ranked completions y_1 ≻ … ≻ y_K (K = 2: chosen ≻ rejected), `policy_logps` and
`reference_logps` hold log π(y_k|x), the sum of the completion's token log-probs. The implicit reward of the DPO
paper (Rafailov et al. 2023, arXiv 2305.18290v3, Sec. 5) is r̂(x, y) = β·(log π_θ(y|x) − log π_ref(y|x)).

Every function returns `(losses, rewards)`: per-example losses of shape (B,) and the detached implicit rewards of
shape (B, K), column 0 the preferred completion. None of them sees a model, a batch or a config.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LossOutput(NamedTuple):
    losses: Tensor
    """(B,) per-example loss."""
    rewards: Tensor
    """(B, K) detached implicit rewards β·(log π_θ − log π_ref), column 0 preferred."""


def _pair_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """(B, 2) detached implicit rewards β·(log π_θ − log π_ref) of chosen and rejected."""
    policy = torch.stack([policy_chosen_logps, policy_rejected_logps], dim=1)
    reference = torch.stack([reference_chosen_logps, reference_rejected_logps], dim=1)
    return (beta * (policy - reference)).detach()


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (arXiv 2305.18290v3, Eq. 7) and conservative DPO.

    h = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))
    loss = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    ε (label smoothing) is the probability that a preference label is flipped (cDPO, Mitchell 2023, "A note on
    DPO with noisy preferences"); ε = 0 is Eq. 7. With all reference log-probs 0 this is reference-free DPO.
    All inputs are (B,).
    """
    logits = beta * (
        (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    )
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    rewards = _pair_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return LossOutput(losses, rewards)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036v2, Eq. 17), with per-token length normalisation.

    h = (log π_θ(y_w) − log π_ref(y_w)) / |y_w| − (log π_θ(y_l) − log π_ref(y_l)) / |y_l|
    loss = (h − 1/(2β))²

    β plays the role of the paper's τ. Why normalise by length: the squared loss of summed log-ratios grows with
    completion length, so the target margin 1/(2β) would mean different things for short and long answers; the
    per-token average keeps β comparable across lengths. The IPO paper does not discuss this; TRL documents the
    same choice as confirmed with the IPO authors. All inputs are (B,); lengths count completion tokens.
    """
    chosen_ratio = (policy_chosen_logps - reference_chosen_logps) / chosen_lengths.clamp(min=1)
    rejected_ratio = (policy_rejected_logps - reference_rejected_logps) / rejected_lengths.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    rewards = _pair_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return LossOutput(losses, rewards)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """Hinge loss on the implicit reward margin (SLiC, Zhao et al. 2023, arXiv 2305.10425v1, Eq. 3 with
    reference-normalised scores): loss = max(0, 1 − β·h), h as in `sigmoid_loss`. Inputs are (B,)."""
    logits = beta * (
        (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    )
    losses = torch.relu(1.0 - logits)
    rewards = _pair_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return LossOutput(losses, rewards)


def dpo_nll_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    beta: float,
    alpha: float,
) -> LossOutput:
    """DPO plus α times the per-token NLL of the chosen completion (Pang et al. 2024, arXiv 2404.19733v3, Eq. 3):
    loss = L_DPO − α·log π_θ(y_w|x) / |y_w|. Inputs are (B,)."""
    dpo = sigmoid_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    nll = -policy_chosen_logps / chosen_lengths.clamp(min=1)
    return LossOutput(dpo.losses + alpha * nll, dpo.rewards)


def plackett_luce_loss(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> LossOutput:
    """DPO under the Plackett-Luce model for K ranked completions (arXiv 2305.18290v3, Appendix A.3, Eq. 18):

    loss = −Σ_{k=1..K} [ r̂_k − log Σ_{j=k..K} exp(r̂_j) ],   r̂_k = β·(log π_θ(y_k|x) − log π_ref(y_k|x))

    with completions in rank order (column 0 best). For K = 2 this is exactly Eq. 7:
    −[r̂_1 − log(e^r̂_1 + e^r̂_2)] − [r̂_2 − r̂_2] = −log σ(r̂_1 − r̂_2). Inputs are (B, K).
    """
    scores = beta * (policy_logps - reference_logps)  # (B, K)
    # log Σ_{j≥k} exp(s_j): a cumulative logsumexp taken from the end.
    tail_logsumexp = torch.logcumsumexp(scores.flip(1), dim=1).flip(1)
    losses = -(scores - tail_logsumexp).sum(dim=1)
    return LossOutput(losses, scores.detach())


def unlikelihood_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_log1m: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    alpha: float,
) -> Tensor:
    """Unlikelihood training on pairs (Welleck et al. 2019, arXiv 1908.04319v2, Eq. 4; the DPO paper's baseline):

    loss = −log π(y_w|x) / |y_w| − α · Σ_t log(1 − π(y_l,t | x, y_l,<t)) / |y_l|

    raises the likelihood of the preferred completion and pushes down every token of the dispreferred one.
    `policy_rejected_log1m` is Σ_t log(1 − π(y_l,t|·)). Inputs are (B,); returns per-example losses (B,).
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1) - alpha * policy_rejected_log1m / rejected_lengths.clamp(
        min=1
    )


def sft_loss(policy_logps: Tensor) -> LossOutput:
    """Negative log-likelihood of the completion, summed over its tokens; the training loop divides by the
    number of completion tokens in the whole batch, which gives the usual per-token mean. Input is (B,) or (B, 1)."""
    policy_logps = policy_logps.reshape(policy_logps.shape[0], -1)
    return LossOutput(-policy_logps.sum(dim=1), policy_logps.detach())


class LossSpec(NamedTuple):
    pairwise: bool
    """Needs exactly two completions per prompt."""
    per_token: bool
    """Normalise the batch loss by completion tokens instead of examples (SFT)."""


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(pairwise=True, per_token=False),
    "ipo": LossSpec(pairwise=True, per_token=False),
    "hinge": LossSpec(pairwise=True, per_token=False),
    "dpo_nll": LossSpec(pairwise=True, per_token=False),
    "plackett_luce": LossSpec(pairwise=False, per_token=False),
    "unlikelihood": LossSpec(pairwise=True, per_token=False),
    "sft": LossSpec(pairwise=False, per_token=True),
}


def compute_loss(
    name: str,
    policy_logps: Tensor,
    reference_logps: Tensor,
    lengths: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    nll_alpha: float = 1.0,
    policy_log1m: Tensor | None = None,
    unlikelihood_alpha: float = 1.0,
) -> LossOutput:
    """Dispatch by loss name on (B, K) tensors (K = 2 for pairwise losses, column 0 preferred).
    `policy_log1m` (B, K), Σ_t log(1 − π(y_t|·)), is needed by `unlikelihood` only."""
    if name == "sft":
        return sft_loss(policy_logps)
    if name == "plackett_luce":
        return plackett_luce_loss(policy_logps, reference_logps, beta)
    if policy_logps.shape[1] != 2:
        raise ValueError(f"loss '{name}' needs 2 completions per prompt, got {policy_logps.shape[1]}")
    pc, pr = policy_logps.unbind(1)
    rc, rr = reference_logps.unbind(1)
    lc, lr = lengths.unbind(1)
    if name == "sigmoid":
        return sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing)
    if name == "ipo":
        return ipo_loss(pc, pr, rc, rr, lc, lr, beta)
    if name == "hinge":
        return hinge_loss(pc, pr, rc, rr, beta)
    if name == "dpo_nll":
        return dpo_nll_loss(pc, pr, rc, rr, lc, beta, nll_alpha)
    if name == "unlikelihood":
        if policy_log1m is None:
            raise ValueError("the unlikelihood loss needs policy_log1m")
        losses = unlikelihood_loss(pc, policy_log1m[:, 1], lc, lr, unlikelihood_alpha)
        return LossOutput(losses, _pair_rewards(pc, pr, rc, rr, beta))
    raise ValueError(f"unknown loss '{name}'; known: {', '.join(LOSSES)}")
