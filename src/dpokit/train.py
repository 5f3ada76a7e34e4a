"""THE training loop, for SFT and every preference loss. Read `train()` top to bottom.

One optimizer step consumes `train.batch_size` examples in `batch_size / micro_batch_size` forward/backward
passes; each pass's summed loss is divided by the example count of the whole step (or, for SFT, its completion
token count), so accumulation gives the same update as one large batch. `set_up` does everything before the first
step and `finish` everything after the last.

Under torchrun every process runs this same loop on its share of each step's examples (`distributed.shard`), the
models sharded with FSDP2; statistics are summed over the processes, so the metrics are the global batch's, and
process 0 alone writes files. With the global normaliser, N processes make one process's update.
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
from dpokit.config import ConfigError, RunConfig, save_config, to_dict
from dpokit.data.batching import AnyBatch, Collate, batches_in_order, collate_for, step_examples
from dpokit.data.prepare import PreparedData, prepare_data
from dpokit.data.report import DataError
from dpokit.device import autocast_for, check_attention, out_of_resources, pick_device, seed_everything
from dpokit.errors import UserError
from dpokit.logprobs import LogpsModel
from dpokit.losses import LOSSES, compute_loss
from dpokit.metrics import MetricsLog, Stats, averaged, to_host
from dpokit.model import compiler_memory_budget, load_tokenizer
from dpokit.optim import make_optimizer, make_scheduler
from dpokit.policy import load_models
from dpokit.reference import ReferenceFn
from dpokit.runfolder import RunFolder, claim


def batch_loss(
    config: RunConfig, policy: LogpsModel, reference_logps: ReferenceFn, batch: AnyBatch, split: str
) -> tuple[torch.Tensor, Stats]:
    """Summed loss over the batch's examples, and summed statistics left on the device (`metrics.to_host` brings a
    step's worth to the host at once; divide by the counts to average)."""
    with torch.no_grad():
        # The reference first: under FSDP2 its gathered weights are freed before the policy's are gathered.
        ref_logps = reference_logps(batch, split)
    policy_logps, lengths, log1m = policy(batch)
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
    policy: LogpsModel
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
    """Means over every batch; with several processes each computes every N-th batch and the sums are added up."""
    run.policy.eval()
    sums = []
    shares = distributed.shard_batches(batches)
    for _, batch in tqdm(shares, desc=split, leave=False, disable=not distributed.is_main()):
        with run.autocast():
            # A process with no batch left joins the others' FSDP collectives with a forward it throws away.
            stats = batch_loss(config, run.policy, run.reference_logps, (batch or batches[0]).to(run.device), split)[1]
        if batch is not None:
            sums.append(stats)
    run.policy.train()
    means = averaged(distributed.sum_over_ranks(to_host(sums)), LOSSES[config.loss.name].per_token)
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
    device = pick_device(config.train.device)
    check_attention(config.model.attn_implementation, device, backward=True)
    fsdp = distributed.use_fsdp(config.distributed, device)
    # Under torchrun: the process group lives as long as the process (distributed.process_group); process 0 claims
    # the folder, and a refusal stops every process.
    with distributed.process_group(device, config.distributed.timeout_s, single=fsdp), contextlib.ExitStack() as stack:
        folder = distributed.agree(lambda: stack.enter_context(claim(config, resume, overwrite)))
        with out_of_resources(config.train.micro_batch_size):
            return _train(config, folder, resume, device)


def _train(config: RunConfig, folder: RunFolder, resume: bool, device: torch.device) -> dict[str, Any]:
    t = config.train
    run = set_up(config, folder, resume, device)
    policy, optimizer, scheduler, device = run.policy, run.optimizer, run.scheduler, run.device
    per_token = LOSSES[config.loss.name].per_token
    eval_batches = batches_in_order(run.data.eval, t.micro_batch_size, run.make_batch)
    checkpoints = run.out / "checkpoints"
    trackers = tracking.open_trackers(tracking.resolve(t.report_to), run.out, to_dict(config), run.start_step > 0)
    log = MetricsLog(run.out, run.start_step, trackers, enabled=distributed.is_main())
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
            grad_norm = distributed.clip_grad_norm(list(policy.parameters()), max_norm)  # over every process's shards
            totals = to_host([*sums, {"grad_norm": grad_norm}])  # the step's one transfer to the host
            grad_norm_value, done = totals.pop("grad_norm"), step + 1
            totals = distributed.sum_over_ranks(totals)  # the global batch's sums, the same on every process
            if math.isfinite(grad_norm_value) and math.isfinite(totals["loss"]):
                optimizer.step()
                scheduler.step()
            else:
                # Skip the update, keep the data moving; too many such steps (resumes included) mean a broken run.
                skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if distributed.is_main():
                    print(
                        f"[warning] step {done}: non-finite loss or gradient, update skipped ({skipped_steps} so far)"
                    )
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
            stop = distributed.any_rank(bool(stop_flag))  # all processes stop at one step, even if one was signalled
            if (t.save_every and done % t.save_every == 0 and done < run.total_steps) or stop:
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
            if stop:
                log.close()
                raise Interrupted(stop_flag.get("signal", signal.SIGTERM), checkpoints / f"step-{done}")
    return finish(config, run, log, train_metrics, eval_batches)


def set_up(config: RunConfig, folder: RunFolder, resume: bool, device: torch.device) -> Run:
    """Precision and seeds; tokenizer and data; policy and reference; optimizer and schedule; with `resume`, the
    newest usable checkpoint's state (resume.py). Bad settings, paths and data fail here, before anything is written
    into the claimed output folder, and on every process at once (`distributed.agree`)."""
    t = config.train
    autocast = autocast_for(t.precision, device)
    tracking.resolve(t.report_to)  # a tracker that is not installed fails here, before anything is written
    seed_everything(t.seed, t.deterministic)
    out, checkpoints = folder.out, folder.out / "checkpoints"
    main = distributed.is_main()

    def load() -> tuple[list[resume_checks.Checkpoint], Any, PreparedData, dict[str, str]]:
        resumable = resume_checks.choose(step_folders(checkpoints), config, checkpoints) if resume else []
        tokenizer = load_tokenizer(config.model.path, config.model.gguf_file, config.model.revision)
        data = prepare_data(config.data, tokenizer, LOSSES[config.loss.name].data)
        digests = resume_checks.data_digests(tokenizer, data.train, data.eval)
        notes = resume_checks.check_data(resumable[0], digests, config) if resumable else []
        lines = [f"[resume] {note}" for note in notes] + [f"[data] {line}" for line in data.train_report.lines()]
        if main:  # every process read all the data: these counts are the run's
            print("\n".join(lines))
        if len(data.train) < t.batch_size:
            raise DataError(
                f"{config.data.train_path}: {len(data.train)} training examples (counts above) are fewer than "
                f"train.batch_size={t.batch_size}; lower train.batch_size or give more data"
            )
        if t.batch_size % distributed.world_size():
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must be a multiple of the number of processes "
                f"({distributed.world_size()}), so that each takes an equal share of every step"
            )
        return resumable, tokenizer, data, digests

    resumable, tokenizer, data, digests = distributed.agree(load)
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * (len(data.train) // t.batch_size)
    policy, reference_logps = distributed.agree(lambda: load_models(config, device, tokenizer, data))
    optimizer = make_optimizer(config, policy)
    scheduler = make_scheduler(config, optimizer, total_steps)
    make_batch = collate_for(config, policy.lm, tokenizer.pad_token_id)
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
    if main:
        save_config(config, out / "config.yaml")
    return run


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
        "world_size": distributed.world_size(),
        "fsdp": distributed.is_sharded(run.policy),
        "train": train_metrics,
        "eval": eval_metrics,
        "train_eval": train_eval,
        "data": {"train": run.data.train_report.to_dict(), "eval": run.data.eval_report.to_dict()},
        "config": to_dict(config),
    }
    if distributed.is_main():
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
