"""The bad-input suite: hostile-but-realistic input given to the command line, one table row per case.

Every case runs `dpokit.cli.main` in-process in a fresh folder (the "world": a small data file, the tiny model, and
whatever the case sets up) and asserts the exit code, that no traceback is printed, that the one error line names
the offending key, file or value, and that no file outside the run's own folder changed. Most cases fail before
anything is loaded; the classes follow issue 14.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpokit.cli import main
from tests.bad_input import CLASSES, Case, World
from tests.bad_input.config_cases import CASES as CONFIG_CASES
from tests.bad_input.run_cases import CASES as RUN_CASES
from tests.conftest import hh_rows, write_jsonl

CASES: list[Case] = [*CONFIG_CASES, *RUN_CASES]


@pytest.fixture
def world(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
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
    if case.setup is not None:
        case.setup(world)
    refused = case.code != 0
    before = _snapshot(world, with_run=refused)
    code = _main([arg.format(**world.names) for arg in case.argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.code, err
    if refused:
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
