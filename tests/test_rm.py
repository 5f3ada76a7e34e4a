"""Reward models: the Bradley-Terry loss by hand (with its margin), the config rules, and `dpokit rm` on the tiny
model: first loss ln 2 (softplus(m) with a margin), pairwise accuracy and margin as metrics, a sequence-classification
folder that plain transformers loads and scores as dpokit does, and the rm: judge on held-out prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.config import ConfigError, load_config
from dpokit.eval.judges import Comparison, make_judge
from dpokit.losses import bradley_terry_loss, compute_loss
from dpokit.rm import load_reward_model, reward_config, score_texts
from tests.conftest import read_metrics, write_jsonl
from tests.test_judges import yes_no_rows


def test_bradley_terry_loss_by_hand() -> None:
    """−log σ(r_w − r_l − m): r = (2, 0.5) gives −log σ(1.5) = 0.20141; with m = 1, −log σ(0.5) = 0.47408."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.0])
    out = bradley_terry_loss(chosen, rejected)
    assert out.losses.tolist() == pytest.approx([0.201413, math.log(2)], abs=1e-5)
    assert out.rewards.tolist() == [[2.0, 0.5], [0.0, 0.0]]
    with_margin = compute_loss(
        "bradley_terry",
        policy_logps=torch.stack([chosen, rejected], 1),
        reference_logps=torch.zeros(2, 2),
        lengths=torch.ones(2, 2),
        margin=1.0,
    )
    assert with_margin.losses.tolist() == pytest.approx([0.474077, math.log(1 + math.e)], abs=1e-5)


def test_reward_model_config_rules() -> None:
    with pytest.raises(ConfigError, match="bradley_terry"):
        load_config(None, ["model.head=score", "reference.mode=none", "loss.name=sft"])
    with pytest.raises(ConfigError, match="reward model"):
        load_config(None, ["loss.name=bradley_terry", "reference.mode=none"])
    with pytest.raises(ConfigError, match="margin"):
        load_config(None, ["loss.margin=1.0"])
    config = reward_config(None, ["model.path=x", "loss.margin=0.5"])
    assert (config.model.head, config.loss.name, config.reference.mode, config.loss.margin) == (
        "score",
        "bradley_terry",
        "none",
        0.5,
    )


@pytest.fixture(scope="module")
def yes_rm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dpokit rm` on "yes ≻ no" pairs, 10 steps, with held-out pairs."""
    tmp = tmp_path_factory.mktemp("rm")
    train, held_out = write_jsonl(tmp / "t.jsonl", yes_no_rows(32)), write_jsonl(tmp / "e.jsonl", yes_no_rows(8, 50))
    out = tmp / "rm"
    args = [
        f"model.path={tiny_model}",
        f"data.train_path={train}",
        f"data.eval_path={held_out}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        f"train.output_dir={out}",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "train.max_steps=10",
        "train.lr=5e-3",
    ]
    assert main(["rm", *args]) == 0
    return out


def test_rm_command_trains_a_reward_model(yes_rm: Path) -> None:
    steps = read_metrics(yes_rm)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the head starts at zero: every score 0
    summary = json.loads((yes_rm / "summary.json").read_text())
    assert summary["eval"]["eval/rewards/accuracies"] == 1.0
    assert summary["eval"]["eval/rewards/margins"] > 0.5
    assert summary["config"]["model"]["head"] == "score"


def test_saved_reward_model_scores_the_same_in_transformers(yes_rm: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(yes_rm / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(yes_rm / "final")
    model, _ = load_reward_model(str(yes_rm / "final"))
    prompts = [r["prompt"] for r in yes_no_rows(3, 70)]
    ours = score_texts(model, tokenizer, prompts, [" yes", " no", " yes"])
    with torch.no_grad():
        theirs = [
            float(plain(**tokenizer(p + a, return_tensors="pt")).logits[0, 0])
            for p, a in zip(prompts, [" yes", " no", " yes"], strict=True)
        ]
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_rm_judge(yes_rm: Path) -> None:
    judge = make_judge(f"rm:{yes_rm / 'final'}")
    prompts = [r["prompt"] for r in yes_no_rows(3, 90)]
    verdicts = judge.judge([Comparison(p, " yes", " no") for p in prompts] + [Comparison(prompts[0], " no", " yes")])
    assert [v.outcome for v in verdicts] == ["A", "A", "A", "B"]
    assert verdicts[0].detail["score_a"] > verdicts[0].detail["score_b"]


def test_rm_with_margin_starts_at_softplus_margin(tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "t.jsonl", yes_no_rows(8))
    out = tmp_path / "rm"
    common = [f"model.path={tiny_model}", f"data.train_path={data}", f"train.output_dir={out}"]
    assert (
        main(["rm", *common, "train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=1", "loss.margin=1.0"])
        == 0
    )
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(1 + math.e), abs=1e-6)
