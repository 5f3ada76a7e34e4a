"""train.report_to: TensorBoard, Weights & Biases (offline) and Trackio each get metrics.jsonl's names and values
and the resolved config; rank 0 only; a tracker that is not installed stops the run before anything is written."""

from __future__ import annotations

import importlib.machinery
import json
import struct
import sys
import types
from pathlib import Path

import pytest

from dpokit import tracking
from dpokit.config import load_config
from dpokit.errors import UserError
from dpokit.train import train
from tests.conftest import read_metrics, tiny_run

BLOCK = 32768


def wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` run file: a 7-byte header (`:W&B`, magic, version), then LevelDB-log
    blocks of 32 KiB holding records of (crc32 4, length 2, type 1: full/first/middle/last) + data."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending += data
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture
def fake_trackio(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Trackio does not install beside this environment's packages, so a stand-in module records the calls that
    dpokit makes through trackio's documented API (init/log/finish)."""
    calls: dict = {"init": [], "log": [], "finish": 0}
    module = types.ModuleType("trackio")
    module.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    module.init = lambda **kw: calls["init"].append(kw)  # type: ignore[attr-defined]
    module.log = lambda metrics, step=None: calls["log"].append((step, dict(metrics)))  # type: ignore[attr-defined]

    def finish() -> None:
        calls["finish"] += 1

    module.finish = finish  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trackio", module)
    return calls


@pytest.mark.slow
def test_each_tracker_gets_the_metrics_and_the_config(
    tiny_model: Path, hh_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_trackio: dict
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    extra = ["train.max_steps=2", "data.eval_fraction=0.2", "train.eval_every=1", "train.micro_batch_size=8"]
    trackers = "train.report_to=[tensorboard,wandb,trackio]"
    config = load_config(None, [*tiny_run(tiny_model, hh_file, out), *extra, trackers])
    train(config)
    rows = read_metrics(out)
    expected = {(row["step"], k): v for row in rows for k, v in row.items() if k != "step"}
    assert any(k == "eval/loss" for _, k in expected) and any(k == "rewards/accuracies" for _, k in expected)

    # Weights & Biases: the offline run folder holds every metric at its step, and the config.
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            logged |= {(items["_step"], k): v for k, v in items.items() if not k.startswith("_")}
    assert logged == pytest.approx(expected)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    stored = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert stored["loss"]["beta"] == 0.5 and stored["train"]["output_dir"] == str(out)

    # TensorBoard: the same scalars, and the config as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert scalars == pytest.approx(expected, rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]

    # Trackio (stand-in): the same calls.
    assert fake_trackio["init"][0]["config"]["loss"]["beta"] == 0.5 and fake_trackio["finish"] == 1
    assert {(step, k): v for step, m in fake_trackio["log"] for k, v in m.items()} == expected


def test_missing_tracker_stops_before_anything_is_written(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [*tiny_run(tiny_model, hh_file, out), "train.micro_batch_size=8", "train.report_to=[trackio]"]
    config = load_config(None, overrides)
    message = r"train.report_to lists trackio, which is not installed: pip install 'dpokit\[trackio\]'"
    with pytest.raises(UserError, match=message):
        train(config)
    assert not out.exists()


def test_default_and_rank_zero_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert tracking.resolve(None) == ("tensorboard",)  # tensorboard is a dev dependency
    assert tracking.resolve(()) == ()
    monkeypatch.setattr(tracking.distributed, "is_main", lambda: False)
    assert tracking.open_trackers(("tensorboard",), tmp_path, {}, False) == []
    assert not (tmp_path / "tensorboard").exists()
