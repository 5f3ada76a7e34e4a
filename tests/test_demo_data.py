"""Where `dpokit demo` finds its data: --imdb first, then the Hub data set stanfordnlp/imdb (here from a Hub cache
with HF_HUB_OFFLINE=1), then the shared data folder; one clear error when there is none."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.experiments import demo_data
from tests.conftest import IMDB, SHARED
from tests.hub_cache import put_repo


@pytest.fixture
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    return home


@pytest.mark.slow
def test_hub_imdb_comes_before_the_shared_folder(offline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub's IMDb ({text, label}, sorted by label like the real train split) is used when the cache has it."""
    with gzip.open(IMDB, "rt", encoding="utf-8") as f:
        rows = sorted(
            ({"text": r["review"], "label": int(r["sentiment"])} for r in map(json.loads, f)), key=lambda r: r["label"]
        )
    content = "".join(json.dumps(r) + "\n" for r in rows + rows[:1000]).encode()
    put_repo(offline_home, "dataset", "stanfordnlp/imdb", {"train.jsonl": content})
    monkeypatch.setenv("DPOKIT_DATA_DIR", str(SHARED))
    found = demo_data.find_demo_data()
    assert found.source == "stanfordnlp/imdb[train]" and len(found.reviews) == demo_data.REVIEWS
    assert 0.4 < sum(r["label"] for r in found.reviews[:4000]) / 4000 < 0.6  # shuffled, not label-sorted
    assert found.vader == SHARED / demo_data.VADER_FILE


def test_imdb_flag_wins_and_shared_folder_is_the_fallback(offline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPOKIT_DATA_DIR", str(SHARED))
    assert demo_data.find_demo_data(str(IMDB)).source == str(IMDB)
    fallback = demo_data.find_demo_data()  # the Hub cache is empty and offline: the shared folder
    assert fallback.source == str(SHARED / demo_data.IMDB_FILE) and len(fallback.reviews) == 5000


def test_no_data_anywhere_is_one_clear_error(
    offline_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_data, "shared_folders", lambda: [tmp_path / "nowhere"])
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "stanfordnlp/imdb" in err and "offline mode on" in err and str(tmp_path / "nowhere") in err
    assert "--imdb" in err and not out.exists()
