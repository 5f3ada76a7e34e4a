"""Run several dpokit jobs in the processes of one torchrun launch (the launch costs more than the jobs).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_jobs.py JOBS.json

JOBS.json: a list of {"kind": "train" | "precompute", "overrides": [...], "resume": false}. Each job runs through
dpokit's Python API, in the one process group the launch keeps for its life, as a script calling `train` twice does.
"""

import json
import sys

from dpokit.config import load_config
from dpokit.precompute import precompute_reference
from dpokit.train import train


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        config = load_config(None, job["overrides"])
        if job["kind"] == "precompute":
            precompute_reference(config)
        else:
            train(config, resume=job.get("resume", False))


if __name__ == "__main__":
    main(sys.argv[1])
