"""Loss values worked out by hand, the gradient of Eq. 7 against the paper's closed form, and the identities
between losses (ε = 0 is DPO, Plackett-Luce with K = 2 is DPO)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpokit.losses import (
    LOSSES,
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
    out = unlikelihood_loss(t(-4.0), log1m, t(2.0), t(2.0), alpha=0.5)
    assert out.item() == pytest.approx(2 + 0.75 * math.log(2))


def test_sft_is_summed_nll() -> None:
    assert sft_loss(t(-2.0, -5.0)).losses.tolist() == [2.0, 5.0]


def test_compute_loss_dispatch_and_shape_checks() -> None:
    policy, reference, lengths = torch.randn(4, 2), torch.randn(4, 2), torch.full((4, 2), 3.0)
    for name in LOSSES:
        out = compute_loss(name, policy, reference, lengths, beta=0.1, policy_log1m=-torch.rand(4, 2))
        assert out.losses.shape == (4,) and torch.isfinite(out.losses).all()
    with pytest.raises(ValueError, match="2 completions"):
        compute_loss("sigmoid", torch.randn(4, 3), torch.randn(4, 3), torch.ones(4, 3), beta=0.1)
