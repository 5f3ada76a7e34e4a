"""The Python API a notebook uses: `from dpokit import load_config, train`, the summary returned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_run


@pytest.mark.slow
def test_load_config_and_train_from_python(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    from dpokit import load_config, train

    out = tmp_path / "run"
    config = load_config(None, [*tiny_run(tiny_model, hh_file, out), "train.micro_batch_size=8", "train.max_steps=1"])
    summary = train(config)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["config"]["train"]["output_dir"] == str(out)


def test_the_package_exports_the_function_and_the_module_stays_reachable() -> None:
    import importlib

    import dpokit

    assert callable(dpokit.train) and dpokit.train.__module__ == "dpokit.train"
    assert importlib.import_module("dpokit.train").train is dpokit.train
    assert {"load_config", "train", "precompute_reference", "export"} <= set(dpokit.__all__)
