"""Preference losses as pure functions of per-sequence log-prob tensors, and the registry that names them.

Notation: for a prompt x with K ranked completions y_1 ≻ … ≻ y_K (K = 2: chosen ≻ rejected), `policy_logps` and
`reference_logps` hold log π(y_k|x), the sum of the completion's token log-probs. The implicit reward of the DPO
paper (Rafailov et al. 2023, arXiv 2305.18290v3, Sec. 5) is r̂(x, y) = β·(log π_θ(y|x) − log π_ref(y|x)).

Every function returns a `LossOutput`: per-example losses of shape (B,) and detached rewards of shape (B, K),
column 0 the preferred completion. None of them sees a model, a batch or a config.

Adding a loss: write the function, naming its tensor parameters from `compute_loss`'s vocabulary
(`policy_chosen_logps`, `chosen_lengths`, `policy_logps`, ...), and add one `LossSpec` to `LOSSES`. The config
validates `loss.name` and its rules against `LOSSES`, and the training loop calls `compute_loss`, so nothing else
changes; a new hyper-parameter also needs its field in `config.LossConfig`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LossOutput(NamedTuple):
    losses: Tensor
    """(B,) per-example loss."""
    rewards: Tensor
    """(B, K) detached implicit rewards β·(log π_θ − log π_ref), column 0 preferred (SFT: the log-probs)."""


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
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    policy_rejected_log1m: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    alpha: float,
) -> LossOutput:
    """Unlikelihood training on pairs (Welleck et al. 2019, arXiv 1908.04319v2, Eq. 4; the DPO paper's baseline):

    loss = −log π(y_w|x) / |y_w| − α · Σ_t log(1 − π(y_l,t | x, y_l,<t)) / |y_l|

    raises the likelihood of the preferred completion and pushes down every token of the dispreferred one.
    `policy_rejected_log1m` is Σ_t log(1 − π(y_l,t|·)). The reference and β only enter the reported implicit
    rewards, not the loss. Inputs are (B,).
    """
    nll = -policy_chosen_logps / chosen_lengths.clamp(min=1)
    unlikelihood = -policy_rejected_log1m / rejected_lengths.clamp(min=1)
    rewards = _pair_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return LossOutput(nll + alpha * unlikelihood, rewards)


def sft_loss(policy_logps: Tensor) -> LossOutput:
    """Negative log-likelihood of the completion, summed over its tokens; the training loop divides by the
    number of completion tokens in the whole batch (`LossSpec.per_token`), which gives the usual per-token mean.
    There is no implicit reward without a reference: `rewards` holds the detached log-probs. Input is (B, 1)."""
    policy_logps = policy_logps.reshape(policy_logps.shape[0], -1)
    return LossOutput(-policy_logps.sum(dim=1), policy_logps.detach())


def bradley_terry_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, margin: float = 0.0) -> LossOutput:
    """The reward-model loss: the negative log-likelihood of the preference under Bradley-Terry (the DPO paper's
    Eq. 2, as maximum likelihood), with Llama 2's margin term (Touvron et al. 2023, arXiv 2307.09288v2, Eq. 2, one
    margin m for every pair):

    loss = −log σ(r(x, y_w) − r(x, y_l) − m)

    For a reward model (`model.head=score`) the training loop passes the scalar rewards r(x, y) where a policy's
    log-probs go, so `policy_chosen_logps` is r(x, y_w). m = 0 is plain Bradley-Terry. Inputs are (B,); the rewards
    returned are (r_w, r_l), so that the logged accuracy and margin are the reward model's pairwise ones."""
    losses = -F.logsigmoid(policy_chosen_logps - policy_rejected_logps - margin)
    return LossOutput(losses, torch.stack([policy_chosen_logps, policy_rejected_logps], dim=1).detach())


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and the facts the config, the data pipeline and the training loop need."""

    fn: Callable[..., LossOutput]
    """Called by `compute_loss` with keywords: the tensors its parameters name, and its hyper-parameters."""
    data: Literal["pairs", "ranked", "sft"]
    """What each example holds: `pairs` (chosen, rejected: K = 2), `ranked` (K ≥ 2 completions in rank order),
    `sft` (one completion)."""
    reference: Literal["required", "optional", "unused"]
    """`required`: needs π_ref; `optional`: also defined reference-free (reference.mode=none, log π_ref = 0);
    `unused`: trains without one (reference.mode must be none)."""
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    """Keyword of `fn` -> the `LossConfig` field that supplies it, e.g. {"alpha": "nll_alpha"}."""
    per_token: bool = False
    """Normalise the step's loss by its completion tokens instead of its examples (SFT)."""


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, "pairs", "optional", {"beta": "beta", "label_smoothing": "label_smoothing"}),
    "ipo": LossSpec(ipo_loss, "pairs", "required", {"beta": "beta"}),
    "hinge": LossSpec(hinge_loss, "pairs", "required", {"beta": "beta"}),
    "dpo_nll": LossSpec(dpo_nll_loss, "pairs", "required", {"beta": "beta", "alpha": "nll_alpha"}),
    "plackett_luce": LossSpec(plackett_luce_loss, "ranked", "required", {"beta": "beta"}),
    "unlikelihood": LossSpec(unlikelihood_loss, "pairs", "optional", {"beta": "beta", "alpha": "unlikelihood_alpha"}),
    "sft": LossSpec(sft_loss, "sft", "unused", per_token=True),
    "bradley_terry": LossSpec(bradley_terry_loss, "pairs", "unused", {"margin": "margin"}),
}
"""Every loss `loss.name` can name. The config's rules (which hyper-parameters apply, which losses may run
reference-free) and the data each run loads are read from here."""


@functools.cache
def _parameters(fn: Callable[..., LossOutput]) -> dict[str, bool]:
    """Parameter name -> whether it has a default."""
    return {name: p.default is not p.empty for name, p in inspect.signature(fn).parameters.items()}


def compute_loss(
    name: str,
    *,
    policy_logps: Tensor,
    reference_logps: Tensor,
    lengths: Tensor,
    policy_log1m: Tensor | None = None,
    **settings: float,
) -> LossOutput:
    """Look `name` up in `LOSSES` and call its function on (B, K) tensors (column 0 preferred).

    `lengths` counts completion tokens; `policy_log1m` is Σ_t log(1 − π(y_t|·)) (for unlikelihood). `settings`
    are `LossConfig` values by field name (beta, label_smoothing, ...); each loss gets those its spec names.
    A loss function's tensor parameters are named from: policy_logps, reference_logps, lengths, policy_log1m
    (all (B, K)) and, for pairwise losses, their (B,) columns policy_chosen_logps, policy_rejected_logps,
    reference_chosen_logps, reference_rejected_logps, chosen_lengths, rejected_lengths, policy_chosen_log1m,
    policy_rejected_log1m.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss '{name}'; known: {', '.join(LOSSES)}")
    inputs: dict[str, Tensor | None] = {
        "policy_logps": policy_logps,
        "reference_logps": reference_logps,
        "lengths": lengths,
        "policy_log1m": policy_log1m,
    }
    if spec.data == "pairs":
        if policy_logps.shape[1] != 2:
            raise ValueError(f"loss '{name}' needs 2 completions per prompt, got {policy_logps.shape[1]}")
        columns = {
            "policy_{}_logps": policy_logps,
            "reference_{}_logps": reference_logps,
            "{}_lengths": lengths,
            "policy_{}_log1m": policy_log1m,
        }
        for pattern, both in columns.items():
            if both is not None:
                inputs[pattern.format("chosen")], inputs[pattern.format("rejected")] = both.unbind(1)
    kwargs: dict[str, object] = {}
    for parameter, has_default in _parameters(spec.fn).items():
        source = spec.hyperparameters.get(parameter)
        value = inputs.get(parameter) if source is None else settings.get(source)
        if value is not None:
            kwargs[parameter] = value
        elif not has_default:
            wanted = f"the setting {source}" if source else f"the input {parameter}"
            raise TypeError(f"loss '{name}' needs {wanted}, which compute_loss was not given (see its docstring)")
    return spec.fn(**kwargs)
