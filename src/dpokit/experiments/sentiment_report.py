"""The sentiment demo's outputs: facts.json (what its pieces are), results.json, results.csv, frontier.png and
report.md (the frontier table and what it shows), written from the points that `sentiment.Demo` measured."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpokit.eval.frontier import compare_by_kl, dominance, plot_frontier
from dpokit.experiments.sentiment_ppo import reward_model_facts
from dpokit.experiments.stages import run_stage

if TYPE_CHECKING:
    from dpokit.experiments.sentiment import Demo
    from dpokit.experiments.sentiment_setup import Judge

BASELINES = ("Preferred-FT", "Unlikelihood", "SFT", "PPO", "PPO-GT")
"""The points the frontier check holds DPO's frontier against."""

CSV_FIELDS = ["method", "setting", "step", "seed", "reward", "reward_se", "kl", "samples"]


def write_outputs(out: Path, results: list[dict], facts: dict[str, Any], seeds: int, seconds: float) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    plot_frontier(
        results, out / "frontier.png", f"IMDb controlled sentiment: reward vs KL ({seeds} seed{'s' * (seeds > 1)})"
    )
    (out / "report.md").write_text(report(results, facts, seconds), encoding="utf-8")


def measure_facts(demo: Demo, judge: Judge) -> dict[str, Any]:
    """Sizes and qualities of the demo's pieces: π_SFT's size and perplexity, the reward's accuracy and agreement
    with people, the pairs and the reward model (a stage of its own: facts.json)."""
    out, path = demo.out, demo.out / "facts.json"

    def build() -> None:
        summary = json.loads((out / "sft" / "summary.json").read_text())
        heldout = demo.heldout_reviews
        pearson = None
        if demo.data.vader is not None:
            with demo.data.vader.open(encoding="utf-8") as f:
                vader = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
            ratings = np.array([float(r[1]) for r in vader])
            pearson = float(np.corrcoef(judge.reward([r[2] for r in vader]), ratings)[0, 1])
        facts = {
            "sft_parameters": sum(p.numel() for p in judge.sft_model.parameters()),
            "sft_heldout_perplexity": math.exp(summary["eval"]["eval/loss"]),
            "reward_heldout_accuracy": judge.reward.accuracy(
                [r["text"] for r in heldout], [r["label"] for r in heldout]
            ),
            "reward_vader_pearson": pearson,
            "pairs": json.loads((out / "data" / "pairs_counts.json").read_text()),
            "reward_model": reward_model_facts(out),
            "sizes": asdict(demo.sizes),
        }
        path.write_text(json.dumps(facts, indent=2))

    run_stage(out, "facts", "facts", demo.settings["facts"], [path], build)
    return dict(json.loads(path.read_text()))


def report(results: list[dict], facts: dict[str, Any], seconds: float) -> str:
    verdicts = dominance(results, baselines=BASELINES)
    checked = [v for v in verdicts if v["dominated"] is not None]
    beaten = [v for v in checked if not v["dominated"]]
    lines = [
        "# Controlled sentiment (IMDb): reward/KL frontier",
        "",
        "![frontier](frontier.png)",
        "",
        f"π_SFT: {facts['sft_parameters']:,} parameters, held-out perplexity {facts['sft_heldout_perplexity']:.1f}. "
        f"Reward: TF-IDF + logistic regression, held-out accuracy {facts['reward_heldout_accuracy']:.3f}, "
        + (
            f"Pearson r = {facts['reward_vader_pearson']:.2f} against the human ratings of the VADER movie snippets. "
            if facts["reward_vader_pearson"] is not None
            else "agreement with human ratings not measured (no VADER snippets file; pass --vader). "
        )
        + f"Pairs: {facts['pairs']['pairs']} from {facts['pairs']['prompts']} prompts "
        f"({facts['pairs']['ties_dropped']} ties dropped). PPO's reward model (Bradley-Terry on π_SFT's backbone, "
        f"trained on {facts['reward_model']['train_pairs']} of the pairs): held-out pairwise accuracy "
        f"{facts['reward_model']['heldout_accuracy']:.3f} on the {facts['reward_model']['heldout_pairs']} pairs of "
        "prompts it was not trained on. "
        f"Runtime {seconds:.0f}s.",
        "",
        "| method | setting | seed | step | reward | KL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['seed']} | {r['step']} | {r['reward']:.3f} | {r['kl']:.2f} |"
        )
    lines += ["", "## What it shows", ""]
    for seed in sorted({r["seed"] for r in results}):
        sft = next(r["reward"] for r in results if r["method"] == "SFT" and r["seed"] == seed)
        dpo01 = [
            r["reward"] for r in results if r["method"] == "DPO" and r["setting"] == "beta=0.1" and r["seed"] == seed
        ]
        best = {
            m: max((r["reward"] for r in results if r["method"] == m and r["seed"] == seed), default=float("nan"))
            for m in ("DPO", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood", "Best-of-N")
        }
        dpo_text = f"DPO β=0.1 final {dpo01[-1]:.3f} ({dpo01[-1] - sft:+.3f})" if dpo01 else "no DPO β=0.1 run"
        lines.append(
            f"- seed {seed}: π_SFT reward {sft:.3f}; {dpo_text}; best reward per method: "
            + ", ".join(f"{m} {v:.3f}" for m, v in best.items())
        )
    noisy = [v for v in beaten if v["within_noise"]]
    lines.append(
        f"- Frontier check: at the KL of each of the {len(verdicts)} {', '.join(BASELINES)} points, DPO's "
        f"best reward at that KL or less is at least the baseline's for {len(checked) - len(beaten)} of "
        f"{len(checked)} points ({len(verdicts) - len(checked)} lie below every DPO point's KL: not comparable); "
        f"{len(noisy)} of the other {len(beaten)} are within two standard errors of the baseline's mean reward."
    )
    for v in beaten:
        lines.append(
            f"  - not dominated: {v['method']} {v['setting']} seed {v['seed']} step {v['step']}: reward "
            f"{v['reward']:.3f} at KL {v['kl']:.2f}, DPO best {v['dpo_best']:.3f} (gap "
            f"{v['reward'] - v['dpo_best']:.3f}{', within noise' if v['within_noise'] else ''})"
        )
    return "\n".join(lines + by_kl_range(results)) + "\n"


def by_kl_range(results: list[dict]) -> list[str]:
    """DPO against PPO and PPO-GT in each KL range: the best reward per seed in the range, the mean over seeds with
    its standard error, and who is ahead by more than two standard errors of the gap."""
    lines = [
        "",
        "## DPO against PPO, by KL range",
        "",
        "Each method's best mean reward among its points in the range, per seed, then the mean over the seeds where "
        "both methods have a point, ± its standard error (evaluation noise of those points). Ahead: the gap exceeds "
        "two standard errors.",
        "",
        "| KL range | other | seeds | DPO | other's | gap (DPO − other) | ahead |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for other in ("PPO", "PPO-GT"):
        for row in compare_by_kl(results, "DPO", other):
            span = f"[{row['kl_low']:g}, {row['kl_high']:g})"
            if row["ahead"] is None:
                lines.append(f"| {span} | {other} | – | – | – | – | no points of both |")
                continue
            lines.append(
                f"| {span} | {other} | {len(row['seeds'])} | {row['DPO_mean']:.3f} ± {row['DPO_se']:.3f} | "
                f"{row[f'{other}_mean']:.3f} ± {row[f'{other}_se']:.3f} | {row['gap']:+.3f} ± {row['gap_se']:.3f} | "
                f"{row['ahead']} |"
            )
    return lines
