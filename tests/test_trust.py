"""Trust: bad input is reported with its place, interrupted runs resume exactly, checkpoints are atomic,
non-finite steps are skipped and counted, and the same seed gives the same run."""

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from dpokit import checkpoint as checkpoint_module
from dpokit.cli import main
from dpokit.config import ConfigError, load_config
from dpokit.data.formats import load_records
from dpokit.data.report import DataError
from dpokit.reference import ReferenceMismatch
from dpokit.train import NonFiniteError, train
from tests.conftest import read_metrics, tiny_run

ROOT = Path(__file__).resolve().parents[1]

# Every kind of bad input a JSON-lines file can hold, and the reason it is counted under.
BAD_LINES = {
    b"not json at all": ("invalid_json", "invalid JSON"),
    b'{"prompt": "p", "chosen": "a"}': ("missing_field", "missing field 'rejected'"),
    b'{"prompt": "p", "chosen": "a", "rejected": "b", "ranking": [0]}': (
        "unexpected_field",
        "unexpected field 'ranking'",
    ),
    b'{"prompt": "p", "chosen": "a", "rejected": ["b"]}': ("wrong_type", "field 'rejected' must be a string"),
    b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}': ("not_utf8", "not UTF-8"),
    b'["a", "b"]': ("not_an_object", "must be a JSON object"),
}
QUIRK_LINES = {
    b'{"prompt": "p", "chosen": "", "rejected": "b"}': "empty_chosen",
    b'{"prompt": "p", "chosen": "same", "rejected": "same"}': "identical_chosen_rejected",
}


def _bad_file(tmp_path: Path) -> Path:
    lines = [b'{"prompt": "p", "chosen": "good", "rejected": "bad", "id": 7}', *BAD_LINES, *QUIRK_LINES]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_row_is_named_and_counted(tmp_path: Path, capsys) -> None:
    path = _bad_file(tmp_path)
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        load_records(path)
    records, report = load_records(path, on_error="skip")
    assert len(records) == 1
    for line, (reason, text) in enumerate(BAD_LINES.values(), start=2):
        assert report.skipped[reason] == 1 and report.where[reason] == [f"{path}:{line}"]
        assert any(m.startswith(f"{path}:{line}: ") and text in m for m in report.messages), text
    for reason in QUIRK_LINES.values():
        assert report.skipped[reason] == 1
    assert report.ignored_fields == {"id": 1}
    assert report.loaded == 1 + len(BAD_LINES) + len(QUIRK_LINES) == len(records) + sum(report.skipped.values())
    # The command prints each message and exits 1.
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert all(f"{path}:{line}:" in out for line in range(2, 2 + len(BAD_LINES)))


def test_validate_passes_a_clean_file_and_counts_quirks(capsys) -> None:
    from tests.conftest import HH

    assert main(["validate", str(HH["helpful-online"])]) == 0
    assert "identical_chosen_rejected: 2" in capsys.readouterr().out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.one_of(
                st.sampled_from([*BAD_LINES, *QUIRK_LINES, b'{"prompt": "p", "chosen": "a", "rejected": "b"}']),
                st.binary(max_size=40),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: (
                        st.lists(c, max_size=3)
                        | st.dictionaries(
                            st.sampled_from(
                                ["prompt", "chosen", "rejected", "responses", "ranking", "pairs", "text", "x"]
                            ),
                            c,
                            max_size=4,
                        )
                    ),
                ).map(lambda v: json.dumps(v).encode()),
            ),
            max_size=6,
        ).map(b"\n".join),
    )
)
def test_any_bytes_give_records_or_a_located_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(content)
    try:
        load_records(path)
    except DataError as e:
        assert str(e).startswith(f"{path}:"), str(e)
    records, report = load_records(path, on_error="skip")
    assert report.loaded == sum(1 for line in content.split(b"\n") if line.strip())
    assert report.records == len(records)


TRUST_RUN = ["train.micro_batch_size=4", "train.deterministic=true"]


def _config(tiny_model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [*tiny_run(tiny_model, data, out), *TRUST_RUN, *extra])


_metrics = read_metrics


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in _metrics(out) if "loss" in m]


def test_same_seed_same_run(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        train(_config(tiny_model, hh_file, tmp_path / name, "train.max_steps=3"))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a, b = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dpokit", "dpo", *tiny_run(tiny_model, data, out), *TRUST_RUN, *extra]


def _wait_for_rows(out: Path, rows: int, process: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and process.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {rows} steps")


KILL_SEED = 20261128
"""Seeds the draw of the step the SIGKILL test kills at; the draw and what it found are in every assertion message."""


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_exact(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    steps = ["train.max_steps=10", "train.save_every=1"]
    subprocess.run(_cli(tiny_model, hh_file, tmp_path / "full", *steps), check=True, capture_output=True, env=_env())
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cli(tiny_model, hh_file, killed, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    kill_after = random.Random(KILL_SEED).randint(2, 8)
    _wait_for_rows(killed, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = (killed / "metrics.jsonl").read_text().splitlines()
    last = checkpoint_module.latest_checkpoint(killed / "checkpoints")
    assert last is not None, f"killed after {kill_after} metric rows (seed {KILL_SEED}) with no checkpoint"
    at = int(last.name.split("-")[1])
    where = f"killed after {kill_after} metric rows (seed {KILL_SEED}, {len(before)} written), newest checkpoint {at}"
    print(where)
    resumed = subprocess.run(
        [*_cli(tiny_model, hh_file, killed, *steps), "--resume"], check=True, capture_output=True, text=True, env=_env()
    )
    # The resumed process started at the checkpoint: it says so, its summary says so, and the rows of steps 1..at
    # are still the killed process's own (their step_seconds would differ had they been computed again).
    assert f"[resume] from {last} at step {at}" in resumed.stdout, where
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] == at, where
    after = (killed / "metrics.jsonl").read_text().splitlines()
    assert after[:at] == before[:at] and len(after) == 10, where
    assert _losses(killed) == _losses(tmp_path / "full"), where
    full, resumed_weights = (load_file(str(p / "final" / "model.safetensors")) for p in (tmp_path / "full", killed))
    assert all(torch.equal(full[k], resumed_weights[k]) for k in full), where


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        _cli(tiny_model, hh_file, out, "train.max_steps=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _wait_for_rows(out, 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "continue with --resume" in err and "Traceback" not in err
    saved = checkpoint_module.latest_checkpoint(out / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) >= 2


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tiny_model, hh_file, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    real_save = checkpoint_module.distributed.save_sharded
    calls = {"n": 0}

    def dying_save(folder, *args, **kwargs):
        calls["n"] += 1
        real_save(folder, *args, **kwargs)
        if calls["n"] == 2:  # the second checkpoint dies after its weights and optimizer state were written
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint_module.distributed, "save_sharded", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_model, hh_file, out, "train.max_steps=6", "train.save_every=2"))
    monkeypatch.setattr(checkpoint_module.distributed, "save_sharded", real_save)
    assert (out / "checkpoints" / "step-4.tmp" / "sharded" / ".metadata").exists()
    assert checkpoint_module.latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-2"
    train(_config(tiny_model, hh_file, out, "train.max_steps=6", "train.save_every=2"), resume=True)
    train(_config(tiny_model, hh_file, tmp_path / "full", "train.max_steps=6", "train.save_every=2"))
    assert _losses(out) == _losses(tmp_path / "full")


def test_non_finite_steps_are_skipped_then_stop(tiny_model, hh_file, tmp_path, monkeypatch) -> None:
    import dpokit.logprobs as logprobs_module

    real = logprobs_module.batch_logps
    calls = {"n": 0}

    def poisoned(model, batch, chunk):
        out = real(model, batch, chunk)
        if not torch.is_grad_enabled():
            return out  # the reference's forward
        calls["n"] += 1
        # Two policy forwards per step (2 micro-batches): poison steps 2 and 4.
        if calls["n"] in (3, 7):
            out = out._replace(logps=out.logps * float("nan"))
        return out

    monkeypatch.setattr(logprobs_module, "batch_logps", poisoned)
    out = tmp_path / "run"
    train(_config(tiny_model, hh_file, out, "train.max_steps=3", "train.max_nonfinite_steps=1"))
    rows = [m for m in _metrics(out) if "loss" in m]
    assert [m["skipped_steps"] for m in rows] == [0, 1, 1]
    calls["n"] = 0
    with pytest.raises(NonFiniteError, match="Last good checkpoint: .*step-2"):
        train(
            _config(
                tiny_model,
                hh_file,
                tmp_path / "stop",
                "train.max_steps=6",
                "train.max_nonfinite_steps=1",
                "train.save_every=2",
            )
        )
    # The count is part of the checkpoint: a resumed run goes on counting from it.
    state = torch.load(tmp_path / "stop" / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=False)
    assert state["skipped_steps"] == 1
    monkeypatch.setattr(logprobs_module, "batch_logps", real)
    resumed = _config(tiny_model, hh_file, tmp_path / "stop", "train.max_steps=4", "train.max_nonfinite_steps=1")
    train(resumed, resume=True)
    assert [m["skipped_steps"] for m in _metrics(tmp_path / "stop") if "loss" in m][-2:] == [1, 1]


def test_flex_attention_training_on_cpu_is_refused_before_loading(tmp_path: Path) -> None:
    config = load_config(None, [f"train.output_dir={tmp_path}", "model.attn_implementation=flex_attention"])
    with pytest.raises(ConfigError, match="FlexAttention backward on CPU"):
        train(config)
    assert not any(tmp_path.iterdir())


def test_fp16_is_refused_with_a_reason() -> None:
    with pytest.raises(ConfigError, match="loss scaling"):
        load_config(None, ["train.precision=fp16"])


def test_precomputed_reference_from_another_tokenizer_is_refused_before_loading(
    tiny_model, hh_file, tmp_path, monkeypatch
) -> None:
    from dpokit import model as model_module
    from dpokit.precompute import precompute_reference
    from tests.conftest import hh_rows

    other = model_module.init_model(
        [r["chosen"] for r in hh_rows(100)],
        tmp_path / "other",
        vocab_size=350,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
    )
    cache = tmp_path / "ref.safetensors"
    precompute_reference(
        _config(other, hh_file, tmp_path / "pre", "reference.mode=precomputed", f"reference.cache={cache}")
    )

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the cache was checked")

    monkeypatch.setattr(importlib.import_module("dpokit.policy"), "load_model", no_loading)
    with pytest.raises(ReferenceMismatch, match="other tokenizer"):
        train(
            _config(
                tiny_model,
                hh_file,
                tmp_path / "run",
                "train.max_steps=1",
                "reference.mode=precomputed",
                f"reference.cache={cache}",
            )
        )
