"""PPO's arithmetic against hand-worked values, and its first update on a bandit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpokit import ppo
from dpokit.ppo_train import (
    PolicyWithValue,
    PPOConfig,
    make_rollout,
    normalized,
    ppo_step,
    ppo_train,
    reward_model_reward,
    score_tokens,
)
from tests.test_rm import yes_rm  # noqa: F401 (the fixture)


def test_gae_by_hand() -> None:
    """γ = 0.9, λ = 0.8 (γλ = 0.72). Row 0, three tokens, V = (0.5, 0.4, 0.3), r = (0, 0, 1), V after the end = 0:
    δ = (0 + 0.9·0.4 − 0.5, 0 + 0.9·0.3 − 0.4, 1 − 0.3) = (−0.14, −0.13, 0.7);
    A_2 = 0.7, A_1 = −0.13 + 0.72·0.7 = 0.374, A_0 = −0.14 + 0.72·0.374 = 0.12928; returns = A + V.
    Row 1 ends after two tokens (the third is padding whose reward 7 and value 9 must not leak in):
    δ_1 = 2 − (−1) = 3, δ_0 = 0.5 + 0.9·(−1) − 1 = −1.4; A = (−1.4 + 0.72·3, 3) = (0.76, 3)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, -1.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0.12928, 0.374, 0.7], [0.76, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[0.62928, 0.774, 1.0], [1.76, 2.0, 0.0]], dtype=torch.float64))


def test_gae_with_lambda_one_is_the_return_minus_the_value() -> None:
    """λ = 1, γ = 1: A_t = Σ_{k≥t} r_k − V_t (the Monte-Carlo return), whatever the values."""
    rewards, values = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, to_go - values)
    torch.testing.assert_close(returns, to_go)


def test_kl_controller_follows_ziegler_formula() -> None:
    """β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon); with n/horizon = 100/1000 = 0.1:
    KL 6.6 vs 6: e = 0.1, β = 0.2·1.01 = 0.202; KL 30: e clipped to 0.2, β·1.02; KL 0: e = −0.2, β·0.98."""
    controller = ppo.KLController(0.2, target=6.0, horizon=1000)
    assert controller.update(6.6, 100) == pytest.approx(0.202)
    assert controller.update(30.0, 100) == pytest.approx(0.202 * 1.02)
    assert controller.update(0.0, 100) == pytest.approx(0.202 * 1.02 * 0.98)
    assert controller.update(6.0, 100) == pytest.approx(0.202 * 1.02 * 0.98)  # on target: unchanged
    fixed = ppo.KLController(0.2)
    assert fixed.update(100.0, 100) == 0.2


def test_policy_loss_by_hand() -> None:
    """ε = 0.2. Per token (ratio ρ, advantage A) -> max(−Aρ, −A·clip(ρ)):
    (1.5, +1) -> max(−1.5, −1.2) = −1.2 (clipped); (0.5, +1) -> max(−0.5, −0.8) = −0.5;
    (0.5, −1) -> max(0.5, 0.8) = 0.8 (clipped); (1.1, 2) -> −2.2 either way. Mean −0.775, clipfrac 2/4.
    A fifth, masked token with a huge ratio must not count."""
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.1, 50.0]], dtype=torch.float64)
    old = torch.full_like(ratio, -1.0)
    logps = (old + ratio.log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, clipfrac = ppo.policy_loss(logps, old, advantages, mask, clip_range=0.2)
    assert float(loss.detach()) == pytest.approx(-0.775)
    assert float(clipfrac) == pytest.approx(0.5)
    loss.backward()
    # d/d log π of −Aρ/4 is −Aρ/4 where the unclipped term counts, 0 where the clip holds it.
    assert logps.grad is not None
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.125, 0.0, -0.55, 0.0]], dtype=torch.float64))


def test_value_loss_by_hand() -> None:
    """ε = 0.2, ½·mean max((V − R)², (clip(V, V_old ± ε) − R)²), old values 0 except the last (0.2):
    V 0.5, R 1 -> max(0.25, (0.2 − 1)² = 0.64) = 0.64 (clipped); V −0.1, R 0 -> 0.01 either way;
    V 0.5, R 0.4 -> max(0.01, 0.04) = 0.04 (clipped); V 0.3, R 0.6, old 0.2 -> within the range, 0.09.
    Loss ½·0.78/4 = 0.0975, clipfrac 2/4."""
    values = torch.tensor([[0.5, -0.1, 0.5, 0.3]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, 0.0, 0.2]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.0, 0.4, 0.6]], dtype=torch.float64)
    loss, clipfrac = ppo.value_loss(values, old, returns, torch.ones_like(values), clip_range=0.2)
    assert float(loss) == pytest.approx(0.0975)
    assert float(clipfrac) == pytest.approx(0.5)


def test_whiten_by_hand() -> None:
    """(1, 2, 3) and a padded 100: mean 2, population variance 2/3, so (x − 2)/√(2/3) = (−1.2247, 0, 1.2247); without
    the mean shift the mean comes back: (0.7753, 2, 3.2247). Padding comes back as 0."""
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    s = math.sqrt(1.5)
    torch.testing.assert_close(ppo.whiten(x, mask), torch.tensor([[-s, 0.0], [s, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(
        ppo.whiten(x, mask, shift_mean=False), torch.tensor([[2 - s, 2.0], [2 + s, 0.0]], dtype=torch.float64)
    )
    big = torch.randn(50, 7, dtype=torch.float64) * 3 + 5
    full = torch.ones_like(big)
    white = ppo.whiten(big, full)
    assert float(white.mean()) == pytest.approx(0.0, abs=1e-9) and float(white.var(unbiased=False)) == pytest.approx(1)


def test_token_rewards_put_the_score_at_the_last_token() -> None:
    """β = 0.5; row 0 has 3 tokens with log π − log π_ref = (1, −2, 0.5): rewards (−0.5, 1, −0.25 + score 2);
    row 1 has 1 token (KL 4): −2 + score −1 = −3; padding gets nothing."""
    logps = torch.tensor([[0.0, -3.0, -1.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.5], [-5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = ppo.token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, 1.0, 1.75], [-3.0, 0.0, 0.0]]))
    torch.testing.assert_close(kl.sum(dim=1), torch.tensor([-0.5, 4.0]))


def _good_mass(model: PolicyWithValue, prompt: list[int], good: torch.Tensor) -> float:
    """The exact expected reward of the bandit: π's probability of a good first token."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits, _ = model(ids, torch.ones_like(ids))
        return float(logits[0, -1].softmax(-1)[good].sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_first_update_moves_reward_up_on_a_bandit(tiny_model: Path, seed: int) -> None:
    """One-token completions, reward 1 for a token in a fixed set of 40 ids, else 0: a contextual bandit. One PPO
    iteration (sampling, GAE, whitening, 4 clipped epochs, KL penalty on) raises the exact expected reward."""
    from dpokit.generate import sample
    from dpokit.model import load_model, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(tiny_model))
    model = PolicyWithValue(load_model(str(tiny_model)))
    reference = load_model(str(tiny_model)).eval()
    good = torch.arange(100, 140)
    prompt = [tokenizer.bos_token_id, 50]
    config = PPOConfig(rollout_batch=64, lr=3e-3, kl_coef=0.05, max_new_tokens=1, seed=seed)
    completions = [g[0] for g in sample(model.lm, [prompt] * 64, 1, 1, tokenizer.eos_token_id, seed)]
    scores = torch.tensor([1.0 if c[0] in set(good.tolist()) else 0.0 for c in completions])
    assert 0 < scores.sum() < 64, "the bandit needs both outcomes in the batch"
    rollout = make_rollout([prompt] * 64, completions, tokenizer.pad_token_id)
    before = _good_mass(model, prompt, good)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=1e-5)
    stats = ppo_step(model, reference, optimizer, rollout, scores, ppo.KLController(config.kl_coef), config)
    after = _good_mass(model, prompt, good)
    assert after > before * 1.03, (before, after)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # sampled from π = π_ref


def test_score_tokens_matches_the_sequence_logps(tiny_model: Path) -> None:
    """The per-token log-probs that PPO gathers sum to the completion log-probs the DPO code computes."""
    from dpokit.eval.frontier import completion_logps
    from dpokit.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    lm = load_model(str(tiny_model)).eval()
    prompts = [[tokenizer.bos_token_id, 7, 8, 9], [tokenizer.bos_token_id, 5]]
    completions = [[11, 12], [13, 14, 15, tokenizer.eos_token_id]]
    rollout = make_rollout(prompts, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, values = score_tokens(PolicyWithValue(lm), rollout)
    torch.testing.assert_close(logps.sum(dim=1), completion_logps(lm, prompts, completions, tokenizer.pad_token_id))
    assert values is not None and torch.all(values == 0)  # zero-initialised head


def test_ppo_train_writes_a_loadable_policy(tiny_model: Path, tmp_path: Path) -> None:
    from dpokit.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    prompts = [[tokenizer.bos_token_id, i] for i in range(20, 36)]

    def reward(prompts: list, completions: list) -> list[float]:
        return [float(len(c)) for c in completions]

    config = PPOConfig(updates=3, rollout_batch=8, minibatches=2, ppo_epochs=1, max_new_tokens=4, save_at=(2,))
    stats = ppo_train(tiny_model, prompts, reward, config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and stats["objective/kl_coef"] == rows[-1]["objective/kl_coef"]
    assert load_model(str(tmp_path / "run" / "final")) is not None
    assert (tmp_path / "run" / "snapshots" / "update-2" / "value_head.pt").exists()


def test_normalized_reward_by_hand() -> None:
    """Scores of the reference samples (1, 2, 3, 6): mean 3, population std √3.5, so a later 10 maps to
    (10 − 3)/√3.5 = 3.7417 and the samples themselves to mean 0, std 1."""

    def reward(prompts: list, completions: list) -> list[float]:
        return [float(sum(c)) for c in completions]

    samples = [[1], [2], [3], [4, 2]]
    scaled = normalized(reward, [[0]] * 4, samples)
    out = scaled([[0]] * 4, samples)
    assert out.mean() == pytest.approx(0.0) and out.std() == pytest.approx(1.0)
    assert scaled([[0]], [[10]])[0] == pytest.approx(7 / math.sqrt(3.5))


def test_reward_model_reward_scores_token_ids_as_training_tokenized_them(yes_rm: Path) -> None:  # noqa: F811
    """The reward-model reward on token ids gives what `score_texts` gives the same rows as text, and it ranks
    " yes" (chosen in training) above " no"."""
    from dpokit.data.tokenize import encode_text
    from dpokit.rm import load_reward_model, score_texts

    model, tokenizer = load_reward_model(str(yes_rm / "final"))
    prompts = [f"\n\nHuman: Is {i} a number?\n\nAssistant:" for i in (200, 201)]
    answers = [" yes", " no"]
    ids = [encode_text(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    scores = reward_model_reward(yes_rm / "final")([p for p, _ in ids], [c for _, c in ids])
    assert scores == pytest.approx(score_texts(model, tokenizer, prompts, answers), abs=1e-6)
    assert scores[0] > scores[1]
