"""Win rates: the bootstrap interval against the binomial closed form, ties as half, the seeded A/B order (balanced,
reproducible, stable when comparisons are added), `both_orders` turning disagreement into a tie, and the counts of
verdicts that are left out."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from dpokit.eval.judges import Comparison, Verdict
from dpokit.eval.winrate import (
    Pairing,
    against_chosen,
    bootstrap_interval,
    candidate_is_a,
    judge_pairings,
    summarize,
    write_outputs,
)


def _quantile_mc_sd(q: float, resamples: int, density: float) -> float:
    """Monte-Carlo standard deviation of a sample q-quantile from `resamples` draws (asymptotic formula)."""
    return math.sqrt(q * (1 - q) / resamples) / density


@pytest.mark.parametrize(("n", "wins"), [(400, 240), (150, 60), (1000, 510)])
def test_bootstrap_matches_binomial_closed_form(n, wins) -> None:
    """Without ties a bootstrap mean is Binomial(n, p̂)/n exactly, so the percentile interval must equal the binomial
    quantiles up to Monte-Carlo error (derived from the normal density at the quantile) and one step of 1/n."""
    values = [1.0] * wins + [0.0] * (n - wins)
    resamples = 4000
    low, high = bootstrap_interval(values, resamples=resamples, seed=7)
    p = wins / n
    sd = math.sqrt(p * (1 - p) / n)
    tolerance = 4 * _quantile_mc_sd(0.025, resamples, stats.norm.pdf(1.96) / sd) + 1 / n
    assert low == pytest.approx(stats.binom.ppf(0.025, n, p) / n, abs=tolerance)
    assert high == pytest.approx(stats.binom.ppf(0.975, n, p) / n, abs=tolerance)
    # and the normal approximation p̂ ± 1.96·sqrt(p̂(1 − p̂)/n) (within its own error, a fraction of sd)
    assert low == pytest.approx(p - 1.96 * sd, abs=tolerance + 0.15 * sd)
    assert high == pytest.approx(p + 1.96 * sd, abs=tolerance + 0.15 * sd)
    assert bootstrap_interval(values, resamples=resamples, seed=7) == (low, high)


def test_bootstrap_with_ties_matches_the_normal_interval() -> None:
    values = [1.0] * 300 + [0.5] * 200 + [0.0] * 500
    low, high = bootstrap_interval(values, resamples=4000, seed=1)
    mean, se = np.mean(values), np.std(values) / math.sqrt(len(values))
    tolerance = 4 * _quantile_mc_sd(0.025, 4000, stats.norm.pdf(1.96) / se) + 0.1 * se
    assert (low, high) == pytest.approx((mean - 1.96 * se, mean + 1.96 * se), abs=tolerance)


class PositionBiased:
    """A judge that always answers A: a pure position bias."""

    name = "always-A"
    order_matters = True

    def __init__(self) -> None:
        self.seen: list[Comparison] = []

    def judge(self, comparisons):
        self.seen += comparisons
        return [Verdict("A") for _ in comparisons]


def _pairings(n: int) -> list[Pairing]:
    return [Pairing(str(i), 0, f"q{i}", f"cand{i}", f"base{i}") for i in range(n)]


def test_order_is_random_balanced_and_reproducible() -> None:
    pairings = _pairings(2000)
    orders = [candidate_is_a(3, p) for p in pairings]
    assert abs(sum(orders) / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000)
    assert orders == [candidate_is_a(3, p) for p in pairings]
    assert sum(a != b for a, b in zip(orders, [candidate_is_a(4, p) for p in pairings], strict=True)) > 800
    # Adding comparisons leaves the order of the others as it was (their cached verdicts stay valid).
    assert [candidate_is_a(3, p) for p in _pairings(3000)][:2000] == orders

    judge = PositionBiased()
    records = judge_pairings(judge, pairings, seed=3)
    for record, comparison in zip(records, judge.seen, strict=True):
        position = record["candidate_position"]
        assert (comparison.a if position == "A" else comparison.b) == record["candidate"]
    summary = summarize(records, resamples=1000)
    # A judge that always says A makes the candidate win exactly when it was put first.
    assert summary["wins"] == sum(orders) and summary["verdict_a_share"] == 1.0


def test_both_orders_disagreement_is_a_tie() -> None:
    records = judge_pairings(PositionBiased(), _pairings(50), seed=0, both_orders=True)
    assert {r["winner"] for r in records} == {"tie"}
    assert summarize(records, resamples=1000)["win_rate"] == 0.5


class Scripted:
    name = "scripted"
    order_matters = True

    def __init__(self, outcomes: dict[str, Verdict]) -> None:
        self.outcomes = outcomes

    def judge(self, comparisons):
        return [self.outcomes[c.prompt] for c in comparisons]


def test_summary_counts_and_outputs(tmp_path) -> None:
    """Verdicts seen from the candidate's side: A when the candidate was A is a win; unparseable and failed verdicts
    are counted and left out of the rate; both orders agreeing keeps the winner."""
    pairings = _pairings(6)
    script = {
        "q0": Verdict("A"),
        "q1": Verdict("B"),
        "q2": Verdict("tie"),
        "q3": Verdict(None, "unparseable"),
        "q4": Verdict(None, "failed"),
        "q5": Verdict("A"),
    }
    records = judge_pairings(Scripted(script), pairings, seed=0)
    expected = {"A": "candidate", "B": "baseline"}
    flip = {"candidate": "baseline", "baseline": "candidate"}
    for r, p in zip(records, pairings, strict=True):
        verdict = script[p.prompt].outcome
        if verdict in ("A", "B"):
            winner = expected[verdict]
            assert r["winner"] == (winner if r["candidate_position"] == "A" else flip[winner])
    s = summarize(records, resamples=1000)
    assert (s["comparisons"], s["judged"], s["ties"], s["unparseable"], s["failed"]) == (6, 4, 1, 1, 1)
    assert s["win_rate"] == pytest.approx((s["wins"] + 0.5) / 4)
    write_outputs(tmp_path, records, s | {"judge": "scripted"}, "test")
    assert len((tmp_path / "comparisons.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "summary.json").read_text())["unparseable"] == 1
    assert "1 answers were not in the template's format" in (tmp_path / "report.md").read_text()


def test_against_chosen_uses_the_preferred_response() -> None:
    from dpokit.eval.samples import PromptRow

    prompts = [PromptRow("3", "\n\nHuman: hi\n\nAssistant:", " Hello there!", (1, 2))]
    rows = [{"id": "3", "sample": 0, "prompt": prompts[0].prompt, "completion": " Hey "}]
    assert against_chosen(rows, prompts) == [Pairing("3", 0, prompts[0].prompt, " Hey ", " Hello there!")]
