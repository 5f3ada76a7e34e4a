"""Models and data sets by Hub id, from a Hub cache in a temp HF_HOME with HF_HUB_OFFLINE=1 (no network here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.hub import HubDataset, HubError, is_hub_id, resolve_model
from tests.conftest import hh_rows
from tests.hub_cache import folder_files, put_repo

MODEL_ID = "dpokit-test/tiny-llama"
DATA_ID = "dpokit-test/hh-pairs"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> Path:
    """A Hub cache holding the tiny model and an HH preference data set (folder helpful-base: train and test
    splits of real rows, the 2nd train row repeated with chosen == rejected), offline mode on."""
    home = tmp_path / "hf"
    put_repo(home, "model", MODEL_ID, folder_files(tiny_model))
    train = hh_rows(40)
    train.append({"chosen": train[1]["chosen"], "rejected": train[1]["chosen"]})
    files = {"helpful-base/train.jsonl": _jsonl(train), "helpful-base/test.jsonl": _jsonl(hh_rows(48)[40:])}
    put_repo(home, "dataset", DATA_ID, files)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


@pytest.mark.slow
def test_model_and_data_by_hub_id_through_the_cli(hf_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        f"model.path={MODEL_ID}",
        f"data.train_path={DATA_ID}",
        "data.data_dir=helpful-base",
        "data.eval_split=test",
        "data.max_length=64",
        "data.max_prompt_length=32",
        f"train.output_dir={out}",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "train.max_steps=1",
    ]
    assert main(["dpo", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["loaded"] == 41
    assert summary["data"]["eval"]["loaded"] == 8
    assert summary["data"]["train"]["examples"]["identical_chosen_rejected"][0] == f"{DATA_ID}[train]:41"
    assert "eval/loss" in summary["eval"]


def test_unknown_id_is_one_clear_error(hf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"data.train_path={DATA_ID}", "data.data_dir=helpful-base", f"train.output_dir={tmp_path / 'r'}"]
    assert main(["dpo", "model.path=nobody/no-such-model", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'nobody/no-such-model'" in err and str(hf_home / "hub") in err and "offline mode is on" in err
    no_data = ["data.train_path=nobody/no-data", f"train.output_dir={tmp_path / 'r2'}"]
    assert main(["dpo", f"model.path={MODEL_ID}", *no_data]) == 2
    err = capsys.readouterr().err
    assert "data set 'nobody/no-data'" in err and "offline mode is on" in err and "Traceback" not in err


def test_local_path_wins_and_revision_picks_a_snapshot(hf_home: Path, tmp_path: Path) -> None:
    other = put_repo(hf_home, "model", MODEL_ID, {"config.json": b"{}"}, commit="1" * 40, ref="v1")
    assert Path(resolve_model(MODEL_ID)).name == "0" * 40
    assert Path(resolve_model(MODEL_ID, revision="v1")) == other
    local = tmp_path / MODEL_ID
    local.mkdir(parents=True)
    assert resolve_model(MODEL_ID) == MODEL_ID  # relative to the working directory, which holds that folder
    assert not is_hub_id(MODEL_ID)
    with pytest.raises(HubError, match="revision 'v2'"):
        resolve_model("dpokit-test/other", revision="v2")


def test_file_like_names_are_never_hub_ids() -> None:
    assert is_hub_id("Anthropic/hh-rlhf") and is_hub_id("imdb")
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("../x") and not is_hub_id("/abs/path")
    assert str(HubDataset("a/b", "test")) == "a/b[test]"
