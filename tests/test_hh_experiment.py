"""`dpokit experiment hh --quick` end to end on the real HH files: disjoint splits, outputs and their structure,
win rates that match their per-comparison verdicts, plots, and stage caching."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.errors import UserError
from dpokit.experiments.hh import QUICK, Experiment, Sizes, with_settings
from tests.conftest import SHARED


def test_sizes_from_the_command_line() -> None:
    sizes = with_settings(Sizes(), ["eval_prompts=500", "beta=0.5", "temperatures=0.5,1.0"])
    assert (sizes.eval_prompts, sizes.beta, sizes.temperatures) == (500, 0.5, (0.5, 1.0))
    for bad in ("nope=1", "beta", "batch=x"):
        with pytest.raises(UserError):
            with_settings(QUICK, [bad])


def test_stage_keys_follow_the_settings_each_stage_reads(tmp_path) -> None:
    def keys(*settings: str) -> dict[str, str]:
        return Experiment(tmp_path, with_settings(QUICK, settings), tmp_path).keys()

    base = keys()
    changed = {
        "dpo_lr=0.1": {"dpo", "samples", "winrates"},
        "rm_lr=0.1": {"rm", "winrates"},
        "new_tokens=5": {"samples", "winrates"},
        "resamples=5000": {"winrates"},
        "sft_lr=0.1": {"sft", "dpo", "samples", "winrates"},
        "hidden_size=16": {"base", "sft", "dpo", "rm", "samples", "winrates"},
        "eval_prompts=3": {"data", "base", "sft", "dpo", "rm", "samples", "winrates"},
    }
    for setting, stages in changed.items():
        after = keys(setting)
        assert {name for name in base if after[name] != base[name]} == stages, setting


@pytest.mark.slow
def test_quick_experiment(tmp_path: Path, capsys) -> None:
    out = tmp_path / "hh"
    args = ["experiment", "hh", "--quick", "--out", str(out), "--hh", str(SHARED / "hh-rlhf")]
    assert main(args) == 0
    assert "DPO vs Preferred-FT under rm:" in capsys.readouterr().out

    data = {
        name: [json.loads(x) for x in (out / "data" / f"{name}.jsonl").open()] for name in ("policy", "rm", "held_out")
    }
    keys = {name: {r["prompt"] + r["chosen"] for r in rows} for name, rows in data.items()}
    assert (
        not keys["policy"] & keys["rm"] and not keys["policy"] & keys["held_out"] and not keys["rm"] & keys["held_out"]
    )
    prompts = [json.loads(x) for x in (out / "data" / "prompts.jsonl").open()]
    assert len(prompts) == QUICK.eval_prompts and all(p["prompt"].count("\n\nHuman:") == 1 for p in prompts)
    assert all(p["prompt"] + p["chosen"] in keys["held_out"] for p in prompts)

    saved = json.loads((out / "results.json").read_text())
    results, facts = saved["results"], saved["facts"]
    by_temperature = [r for r in results if r["step"] is None]
    assert {(r["comparison"], r["temperature"]) for r in by_temperature} == {
        (c, t) for c in ("DPO vs chosen", "Preferred-FT vs chosen", "DPO vs Preferred-FT") for t in QUICK.temperatures
    }
    steps = sorted({r["step"] for r in results if r["step"] is not None})
    assert steps[0] == 0 and len(steps) == QUICK.checkpoints + 1
    assert all(
        r["judged"] == QUICK.eval_prompts * QUICK.samples and r["ci_low"] <= r["win_rate"] <= r["ci_high"]
        for r in results
    )
    assert 0.0 <= facts["rm_heldout_accuracy"] <= 1.0
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(results)
    for png in ("winrate_vs_temperature.png", "winrate_over_steps.png"):
        assert (out / png).stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "**Finding**: DPO's best win rate against Preferred-FT's samples is" in report

    # Each win rate is the mean of its verdicts (ties ½) from its comparisons file.
    row = next(r for r in results if r["comparison"] == "DPO vs Preferred-FT" and r["temperature"] == 1.0)
    folder = out / "winrates" / "rm" / "DPO_vs_Preferred-FT-t1.0-stepNone"
    verdicts = [json.loads(x)["winner"] for x in (folder / "comparisons.jsonl").open()]
    assert row["win_rate"] == pytest.approx(
        sum({"candidate": 1, "tie": 0.5}.get(v, 0) for v in verdicts) / len(verdicts)
    )

    # A second run finds every stage cached and writes the same results.
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"[hh] {stage}: cached" in printed for stage in ("data", "base", "sft", "dpo", "rm", "samples"))
    assert json.loads((out / "results.json").read_text())["results"] == results
