"""Loss values worked out by hand, the gradient of Eq. 7 against the paper's closed form, the identities
between losses (ε = 0 is DPO, Plackett-Luce with K = 2 is DPO), the β → 0 limit, and what every registered loss
promises (detached rewards, the shapes `compute_loss` hands back)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpokit.losses import (
    LOSSES,
    LossOutput,
    compute_loss,
    dpo_nll_loss,
    hinge_loss,
    ipo_loss,
    plackett_luce_loss,
    sft_loss,
    sigmoid_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_hand_computed() -> None:
    """β = 0.5; policy (−1, −3), reference (−2, −2): h = (−1+2) − (−3+2) = 2, β·h = 1,
    loss = −log σ(1) = log(1 + e^−1) = 0.3132617; rewards β·(π − ref) = (0.5, −0.5)."""
    out = sigmoid_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.3132617, abs=1e-7)
    assert out.rewards.tolist() == [[0.5, -0.5]]


def test_sigmoid_at_reference_is_ln2() -> None:
    """When π_θ = π_ref every log-ratio is 0, so loss = −log σ(0) = ln 2 whatever β and the log-probs."""
    logps = t(-5.0, -17.0, -0.3)
    out = sigmoid_loss(logps, logps * 2, logps, logps * 2, beta=3.0)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2), dtype=torch.float64))


def test_gradient_matches_closed_form() -> None:
    """Paper, Sec. 4: ∇L = −β·σ(r̂_l − r̂_w)·(∇log π(y_w) − ∇log π(y_l)). With respect to the policy log-probs
    themselves: ∂L/∂log π(y_w) = −β·σ(r̂_l − r̂_w), ∂L/∂log π(y_l) = +β·σ(r̂_l − r̂_w)."""
    beta = 0.3
    pc, pr = t(-4.0, -1.0).requires_grad_(), t(-2.0, -6.0).requires_grad_()
    rc, rr = t(-3.0, -2.0), t(-3.0, -1.0)
    sigmoid_loss(pc, pr, rc, rr, beta).losses.sum().backward()
    r_w, r_l = beta * (pc.detach() - rc), beta * (pr.detach() - rr)
    weight = torch.sigmoid(r_l - r_w)
    assert torch.allclose(pc.grad, -beta * weight)
    assert torch.allclose(pr.grad, beta * weight)
    # Pairs ordered wrongly (r̂_l > r̂_w) get the larger weight.
    assert weight[0] > 0.5 > weight[1]


def test_label_smoothing_zero_is_dpo_and_positive_is_cdpo() -> None:
    args = (t(-1.0, -2.0), t(-3.0, -1.5), t(-2.0, -2.0), t(-2.0, -2.0))
    plain = sigmoid_loss(*args, beta=0.5)
    assert torch.equal(sigmoid_loss(*args, beta=0.5, label_smoothing=0.0).losses, plain.losses)
    eps, z = 0.2, 0.5 * ((args[0] - args[2]) - (args[1] - args[3]))
    expected = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    assert torch.allclose(sigmoid_loss(*args, beta=0.5, label_smoothing=eps).losses, expected)


def test_plackett_luce_k2_equals_dpo() -> None:
    torch.manual_seed(0)
    policy, reference = torch.randn(5, 2, dtype=torch.float64) * 3, torch.randn(5, 2, dtype=torch.float64) * 3
    pl = plackett_luce_loss(policy, reference, beta=0.7)
    dpo = sigmoid_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=0.7)
    assert torch.allclose(pl.losses, dpo.losses, atol=1e-12)
    assert torch.allclose(pl.rewards, dpo.rewards)


def test_plackett_luce_k3_hand_computed() -> None:
    """Scores s = (2, 1, 0) (β = 1, reference 0): loss = −[s1 − log(e²+e+1)] − [s2 − log(e+1)] − 0
    = log(e²+e+1) − 2 + log(e+1) − 1."""
    out = plackett_luce_loss(t(2.0, 1.0, 0.0).unsqueeze(0), torch.zeros(1, 3, dtype=torch.float64), beta=1.0)
    e = math.e
    assert out.losses.item() == pytest.approx(math.log(e**2 + e + 1) - 2 + math.log(e + 1) - 1, abs=1e-12)


def test_ipo_hand_computed() -> None:
    """Log-ratios 6 over 3 tokens (2 per token) and −2 over 2 tokens (−1 per token): h = 3; β = 0.25 gives the
    target 1/(2β) = 2, loss = (3 − 2)² = 1."""
    out = ipo_loss(t(-4.0), t(-7.0), t(-10.0), t(-5.0), t(3.0), t(2.0), beta=0.25)
    assert out.losses.item() == pytest.approx(1.0)


def test_hinge_hand_computed() -> None:
    """β·h = 0.5·2 = 1 gives max(0, 1 − 1) = 0; β·h = 0.5·(−2) = −1 gives 2."""
    out = hinge_loss(t(-1.0, -3.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5)
    assert out.losses.tolist() == [0.0, 2.0]


def test_dpo_nll_adds_per_token_nll() -> None:
    args = (t(-6.0), t(-3.0), t(-5.0), t(-2.0))
    dpo = sigmoid_loss(*args, beta=0.1).losses
    out = dpo_nll_loss(*args, chosen_lengths=t(3.0), beta=0.1, alpha=0.5)
    assert out.losses.item() == pytest.approx(dpo.item() + 0.5 * 6.0 / 3.0)


def test_reference_free_is_dpo_with_zero_reference() -> None:
    out = sigmoid_loss(t(-1.0), t(-2.0), t(0.0), t(0.0), beta=1.0)
    assert out.losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))


def test_unlikelihood_hand_computed() -> None:
    """Chosen log-prob −4 over 2 tokens: NLL 2 per token. Rejected tokens with p = 0.5 and p = 0.75:
    Σ log(1 − p) = log 0.5 + log 0.25 = −3·log 2, per token −1.5·log 2; α = 0.5 gives 2 + 0.75·log 2."""
    from dpokit.losses import unlikelihood_loss

    log1m = t(math.log(0.5) + math.log(0.25))
    out = unlikelihood_loss(
        policy_chosen_logps=t(-4.0),
        policy_rejected_logps=t(-3.0),
        reference_chosen_logps=t(-5.0),
        reference_rejected_logps=t(-2.0),
        policy_rejected_log1m=log1m,
        chosen_lengths=t(2.0),
        rejected_lengths=t(2.0),
        beta=0.5,
        alpha=0.5,
    )
    assert out.losses.item() == pytest.approx(2 + 0.75 * math.log(2))
    # Its rewards are DPO's: β·(π − ref) = 0.5·(1, −1).
    assert out.rewards.tolist() == [[0.5, -0.5]]


def test_sft_is_summed_nll() -> None:
    assert sft_loss(t(-2.0, -5.0)).losses.tolist() == [2.0, 5.0]


SETTINGS = {"beta": 0.1, "label_smoothing": 0.0, "nll_alpha": 1.0, "unlikelihood_alpha": 1.0}


def _inputs(b: int, k: int, grad: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    policy = (-5 * torch.rand(b, k, dtype=torch.float64)).requires_grad_(grad)
    return {
        "policy_logps": policy,
        "reference_logps": -5 * torch.rand(b, k, dtype=torch.float64),
        "lengths": torch.full((b, k), 3.0, dtype=torch.float64),
        "policy_log1m": -torch.rand(b, k, dtype=torch.float64),
    }


def _k(name: str) -> int:
    return {"pairs": 2, "ranked": 3, "sft": 1}[LOSSES[name].data]


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_registered_loss_returns_losses_and_detached_rewards(name: str) -> None:
    """Per-example losses (B,) carry the gradient; the rewards (B, K) are reported, never trained on."""
    out = compute_loss(name, **_inputs(4, _k(name), grad=True), **SETTINGS)
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (4,) and torch.isfinite(out.losses).all() and out.losses.requires_grad
    assert out.rewards.shape == (4, _k(name)) and not out.rewards.requires_grad and out.rewards.grad_fn is None


def test_compute_loss_shape_checks_and_missing_inputs() -> None:
    with pytest.raises(ValueError, match="2 completions"):
        compute_loss("sigmoid", **_inputs(4, 3), beta=0.1)
    with pytest.raises(TypeError, match="nll_alpha"):
        compute_loss("dpo_nll", **_inputs(4, 2), beta=0.1)
    inputs = _inputs(4, 2)
    del inputs["policy_log1m"]
    with pytest.raises(TypeError, match="policy_rejected_log1m"):
        compute_loss("unlikelihood", **inputs, **SETTINGS)


def test_compute_loss_passes_each_loss_its_own_settings() -> None:
    """The registry maps a function's keyword to its config field: dpo_nll's α is nll_alpha, not unlikelihood_alpha."""
    inputs = _inputs(4, 2)
    a = compute_loss("dpo_nll", **inputs, **SETTINGS | {"nll_alpha": 0.0, "unlikelihood_alpha": 5.0})
    pc, pr = inputs["policy_logps"].unbind(1)
    rc, rr = inputs["reference_logps"].unbind(1)
    assert torch.allclose(a.losses, sigmoid_loss(pc, pr, rc, rr, beta=0.1).losses)
    smoothed = compute_loss("sigmoid", **inputs, **SETTINGS | {"label_smoothing": 0.2})
    assert torch.allclose(smoothed.losses, sigmoid_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2).losses)


def test_beta_to_zero_limit() -> None:
    """−log σ(x) = ln 2 − x/2 + x²/8 + O(x⁴), so with x = β·h the DPO loss tends to ln 2 as β → 0, with slope −h/2:
    the error of ln 2 − β·h/2 is at most (β·h)²/8. Plackett-Luce tends to log K! (every ordering equally likely), and
    all implicit rewards to 0."""
    policy, reference = t(-1.0, -7.0, -2.0), t(-4.0, -3.0, -2.5)
    pc, pr, rc, rr = policy[:2], policy[1:], reference[:2], reference[1:]
    h = (pc - rc) - (pr - rr)  # (7, −4.5)
    for beta in (1e-2, 1e-4, 1e-6):
        out = sigmoid_loss(pc, pr, rc, rr, beta=beta)
        assert torch.all((out.losses - (math.log(2) - beta * h / 2)).abs() <= (beta * h) ** 2 / 8 + 1e-15)
        assert out.rewards.abs().max() <= beta * 6
        ranked = plackett_luce_loss(policy.unsqueeze(0), reference.unsqueeze(0), beta=beta)
        assert ranked.losses.item() == pytest.approx(math.log(6), abs=10 * beta)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "dpo_nll", "plackett_luce"])
def test_gradient_favours_chosen_over_rejected(name: str) -> None:
    """For pairs the policy orders wrongly (r̂_l > r̂_w), a gradient-descent step on any DPO-family loss raises
    log π(y_w) and lowers log π(y_l): ∂L/∂log π(y_w) < 0 < ∂L/∂log π(y_l)."""
    inputs = _inputs(5, 2, grad=True)
    inputs["reference_logps"] = inputs["policy_logps"].detach().flip(1) + t(1.0, 0.0)  # r̂_w − r̂_l = −β·(gap + 1)
    compute_loss(name, **inputs, **SETTINGS).losses.sum().backward()
    grad = inputs["policy_logps"].grad
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all(), grad


def test_parameter_gradient_matches_the_papers_closed_form() -> None:
    """PAPER.md §2: ∇_θ L = −β·σ(r̂_l − r̂_w)·(∇_θ log π(y_w) − ∇_θ log π(y_l)). A policy over a vocabulary with logits
    θ and completions of independent tokens has log π(y) = Σ_t log softmax(θ)[y_t], so ∇_θ log π(y) =
    Σ_t (e_{y_t} − softmax(θ)) in closed form. One descent step then raises log π(y_w) and lowers log π(y_l)."""
    beta, vocab = 0.5, 6
    torch.manual_seed(1)
    theta = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    chosen, rejected = [0, 2, 2], [1, 3]
    reference = torch.randn(vocab, dtype=torch.float64).log_softmax(0)

    def logp(tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.log_softmax(0)[tokens].sum()

    pc, pr = logp(chosen, theta), logp(rejected, theta)
    rc, rr = reference[chosen].sum(), reference[rejected].sum()
    sigmoid_loss(pc.view(1), pr.view(1), rc.view(1), rr.view(1), beta).losses.sum().backward()

    p = theta.detach().softmax(0)
    one_hot = torch.eye(vocab, dtype=torch.float64)
    grad_w = sum(one_hot[y] - p for y in chosen)
    grad_l = sum(one_hot[y] - p for y in rejected)
    weight = torch.sigmoid(beta * ((pr - rr) - (pc - rc))).detach()
    assert torch.allclose(theta.grad, -beta * weight * (grad_w - grad_l))
    stepped = theta.detach() - 0.1 * theta.grad
    assert logp(chosen, stepped) > pc.detach() and logp(rejected, stepped) < pr.detach()
