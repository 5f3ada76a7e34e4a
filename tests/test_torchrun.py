"""2 processes under torchrun (gloo, FSDP2 on CPU) against 1: the same per-step losses, held-out metrics and final
weights (1e-5 relative) for DPO packed, DPO padded and SFT; the same precomputed reference cache; checkpoints that
resume on another number of processes; a killed rank; SIGTERM; one rank's bad row; two "nodes" on one machine.

Each launch costs ~10 s of imports per process on these 2 cores, so one launch runs several jobs
(tests/torchrun_jobs.py) and the tests share it (module-scoped fixtures). Every launch has a deadline.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.precompute import precompute_reference
from dpokit.train import train
from tests.conftest import hh_rows, read_metrics, tiny_run, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# lr 1e-3: at 1e-2 the float noise of adding gradients in another order grows to ~1e-5 within six AdamW steps.
STEPS = ["train.lr=1e-3", "train.micro_batch_size=2", "train.max_steps=6", "train.save_every=2"]
STEPS += ["data.eval_fraction=0.2"]
EVAL = ["train.eval_every=2", "train.eval_train=true"]
MODES = {
    "packed": ["train.layout=packed"],
    "padded": ["train.layout=padded"],
    "sft": ["loss.name=sft", "reference.mode=none"],
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    # --standalone: a rendezvous on a free local port, so that launches never meet another's store.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _launch(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rel * max(1.0, float(b.abs().max())))


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = (load_file(str(p / "final" / "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys() and len(wa) > 10
    for key in wa:
        assert _close(wa[key], wb[key]), key


def _same_metrics(a: Path, b: Path) -> None:
    """Every row of metrics.jsonl (train steps, eval, train_eval): same steps and keys; losses, log-probs, grad norm
    and lr within 1e-5 relative; rewards, β-scaled differences of log-prob sums near 0 that float32 resolves to about
    1e-6, within 1e-5 absolute."""
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for key in x.keys() - {"step", "tokens_per_second", "step_seconds"}:
            relative = key.rsplit("/", 1)[-1] in ("loss", "grad_norm", "lr", "skipped_steps") or "logps" in key
            tolerance = {"rel": 1e-5, "abs": 0} if relative else {"rel": 0, "abs": 1e-5}
            assert x[key] == pytest.approx(y[key], **tolerance), (x["step"], key)


@pytest.fixture(scope="module")
def setting(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("torchrun")
    rows = hh_rows(48)
    rows.append({"chosen": rows[1]["chosen"], "rejected": rows[1]["chosen"]})  # skipped: counted in the data report
    return {"model": tiny_model, "data": write_jsonl(folder / "hh.jsonl", rows), "folder": folder}


def _overrides(setting: dict, out: Path, *extra: str) -> list[str]:
    return [*tiny_run(setting["model"], setting["data"], out), *STEPS, *extra]


@pytest.fixture(scope="module")
def runs(setting: dict) -> dict[str, Path]:
    """One process (in this process) and two (one torchrun launch) for each mode, precompute-ref with each, and a
    1-process checkpoint that two processes finish."""
    folder: Path = setting["folder"]
    jobs, out = [], {}
    for mode, extra in MODES.items():
        out[f"1-{mode}"], out[f"2-{mode}"] = folder / f"1-{mode}", folder / f"2-{mode}"
        train(load_config(None, _overrides(setting, out[f"1-{mode}"], *extra, *EVAL)))
        jobs.append({"kind": "train", "overrides": _overrides(setting, out[f"2-{mode}"], *extra, *EVAL)})
    for n in (1, 2):
        out[f"cache-{n}"] = folder / f"ref-{n}.safetensors"
    cache = _overrides(setting, folder / "pre", "reference.mode=precomputed")
    precompute_reference(load_config(None, [*cache, f"reference.cache={out['cache-1']}"]))
    jobs.append({"kind": "precompute", "overrides": [*cache, f"reference.cache={out['cache-2']}"]})
    # A checkpoint written by 1 process (at step 4 of 6), resumed by 2.
    out["1to2"] = folder / "1to2"
    shutil.copytree(out["1-packed"], out["1to2"])
    shutil.rmtree(out["1to2"] / "final")
    jobs.append({"kind": "train", "overrides": _overrides(setting, out["1to2"], *MODES["packed"]), "resume": True})
    (folder / "jobs.json").write_text(json.dumps(jobs))
    _launch(_torchrun(str(ROOT / "tests" / "torchrun_jobs.py"), str(folder / "jobs.json")))
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_two_processes_make_one_process_run(runs: dict[str, Path], mode: str) -> None:
    """Same config and global batch: every step's metrics, the sharded held-out and train evaluations, and the final
    weights (gathered from the shards by rank 0) agree to 1e-5; the data report and world size are recorded."""
    one, two = runs[f"1-{mode}"], runs[f"2-{mode}"]
    _same_metrics(one, two)
    _same_weights(one, two)
    s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (one, two))
    assert (s1["world_size"], s1["fsdp"], s2["world_size"], s2["fsdp"]) == (1, False, 2, True)
    assert s2["data"] == s1["data"] and s2["data"]["train"]["loaded"] == 49  # the whole run's counts
    assert any("eval/loss" in r for r in read_metrics(two)) and any("train_eval/loss" in r for r in read_metrics(two))
    # Rank 0 alone wrote the files: one row per step, one config.
    assert len([r for r in read_metrics(two) if "loss" in r]) == 6 and (two / "config.yaml").exists()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_precompute_ref_with_two_processes_writes_the_same_cache(runs: dict[str, Path]) -> None:
    from safetensors import safe_open

    one, two = load_file(str(runs["cache-1"])), load_file(str(runs["cache-2"]))
    assert one.keys() == two.keys() == {"train", "eval"}
    for name in one:
        assert one[name].shape == two[name].shape and torch.allclose(one[name], two[name], rtol=1e-6, atol=0), name
    with safe_open(str(runs["cache-1"]), "pt") as a, safe_open(str(runs["cache-2"]), "pt") as b:
        assert a.metadata() == b.metadata() and any(k.startswith("digest/") for k in a.metadata())


def test_generate_with_two_processes_writes_what_one_writes(setting: dict, tmp_path: Path) -> None:
    """`torchrun -m dpokit generate`: each process samples its share of the prompts and process 0 merges them. Per-row
    seeds: the samples do not depend on which process drew them; the file is in data order; no part file is left."""
    argv = ["generate", str(setting["data"]), "--model", str(setting["model"]), "-n", "2", "--limit", "7"]
    argv += ["--max-new-tokens", "6", "--max-length", "64", "--max-prompt-length", "32", "--seed", "3"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main([*argv, "--out", str(one)]) == 0
    _launch(_torchrun("-m", "dpokit", *argv, "--out", str(two)), timeout=180)
    lines = one.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 14 and two.read_text(encoding="utf-8").splitlines() == lines
    assert not list(tmp_path.glob("two.jsonl.rank*"))


def test_a_one_process_checkpoint_resumes_with_two(runs: dict[str, Path]) -> None:
    summary = json.loads((runs["1to2"] / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["world_size"] == 2  # continued, not started over
    _same_weights(runs["1to2"], runs["1-packed"])
    assert [r["loss"] for r in read_metrics(runs["1to2"]) if "loss" in r] == pytest.approx(
        [r["loss"] for r in read_metrics(runs["1-packed"]) if "loss" in r], rel=1e-5
    )


def test_export_gives_the_trained_policy(setting: dict, runs: dict[str, Path], tmp_path: Path) -> None:
    """`dpokit export` of the 2-process checkpoint at step 4: a folder from_pretrained loads, whose log-probs are
    those of the policy trained for 4 steps (one process, to the end)."""
    from transformers import AutoModelForCausalLM

    from dpokit.data.collate import collate
    from dpokit.data.prepare import prepare_data
    from dpokit.logprobs import sequence_logps
    from dpokit.model import load_tokenizer

    four = tmp_path / "four"
    train(load_config(None, [*_overrides(setting, four, *MODES["packed"]), "train.max_steps=4"]))
    assert main(["export", str(runs["2-packed"] / "checkpoints" / "step-4"), str(tmp_path / "exported")]) == 0
    tokenizer = load_tokenizer(str(tmp_path / "exported"))
    data = prepare_data(load_config(None, _overrides(setting, four)).data, tokenizer, "pairs")
    batch = collate(data.train[:6], range(6), tokenizer.pad_token_id)
    with torch.no_grad():
        exported = sequence_logps(AutoModelForCausalLM.from_pretrained(tmp_path / "exported"), batch).logps
        trained = sequence_logps(AutoModelForCausalLM.from_pretrained(four / "final"), batch).logps
        initial = sequence_logps(AutoModelForCausalLM.from_pretrained(setting["model"]), batch).logps
    assert _close(exported, trained) and not _close(exported, initial, rel=1e-3)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (a test's own folder)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and marker in cmdline and int(entry.name) != os.getpid():
            alive.append(cmdline)
    return alive


def _wait_for_steps(out: Path, steps: int, process: subprocess.Popen, limit: float = 180) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and process.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {steps}: {process.communicate()[1][-3000:]}")


def test_a_killed_rank_stops_the_run_and_one_process_resumes_it(setting: dict, runs: dict[str, Path]) -> None:
    """SIGKILL to one rank at a seeded random step: the other exits too (torchrun ends the group), nothing is left
    running; one process resumes from the newest complete checkpoint and ends where the uninterrupted run ends."""
    out = setting["folder"] / "killed"
    cmd = _torchrun("-m", "dpokit", "dpo", *_overrides(setting, out, *MODES["packed"]))
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    kill_at = random.Random(9).randint(3, 5)
    _wait_for_steps(out, kill_at, process)
    ranks = _children(process.pid)
    assert len(ranks) == 2, ranks
    os.kill(random.Random(kill_at).choice(ranks), signal.SIGKILL)
    started = time.time()
    process.communicate(timeout=90)
    assert process.returncode != 0 and time.time() - started < 60
    assert not _alive(str(out))
    newest = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if "tmp" not in p.name)
    summary = train(load_config(None, _overrides(setting, out, *MODES["packed"])), resume=True)
    assert summary["resumed_from_step"] == newest >= 2 and summary["world_size"] == 1
    _same_weights(out, runs["1-packed"])
    assert [r["loss"] for r in read_metrics(out) if "loss" in r] == pytest.approx(
        [r["loss"] for r in read_metrics(runs["1-packed"]) if "loss" in r], rel=1e-5
    )


def test_sigterm_to_torchrun_saves_a_checkpoint_on_every_rank(setting: dict) -> None:
    """torchrun forwards SIGTERM to its processes; they agree on the step, save one checkpoint together and exit
    143 ("continue with --resume"). torchrun itself then exits 1 (its own SignalException), which dpokit cannot
    change."""
    out = setting["folder"] / "sigterm"
    never = ["train.max_steps=100000", "train.save_every=100000"]  # the signal's checkpoint is the only one
    cmd = _torchrun("-m", "dpokit", "dpo", *_overrides(setting, out, *MODES["packed"]), *never)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    _wait_for_steps(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    said = re.findall(r"stopped by signal 15; checkpoint saved at (\S+);", err)
    assert process.returncode != 0 and len(said) == 2 and said[0] == said[1], err[-3000:]  # one step, both ranks
    saved = list((out / "checkpoints").iterdir())
    assert [str(p) for p in saved] == [said[0]] and (saved[0] / "sharded" / ".metadata").exists()
    step = int(saved[0].name.split("-")[1])
    assert step >= 3 and torch.load(saved[0] / "trainer_state.pt", weights_only=False)["step"] == step
    assert not _alive(str(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nodes(args_per_node: list[list[str]], port: int) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2` twice on this machine, one process each, meeting at 127.0.0.1:port."""
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--rdzv-id=dpokit-{port}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for args in args_per_node
    ]


def test_one_rank_with_a_bad_row_stops_both_with_its_message(setting: dict, tmp_path: Path) -> None:
    """Two nodes; node 1's copy of the data has a malformed row. Both exit non-zero within 60 s with the file:line
    message (the set-up agreement), and no process is left."""
    good = setting["data"]
    lines = good.read_text().splitlines()
    lines[4] = '{"chosen": "Human: hi Assistant: hello"}'  # no "rejected"
    bad = tmp_path / "copy" / good.name
    bad.parent.mkdir()
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    started = time.time()
    nodes = _nodes(
        [["-m", "dpokit", "dpo", *_overrides(setting, out), f"data.train_path={path}"] for path in (good, bad)],
        _free_port(),
    )
    errors = [node.communicate(timeout=90)[1] for node in nodes]
    assert time.time() - started < 60, errors
    assert all(node.returncode != 0 for node in nodes)
    for err in errors:
        assert f"{bad}:5" in err and "rejected" in err, err[-3000:]
    assert not _alive(str(out))


def test_two_nodes_run_the_hh_sft_then_dpo_configs(tmp_path: Path) -> None:
    """scripts/hh.sh with each stage on two "nodes" (torchrun --nnodes 2, a rendezvous on 127.0.0.1, one process
    each): SFT then DPO against it, both configs to their last step."""
    hh = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    tiny = tmp_path / "tiny"
    # A smaller model than scripts/hh.sh's (hidden 128, vocab 2048) and fewer rows: the configs' every other setting
    # (lengths, batch sizes, epochs, schedules, evaluation) as shipped, in a third of the time.
    small = ["--hidden-size", "64", "--vocab-size", "1024"]
    assert main(["init-model", "--data", str(hh), "--out", str(tiny), *small]) == 0
    stages = {
        "sft": [
            str(ROOT / "configs" / "hh_sft.yaml"),
            f"model.path={tiny}",
            f"train.output_dir={tmp_path / 'sft'}",
            "data.max_examples=512",
        ],
        "dpo": [
            str(ROOT / "configs" / "hh_dpo.yaml"),
            f"model.path={tmp_path / 'sft' / 'final'}",
            f"train.output_dir={tmp_path / 'dpo'}",
            "data.max_examples=128",
        ],
    }
    for command, args in stages.items():
        nodes = _nodes([["-m", "dpokit", command, f"data.train_path={hh}", *args]] * 2, _free_port())
        outcomes = [node.communicate(timeout=900) for node in nodes]
        assert all(node.returncode == 0 for node in nodes), outcomes[0][1][-3000:] + outcomes[1][1][-3000:]
        summary = json.loads((tmp_path / command / "summary.json").read_text())
        t = load_config(stages[command][0], []).train
        steps = t.max_steps or t.epochs * (summary["data"]["train"]["kept"] // t.batch_size)
        assert summary["world_size"] == 2 and summary["steps"] == steps
        assert len([r for r in read_metrics(tmp_path / command) if "loss" in r]) == steps
    dpo = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert dpo["train_eval"]["rewards/accuracies"] > 0.9  # DPO fits its training pairs, as in one process
