"""Every command runs from the command line on real data and a tiny model, in seconds."""

import dataclasses
import importlib
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dpokit.cli import PREVIEW_FIELDS, _data_config, _parser, field_docs, main
from dpokit.config import ConfigError, DataConfig, RunConfig
from dpokit.losses import LOSSES
from tests.conftest import IMDB, ULTRAFEEDBACK_TRAIN

COMMANDS = [
    "sft",
    "dpo",
    "precompute-ref",
    "rm",
    "preview",
    "validate",
    "demo",
    "export",
    "init-model",
    "generate",
    "winrate",
    "experiment",
]


def test_help_lists_the_commands(capsys) -> None:
    out = subprocess.run([sys.executable, "-m", "dpokit", "--help"], capture_output=True, text=True, check=True).stdout
    listed = re.search(r"^usage: dpokit \[-h\] \[--debug\]\s+\{([a-z,-]+)\}", out, re.MULTILINE)
    assert listed is not None and listed.group(1).split(",") == COMMANDS, out
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f"usage: dpokit {command} ")
        assert "--debug" in out, f"dpokit {command} has no --debug"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_training_help_documents_every_config_field(capsys) -> None:
    """`dpokit dpo --help` lists each field of the schema with its default and its docstring (read from config.py)."""
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = _one_line(capsys.readouterr().out)
    for part in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[part.name]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f"{part.name}.{f.name} = {json.dumps(f.default)}" in out
            assert docs[f.name] and docs[f.name] in out, f.name
    assert f'loss.name = "sigmoid" ({" | ".join(LOSSES)})' in out and "| plackett_luce |" in out


def test_preview_and_validate_flags_come_from_the_schema(capsys) -> None:
    """Their data flags are DataConfig's fields: the schema's defaults, docstrings and checks, none restated."""
    args = _parser().parse_args(["preview", "pairs.jsonl", "--model", "m"])
    assert _data_config(args, PREVIEW_FIELDS, on_error="skip") == DataConfig(train_path="pairs.jsonl", on_error="skip")
    flags = ["--max-length", "40", "--max-prompt-length", "8", "--chat", "--text-field", "1", "--format", "text"]
    config = _data_config(
        _parser().parse_args(["preview", "x", "--model", "m", *flags, "--max-examples", "7"]), PREVIEW_FIELDS
    )
    assert (config.max_length, config.max_prompt_length, config.chat, config.text_field) == (40, 8, True, "1")
    assert config.format == "text" and config.max_examples == 7
    args = _parser().parse_args(["preview", "pairs.jsonl", "--model", "m", "--max-prompt-length", "600"])
    with pytest.raises(ConfigError, match=r"data.max_prompt_length \(600\) must be below data.max_length \(512\)"):
        _data_config(args, PREVIEW_FIELDS)
    for command in ("preview", "validate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = _one_line(capsys.readouterr().out)
        assert _one_line(field_docs(DataConfig)["max_prompt_length"]) in out and "default: 256" in out


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
    for argv, message in (
        (["dpo", str(tmp_path / "missing.yaml")], "config file '"),
        (["dpo", *args], "no model given: set model.path"),
        (["dpo", "train.precision=bf16", "train.device=cpu", *args], "train.precision=bf16 needs a CUDA device"),
        (["precompute-ref", *args], "precompute-ref writes to reference.cache"),
        (["dpo", "model.attn_implementation=flex_attention", "train.device=cpu", *args], "FlexAttention backward"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"dpokit {argv[0]}: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_an_empty_section_is_an_empty_mapping(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\nreference:\nloss:\n")
    assert main(["sft", str(config)]) == 2
    assert "no model given" in capsys.readouterr().err
    assert main(["dpo", str(config), "reference.mode=none", "loss.name=ipo"]) == 2
    assert "reference-free" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only dpokit's UserError becomes one line; anything else (a ValueError included) is a bug and propagates."""

    def buggy(config, resume=False, overwrite=False):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(importlib.import_module("dpokit.train"), "train", buggy)  # `dpokit.train` is the function
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["dpo", "model.path=x"])
    with pytest.raises(ConfigError, match="unknown key"):
        main(["--debug", "dpo", "loss.betta=0.1"])
    with pytest.raises(ConfigError, match="unknown key"):
        main(["dpo", "--debug", "loss.betta=0.1"])
