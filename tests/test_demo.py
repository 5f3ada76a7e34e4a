"""`dpokit demo --quick` end to end: outputs, their structure, the direction of the result, and stage caching."""

import csv
import json
from pathlib import Path

import pytest

from dpokit.cli import main

pytestmark = pytest.mark.slow


def test_quick_demo(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"method", "setting", "step", "reward", "kl", "seed"} <= set(results[0])
    methods = {r["method"] for r in results}
    assert methods == {"SFT", "Best-of-N", "DPO", "Preferred-FT", "Unlikelihood", "PPO", "PPO-GT"}
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(results)
    assert (out / "frontier.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| DPO | beta=0.1 |" in report and "Frontier check" in report
    assert "## DPO against PPO, by KL range" in report and "| PPO-GT | target_kl=3.0 |" in report
    # PPO and PPO-GT: a point per snapshot of each target-KL run, and the policies moved away from π_SFT.
    ppo = [r for r in results if r["method"] in ("PPO", "PPO-GT")]
    assert len(ppo) == 2 * 2 * 2 and {r["setting"] for r in ppo} == {"target_kl=3.0", "target_kl=8.0"}
    assert all(r["kl"] > 0 for r in ppo)
    # Each trained run contributes several frontier points.
    assert len([r for r in results if r["method"] == "DPO" and r["setting"] == "beta=0.1"]) >= 3
    # The direction of the paper's result: DPO raises the reward over π_SFT, and the KL of a trained policy is positive.
    sft = next(r["reward"] for r in results if r["method"] == "SFT")
    dpo = [r for r in results if r["method"] == "DPO"]
    assert max(r["reward"] for r in dpo) > sft + 0.02
    assert all(r["kl"] > 0 for r in dpo)
    # Best-of-N's KL is the analytic log N − (N − 1)/N.
    assert [round(r["kl"], 4) for r in results if r["method"] == "Best-of-N"] == [0.0, 0.1931, 0.6363, 1.2044]
    facts = json.loads((out / "facts.json").read_text())
    assert 0.8 < facts["reward_heldout_accuracy"] < 1.0 and facts["reward_vader_pearson"] > 0.3
    assert facts["reward_model"]["heldout_pairs"] > 0 and 0.0 <= facts["reward_model"]["heldout_accuracy"] <= 1.0

    # A second run finds every stage cached and writes the same results.
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pi_SFT: cached" in printed and "samples and pairs: cached" in printed
    assert json.loads((out / "results.json").read_text()) == results
