"""THE training loop, for SFT and every preference loss. Read `train()` top to bottom.

One optimizer step consumes `train.batch_size` examples in `batch_size / micro_batch_size` forward/backward
passes; each pass's summed loss is divided by the example count of the whole step (or, for SFT, its completion
token count), so accumulation gives the same update as one large batch. `set_up` does everything before the first
step and `finish` everything after the last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpokit import distributed, tracking
from dpokit import resume as resume_checks
from dpokit.checkpoint import latest_checkpoint, load_training_state, save_checkpoint, save_model, step_folders
from dpokit.compat import check_policy, check_reference_tokenizer
from dpokit.config import RunConfig, save_config, to_dict
from dpokit.data.batching import AnyBatch, Collate, batches_in_order, collate_for, step_examples
from dpokit.data.prepare import PreparedData, prepare_data
from dpokit.data.report import DataError
from dpokit.device import autocast_for, check_attention, out_of_resources, pick_device, seed_everything
from dpokit.errors import UserError
from dpokit.logprobs import batch_logps
from dpokit.lora import apply_lora
from dpokit.losses import LOSSES, compute_loss
from dpokit.metrics import MetricsLog, Stats, averaged, to_host
from dpokit.model import DTYPES, compile_layers, compiler_memory_budget, load_model, load_tokenizer
from dpokit.optim import make_optimizer, make_scheduler
from dpokit.reference import ReferenceFn, cache_parts, check_cache, make_reference, tokenizer_digest, weights_digest
from dpokit.rm import load_reward_model, reward_logps
from dpokit.runfolder import RunFolder, claim


def batch_loss(
    config: RunConfig, policy: torch.nn.Module, reference_logps: ReferenceFn, batch: AnyBatch, split: str
) -> tuple[torch.Tensor, Stats]:
    """Summed loss over the batch's examples, and summed statistics left on the device (`metrics.to_host` brings a
    step's worth to the host at once; divide by the counts to average)."""
    # A reward model's scalar rewards stand where a policy's log-probs go (loss bradley_terry).
    logps_of = reward_logps if config.model.head == "score" else batch_logps
    policy_logps, lengths, log1m = logps_of(policy, batch, config.train.logits_chunk)
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
    policy_logps = policy_logps.detach()
    stats: Stats = {
        "loss": out.losses.detach().sum(),
        "examples": batch.num_examples,
        "completion_tokens": lengths.sum(),
        "tokens": batch.num_tokens,
        "logps/chosen": policy_logps[:, 0].sum(),
    }
    if batch.num_completions >= 2:
        chosen, rejected = out.rewards[:, 0], out.rewards[:, 1]
        stats |= {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/rejected": policy_logps[:, 1].sum(),
            "logps/ref_chosen": ref_logps[:, 0].sum(),
            "logps/ref_rejected": ref_logps[:, 1].sum(),
        }
    return out.losses.sum(), stats


@dataclass
class Run:
    """What `set_up` hands the loop: everything a step needs, loaded and checked."""

    out: Path
    device: torch.device
    autocast: Callable[[], Any]
    tokenizer: Any
    data: PreparedData
    policy: torch.nn.Module
    reference_logps: ReferenceFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    make_batch: Collate
    total_steps: int
    digests: dict[str, str]
    """Of the tokenizer and the tokenized data: what a checkpoint's record checks a resume against."""
    start_step: int = 0
    """The step the run continues from: the checkpoint's with --resume, else 0."""
    skipped_steps: int = 0


@torch.no_grad()
def evaluate(config: RunConfig, run: Run, batches: Sequence[AnyBatch], split: str = "eval") -> dict[str, float]:
    run.policy.eval()
    sums = []
    for batch in tqdm(batches, desc=split, leave=False, disable=not distributed.is_main()):
        with run.autocast():
            sums.append(batch_loss(config, run.policy, run.reference_logps, batch.to(run.device), split)[1])
    run.policy.train()
    means = averaged(to_host(sums), LOSSES[config.loss.name].per_token)
    means.pop("tokens")
    return {f"{split}/{k}": v for k, v in means.items()}


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


def train(config: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run SFT or preference optimisation as the config says; return the summary (also in summary.json).
    `resume` continues the run in `train.output_dir`, `overwrite` replaces it; without either the folder must hold
    no run (runfolder.py)."""
    with claim(config, resume, overwrite) as folder, out_of_resources(config.train.micro_batch_size):
        return _train(config, folder, resume)


def _train(config: RunConfig, folder: RunFolder, resume: bool) -> dict[str, Any]:
    t = config.train
    run = set_up(config, folder, resume)
    policy, optimizer, scheduler, device = run.policy, run.optimizer, run.scheduler, run.device
    per_token = LOSSES[config.loss.name].per_token
    eval_batches = batches_in_order(run.data.eval, t.micro_batch_size, run.make_batch)
    checkpoints = run.out / "checkpoints"
    trackers = tracking.open_trackers(tracking.resolve(t.report_to), run.out, to_dict(config), run.start_step > 0)
    log = MetricsLog(run.out, run.start_step, trackers)
    skipped_steps, train_metrics = run.skipped_steps, {}

    policy.train()
    bar = tqdm(
        range(run.start_step, run.total_steps),
        initial=run.start_step,
        total=run.total_steps,
        desc=config.loss.name,
        disable=not distributed.is_main(),
    )
    with stop_requests() as stop_flag, compiler_memory_budget(t.compile_memory_budget):
        for step in bar:
            started = time.perf_counter()
            indices = distributed.shard(step_examples(len(run.data.train), step, t.batch_size, t.seed))
            micro = [indices[i : i + t.micro_batch_size] for i in range(0, len(indices), t.micro_batch_size)]
            batches = [run.make_batch([run.data.train[j] for j in m], m).to(device) for m in micro]
            # The whole step's normaliser, so that accumulation equals one large batch.
            local = float(sum(b.num_completion_tokens for b in batches) if per_token else len(indices))
            normalizer = (
                distributed.all_reduce_sum(torch.tensor(local, device=device)).item() / distributed.world_size()
            )

            optimizer.zero_grad(set_to_none=True)
            sums = []
            for batch in batches:
                with run.autocast():
                    loss_sum, stats = batch_loss(config, policy, run.reference_logps, batch, "train")
                (loss_sum / normalizer).backward()
                sums.append(stats)
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
            totals = to_host([*sums, {"grad_norm": grad_norm}])  # the step's one transfer to the host
            grad_norm_value, done = totals.pop("grad_norm"), step + 1
            if math.isfinite(grad_norm_value) and math.isfinite(totals["loss"]):
                optimizer.step()
                scheduler.step()
            else:
                # Skip the update, keep the data moving; too many such steps (resumes included) mean a broken run.
                skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                print(f"[warning] step {done}: non-finite loss or gradient, update skipped ({skipped_steps} so far)")
                if skipped_steps > t.max_nonfinite_steps:
                    last = latest_checkpoint(checkpoints) or "none saved"
                    raise NonFiniteError(
                        f"{skipped_steps} steps had a non-finite loss or gradient (train.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}); stopping. Last good checkpoint: {last}. "
                        "Lower train.lr, check the data, or use fp32."
                    )

            train_metrics = averaged(totals, per_token)
            tokens, elapsed = train_metrics.pop("tokens"), time.perf_counter() - started
            train_metrics |= {
                "lr": float(scheduler.get_last_lr()[0]),
                "grad_norm": grad_norm_value,
                "tokens_per_second": tokens / elapsed,
                "step_seconds": elapsed,
                "skipped_steps": skipped_steps,
            }
            if t.log_every and (done % t.log_every == 0 or done == run.total_steps):
                log.write(done, train_metrics)
            bar.set_postfix(
                loss=f"{train_metrics['loss']:.4f}",
                acc=f"{train_metrics.get('rewards/accuracies', float('nan')):.2f}",
                tok_s=f"{train_metrics['tokens_per_second']:.0f}",
            )
            if eval_batches and t.eval_every and done % t.eval_every == 0 and done < run.total_steps:
                log.write(done, evaluate(config, run, eval_batches))
            if (t.save_every and done % t.save_every == 0 and done < run.total_steps) or stop_flag:
                save_checkpoint(
                    checkpoints / f"step-{done}",
                    policy,
                    run.tokenizer,
                    optimizer,
                    scheduler,
                    done,
                    config,
                    skipped_steps,
                    run.digests,
                )
            if stop_flag:
                log.close()
                raise Interrupted(stop_flag["signal"], checkpoints / f"step-{done}")
    return finish(config, run, log, train_metrics, eval_batches)


def set_up(config: RunConfig, folder: RunFolder, resume: bool) -> Run:
    """Device, precision and seeds; tokenizer and data; policy and reference; optimizer and schedule; with `resume`,
    the newest usable checkpoint's state (resume.py). Bad settings, paths and data fail here, before anything is
    written into the claimed output folder."""
    t = config.train
    device = pick_device(t.device)
    check_attention(config.model.attn_implementation, device, backward=True)
    autocast = autocast_for(t.precision, device)
    tracking.resolve(t.report_to)  # a tracker that is not installed fails here, before anything is written
    seed_everything(t.seed, t.deterministic)
    out, checkpoints = folder.out, folder.out / "checkpoints"
    resumable = resume_checks.choose(step_folders(checkpoints), config, checkpoints) if resume else []
    tokenizer = load_tokenizer(config.model.path, config.model.gguf_file, config.model.revision)
    data = prepare_data(config.data, tokenizer, LOSSES[config.loss.name].data)
    digests = resume_checks.data_digests(tokenizer, data.train, data.eval)
    if resumable:
        for note in resume_checks.check_data(resumable[0], digests, config):
            print(f"[resume] {note}")
    for line in data.train_report.lines():
        print(f"[data] {line}")
    if len(data.train) < t.batch_size:
        raise DataError(
            f"{config.data.train_path}: {len(data.train)} training examples (counts above) are fewer than "
            f"train.batch_size={t.batch_size}; lower train.batch_size or give more data"
        )
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * (len(data.train) // t.batch_size)
    policy, reference_logps = load_models(config, device, tokenizer, data)
    optimizer = make_optimizer(config, policy)
    scheduler = make_scheduler(config, optimizer, total_steps)
    make_batch = collate_for(config, policy, tokenizer.pad_token_id)
    run = Run(
        out,
        device,
        autocast,
        tokenizer,
        data,
        policy,
        reference_logps,
        optimizer,
        scheduler,
        make_batch,
        total_steps,
        digests,
    )
    if resumable:
        run.start_step, run.skipped_steps = resume_checks.restore(
            resumable, config, digests, lambda path: load_training_state(path, policy, optimizer, scheduler)
        )
    folder.begin()  # the first write: a run that failed before here left the output folder as it found it
    save_config(config, out / "config.yaml")
    return run


def load_models(
    config: RunConfig, device: torch.device, tokenizer: Any, data: PreparedData
) -> tuple[torch.nn.Module, ReferenceFn]:
    """The policy on `device`, and the reference as a function (batch, split) -> log-probs. A precomputed reference
    cache is checked against the tokenizer and data before any weights load; the weights digest is added after."""
    data_parts: dict[str, str] = {}
    if config.reference.mode == "precomputed":
        data_parts = cache_parts(None, tokenizer_digest(tokenizer), data.train, data.eval, config)
        check_cache(str(config.reference.cache), data_parts)
    if config.reference.mode == "path":
        check_reference_tokenizer(config, tokenizer_digest(tokenizer))
    dtype = DTYPES[config.model.dtype]
    m = config.model
    if m.head == "score":
        policy = load_reward_model(m.path, m.dtype, m.attn_implementation)[0].to(device)
    else:
        policy = load_model(m.path, m.gguf_file, m.attn_implementation, dtype, m.revision).to(device)
    check_policy(config, tokenizer, policy, m.path)
    policy.config.use_cache = False
    if m.lora is not None:  # adapters on the frozen model; π_ref (mode copy) is the same model with them disabled
        policy = apply_lora(policy, m.lora, m.path, m.revision)

    def reference_parts() -> dict[str, str]:
        # The weights digest of the model precompute-ref scored with: the initial policy, or reference.path.
        reference = policy if config.reference.path is None else load_model(config.reference.path, dtype=dtype)
        return data_parts | {"weights": weights_digest(reference)}

    reference_logps, reference = make_reference(config, policy, reference_parts, device)
    if config.train.activation_checkpointing:  # after the reference copy, which never runs backward
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.train.compile:
        compile_layers(policy)
        if reference is not None:
            compile_layers(reference)
    return policy, reference_logps


def finish(
    config: RunConfig, run: Run, log: MetricsLog, train_metrics: dict[str, float], eval_batches: Sequence[AnyBatch]
) -> dict[str, Any]:
    """After the last step: held-out evaluation, with train.eval_train every training example too, the final model,
    and summary.json."""
    eval_metrics: dict[str, float] = {}
    if eval_batches:
        eval_metrics = evaluate(config, run, eval_batches)
        log.write(run.total_steps, eval_metrics)
    train_eval: dict[str, float] = {}
    if config.train.eval_train:
        train_batches = batches_in_order(run.data.train, config.train.micro_batch_size, run.make_batch)
        train_eval = {k.replace("train/", ""): v for k, v in evaluate(config, run, train_batches, "train").items()}
        log.write(run.total_steps, {f"train_eval/{k}": v for k, v in train_eval.items()})
    log.close()
    save_model(run.policy, run.tokenizer, run.out / "final", config)
    summary = {
        "steps": run.total_steps,
        "resumed_from_step": run.start_step,
        "train": train_metrics,
        "eval": eval_metrics,
        "train_eval": train_eval,
        "data": {"train": run.data.train_report.to_dict(), "eval": run.data.eval_report.to_dict()},
        "config": to_dict(config),
    }
    if distributed.is_main():
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
