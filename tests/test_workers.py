"""The demo's job runner: dependencies respected, in this process and across worker processes."""

from __future__ import annotations

import os
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
        time.sleep(0.3)
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
