"""The output folder: --overwrite replaces only what dpokit wrote, and only once the new run starts writing; a folder
left with only the marker of a run killed before it wrote anything is free again."""

import json
import shutil
from pathlib import Path

import pytest

from dpokit.config import load_config
from dpokit.runfolder import MARKER, WRITTEN, OutputFolderError, claim
from dpokit.train import train
from tests.bad_input import RUN_ARGS
from tests.conftest import hh_rows, write_jsonl


def _config(tiny_model: Path, tmp_path: Path, out: Path, *extra: str):
    names = {"model": str(tiny_model), "data": str(write_jsonl(tmp_path / "d.jsonl", hh_rows(12))), "out": str(out)}
    return load_config(None, [a.format(**names) for a in (*RUN_ARGS, *extra)])


def test_overwrite_replaces_only_what_dpokit_wrote(tiny_model: Path, base_run: Path, tmp_path: Path) -> None:
    out = shutil.copytree(base_run, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "keep.txt").write_text("inside a folder dpokit owns")
    assert (out / "checkpoints" / "step-2").is_dir()
    train(_config(tiny_model, tmp_path, out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints").exists()  # the old run's checkpoints cannot be resumed by mistake
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_a_run_writes_only_the_names_it_declares(base_run: Path) -> None:
    assert {p.name for p in base_run.iterdir()} <= WRITTEN


def test_a_marker_alone_does_not_make_a_used_folder(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text('{"pid": 1}')  # a run killed before it wrote anything
    with claim(_config(tiny_model, tmp_path, out)) as folder:
        folder.begin()
    with pytest.raises(OutputFolderError, match="no run to resume"):
        with claim(_config(tiny_model, tmp_path, tmp_path / "new"), resume=True):
            pass
    assert not (tmp_path / "new").exists()


def test_the_lock_is_held_while_a_run_lives_and_released_after(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tiny_model, tmp_path, tmp_path / "run")
    with claim(config):
        with pytest.raises(OutputFolderError, match="in use by another dpokit run"):
            with claim(config):
                pass
    with claim(config) as folder:
        folder.begin()
