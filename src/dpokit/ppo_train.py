"""RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020): the baseline the DPO paper's IMDb frontier compares
against. One loop: sample completions from the policy, score them with a reward function, spread the score and a
per-token KL penalty to π_ref over the tokens, estimate advantages with GAE, and take a few epochs of clipped PPO
steps; β follows Ziegler et al.'s adaptive controller towards a target KL. The arithmetic is `dpokit.ppo`.

The value function is a scalar head on the policy's own transformer, as in Ziegler et al.'s code
(openai/lm-human-preferences). Stiennon et al. give the value function a separate transformer so that value updates
cannot disturb the policy early on; a second transformer would double the cost of every forward and backward, which
the CPU demo cannot afford, and at this size the shared head is kept harmless by the small value-loss weight
(`vf_coef` = 0.1, Ziegler et al.'s) and a zero-initialised head, so that the first updates are pure policy gradient.

Details from Huang et al. 2023, "The N Implementation Details of RLHF with PPO" (ICLR blog track 2024), that matter
at this size and are followed here: per-token KL penalty with the score at the last token; rewards whitened without
shifting their mean and advantages whitened (per rollout batch, which is their per-minibatch whitening with one
minibatch, Ziegler et al.'s setting); clipped value loss; the value head zero-initialised; the learning rate decayed
linearly to 0; γ = 1, λ = 0.95; rollouts sampled at temperature 1 from the current policy, and their log-probs
recomputed by the same forward used in training, so the first ratio is exactly 1. Left out, with reasons: the
sampling temperature in the logits (we sample at 1, which the KL on the frontier assumes), and response truncation
at a period (completions here end at EOS or the token limit).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from dpokit import ppo
from dpokit.data.collate import collate
from dpokit.data.tokenize import TokenizedExample
from dpokit.generate import Sampling, generate
from dpokit.logprobs import token_logps
from dpokit.metrics import MetricsLog
from dpokit.model import load_model, load_tokenizer

Prompt = Sequence[int]
RewardFn = Callable[[Sequence[Prompt], Sequence[Sequence[int]]], Any]
"""(prompts, completions) as token ids -> one reward per completion (a sequence, array or tensor of floats)."""


def text_reward(tokenizer: Any, score_texts: Callable[[list[str]], Any]) -> RewardFn:
    """A reward function on token ids from a scorer of texts (prompt and completion decoded together)."""

    def reward(prompts: Sequence[Prompt], completions: Sequence[Sequence[int]]) -> Any:
        texts = [
            tokenizer.decode(list(p) + list(c), skip_special_tokens=True)
            for p, c in zip(prompts, completions, strict=True)
        ]
        return score_texts(texts)

    return reward


def reward_model_reward(path: str | Path, batch_size: int = 128) -> RewardFn:
    """A Bradley-Terry reward model (a `dpokit rm` folder) as a reward function on token ids."""
    from dpokit.rm import load_reward_model, score_examples

    model, tokenizer = load_reward_model(str(path))

    def reward(prompts: Sequence[Prompt], completions: Sequence[Sequence[int]]) -> list[float]:
        examples = [TokenizedExample(tuple(p), (tuple(c),), "") for p, c in zip(prompts, completions, strict=True)]
        return score_examples(model, examples, tokenizer.pad_token_id, batch_size)

    return reward


def normalized(reward: RewardFn, prompts: Sequence[Prompt], completions: Sequence[Sequence[int]]) -> RewardFn:
    """`reward` mapped affinely so that these samples (π_ref's) score mean 0 and standard deviation 1: Ziegler et
    al.'s reward normalisation, which puts a learned reward and the ground truth on one scale, so that one KL
    coefficient means the same for both."""
    raw = np.asarray(reward(prompts, completions), dtype=np.float64)
    gain = 1.0 / (raw.std() + 1e-8)
    bias = -gain * raw.mean()

    def scaled(p: Sequence[Prompt], c: Sequence[Sequence[int]]) -> Any:
        return gain * np.asarray(reward(p, c), dtype=np.float64) + bias

    return scaled


@dataclass(frozen=True)
class PPOConfig:
    """One PPO run. Defaults are Ziegler et al.'s sentiment settings where they fit a CPU-sized run."""

    updates: int = 40
    """PPO iterations, each a rollout batch and `ppo_epochs` passes over it."""
    rollout_batch: int = 64
    """Episodes (prompt + one sampled completion) per iteration."""
    minibatches: int = 1
    """Minibatches per pass over a rollout batch (Ziegler et al.: 1)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (Ziegler et al.: 4)."""
    lr: float = 1e-5
    """Adam learning rate, decayed linearly to 0 over the run."""
    max_new_tokens: int = 32
    """Completion length limit when sampling."""
    kl_coef: float = 0.15
    """β at the start (Ziegler et al.'s sentiment run: 0.15)."""
    target_kl: float | None = 6.0
    """Target of the adaptive KL controller (nats per sequence); None keeps β fixed."""
    kl_horizon: float = 10_000.0
    """The controller's horizon in episodes (Ziegler et al.: 10,000; scale it with the run's length)."""
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = True
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_at: tuple[int, ...] = ()
    """Iterations after which the policy is saved to `snapshots/update-N` (the final one is `final/`)."""

    def __post_init__(self) -> None:
        if self.rollout_batch % self.minibatches:
            raise ValueError(f"rollout_batch={self.rollout_batch} is not divisible by minibatches={self.minibatches}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl={self.target_kl} must be positive (or None for a fixed β)")


class PolicyWithValue(torch.nn.Module):
    """A causal LM and a scalar value head on its last hidden state (shared backbone, zero-initialised head)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T) -> logits (N, T, V) and values (N, T)."""
        hidden = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self.lm.get_output_embeddings()(hidden), self.value_head(hidden).squeeze(-1).float()


@dataclass
class Rollout:
    """A batch of episodes in the (N, L) completion frame of `dpokit.ppo`, with the padded model input."""

    input_ids: Tensor
    attention_mask: Tensor
    index: Tensor
    """(N, L) column of the shifted model output that scores completion token t (prompt length − 1 + t)."""
    targets: Tensor
    """(N, L) completion token ids."""
    mask: Tensor

    def select(self, rows: Tensor) -> Rollout:
        return Rollout(*(t[rows] for t in (self.input_ids, self.attention_mask, self.index, self.targets, self.mask)))


def make_rollout(prompts: Sequence[Prompt], completions: Sequence[Sequence[int]], pad_id: int) -> Rollout:
    examples = [TokenizedExample(tuple(p), (tuple(c),), "") for p, c in zip(prompts, completions, strict=True)]
    batch = collate(examples, range(len(examples)), pad_id)
    length = max(len(c) for c in completions)
    index = torch.zeros(len(prompts), length, dtype=torch.long)
    targets = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        index[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        targets[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1.0
    return Rollout(batch.input_ids, batch.attention_mask, index, targets, mask)


def score_tokens(model: Any, rollout: Rollout) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (N, L) of the completions, and values (N, L) when `model` has a value head."""
    if isinstance(model, PolicyWithValue):
        logits, values = model(rollout.input_ids, rollout.attention_mask)
    else:
        out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, use_cache=False)
        logits, values = out.logits, None
    per_token = token_logps(logits[:, :-1], rollout.input_ids[:, 1:])  # (N, T-1)
    logps = per_token.gather(1, rollout.index) * rollout.mask
    if values is None:
        return logps, None
    return logps, values[:, :-1].gather(1, rollout.index) * rollout.mask


def ppo_train(
    policy_path: str | Path,
    prompts: Sequence[Prompt],
    reward: RewardFn,
    config: PPOConfig,
    out: str | Path,
    reference_path: str | Path | None = None,
) -> dict[str, Any]:
    """Train `policy_path` (π_ref too, unless `reference_path` is given) with PPO on `prompts` against `reward`.
    Writes config.yaml, metrics.jsonl, snapshots/update-N/ at `config.save_at` and final/ (Hugging Face folders
    with the value head beside the weights); returns the last iteration's statistics."""
    c = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(asdict(c), sort_keys=False), encoding="utf-8")
    random.seed(c.seed)
    torch.manual_seed(c.seed)
    tokenizer = load_tokenizer(str(policy_path))
    model = PolicyWithValue(load_model(str(policy_path)))
    reference = load_model(str(reference_path or policy_path)).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / c.updates)
    controller = ppo.KLController(c.kl_coef, c.target_kl, c.kl_horizon)
    order = np.random.default_rng(c.seed).permutation(len(prompts)).tolist()
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=c.max_new_tokens)
    log = MetricsLog(out, 0)
    stats: dict[str, float] = {}
    for update in range(c.updates):
        started = time.perf_counter()
        picks = [order[(update * c.rollout_batch + i) % len(order)] for i in range(c.rollout_batch)]
        batch_prompts = [prompts[i] for i in picks]
        keys = [f"{update}/{i}" for i in range(c.rollout_batch)]
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        completions = generate(model.lm, batch_prompts, keys, sampling, eos, pad, c.seed, batch_size=c.rollout_batch)
        rollout = make_rollout(batch_prompts, completions, tokenizer.pad_token_id)
        scores = torch.as_tensor(np.asarray(reward(batch_prompts, completions), dtype=np.float32))
        sampled = time.perf_counter()
        stats = ppo_step(model, reference, optimizer, rollout, scores, controller, c)
        stats |= {"time/rollout_seconds": sampled - started, "time/step_seconds": time.perf_counter() - started}
        scheduler.step()
        stats["objective/kl_coef"] = controller.update(stats["objective/kl"], c.rollout_batch)
        stats["lr"] = float(scheduler.get_last_lr()[0])
        log.write(update + 1, stats)
        if update + 1 in c.save_at and update + 1 < c.updates:
            save_policy(model, tokenizer, out / "snapshots" / f"update-{update + 1}")
    log.close()
    save_policy(model, tokenizer, out / "final")
    (out / "summary.json").write_text(json.dumps({"updates": c.updates, "last": stats}, indent=2), encoding="utf-8")
    return stats


def ppo_step(
    model: PolicyWithValue,
    reference: Any,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    scores: Tensor,
    controller: ppo.KLController,
    c: PPOConfig,
) -> dict[str, float]:
    """One PPO iteration on a sampled batch: rewards, advantages, then `ppo_epochs` passes of clipped updates."""
    mask = rollout.mask
    with torch.no_grad():
        model.eval()
        old_logps, old_values = score_tokens(model, rollout)
        ref_logps, _ = score_tokens(reference, rollout)
        assert old_values is not None
        rewards, kl = ppo.token_rewards(scores, old_logps, ref_logps, mask, controller.value)
        if c.whiten_rewards:
            rewards = ppo.whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo.gae(rewards, old_values, mask, c.gamma, c.lam)
        advantages = ppo.whiten(advantages, mask)
    model.train()
    n, size = len(scores), len(scores) // c.minibatches
    sums: dict[str, float] = {}
    for _ in range(c.ppo_epochs):
        for rows in torch.randperm(n).split(size):
            part = rollout.select(rows)
            logps, values = score_tokens(model, part)
            assert values is not None
            pg_loss, pg_clipfrac = ppo.policy_loss(logps, old_logps[rows], advantages[rows], part.mask, c.clip_range)
            vf_loss, vf_clipfrac = ppo.value_loss(
                values, old_values[rows], returns[rows], part.mask, c.value_clip_range
            )
            loss = pg_loss + c.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
            optimizer.step()
            approx_kl = 0.5 * ppo.masked_mean((logps.detach() - old_logps[rows]) ** 2, part.mask)
            for key, value in (
                ("ppo/loss/policy", pg_loss),
                ("ppo/loss/value", vf_loss),
                ("ppo/policy/clipfrac", pg_clipfrac),
                ("ppo/policy/approxkl", approx_kl),
                ("ppo/val/clipfrac", vf_clipfrac),
            ):
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / (c.ppo_epochs * c.minibatches)
    lengths = mask.sum(dim=1)
    return {
        "objective/scores": float(scores.mean()),
        "objective/kl": float(kl.sum(dim=1).mean()),
        "objective/entropy": float(-(old_logps * mask).sum(dim=1).mean()),
        "objective/length": float(lengths.mean()),
        "ppo/returns/mean": float(ppo.masked_mean(returns, mask)),
        "ppo/val/mean": float(ppo.masked_mean(old_values, mask)),
        **sums,
    }


def save_policy(model: PolicyWithValue, tokenizer: Any, out: Path) -> None:
    """The policy as a Hugging Face folder (loads with AutoModelForCausalLM) with value_head.pt beside it, written
    to `<out>.tmp` and renamed, so a folder that exists is complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.lm.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(model.value_head.state_dict(), tmp / "value_head.pt")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
