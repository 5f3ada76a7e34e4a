"""Win rates of candidate samples against a baseline (another samples file, or a data set's chosen responses).

Each comparison puts the candidate in position A or B by a seeded coin of its own (drawn from the seed and the
comparison's id, so adding comparisons leaves the others' orders, and their cached verdicts, unchanged), as the DPO
paper randomised the order for every GPT-4 judgment. With `both_orders` each pair is judged both ways and a
disagreement counts as a tie. A win counts 1, a tie ½, a loss 0; comparisons without a usable verdict are left out
and counted. The 95% interval is a seeded percentile bootstrap over comparisons.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpokit.data.formats import Text
from dpokit.errors import UserError
from dpokit.eval.judges import Comparison, Judge, Verdict
from dpokit.eval.samples import PromptRow, read_jsonl, write_jsonl

POINTS = {"candidate": 1.0, "tie": 0.5, "baseline": 0.0}


@dataclass(frozen=True)
class Pairing:
    id: str
    sample: int
    prompt: Text
    candidate: str
    baseline: str


def answer_text(completion: Text) -> str:
    """A completion as text, as it was written (HH completions keep their leading space, which scorers tokenize as
    training did; the judging templates strip it); a chat completion's message contents."""
    if isinstance(completion, list):
        return "\n".join(m["content"] for m in completion)
    return completion


def against_samples(candidates: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> list[Pairing]:
    """Pair each candidate row with the baseline row of the same id and sample (sample 0 when the baseline has one
    sample per prompt)."""
    index = {(r["id"], r["sample"]): r for r in baseline}
    pairings = []
    for r in candidates:
        other = index.get((r["id"], r["sample"])) or index.get((r["id"], 0))
        if other is not None:
            pairings.append(Pairing(r["id"], r["sample"], r["prompt"], r["completion"], other["completion"]))
    if not pairings:
        raise UserError("no candidate row shares an id with the baseline samples: were they made from the same data?")
    return pairings


def against_chosen(candidates: Sequence[dict[str, Any]], prompts: Sequence[PromptRow]) -> list[Pairing]:
    """Pair each candidate row with the preferred response of its row in the data file."""
    chosen = {p.id: answer_text(p.chosen) for p in prompts}
    pairings = [
        Pairing(r["id"], r["sample"], r["prompt"], r["completion"], chosen[r["id"]])
        for r in candidates
        if r["id"] in chosen
    ]
    if not pairings:
        raise UserError("no candidate row matches a row of the data file: give the file the samples were made from")
    return pairings


def candidate_is_a(seed: int, pairing: Pairing) -> bool:
    """The seeded coin of one comparison."""
    digest = hashlib.sha256(f"{seed}/{pairing.id}/{pairing.sample}".encode()).digest()
    return digest[0] % 2 == 0


def _winner(verdict: Verdict, candidate_a: bool) -> str | None:
    if verdict.outcome is None:
        return None
    if verdict.outcome == "tie":
        return "tie"
    return "candidate" if (verdict.outcome == "A") == candidate_a else "baseline"


def judge_pairings(
    judge: Judge, pairings: Sequence[Pairing], seed: int = 0, both_orders: bool = False
) -> list[dict[str, Any]]:
    """One record per pairing: who won (`candidate`, `baseline`, `tie`, or None with the problem), in which order."""
    orders = [candidate_is_a(seed, p) for p in pairings]
    comparisons = [
        Comparison(p.prompt, p.candidate, p.baseline) if a else Comparison(p.prompt, p.baseline, p.candidate)
        for p, a in zip(pairings, orders, strict=True)
    ]
    verdicts = judge.judge(comparisons)
    second: list[Verdict | None] = [None] * len(pairings)
    if both_orders and judge.order_matters:
        second = list(judge.judge([Comparison(c.prompt, c.b, c.a) for c in comparisons]))
    records = []
    for p, a, v, w in zip(pairings, orders, verdicts, second, strict=True):
        winner, problem = _winner(v, a), v.problem
        record = asdict(p) | {"judge": judge.name, "candidate_position": "A" if a else "B", "verdict": v.outcome}
        record["detail"] = v.detail
        if w is not None:
            other = _winner(w, not a)
            problem = problem or w.problem
            winner = None if winner is None or other is None else winner if winner == other else "tie"
            record |= {"verdict_swapped": w.outcome, "detail_swapped": w.detail}
        records.append(record | {"winner": winner, "problem": problem if winner is None else None})
    return records


def bootstrap_interval(
    values: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: `resamples` draws of len(values) with replacement."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            x[rng.integers(0, len(x), size=(min(200, resamples - i), len(x)))].mean(axis=1)
            for i in range(0, resamples, 200)
        ]
    )
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def summarize(records: Sequence[dict[str, Any]], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Win rate (ties ½) with its bootstrap interval, and the counts behind it."""
    winners = Counter(r["winner"] for r in records)
    problems = Counter(r["problem"] for r in records if r["winner"] is None)
    values = [POINTS[r["winner"]] for r in records if r["winner"] is not None]
    low, high = bootstrap_interval(values, resamples, seed)
    said_a = [r["verdict"] == "A" for r in records if r["verdict"] in ("A", "B")]
    return {
        "win_rate": float(np.mean(values)) if values else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "level": 0.95,
        "resamples": resamples,
        "bootstrap_seed": seed,
        "comparisons": len(records),
        "judged": len(values),
        "wins": winners["candidate"],
        "losses": winners["baseline"],
        "ties": winners["tie"],
        "unparseable": problems["unparseable"],
        "failed": problems["failed"],
        "candidate_as_a": sum(r["candidate_position"] == "A" for r in records),
        "verdict_a_share": float(np.mean(said_a)) if said_a else float("nan"),
    }


def write_outputs(out: Path, records: Sequence[dict[str, Any]], summary: dict[str, Any], title: str) -> None:
    """comparisons.jsonl, summary.json and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "comparisons.jsonl", records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report(summary, title), encoding="utf-8")


def report(s: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Judge: `{s.get('judge', '?')}`. Candidate: `{s.get('candidate', '?')}`. "
        f"Baseline: `{s.get('baseline', '?')}`.",
        "",
        "| win rate | 95% CI | judged | wins | ties | losses | unparseable | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {s['win_rate']:.3f} | [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | {s['judged']} of {s['comparisons']} | "
        f"{s['wins']} | {s['ties']} | {s['losses']} | {s['unparseable']} | {s['failed']} |",
        "",
        f"Ties count ½. Interval: percentile bootstrap over comparisons, {s['resamples']} resamples, seed "
        f"{s['bootstrap_seed']}. The candidate was answer A in {s['candidate_as_a']} of {s['comparisons']} "
        f"comparisons; the judge answered A in {s['verdict_a_share']:.0%} of its verdicts.",
    ]
    if s["unparseable"] or s["failed"]:
        lines.append(
            f"{s['unparseable']} answers were not in the template's format and {s['failed']} requests failed; "
            "both are left out of the win rate."
        )
    return "\n".join(lines) + "\n"


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    rows = list(read_jsonl(Path(path)))
    if not rows:
        raise UserError(f"{path}: no samples (make them with `dpokit generate`)")
    return rows
