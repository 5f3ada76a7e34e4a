"""dpokit against TRL's DPOTrainer on the same DPO workload, in one invocation.

    python bench/bench_dpo.py --preset cpu              # 2 CPU cores: small Llama, lengths 32-128
    python bench/bench_dpo.py --preset llama1b          # one GPU: Llama-3.2-1B shapes, lengths 64-512

The workload: a randomly initialised Llama-style model (no downloads) and a word-level tokenizer in which the text
"w17 w4 ..." tokenizes to exactly [17, 4, ...]; prompt, chosen and rejected lengths independently uniform in
[lo, hi]; the same pairs in the same order for every system. Tokens per pair are counted as 2·prompt + chosen +
rejected (what an implementation without padding or prefix sharing processes), so the systems are comparable.
Each system runs in its own process (peak memory is per process) for `warmup + steps` optimizer steps; the
timings are of the last `steps`. Prints a table and writes bench/results/<preset>.json with the exact command
(rewritten after every system, so a run cut short keeps what it measured).

Systems: `trl` and `trl-precomputed` (TRL's DPOTrainer: no gradient checkpointing, sdpa, fused AdamW, bf16 on GPU),
and `dpokit` (packed prefix-shared rows, dense mask) with modifiers joined by `-`: `flex` (FlexAttention block mask,
all pairs of a step in one row; GPU only), `compile` (each decoder layer compiled), `lean` (compile with half the
activation memory budget), `ac` (activation checkpointing), `padded` (one padded row per completion), `precomputed`
(reference log-probs computed once before training). On the GPU preset both load the weights in bf16. MFU counts
6·N FLOPs per counted token for the policy and 2·N more for a reference forward (N parameters, attention excluded),
so padding and recomputation count as waste and prefix sharing as a gain.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    "cpu": {
        "vocab": 8192,
        "hidden": 256,
        "intermediate": 1024,
        "layers": 4,
        "heads": 8,
        "kv_heads": 8,
        "lo": 32,
        "hi": 128,
        "pairs": 8,
        "steps": 6,
        "warmup": 2,
        "device": "cpu",
        "dtype": "fp32",
        "systems": ["trl", "trl-precomputed", "dpokit", "dpokit-precomputed", "dpokit-padded"],
    },
    "llama1b": {
        "vocab": 128256,
        "hidden": 2048,
        "intermediate": 8192,
        "layers": 16,
        "heads": 32,
        "kv_heads": 8,
        "lo": 64,
        "hi": 512,
        "pairs": 16,
        "steps": 10,
        "warmup": 3,
        "device": "cuda",
        # Both load the weights in bf16: the configuration TRL's reference figures in the issue were taken in.
        "dtype": "bf16",
        # Most telling first: one GPU call may not finish them all, and each finished one is kept.
        "systems": [
            "trl",
            "dpokit-flex",
            "dpokit-flex-precomputed",
            "dpokit-flex-lean",
            "trl-precomputed",
            "dpokit",
            "dpokit-flex-compile",
            "dpokit-precomputed",
        ],
    },
}
MODIFIERS: dict[str, dict] = {
    "precomputed": {},  # reference log-probs computed once before training (set up in run_dpokit)
    "padded": {"train": {"layout": "padded"}},
    "flex": {"model": {"attn_implementation": "flex_attention"}},  # block-sparse mask, one row per step (GPU only)
    "compile": {"train": {"compile": True}},
    "lean": {"train": {"compile": True, "compile_memory_budget": 0.5}},
    "ac": {"train": {"activation_checkpointing": True}},
}
"""dpokit systems are `dpokit` plus modifiers joined by `-`, e.g. `dpokit-compile-precomputed`."""


def check_system(name: str) -> str:
    if name in ("trl", "trl-precomputed"):
        return name
    base, *mods = name.split("-")
    if base != "dpokit" or any(m not in MODIFIERS for m in mods):
        raise argparse.ArgumentTypeError(
            f"unknown system {name!r}: trl, trl-precomputed, or dpokit[-{'|'.join(MODIFIERS)}]..."
        )
    return name


H200_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s, NVIDIA's H200 datasheet


def make_workload(folder: Path, p: dict, n_pairs: int, seed: int, init_device: str = "cpu") -> tuple[Path, Path]:
    """A word-level tokenizer + random Llama in `folder/model`, and `n_pairs` pairs in `folder/pairs.jsonl`.
    `init_device`: where the random weights are drawn (a GPU draws an 8B model in a second, a CPU in minutes)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, p["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=4 * p["hi"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    with torch.device(init_device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder / "model", safe_serialization=True)
    del model
    tokenizer.save_pretrained(folder / "model")
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(p, n_pairs, seed)))
    return folder / "model", data


def make_pairs(p: dict, n_pairs: int, seed: int) -> list[dict]:
    """Pairs of "w<id> ..." texts; prompt, chosen and rejected word counts independently uniform in [lo, hi]
    (chosen and rejected one less, for their EOS)."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, p['vocab'])}" for _ in range(n))

    return [
        {
            "prompt": text(rng.randint(p["lo"], p["hi"])),
            "chosen": " " + text(rng.randint(p["lo"], p["hi"] - 1)),
            "rejected": " " + text(rng.randint(p["lo"], p["hi"] - 1)),
        }
        for _ in range(n_pairs)
    ]


def counted_tokens(rows: list[dict], p: dict) -> list[int]:
    """2·prompt + chosen + rejected per pair (chosen and rejected get their EOS)."""
    return [2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2 for r in rows]


def run_dpokit(folder: Path, p: dict, system: str) -> dict:
    import torch

    from dpokit.config import from_dict
    from dpokit.train import train

    model, data = folder / "model", folder / "pairs.jsonl"
    total = p["warmup"] + p["steps"]
    raw: dict = {
        "model": {"path": str(model), "dtype": p["dtype"]},
        "data": {"train_path": str(data), "max_length": 4 * p["hi"], "max_prompt_length": 2 * p["hi"]},
        "loss": {"name": "sigmoid", "beta": 0.1},
        "train": {
            "output_dir": str(folder / system),
            "batch_size": p["pairs"],
            "micro_batch_size": p["pairs"],
            "max_steps": total,
            "lr": 1e-5,
            "optimizer": "adamw",
            "device": p["device"],
            "layout": "packed",
            "max_grad_norm": 1.0,
        },
    }
    modifiers = system.split("-")[1:]
    for m in modifiers:
        for section, fields in MODIFIERS[m].items():
            raw[section] = raw[section] | fields
    if "precomputed" in modifiers:
        from dpokit.precompute import precompute_reference

        raw["reference"] = {"mode": "precomputed", "cache": str(folder / "ref.safetensors")}
        precompute_reference(from_dict(raw))
    if p["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(from_dict(raw), overwrite=True)  # the benchmark owns its folder
    rows = [json.loads(line) for line in (folder / system / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "step_seconds" in r]
    return {"step_seconds": [r["step_seconds"] for r in steps], "first_loss": steps[0]["loss"]}


def run_trl(folder: Path, p: dict, system: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    cuda = p["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder / "model", attn_implementation="sdpa", dtype=dtype)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    args = DPOConfig(
        output_dir=str(folder / system),
        per_device_train_batch_size=p["pairs"],
        max_steps=p["warmup"] + p["steps"],
        learning_rate=1e-5,
        beta=0.1,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        bf16=cuda,
        use_cpu=not cuda,
        activation_checkpointing=False,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        max_length=None,
        precompute_ref_log_probs=system == "trl-precomputed",
        dataloader_drop_last=True,
        seed=0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
    )
    # TRL shuffles with its own sampler; both see the same set of pairs and the same length distribution.
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Timer()]
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    checkpointing = bool(trainer.model.is_activation_checkpointing)
    return {"step_seconds": times, "first_loss": losses[0], "activation_checkpointing": checkpointing}


def worker(args: argparse.Namespace) -> None:
    p = PRESETS[args.preset] | json.loads(args.overrides)
    folder = Path(args.folder)
    result = (run_trl if args.worker.startswith("trl") else run_dpokit)(folder, p, args.worker)
    if p["device"] == "cuda":
        import torch

        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (RSS)
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--systems", nargs="+", type=check_system, help="default: the preset's list")
    parser.add_argument("--overrides", default="{}", help='JSON to change preset fields, e.g. {"steps": 3}')
    parser.add_argument("--out", help="result file (default bench/results/<preset>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    p = PRESETS[args.preset] | json.loads(args.overrides)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = Path(args.out or Path(__file__).parent / "results" / f"{args.preset}.json")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_pairs = p["pairs"] * (p["warmup"] + p["steps"])
        print(f"[bench] building the workload: {n_pairs} pairs, model {p['layers']}x{p['hidden']} ...", flush=True)
        make_workload(folder, p, n_pairs, seed=0)
        rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        tokens_per_step = sum(counted_tokens(rows, p)) / (p["warmup"] + p["steps"])
        n_params = _params(p)
        for system in args.systems or p["systems"]:
            result = folder / f"{system}.json"
            cmd = [sys.executable, __file__, "--preset", args.preset, "--overrides", args.overrides]
            cmd += ["--worker", system, "--folder", str(folder), "--result", str(result)]
            print(f"[bench] {system} ...", flush=True)
            started = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if run.returncode:
                print(run.stdout[-2000:], run.stderr[-4000:])
                results[system] = {"error": run.stderr[-1000:]}
            else:
                r = json.loads(result.read_text())
                timed = r["step_seconds"][p["warmup"] :]
                step = sum(timed) / len(timed)
                flops = (6 + (0 if "precomputed" in system else 2)) * n_params * tokens_per_step
                r |= {
                    "mean_step_seconds": step,
                    "tokens_per_second": tokens_per_step / step,
                    "mfu": flops / step / H200_BF16_PEAK if p["device"] == "cuda" else None,
                    "wall_seconds": time.perf_counter() - started,
                }
                results[system] = r
            # Written after every system, so a run cut short keeps what it measured.
            _report(results, p, command, tokens_per_step, n_params, out)


def _params(p: dict) -> int:
    h, i, v, L = p["hidden"], p["intermediate"], p["vocab"], p["layers"]
    kv = h // p["heads"] * p["kv_heads"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch

    found = {name: version(name) for name in ("torch", "transformers", "trl")}
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return found


def _report(results: dict, p: dict, command: str, tokens_per_step: float, n_params: int, out: Path) -> None:
    base = results.get("trl", {})

    def ratio(r: dict, other: dict, key: str) -> str:
        return f"{r[key] / other[key]:.2f}" if key in other else "-"

    lines = [
        f"{'system':<28} {'step s':>7} {'tokens/s':>9} {'peak GiB':>8} {'MFU':>6} {'1st loss':>8} "
        f"{'x TRL tok/s':>11} {'x TRL mem':>9} {'x w/o pre':>9}"
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<28} failed: {r['error'][-200:]}")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        # Precomputed reference: the speed-up over the same system computing the reference every step.
        plain = results.get(name.replace("-precomputed", ""), {}) if name.endswith("-precomputed") else {}
        lines.append(
            f"{name:<28} {r['mean_step_seconds']:>7.3f} {r['tokens_per_second']:>9.0f} {r['peak_memory_gib']:>8.2f} "
            f"{mfu:>6} {r['first_loss']:>8.4f} {ratio(r, base, 'tokens_per_second'):>11} "
            f"{ratio(r, base, 'peak_memory_gib'):>9} {ratio(r, plain, 'tokens_per_second'):>9}"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command,
                "preset": p,
                "tokens_per_step_counted": tokens_per_step,
                "parameters": n_params,
                "versions": _versions(),
                "results": results,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
