"""Win rates, plots and the report of `dpokit experiment hh` (the stages are in `dpokit.experiments.hh`)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dpokit.config import DataConfig
from dpokit.eval.judges import Judge, make_judge
from dpokit.eval.plots import plot_over_steps, plot_vs_temperature
from dpokit.eval.samples import PromptRow, data_records, row_id
from dpokit.eval.winrate import (
    Pairing,
    against_chosen,
    against_samples,
    judge_pairings,
    load_samples,
    summarize,
)
from dpokit.eval.winrate import (
    write_outputs as write_winrate,
)

if TYPE_CHECKING:
    from dpokit.experiments.hh import Experiment

FIELDS = ["judge", "comparison", "temperature", "step", "win_rate", "ci_low", "ci_high", "judged", "comparisons"]
FIELDS += ["wins", "ties", "losses", "unparseable", "failed"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name.split("/")[-2] if name.startswith("rm:") else name)[-60:]


def comparisons(exp: Experiment, first_judge: bool) -> list[tuple[str, float, int | None, list[Pairing]]]:
    """(comparison, temperature, step or None, pairings) for one judge; the steps series for the first judge only."""
    data = DataConfig(**exp.data_config("prompts.jsonl"))
    records, _ = data_records(data)
    prompts = [PromptRow(row_id(r.source), r.prompt, r.completions[0], ()) for r in records]
    steps = exp.dpo_steps()
    final = max(steps)
    samples = exp.out / "samples"

    def rows(step: int, t: float) -> list[dict[str, Any]]:
        return load_samples(samples / f"step{step}-t{t}.jsonl")

    out: list[tuple[str, float, int | None, list[Pairing]]] = []
    for t in exp.sizes.temperatures:
        out.append(("DPO vs chosen", t, None, against_chosen(rows(final, t), prompts)))
        out.append(("Preferred-FT vs chosen", t, None, against_chosen(rows(0, t), prompts)))
        out.append(("DPO vs Preferred-FT", t, None, against_samples(rows(final, t), rows(0, t))))
        if first_judge:
            out += [("DPO vs chosen", t, step, against_chosen(rows(step, t), prompts)) for step in sorted(steps)]
    return out


def judge_all(exp: Experiment, specs: Sequence[str], options: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """Every comparison under every judge; each comparison's verdicts cached in `winrates/<judge>/<name>/`."""
    results = []
    for i, spec in enumerate(specs):
        judge: Judge | None = None
        for name, t, step, pairings in comparisons(exp, first_judge=i == 0):
            folder = exp.out / "winrates" / _slug(spec) / f"{name.replace(' ', '_')}-t{t}-step{step}"
            stamp = folder / ".dpokit-stage"
            if not (stamp.exists() and stamp.read_text() == key):
                if judge is None:
                    cache = exp.out / "winrates" / "verdict_cache.jsonl"
                    judge = make_judge(spec, "dialogue", **({"cache": cache} | options))
                records = judge_pairings(judge, pairings, exp.seed)
                summary = summarize(records, exp.sizes.resamples, exp.seed) | {"judge": judge.name}
                summary |= {"candidate": name.split(" vs ")[0], "baseline": name.split(" vs ")[1]}
                write_winrate(
                    folder, records, summary, f"{name}, temperature {t}" + (f", step {step}" * (step is not None))
                )
                stamp.write_text(key)
            summary = json.loads((folder / "summary.json").read_text())
            results.append({"judge": spec, "comparison": name, "temperature": t, "step": step} | summary)
    return results


def write_outputs(exp: Experiment, results: list[dict[str, Any]], facts: dict[str, Any], seconds: float) -> None:
    out = exp.out
    (out / "results.json").write_text(json.dumps({"results": results, "facts": facts}, indent=2))
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    judges = list(dict.fromkeys(r["judge"] for r in results))
    for spec in judges:
        suffix = "" if spec == judges[0] else f"-{_slug(spec)}"
        plot_vs_temperature(results, spec, out / f"winrate_vs_temperature{suffix}.png", "HH single-turn dialogue")
    plot_over_steps(results, judges[0], out / "winrate_over_steps.png", "DPO over training (HH single-turn)")
    (out / "report.md").write_text(report(results, facts, judges, seconds), encoding="utf-8")


def _cell(r: dict[str, Any]) -> str:
    return f"{r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def finding(results: Sequence[dict[str, Any]], judge: str) -> dict[str, Any]:
    """DPO against Preferred-FT at the temperature where DPO does best, and whether its lower bound clears 50%."""
    rows = [r for r in results if r["judge"] == judge and r["comparison"] == "DPO vs Preferred-FT"]
    best = max(rows, key=lambda r: r["win_rate"])
    return {
        "temperature": best["temperature"],
        "win_rate": best["win_rate"],
        "ci_low": best["ci_low"],
        "ci_high": best["ci_high"],
        "judged": best["judged"],
        "lower_bound_above_half": best["ci_low"] > 0.5,
    }


def report(results: Sequence[dict[str, Any]], facts: dict[str, Any], judges: Sequence[str], seconds: float) -> str:
    counts, sizes = facts["counts"], facts["sizes"]
    lines = [
        "# Single-turn dialogue (Anthropic HH): win rates of DPO and Preferred-FT",
        "",
        "![win rate vs temperature](winrate_vs_temperature.png) ![over training](winrate_over_steps.png)",
        "",
        f"Base model: {facts['base']} ({facts['parameters']:,} parameters after Preferred-FT). Pairs: "
        f"{counts['policy']} for the policies, {counts['rm']} for the reward model, {counts['held_out']} held out "
        f"({counts['prompts']} single-turn evaluation prompts, {sizes['samples']} samples each per temperature). "
        f"Reward model (the judge): held-out pairwise accuracy {facts['rm_heldout_accuracy']:.3f}, mean margin "
        f"{facts['rm_heldout_margin']:.3f} (train {facts['rm_train_accuracy']:.3f}). β = {sizes['beta']}. "
        f"Runtime {seconds:.0f}s.",
        "",
    ]
    for judge in judges:
        lines += [
            f"## Judge `{judge}`",
            "",
            "| temperature | DPO vs chosen | Preferred-FT vs chosen | DPO vs Preferred-FT |",
        ]
        lines.append("| --- | --- | --- | --- |")
        for t in sizes["temperatures"]:
            cells = {
                r["comparison"]: _cell(r)
                for r in results
                if r["judge"] == judge and r["temperature"] == t and r["step"] is None
            }
            order = ("DPO vs chosen", "Preferred-FT vs chosen", "DPO vs Preferred-FT")
            lines.append(f"| {t} | " + " | ".join(cells[c] for c in order) + " |")
        f = finding(results, judge)
        verdict = "above" if f["lower_bound_above_half"] else "not above"
        lines += [
            "",
            f"**Finding**: DPO's best win rate against Preferred-FT's samples is {f['win_rate']:.3f} at temperature "
            f"{f['temperature']} (95% CI [{f['ci_low']:.3f}, {f['ci_high']:.3f}], {f['judged']} comparisons): the "
            f"lower bound is {verdict} 50%.",
            "",
        ]
        bad = sum(r["unparseable"] + r["failed"] for r in results if r["judge"] == judge)
        if bad:
            lines += [f"{bad} verdicts were unparseable or failed and are left out (see winrates/).", ""]
    steps = sorted(
        (r for r in results if r["judge"] == judges[0] and r["step"] is not None),
        key=lambda r: (r["temperature"], r["step"]),
    )
    lines += ["## Sample lengths (a reward model may prefer length; read the win rates with these)", ""]
    lines += [
        "| temperature | Preferred-FT tokens (ended with EOS) | DPO tokens (ended with EOS) |",
        "| --- | --- | --- |",
    ]
    for t, sft, dpo in facts.get("lengths", []):
        lines.append(f"| {t} | {sft[0]:.1f} ({sft[1]:.0%}) | {dpo[0]:.1f} ({dpo[1]:.0%}) |")
    lines += ["", "## Over training (DPO vs chosen; step 0 is Preferred-FT)", "", "| temperature | step | win rate |"]
    lines.append("| --- | --- | --- |")
    lines += [f"| {r['temperature']} | {r['step']} | {_cell(r)} |" for r in steps]
    lines += [
        "",
        "Win rates count ties as ½; intervals are percentile bootstraps over comparisons "
        f"({sizes['resamples']} resamples). Per-comparison verdicts: "
        "`winrates/<judge>/<comparison>/comparisons.jsonl`.",
    ]
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, Any]) -> str:
    judges = list(dict.fromkeys(r["judge"] for r in result["results"]))
    f = finding(result["results"], judges[0])
    return (
        f"DPO vs Preferred-FT under {judges[0]}: {f['win_rate']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}] at "
        f"temperature {f['temperature']}; reward model held-out accuracy {result['facts']['rm_heldout_accuracy']:.3f}"
    )
