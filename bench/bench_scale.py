"""dpokit under torchrun and FSDP2 against one process, on bench_dpo's workload (random Llama, word-level pairs).

    python bench/bench_scale.py --preset cpu       # 2 cores: 2 processes x 1 thread (FSDP2) vs 1 process x 2 threads,
                                                   # and FSDP2 at world size 1 vs no wrapping (1 thread each)
    python bench/bench_scale.py --preset llama1b   # one GPU: FSDP2 at world size 1 vs no wrapping (Llama-3.2-1B shapes)
    python bench/bench_scale.py --preset fit       # one GPU: the largest Llama shape (8B, then 3B, then 1B) whose
                                                   # full-parameter DPO step fits with FSDP2 CPU offload

Each system runs in its own process group (`torchrun` for several processes) for `warmup + steps` optimizer steps
of `pairs` pairs, through `dpokit.train.train`; the timings are rank 0's of the last `steps`, and CPU seconds per
step (process CPU time, all threads, summed over the processes: what the work costs on a shared machine, whatever
the neighbours do). With `repeats`, the systems run round-robin that many times and the medians are reported;
"x base" and "CPU x" compare a system with the one it stands against (its wall and CPU seconds per step). Peak
memory is rank 0's (GPU: max allocated; CPU: max RSS of the process). Prints a table and writes
bench/results/<preset>-scale.json with the exact command, rewritten after every system so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo import PRESETS as DPO_PRESETS
from bench_dpo import _params, _versions, counted_tokens, make_workload

LLAMA_8B = {"vocab": 128256, "hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8}
LLAMA_3B = {"vocab": 128256, "hidden": 3072, "intermediate": 8192, "layers": 28, "heads": 24, "kv_heads": 8}
LLAMA_1B = {k: DPO_PRESETS["llama1b"][k] for k in LLAMA_8B}
SYSTEMS = {
    # name: (processes, threads per process, dpokit overrides, the system it is compared with)
    "1proc-2threads": (1, 2, {"distributed": {"fsdp": "off"}}, None),
    "2procs-1thread-fsdp": (2, 1, {"distributed": {"fsdp": "auto"}}, "1proc-2threads"),
    # FSDP2's own cost, single-threaded: with 2 threads on a shared machine OpenMP's spin-waits count as CPU time.
    "1proc-1thread": (1, 1, {"distributed": {"fsdp": "off"}}, None),
    "1proc-1thread-fsdp": (1, 1, {"distributed": {"fsdp": "on"}}, "1proc-1thread"),
    "gpu-plain": (1, 0, {"distributed": {"fsdp": "off"}}, None),
    "gpu-fsdp": (1, 0, {"distributed": {"fsdp": "on"}}, "gpu-plain"),
    # The largest model one GPU trains: weights, gradients and AdamW's state in CPU memory, activations recomputed.
    "gpu-fsdp-offload": (
        1,
        0,
        {
            "distributed": {"fsdp": "on", "cpu_offload": True},
            "model": {"dtype": "bf16"},
            "train": {"activation_checkpointing": True},
        },
        None,
    ),
}
CPU_SYSTEMS = ["1proc-2threads", "2procs-1thread-fsdp", "1proc-1thread", "1proc-1thread-fsdp"]
PRESETS = {
    # Each system `repeats` times, round-robin (the machine's load drifts): the medians are reported.
    "cpu": DPO_PRESETS["cpu"] | {"systems": CPU_SYSTEMS, "steps": 8, "repeats": 3},
    "llama1b": DPO_PRESETS["llama1b"] | {"systems": ["gpu-plain", "gpu-fsdp"], "steps": 10},
    # 8 pairs of U[64, 512] tokens per step; one size after another until one fits.
    "fit": DPO_PRESETS["llama1b"]
    | {"pairs": 8, "steps": 2, "warmup": 1, "systems": ["gpu-fsdp-offload"], "sizes": ["8b", "3b", "1b"]},
}
SIZES = {"8b": LLAMA_8B, "3b": LLAMA_3B, "1b": LLAMA_1B}


def worker(args: argparse.Namespace) -> None:
    """One system, in each process of its group: train, then rank 0 writes the timings."""
    import torch

    from dpokit.config import from_dict
    from dpokit.train import train

    p = json.loads(args.preset_json)
    threads, folder = SYSTEMS[args.worker][1], Path(args.folder)
    if threads:
        torch.set_num_threads(threads)
    if p["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = _stamp_steps()
    train(from_dict(system_config(args.worker, p, folder)))
    rank = os.environ.get("RANK", "0")
    # Every process's CPU seconds (all its threads) at the end of each step: the others' go to files beside rank 0's.
    Path(f"{args.result}.cpu{rank}").write_text(json.dumps(stamps))
    if rank != "0":
        return
    rows = [json.loads(line) for line in (folder / args.worker / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_seconds" in r]
    result = {"step_seconds": [r["step_seconds"] for r in steps], "losses": [r["loss"] for r in steps]}
    if p["device"] == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.result).write_text(json.dumps(result))


def system_config(system: str, p: dict, folder: Path) -> dict:
    """The dpokit config (as a mapping) one system trains with on the workload in `folder`."""
    raw: dict = {
        "model": {"path": str(folder / "model"), "dtype": p["dtype"]},
        "data": {
            "train_path": str(folder / "pairs.jsonl"),
            "max_length": 4 * p["hi"],
            "max_prompt_length": 2 * p["hi"],
        },
        "loss": {"name": "sigmoid", "beta": 0.1},
        "train": {
            "output_dir": str(folder / system),
            "batch_size": p["pairs"],
            "micro_batch_size": p["pairs"],
            "max_steps": p["warmup"] + p["steps"],
            "lr": 1e-5,
            "device": p["device"],
            "layout": "packed",
        },
    }
    for section, fields in SYSTEMS[system][2].items():
        raw[section] = raw.get(section, {}) | fields
    return raw


def _stamp_steps() -> list[list[float]]:
    """(process CPU seconds, wall seconds) when each training step's metrics are logged: every process logs every
    step (only process 0 writes), so each has its own stamps. The machine may be shared: CPU seconds are this
    process's own work, whatever else runs."""
    from dpokit import metrics

    stamps: list[list[float]] = []
    write = metrics.MetricsLog.write

    def stamped(self: metrics.MetricsLog, step: int, values: dict[str, float]) -> None:
        if "step_seconds" in values:
            stamps.append([time.process_time(), time.perf_counter()])
        write(self, step, values)

    metrics.MetricsLog.write = stamped  # type: ignore[method-assign]
    return stamps


def run_system(system: str, p: dict, folder: Path, timeout: float) -> dict:
    processes, threads, _, _ = SYSTEMS[system]
    result = folder / f"{system}.json"
    shutil.rmtree(folder / system, ignore_errors=True)  # a repeat's run folder
    script = [__file__, "--worker", system, "--folder", str(folder), "--result", str(result)]
    script += ["--preset-json", json.dumps(p)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *script]
    else:
        cmd = [sys.executable, *script]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if run.returncode:
        print(run.stdout[-2000:], run.stderr[-4000:])
        return {"error": run.stderr[-1500:]}
    r = json.loads(result.read_text())
    timed = r["step_seconds"][p["warmup"] :]
    r["mean_step_seconds"] = sum(timed) / len(timed)
    # CPU seconds per timed step, summed over the processes: from the end of the last warm-up step to the last step.
    cpu = [json.loads(Path(f"{result}.cpu{rank}").read_text()) for rank in range(processes)]
    first, last = p["warmup"] - 1, p["warmup"] + p["steps"] - 1
    r["cpu_seconds_per_step"] = sum(c[last][0] - c[first][0] for c in cpu) / p["steps"]
    r["wall_seconds_per_step"] = (cpu[0][last][1] - cpu[0][first][1]) / p["steps"]
    r["wall_seconds"] = time.perf_counter() - started
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--overrides", default="{}", help='JSON to change preset fields, e.g. {"steps": 3}')
    parser.add_argument("--out", help="result file (default bench/results/<preset>-scale.json)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per system")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--preset-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    p = PRESETS[args.preset] | json.loads(args.overrides)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = Path(args.out or Path(__file__).parent / "results" / f"{args.preset}-scale.json")
    results: dict[str, dict] = {}
    for size in p.get("sizes", [None]):
        shape = p | SIZES[size] if size else p
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            folder = Path(tmp)
            n_pairs = shape["pairs"] * (shape["warmup"] + shape["steps"])
            print(f"[bench] workload: {n_pairs} pairs, model {shape['layers']}x{shape['hidden']} ...", flush=True)
            make_workload(folder, shape, n_pairs, seed=0, init_device=shape["device"])
            rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
            tokens_per_step = sum(counted_tokens(rows, shape)) / (shape["warmup"] + shape["steps"])
            runs: dict[str, list[dict]] = {}
            for _ in range(shape.get("repeats", 1)):
                for system in shape["systems"]:
                    name = f"{system}-{size}" if size else system
                    print(f"[bench] {name} ...", flush=True)
                    runs.setdefault(name, []).append(run_system(system, shape, folder, args.timeout))
                    results[name] = _summary(runs[name], system, shape, tokens_per_step)
                    _report(results, p, command, out)
            shutil.rmtree(folder, ignore_errors=True)
        if size and all("error" not in r for n, r in results.items() if n.endswith(f"-{size}")):
            break  # the largest size that fits has been measured


def _summary(runs: list[dict], system: str, p: dict, tokens_per_step: float) -> dict:
    """A system's repeats: each kept, the medians of its timings as its figures."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    r = {k: v for k, v in ok[0].items() if k in ("losses", "peak_memory_gib")}
    for key in ("mean_step_seconds", "cpu_seconds_per_step", "wall_seconds_per_step"):
        r[key] = statistics.median(x[key] for x in ok)
    r["tokens_per_second"] = tokens_per_step / r["mean_step_seconds"]
    r["peak_memory_gib"] = max(x["peak_memory_gib"] for x in ok)
    r |= {"parameters": _params(p), "tokens_per_step_counted": tokens_per_step, "baseline": SYSTEMS[system][3]}
    return r | {"repeats": runs}


def _report(results: dict, p: dict, command: str, out: Path) -> None:
    lines = [
        f"{'system':<26} {'params':>8} {'step s':>8} {'CPU s':>7} {'tokens/s':>9} {'peak GiB':>8} {'x base':>8} "
        f"{'CPU x':>6} {'1st loss':>8}"
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<26} failed: {r['error'][-300:]!r}")
            continue
        base = results.get(r["baseline"] or name, r)
        base = r if "error" in base else base
        ratio = r["mean_step_seconds"] / base["mean_step_seconds"]
        cpu_ratio = r["cpu_seconds_per_step"] / base["cpu_seconds_per_step"]
        lines.append(
            f"{name:<26} {r['parameters'] / 1e9:>7.2f}B {r['mean_step_seconds']:>8.3f} "
            f"{r['cpu_seconds_per_step']:>7.3f} {r['tokens_per_second']:>9.0f} {r['peak_memory_gib']:>8.2f} "
            f"{ratio:>8.3f} {cpu_ratio:>6.3f} {r['losses'][0]:>8.4f}"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "preset": p, "versions": _versions(), "results": results, "table": table}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
