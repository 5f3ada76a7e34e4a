"""Frontier helpers: Best-of-N's analytic KL, the upper frontier, and the dominance check of the demo report."""

import math

import pytest
import torch

from dpokit.eval.frontier import best_of_n, compare_by_kl, dominance, upper_frontier


def test_best_of_n() -> None:
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.8, 0.4]])
    points = best_of_n(rewards, [1, 2, 4])
    assert [p["reward"] for p in points] == pytest.approx([0.2, 0.6, 0.85])
    assert [p["kl"] for p in points] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])


def test_upper_frontier() -> None:
    assert upper_frontier([(3, 0.5), (1, 0.6), (2, 0.55), (4, 0.7)]) == [(1, 0.6), (4, 0.7)]


def test_dominance() -> None:
    def point(method, kl, reward, se=0.01):
        return {"method": method, "setting": "s", "step": 1, "seed": 0, "kl": kl, "reward": reward, "reward_se": se}

    results = [
        point("DPO", 1.0, 0.6),
        point("DPO", 3.0, 0.8),
        point("Preferred-FT", 2.0, 0.55),
        point("Unlikelihood", 3.5, 0.81),
        point("Unlikelihood", 3.5, 0.9),
        point("SFT", 0.0, 0.5),
    ]
    verdicts = dominance(results)
    assert [v["dominated"] for v in verdicts] == [True, False, False, None]
    assert [v["within_noise"] for v in verdicts] == [True, True, False, None]
    assert verdicts[1]["dpo_best"] == 0.8


def test_compare_by_kl() -> None:
    """Range [0, 2): DPO's best per seed 0.7 (seed 0) and 0.6 (seed 1) -> mean 0.65, SE √(0.01² + 0.01²)/2 = 0.00707;
    PPO 0.5 and 0.52 -> 0.51; gap 0.14 against 2·0.01 -> DPO ahead. Range [2, 5): DPO 0.8, PPO 0.79 on seed 0 only
    (seed 1 has no PPO point there) -> gap 0.01 within 2·0.01414 -> neither. [5, 10): no PPO point -> None."""

    def point(method, kl, reward, seed, se=0.01):
        return {"method": method, "kl": kl, "reward": reward, "reward_se": se, "seed": seed}

    results = [
        point("DPO", 1.0, 0.7, 0),
        point("DPO", 1.5, 0.65, 0),
        point("DPO", 0.5, 0.6, 1),
        point("PPO", 1.9, 0.5, 0),
        point("PPO", 0.1, 0.52, 1),
        point("DPO", 3.0, 0.8, 0),
        point("DPO", 3.0, 0.9, 1),
        point("PPO", 4.9, 0.79, 0),
        point("DPO", 6.0, 0.95, 0),
        point("SFT", 1.0, 0.99, 0),
    ]
    rows = compare_by_kl(results, "DPO", "PPO", edges=(0.0, 2.0, 5.0, 10.0))
    assert [r["ahead"] for r in rows] == ["DPO", "neither", None]
    assert rows[0]["DPO"] == [0.7, 0.6] and rows[0]["DPO_mean"] == pytest.approx(0.65)
    assert rows[0]["DPO_se"] == pytest.approx(math.sqrt(2) * 0.01 / 2)
    assert rows[0]["gap"] == pytest.approx(0.14) and rows[1]["seeds"] == [0]
    assert rows[1]["gap"] == pytest.approx(0.01)
    # The other way round the verdict names the other method.
    assert compare_by_kl(results, "PPO", "DPO", edges=(0.0, 2.0))[0]["ahead"] == "DPO"
