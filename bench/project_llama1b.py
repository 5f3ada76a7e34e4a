"""What the llama1b workload costs each system, worked out on a CPU: a projection, not a measurement.

For every step of `bench_dpo.py --preset llama1b` (the same pairs, 16 per step, in data order) it counts the token
positions each system computes and the FLOPs they cost, and it projects dpokit's peak GPU memory from the bytes
autograd keeps for backward per position and layer, measured here on the real layer shapes (bf16 weights, 1 and 2
layers). `bench/gpu.sh` measures the real thing on a GPU; this says what to expect there, and why.

    python bench/project_llama1b.py        # ~2 min on 2 cores; writes bench/results/llama1b-projection.json

Model of the cost. Forward FLOPs = 2·N_layers·positions (the decoder's matrix products) + 4·hidden·layers·attended
pairs (QKᵀ and PV) + 2·vocab·hidden·LM-head positions. Training the policy costs 3 forwards, dpokit's checkpointed
LM-head chunks one more LM-head forward, the reference one forward. TRL (1.16) right-pads chosen and rejected rows to
the longest prompt + completion of the step and runs the LM head and attention over every position; dpokit's dense
layout computes its packed rows whole (attention over every row position pair), the FlexAttention layout only the
128×128 blocks its mask leaves visible. At equal FLOP/s (the same MFU on the same GPU), speed ratios are FLOP ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from activation_memory import SavedActivations
from bench_dpo import PRESETS, _params, make_pairs, make_workload

from dpokit.data.batching import FLEX_BLOCK
from dpokit.data.pack import PackedBatch, pack
from dpokit.data.tokenize import TokenizedExample

GIB = 2**30


def examples_of(rows: list[dict]) -> list[TokenizedExample]:
    """Token counts as dpokit tokenizes the workload: BOS + prompt words; completion words + EOS (ids don't matter)."""

    def n(text: str) -> int:
        return len(text.split())

    return [
        TokenizedExample((1,) * (n(r["prompt"]) + 1), ((5,) * (n(r["chosen"]) + 1), (6,) * (n(r["rejected"]) + 1)), "")
        for r in rows
    ]


def attended_blocks(batch: PackedBatch) -> int:
    mask = batch.block_mask()
    return int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()) * FLEX_BLOCK * FLEX_BLOCK


def step_costs(examples: list[TokenizedExample], p: dict) -> dict[str, dict[str, float]]:
    """Positions, attended pairs and LM-head positions of one step, per way of laying it out."""
    h, v, layers = p["hidden"], p["vocab"], p["layers"]
    kv = h // p["heads"] * p["kv_heads"]
    n_layer = layers * (2 * h * h + 2 * h * kv + 3 * h * p["intermediate"])
    completions = sum(len(c) for e in examples for c in e.completion_ids)
    longest = max(len(e.prompt_ids) + len(c) for e in examples for c in e.completion_ids)
    dense = pack(examples, range(len(examples)), pad_id=0)
    flex = pack(examples, range(len(examples)), pad_id=0, capacity=2**62, multiple_of=FLEX_BLOCK)
    layouts = {
        "trl": (2 * len(examples) * longest, 2 * len(examples) * longest**2, 2 * len(examples) * longest),
        "dpokit": (dense.input_ids.numel(), dense.input_ids.shape[0] * dense.input_ids.shape[1] ** 2, completions),
        "dpokit-flex": (flex.input_ids.numel(), attended_blocks(flex), completions),
    }
    out = {}
    for name, (positions, pairs, head) in layouts.items():
        body = 2 * n_layer * positions + 4 * h * layers * pairs
        head_fwd = 2 * v * h * head
        policy = 3 * (body + head_fwd) + (head_fwd if name != "trl" else 0)
        out[name] = {
            "positions": positions,
            "rows": dense.input_ids.shape[0]
            if name == "dpokit"
            else (1 if name == "dpokit-flex" else 2 * len(examples)),
            "attended_pairs": pairs,
            "head_positions": head,
            "flops": policy + body + head_fwd,
            "flops_precomputed": policy,
            "mask_bytes": pairs if name == "dpokit" else 0,  # the dense bool mask: one byte per position pair
        }
    return out


def saved_bytes_per_position(p: dict, mode: str) -> tuple[float, float]:
    """(bytes per position per decoder layer, bytes per position outside the layers) that autograd keeps for backward
    in dpokit's packed path: measured with 1 and 2 layers of the preset's width, bf16 weights, on this CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit.logprobs import packed_sequence_logps
    from dpokit.model import compile_layers, compiler_memory_budget

    def measure(n_layers: int) -> tuple[int, int]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=p["vocab"],
            hidden_size=p["hidden"],
            intermediate_size=p["intermediate"],
            num_hidden_layers=n_layers,
            num_attention_heads=p["heads"],
            num_key_value_heads=p["kv_heads"],
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
        if mode == "ac":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode in ("compile", "lean"):
            compile_layers(model)
        batch = pack(examples_of(make_pairs(p | {"lo": 48, "hi": 96}, 4, seed=1)), range(4), pad_id=0)
        saved = SavedActivations(model)
        for _ in range(2):  # the first call compiles; count the second
            with compiler_memory_budget(0.5 if mode == "lean" else 1.0):
                with saved:
                    out = packed_sequence_logps(model, batch)
                out.logps.sum().backward()
            model.zero_grad(set_to_none=True)
        return saved.bytes, batch.input_ids.numel()

    (one, positions), (two, _) = measure(1), measure(2)
    per_layer = (two - one) / positions
    return per_layer, one / positions - per_layer


def trl_collated_positions(p: dict) -> float:
    """Mean positions per step of the batches TRL's own DPOTrainer builds for this workload (its collator and its
    shuffled order), read from its data loader; the model is shrunk (vocab, width), the lengths are the preset's."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    small = p | {"vocab": 8192, "hidden": 64, "intermediate": 128, "layers": 1, "heads": 4, "kv_heads": 2}
    small["dtype"] = "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_workload(folder, small, p["pairs"] * (p["warmup"] + p["steps"]), seed=0)
        rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        args = DPOConfig(
            output_dir=str(folder / "trl"),
            per_device_train_batch_size=p["pairs"],
            max_length=None,
            report_to=[],
            use_cpu=True,
            dataloader_drop_last=True,
            seed=0,
        )
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(folder / "model"),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(folder / "model"),
        )
        return statistics.mean(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())


def main() -> None:
    p = PRESETS["llama1b"]
    steps = p["warmup"] + p["steps"]
    examples = examples_of(make_pairs(p, p["pairs"] * steps, seed=0))
    chunks = [examples[i * p["pairs"] : (i + 1) * p["pairs"]] for i in range(steps)]
    counted = statistics.mean(sum(2 * len(e.prompt_ids) + sum(map(len, e.completion_ids)) for e in c) for c in chunks)
    real = statistics.mean(sum(len(e.prompt_ids) + sum(map(len, e.completion_ids)) for e in c) for c in chunks)
    per_step = [step_costs(c, p) for c in chunks]
    layouts = {}
    for name in per_step[0]:
        mean = {k: statistics.mean(s[name][k] for s in per_step) for k in per_step[0][name]}
        mean["max_positions"] = max(s[name]["positions"] for s in per_step)
        mean["max_mask_bytes"] = max(s[name]["mask_bytes"] for s in per_step)
        layouts[name] = mean
    trl = layouts["trl"]
    speed = {
        name: {
            "reference_every_step": trl["flops"] / c["flops"],
            "precomputed": trl["flops"] / c["flops_precomputed"],
            "precomputed_over_same": c["flops"] / c["flops_precomputed"],
        }
        for name, c in layouts.items()
    }

    v, layers = p["vocab"], p["layers"]
    n_params = _params(p)
    static = {"policy_weights_grads_adam": 4 * 2 * n_params, "reference_weights": 2 * n_params}
    logits_chunk = 1024 * v * (2 + 4 + 4)  # one LM-head chunk: bf16 logits, fp32 copy, its softmax in backward
    activations = {}
    for mode in ("eager", "compile", "lean", "ac"):
        started = time.perf_counter()
        per_layer, outside = saved_bytes_per_position(p, mode)
        activations[mode] = {"per_position_per_layer": per_layer, "per_position_outside_layers": outside}
        print(
            f"[project] saved activations, {mode}: {per_layer / 1024:.1f} KiB per position per layer "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    eager_layer = activations["eager"]["per_position_per_layer"]
    memory = {}
    for layout in ("dpokit", "dpokit-flex"):
        positions = layouts[layout]["max_positions"]
        mask = layouts[layout]["max_mask_bytes"]
        for mode, a in activations.items():
            saved = positions * (a["per_position_per_layer"] * layers + a["per_position_outside_layers"])
            # Checkpointed layers are recomputed one at a time in backward: one layer's full activations on top.
            transient = logits_chunk + mask + (positions * eager_layer if mode == "ac" else 0)
            total = static["policy_weights_grads_adam"] + static["reference_weights"] + saved + transient
            memory[f"{layout}-{mode}" if mode != "eager" else layout] = {
                "projected_peak_gib": total / GIB,
                "without_reference_weights_gib": (total - static["reference_weights"]) / GIB,
                "activations_gib": saved / GIB,
            }

    trl_collated = trl_collated_positions(p)
    trl_measured_gib = 68.0  # TRL 1.16 without gradient checkpointing on an H200, as the issue reports
    lines = [
        f"{'layout':<14} {'positions':>9} {'pad %':>6} {'att. pairs':>11} {'TFLOP/step':>10} "
        f"{'x TRL (FLOPs)':>13} {'precomp.':>8} {'x self':>6}"
    ]
    for name, c in layouts.items():
        # Pad: positions beyond the tokens the layout needs (TRL: prompt twice; dpokit: prompt once).
        pad = 100 * (1 - (counted if name == "trl" else real) / c["positions"])
        lines.append(
            f"{name:<14} {c['positions']:>9.0f} {pad:>6.1f} {c['attended_pairs']:>11.3g} {c['flops'] / 1e12:>10.1f} "
            f"{speed[name]['reference_every_step']:>13.2f} {speed[name]['precomputed']:>8.2f} "
            f"{speed[name]['precomputed_over_same']:>6.2f}"
        )
    lines.append(f"(TRL's own collator, shuffled order: {trl_collated:.0f} positions per step on average)")
    lines.append("")
    lines.append(f"{'dpokit memory (projected)':<28} {'peak GiB':>9} {'x TRL 68 GiB':>12} {'activations GiB':>15}")
    for name, m in memory.items():
        lines.append(
            f"{name:<28} {m['projected_peak_gib']:>9.1f} {m['projected_peak_gib'] / trl_measured_gib:>12.2f} "
            f"{m['activations_gib']:>15.1f}"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).parent / "results" / "llama1b-projection.json"
    out.write_text(
        json.dumps(
            {
                "command": "python bench/project_llama1b.py",
                "what": "a projection on a CPU from counted positions and FLOPs and measured saved-activation bytes; "
                "not a GPU measurement",
                "preset": p,
                "counted_tokens_per_step": counted,
                "real_tokens_per_step": real,
                "trl_collator_mean_positions": trl_collated,
                "parameters": n_params,
                "layouts": layouts,
                "flop_speed_ratios": speed,
                "saved_activations_bytes": activations,
                "memory": memory,
                "trl_peak_gib_reported_in_issue": trl_measured_gib,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
