"""THE training loop, for SFT and every preference loss. Read it top to bottom.

One optimizer step consumes `train.batch_size` examples in `batch_size / micro_batch_size` forward/backward
passes; each pass's summed loss is divided by the example count of the whole step (or, for SFT, its completion
token count), so accumulation gives the same update as one large batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpokit import distributed
from dpokit.checkpoint import latest_checkpoint, load_training_state, save_checkpoint, save_model
from dpokit.config import RunConfig, save_config, to_dict
from dpokit.errors import UserError
from dpokit.logprobs import batch_logps
from dpokit.losses import LOSSES, compute_loss
from dpokit.model import DTYPES, load_model
from dpokit.reference import ReferenceFn, cache_parts, check_cache, make_reference, tokenizer_digest, weights_digest
from dpokit.runtime import (
    AnyBatch,
    autocast_for,
    batches_in_order,
    collate_for,
    compile_layers,
    compiler_memory_budget,
    load_tokenizer_and_data,
    pick_device,
    seed_everything,
)


def make_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = config.train
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.lr, weight_decay=t.weight_decay)
    # The fused kernel (one launch for every parameter) where there is one: CUDA.
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=params[0].is_cuda or None)


def make_scheduler(
    config: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, schedule = config.train.warmup_steps, config.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_examples(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a fresh seeded permutation each epoch, remainder dropped.
    The step number alone fixes the data position, which is what makes resuming exact."""
    steps_per_epoch = n // batch_size
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[offset * batch_size : (offset + 1) * batch_size]


def batch_loss(
    config: RunConfig, policy: torch.nn.Module, reference_logps: ReferenceFn, batch: AnyBatch, split: str
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed loss over the batch's examples and summed statistics (divide by the counts to average)."""
    policy_logps, lengths, log1m = batch_logps(policy, batch, config.train.logits_chunk)
    with torch.no_grad():
        ref_logps = reference_logps(batch, split)
    settings = dataclasses.asdict(config.loss)
    out = compute_loss(
        settings.pop("name"),
        policy_logps=policy_logps,
        reference_logps=ref_logps.to(policy_logps.dtype),
        lengths=lengths,
        policy_log1m=log1m,
        **settings,
    )
    stats = {
        "loss": float(out.losses.detach().sum()),
        "examples": batch.num_examples,
        "completion_tokens": float(lengths.sum()),
        "tokens": batch.num_tokens,
        "logps/chosen": float(policy_logps[:, 0].detach().sum()),
    }
    if batch.num_completions >= 2:
        chosen, rejected = out.rewards[:, 0], out.rewards[:, 1]
        stats.update(
            {
                "rewards/chosen": float(chosen.sum()),
                "rewards/rejected": float(rejected.sum()),
                "rewards/accuracies": float((chosen > rejected).float().sum()),
                "rewards/margins": float((chosen - rejected).sum()),
                "logps/rejected": float(policy_logps[:, 1].detach().sum()),
                "logps/ref_chosen": float(ref_logps[:, 0].sum()),
                "logps/ref_rejected": float(ref_logps[:, 1].sum()),
            }
        )
    return out.losses.sum(), stats


def averaged(sums: Sequence[dict[str, float]], per_token: bool) -> dict[str, float]:
    """Turn summed statistics from several batches into means per example (loss per token for SFT)."""
    total: dict[str, float] = {}
    for s in sums:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + v
    examples, tokens = total.pop("examples"), total.pop("tokens")
    completion_tokens = total.pop("completion_tokens")
    means = {k: v / examples for k, v in total.items()}
    if per_token:
        means["loss"] = total["loss"] / completion_tokens
    means["tokens"] = tokens
    return means


@torch.no_grad()
def evaluate(
    config: RunConfig,
    policy: torch.nn.Module,
    reference_logps: ReferenceFn,
    batches: Sequence[AnyBatch],
    device: torch.device,
    autocast: Any,
    split: str = "eval",
) -> dict[str, float]:
    policy.eval()
    sums = []
    for batch in tqdm(batches, desc=split, leave=False, disable=not distributed.is_main()):
        with autocast():
            sums.append(batch_loss(config, policy, reference_logps, batch.to(device), split)[1])
    policy.train()
    means = averaged(sums, LOSSES[config.loss.name].per_token)
    means.pop("tokens")
    return {f"{split}/{k}": v for k, v in means.items()}


class MetricsLog:
    """metrics.jsonl always; TensorBoard when it is installed. On resume, rows written after the checkpoint
    (by the run that was killed) are dropped, so that the file reads as one uninterrupted run."""

    def __init__(self, out: Path, resume_step: int) -> None:
        path = out / "metrics.jsonl"
        if resume_step and path.exists():
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if _complete_row(line, resume_step)]
            path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
        self.file = path.open("a" if resume_step else "w", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb: Any = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _complete_row(line: str, last_step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) <= last_step
    except (ValueError, KeyError, TypeError):
        return False  # a line cut short by a kill


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run stopped cleanly."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal {signum}; checkpoint saved at {checkpoint}; continue with --resume")
        self.signum = signum


class NonFiniteError(UserError, RuntimeError):
    """Too many steps with a non-finite loss or gradient."""


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, int]]:
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (so a checkpoint is written first)."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: flag.setdefault("signal", signum))
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run SFT or preference optimisation as the config says; return the summary (also in summary.json)."""
    t = config.train
    device = pick_device(t.device)
    if device.type == "cpu" and config.model.attn_implementation == "flex_attention":
        raise ValueError(
            "model.attn_implementation=flex_attention trains on GPUs only: PyTorch has no FlexAttention backward on "
            "CPU. Use sdpa on CPU (precompute-ref, which runs no backward, accepts flex_attention anywhere)."
        )
    autocast = autocast_for(t.precision, device)
    seed_everything(t.seed, t.deterministic)
    tokenizer, data = load_tokenizer_and_data(config)  # bad paths and bad data fail here, before anything is written
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    for line in data.train_report.lines():
        print(f"[data] {line}")
    if len(data.train) < t.batch_size:
        raise ValueError(f"{len(data.train)} training examples are fewer than train.batch_size={t.batch_size}")
    steps_per_epoch = len(data.train) // t.batch_size
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch

    data_parts: dict[str, str] = {}
    if config.reference.mode == "precomputed":
        # Tokenizer, data and settings are checked before any weights load; the weights digest is added below.
        data_parts = cache_parts(None, tokenizer_digest(tokenizer), data.train, data.eval, config)
        check_cache(str(config.reference.cache), data_parts)
    dtype = DTYPES[config.model.dtype]
    policy = load_model(config.model.path, config.model.gguf_file, config.model.attn_implementation, dtype).to(device)
    policy.config.use_cache = False

    def reference_parts() -> dict[str, str]:
        # The weights digest of the model precompute-ref scored with: the initial policy, or reference.path.
        reference = policy if config.reference.path is None else load_model(config.reference.path, dtype=dtype)
        return data_parts | {"weights": weights_digest(reference)}

    reference_logps, reference = make_reference(config, policy, reference_parts, device)
    if t.activation_checkpointing:  # after the reference copy, which never runs backward
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        compile_layers(policy)
        if reference is not None:
            compile_layers(reference)
    optimizer = make_optimizer(config, policy)
    scheduler = make_scheduler(config, optimizer, total_steps)
    checkpoints = out / "checkpoints"
    start_step = skipped_steps = 0
    if resume and (last := latest_checkpoint(checkpoints)) is not None:
        start_step, skipped_steps = load_training_state(last, policy, optimizer, scheduler)
        print(f"[resume] from {last} at step {start_step}")
    make_batch = collate_for(config, policy, tokenizer.pad_token_id)
    eval_batches = batches_in_order(data.eval, t.micro_batch_size, make_batch)
    per_token = LOSSES[config.loss.name].per_token
    log = MetricsLog(out, start_step)
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}

    policy.train()
    bar = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc=config.loss.name,
        disable=not distributed.is_main(),
    )
    with stop_requests() as stop_flag, compiler_memory_budget(t.compile_memory_budget):
        for step in bar:
            started = time.perf_counter()
            indices = distributed.shard(step_examples(len(data.train), step, t.batch_size, t.seed))
            micro = [indices[i : i + t.micro_batch_size] for i in range(0, len(indices), t.micro_batch_size)]
            batches = [make_batch([data.train[j] for j in m], m).to(device) for m in micro]
            # The whole step's normaliser, so that accumulation equals one large batch.
            local = float(sum(b.num_completion_tokens for b in batches) if per_token else len(indices))
            normalizer = (
                distributed.all_reduce_sum(torch.tensor(local, device=device)).item() / distributed.world_size()
            )

            optimizer.zero_grad(set_to_none=True)
            sums = []
            for batch in batches:
                with autocast():
                    loss_sum, stats = batch_loss(config, policy, reference_logps, batch, "train")
                (loss_sum / normalizer).backward()
                sums.append(stats)
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
            done = step + 1
            if math.isfinite(float(grad_norm)) and all(math.isfinite(s["loss"]) for s in sums):
                optimizer.step()
                scheduler.step()
            else:
                # Skip the update, keep the data moving; too many such steps (resumes included) mean a broken run.
                skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                print(f"[warning] step {done}: non-finite loss or gradient, update skipped ({skipped_steps} so far)")
                if skipped_steps > t.max_nonfinite_steps:
                    last = latest_checkpoint(checkpoints)
                    raise NonFiniteError(
                        f"{skipped_steps} steps had a non-finite loss or gradient (train.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}); stopping. Last good checkpoint: {last or 'none saved'}. "
                        "Lower train.lr, check the data, or use fp32."
                    )

            train_metrics = averaged(sums, per_token)
            tokens, elapsed = train_metrics.pop("tokens"), time.perf_counter() - started
            train_metrics |= {
                "lr": float(scheduler.get_last_lr()[0]),
                "grad_norm": float(grad_norm),
                "tokens_per_second": tokens / elapsed,
                "step_seconds": elapsed,
                "skipped_steps": skipped_steps,
            }
            if t.log_every and (done % t.log_every == 0 or done == total_steps):
                log.write(done, train_metrics)
            bar.set_postfix(
                loss=f"{train_metrics['loss']:.4f}",
                acc=f"{train_metrics.get('rewards/accuracies', float('nan')):.2f}",
                tok_s=f"{train_metrics['tokens_per_second']:.0f}",
            )
            if eval_batches and t.eval_every and done % t.eval_every == 0 and done < total_steps:
                eval_metrics = evaluate(config, policy, reference_logps, eval_batches, device, autocast)
                log.write(done, eval_metrics)
            if (t.save_every and done % t.save_every == 0 and done < total_steps) or stop_flag:
                save_checkpoint(
                    checkpoints / f"step-{done}", policy, tokenizer, optimizer, scheduler, done, config, skipped_steps
                )
            if stop_flag:
                log.close()
                raise Interrupted(stop_flag["signal"], checkpoints / f"step-{done}")

    if eval_batches:
        eval_metrics = evaluate(config, policy, reference_logps, eval_batches, device, autocast)
        log.write(total_steps, eval_metrics)
    train_eval_metrics = {}
    if t.eval_train:
        train_batches = batches_in_order(data.train, t.micro_batch_size, make_batch)
        train_eval_metrics = evaluate(config, policy, reference_logps, train_batches, device, autocast, "train")
        log.write(total_steps, {k.replace("train/", "train_eval/"): v for k, v in train_eval_metrics.items()})
    log.close()
    save_model(policy, tokenizer, out / "final", config)
    summary = {
        "steps": total_steps,
        "train": train_metrics,
        "eval": eval_metrics,
        "train_eval": {k.replace("train/", ""): v for k, v in train_eval_metrics.items()},
        "data": {"train": data.train_report.to_dict(), "eval": data.eval_report.to_dict()},
        "config": to_dict(config),
    }
    if distributed.is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
