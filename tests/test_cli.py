"""Every command runs from the command line on real data and a tiny model, in seconds."""

import json
import subprocess
import sys
from pathlib import Path

from dpokit.cli import main
from tests.conftest import IMDB, ULTRAFEEDBACK_TRAIN


def test_help_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "dpokit", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("sft", "dpo", "precompute-ref", "preview", "validate", "init-model", "demo"):
        assert command in out


def test_init_model_sft_dpo_precompute(tmp_path: Path, hh_file: Path, capsys) -> None:
    model = tmp_path / "m"
    # UltraFeedback has an empty chosen and an empty rejected: counted and skipped, not a crash.
    assert (
        main(
            [
                "init-model",
                "--data",
                str(ULTRAFEEDBACK_TRAIN),
                "--out",
                str(model),
                "--vocab-size",
                "400",
                "--hidden-size",
                "32",
                "--heads",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "init-model",
                "--data",
                str(IMDB),
                "--text-field",
                "review",
                "--max-rows",
                "200",
                "--out",
                str(tmp_path / "m2"),
                "--vocab-size",
                "300",
                "--hidden-size",
                "32",
                "--heads",
                "2",
            ]
        )
        == 0
    )
    common = [
        f"model.path={model}",
        f"data.train_path={hh_file}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "train.max_steps=2",
    ]
    assert main(["sft", *common, f"train.output_dir={tmp_path / 'sft'}"]) == 0
    sft = tmp_path / "sft" / "final"
    cache = tmp_path / "ref.safetensors"
    dpo = [f"model.path={sft}", *common[1:]]
    assert main(["precompute-ref", *dpo, f"reference.cache={cache}"]) == 0
    assert (
        main(
            [
                "dpo",
                *dpo,
                f"train.output_dir={tmp_path / 'dpo'}",
                "reference.mode=precomputed",
                f"reference.cache={cache}",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["config"]["reference"]["mode"] == "precomputed" and summary["steps"] == 2
    assert "done:" in capsys.readouterr().out


def test_errors_are_one_line_for_people(tmp_path: Path, capsys) -> None:
    assert main(["dpo", "loss.betta=0.1"]) == 2
    assert "unknown key 'loss.betta' (did you mean 'beta'?)" in capsys.readouterr().err
    out = tmp_path / "out"
    args = [f"data.train_path={tmp_path / 'none.jsonl'}", f"train.output_dir={out}"]
    assert main(["dpo", f"model.path={tmp_path / 'missing'}", *args]) == 2
    assert "model path" in capsys.readouterr().err and not out.exists()
