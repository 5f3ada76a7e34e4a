"""The bad-input suite: hostile-but-realistic input given to the command line, one table row per case.

Every case runs `dpokit.cli.main` in-process in a fresh folder (the "world": a small data file, the tiny model, and
whatever the case sets up) and asserts the exit code, that no traceback is printed, that the one error line names
the offending key, file or value, and that no file outside the run's own folder changed. Most cases fail before
anything is loaded; the classes follow issue 14.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from tests.bad_input import CLASSES, RUN_ARGS, Case, World
from tests.bad_input.config_cases import CASES as CONFIG_CASES
from tests.bad_input.content_cases import CASES as CONTENT_CASES
from tests.bad_input.file_cases import CASES as FILE_CASES
from tests.bad_input.run_cases import CASES as RUN_CASES
from tests.conftest import hh_rows, write_jsonl

CASES: list[Case] = [*CONFIG_CASES, *RUN_CASES, *FILE_CASES, *CONTENT_CASES]


@pytest.fixture
def world(
    tmp_path: Path,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[World]:
    root = tmp_path / "world"
    root.mkdir()
    monkeypatch.chdir(root)
    data = write_jsonl(root / "data.jsonl", hh_rows(12))
    world = World(root, tiny_model, data, root / "run", lambda: request.getfixturevalue("base_run"))
    yield world
    for held in world.keep:
        if isinstance(held, int):
            os.close(held)


def _snapshot(world: World, with_run: bool) -> dict[str, str]:
    """Every file and folder (outside the run's own folder unless `with_run`), with a digest of its content."""
    seen = {}
    for base in (world.root, world.model):
        for path in sorted(base.rglob("*")):
            if not with_run and (path == world.out or world.out in path.parents):
                continue
            seen[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (usage, exclusive flags)
        return int(e.code or 0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.kind}:{c.id}")
def test_bad_input(case: Case, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused command changes nothing at all, its own output folder included; one that goes on (a resume that
    skips a damaged checkpoint) changes nothing outside its folder and says what it did."""
    if not case.applies():
        pytest.skip("not a fault on this machine")
    if case.setup is not None:
        case.setup(world)
    refused = case.code != 0
    before = _snapshot(world, with_run=refused)
    code = _main([arg.format(**world.names) for arg in case.argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.code, err
    if case.said == "out":
        said = out
    elif refused:
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1, err
        said = errors[0]
    else:
        said = out + err
    for text in case.expect:
        assert text.format(**world.names) in said
    assert _snapshot(world, with_run=refused) == before


def test_the_suite_covers_every_class() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} <= set(CLASSES)


@pytest.mark.slow
def test_sigint_while_the_data_loads_is_one_line_and_leaves_no_trace(tiny_model: Path, tmp_path: Path) -> None:
    """A real process and a real signal: the data file is a pipe, so the run is certainly reading it when the
    signal comes."""
    fifo, out = tmp_path / "data.jsonl", tmp_path / "run"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "TQDM_DISABLE": "1"}
    argv = [sys.executable, "-m", "dpokit", "dpo", f"model.path={tiny_model}", f"data.train_path={fifo}"]
    process = subprocess.Popen([*argv, f"train.output_dir={out}"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while True:  # opening the pipe for writing succeeds once the run has opened it for reading
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert process.poll() is None and time.time() < deadline, "the run never read its data"
            time.sleep(0.05)
    os.write(writer, (json.dumps(hh_rows(1)[0]) + "\n").encode())
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    os.close(writer)
    assert process.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "interrupted (SIGINT)" in err
    assert not out.exists()


def _run(tiny_model: Path, tmp_path: Path, *extra: str) -> list[str]:
    names = {"model": str(tiny_model), "data": str(write_jsonl(tmp_path / "d.jsonl", hh_rows(12))), "out": ""}
    return ["dpo", *(a.format(**names) for a in RUN_ARGS if "output_dir" not in a), *extra]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dpokit.checkpoint

    real, saves = dpokit.checkpoint.torch.save, []

    def fills_the_disk(obj, path, *args, **kwargs):
        saves.append(path)
        # The second checkpoint's first write: torch.distributed.checkpoint writing its shards (into a buffer).
        if not isinstance(path, (str, Path)) and any("step-1" in str(p) for p in saves):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(dpokit.checkpoint.torch, "save", fills_the_disk)
    out = tmp_path / "run"
    args = _run(tiny_model, tmp_path, f"train.output_dir={out}", "train.max_steps=3", "train.save_every=1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no space left on the device writing" in err and "--resume" in err and "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp")] == ["step-1"]


def test_running_out_of_accelerator_memory_says_what_to_lower(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sys.modules["dpokit.train"], "batch_loss", too_big)
    assert main(_run(tiny_model, tmp_path, f"train.output_dir={tmp_path / 'run'}")) == 2
    err = capsys.readouterr().err
    assert "out of accelerator memory (CUDA out of memory" in err and "train.micro_batch_size (now 4" in err
