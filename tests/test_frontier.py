"""Frontier helpers: Best-of-N's analytic KL, the upper frontier, and the dominance check of the demo report."""

import math

import pytest
import torch

from dpokit.eval.frontier import best_of_n, dominance, upper_frontier


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
