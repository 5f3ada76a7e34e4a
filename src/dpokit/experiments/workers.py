"""The demo's independent stages (the reward classifier while π_SFT trains; then each training run with its
evaluation, Best-of-N, the reward model) run in worker processes of one thread each. The models are small enough
that PyTorch's threads within one operation gain little (and lose a lot when the cores are shared), while separate
runs scale with the cores. A job's results do not depend on the worker that ran it or on the jobs before it: every
stage seeds what it samples and trains."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Job:
    """One stage the demo hands to a worker: `kind` is reward, reference, reference_logps, method, reward_model or
    ppo."""

    kind: str
    seed: int = 0
    index: int = 0
    """The method's position in `Demo.methods()` (kind method)."""
    method: str = ""
    """PPO or PPO-GT (kind ppo)."""
    target: float = 0.0
    """The target KL (kind ppo)."""
    after: str = ""
    """The kind of job that must finish first ("" for none)."""


_WORKER: dict[str, Any] = {}
"""A worker process's demo, built once by `_start_worker`."""


def _start_worker(make_demo: Callable[[], Any]) -> None:
    torch.set_num_threads(1)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    # Two processes' progress bars would interleave with the demo's own lines: a worker's stderr goes nowhere (its
    # stage lines go to stdout, and an error in a job is raised again in the demo's process, with its traceback).
    sys.stderr = open(os.devnull, "w", encoding="utf-8")
    _WORKER["demo"] = make_demo()


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose demo process was killed (no shutdown reaches it then) stops within a second instead of running
    the jobs it holds to their end."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _run_in_worker(job: Job) -> list[dict]:
    demo = _WORKER["demo"]
    if job.kind != "reward" and "judge" not in _WORKER:  # π_SFT and the reward exist once these jobs run
        _WORKER["judge"] = demo.load_judge()
    return list(demo.run_job(_WORKER.get("judge"), job))


def default_workers() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch at one thread within this block (the demo's own process, beside its workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Workers:
    """`workers` processes running `make_demo()`'s `run_job`; with one worker, jobs run here, in order."""

    def __init__(self, workers: int, make_demo: Callable[[], Any], demo: Any) -> None:
        self.demo, self.pool, self.judge = demo, None, None
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # a fork would copy PyTorch's thread pools
            self.pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(make_demo,))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def submit(self, job: Job) -> Future[list[dict]]:
        if self.pool is not None:
            return self.pool.submit(_run_in_worker, job)
        if job.kind != "reward" and self.judge is None:
            self.judge = self.demo.load_judge()
        future: Future[list[dict]] = Future()
        future.set_result(list(self.demo.run_job(self.judge, job)))
        return future

    def run_all(self, jobs: Sequence[Job]) -> dict[Job, list[dict]]:
        """Every job, each only after all jobs of its `after` kind; returns each job's points."""
        results: dict[Job, list[dict]] = {}
        waiting, running = list(jobs), dict[Future[list[dict]], Job]()
        while waiting or running:
            unfinished = {j.kind for j in waiting} | {j.kind for j in running.values()}
            for job in [j for j in waiting if not j.after or j.after not in unfinished]:
                waiting.remove(job)
                running[self.submit(job)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
        return results
