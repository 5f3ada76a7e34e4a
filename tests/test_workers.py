"""The demo's job runner: dependencies respected, in this process and across worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpokit.experiments.workers import Job, Workers


class FakeDemo:
    """Records when each job ran (a file per job, so that worker processes can report too)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load_judge(self) -> str:
        return "judge"

    def run_job(self, judge: str | None, job: Job) -> list[dict]:
        started = time.time()
        (self.folder / f"{job.kind}-{job.seed}.pid").write_text(str(os.getpid()))
        time.sleep(120 if job.kind == "long" else 0.3)
        (self.folder / f"{job.kind}-{job.seed}").write_text(f"{started} {time.time()}")
        return [{"kind": job.kind, "seed": job.seed, "pid": os.getpid(), "judge": judge}]


def _span(folder: Path, name: str) -> tuple[float, float]:
    start, end = (folder / name).read_text().split()
    return float(start), float(end)


JOBS = [Job("ppo", 0, after="reward_model"), Job("ppo", 1, after="reward_model"), Job("reward_model"), Job("method")]


def test_jobs_run_after_their_dependency_in_this_process(tmp_path: Path) -> None:
    with Workers(1, lambda: None, FakeDemo(tmp_path)) as pool:
        results = pool.run_all(JOBS)
    assert {job.kind for job in results} == {"ppo", "reward_model", "method"} and len(results) == 4
    assert results[JOBS[0]] == [{"kind": "ppo", "seed": 0, "pid": os.getpid(), "judge": "judge"}]
    assert _span(tmp_path, "ppo-0")[0] >= _span(tmp_path, "reward_model-0")[1]


@pytest.mark.slow
def test_jobs_spread_over_worker_processes(tmp_path: Path) -> None:
    with Workers(2, _fake_demo(tmp_path), None) as pool:
        results = pool.run_all(JOBS)
    pids = {p["pid"] for points in results.values() for p in points}
    assert os.getpid() not in pids and len(results) == 4
    rm_end = _span(tmp_path, "reward_model-0")[1]
    assert all(_span(tmp_path, f"ppo-{seed}")[0] >= rm_end for seed in (0, 1))


def _fake_demo(folder: Path) -> FakeDemoFactory:
    return FakeDemoFactory(folder)


class FakeDemoFactory:
    """A picklable `make_demo` for spawned workers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self) -> FakeDemo:
        return FakeDemo(self.folder)


def _alive(pid: int) -> bool:
    """Running (an orphan nobody reaps stays a zombie: that counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_stop_when_the_demo_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL (or a SIGTERM, which skips the pool's shutdown) leaves no worker running its jobs on."""
    code = (
        "from pathlib import Path; from dpokit.experiments.workers import Job, Workers;"
        "from tests.test_workers import FakeDemoFactory;"
        f"pool = Workers(2, FakeDemoFactory(Path({str(tmp_path)!r})), None);"
        "pool.run_all([Job('long'), Job('long', 1)])"
    )
    demo = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    try:
        pid_files = [tmp_path / "long-0.pid", tmp_path / "long-1.pid"]
        deadline = time.time() + 60
        while not all(f.exists() for f in pid_files) and time.time() < deadline:
            time.sleep(0.2)
        workers = [int(f.read_text()) for f in pid_files]
        assert all(_alive(pid) for pid in workers)
    finally:
        demo.kill()
        demo.wait()
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "a worker ran on after the demo process was killed"
