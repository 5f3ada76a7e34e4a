"""What the sentiment experiment is made of besides its data (`demo_data.py` finds that): its sizes (default and
`--quick`), its fixed design choices, the methods' shape and the training configs, its prompts and the `Judge` every
policy is measured with."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from dpokit.eval.frontier import evaluate_policy
from dpokit.experiments.reward import SentimentReward


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the default demo and `--quick`."""

    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    review_tokens: int = 64
    sft_epochs: int = 2
    sft_lr: float = 3e-3
    train_prompts: int = 800
    """4,800 pairs, 200 DPO steps of 24: DPO's reward still rises with steps at this size; 256 prompts (48 steps of
    32) stopped it near 0.64 (issue 12's experiments: 0.87 after 144 steps of 16 on these 800 prompts)."""
    eval_prompts: int = 100
    eval_samples: int = 2
    new_tokens: int = 32
    betas: tuple[float, ...] = (0.1, 0.5, 2.0)
    unlikelihood_alphas: tuple[float, ...] = (1.0,)
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    pref_epochs: int = 1
    pref_lr: float = 6e-4
    pref_batch: int = 24
    checkpoints: int = 5
    ppo_target_kls: tuple[float, ...] = (3.0, 6.0, 12.0)
    """One PPO and one PPO-GT run per target KL and seed."""
    ppo_updates: int = 16
    ppo_rollout_batch: int = 64
    ppo_snapshots: int = 4
    """Evaluated iterations of each PPO run, evenly spaced, the last included."""


QUICK = Sizes(
    vocab_size=1024,
    hidden_size=64,
    layers=2,
    heads=2,
    review_tokens=48,
    sft_epochs=2,
    train_prompts=128,
    eval_prompts=48,
    eval_samples=2,
    new_tokens=24,
    betas=(0.1, 1.0),
    unlikelihood_alphas=(1.0,),
    best_of=(1, 2, 4, 8),
    pref_epochs=2,
    pref_lr=1e-3,
    pref_batch=32,
    checkpoints=4,
    ppo_target_kls=(3.0, 8.0),
    ppo_updates=8,
    ppo_rollout_batch=32,
    ppo_snapshots=2,
)


@dataclass(frozen=True)
class Design:
    """The experiment's fixed choices, the same for the default demo and `--quick`."""

    train_reviews: int = 4000
    """Reviews 0–3999 train the tokenizer, π_SFT and the reward; the other 1,000 are held out from all three."""
    perplexity_reviews: int = 500
    """π_SFT's held-out perplexity is measured on the first 500 held-out reviews."""
    eval_offset: int = 800
    """Held-out prompts start at held-out review 800 (review 4800), after the pair prompts (train_prompts <= 800)."""
    prefix_tokens: tuple[int, int] = (2, 8)
    """A prompt is [BOS] + the first 2–8 tokens of a review (the paper's prefixes)."""
    samples_per_prompt: int = 4
    """π_SFT samples per pair prompt, all C(4, 2) = 6 pairs ordered by the reward (the paper's 4)."""
    build_seed: int = 0
    """π_SFT's initial weights and data order, and the reward classifier."""
    pair_prompt_seed: int = 1
    """The prefix lengths of the pair prompts."""
    pair_sample_seed: int = 2
    """π_SFT's samples that become the pairs."""
    eval_prompt_seed: int = 3
    """The prefix lengths of the held-out prompts."""
    eval_sample_seed: int = 1000
    """Plus the training seed: the samples each policy is judged on, a stream apart from the pairs' seeds."""
    best_of_seed: int = 2000
    """Plus the training seed: π_SFT's samples for Best-of-N, apart from the evaluation samples."""
    rm_epochs: int = 2
    """The reward model's passes over the pairs (one pass leaves it near chance on this data)."""
    rm_lr: float = 3e-4
    rm_heldout: float = 0.1
    """Fraction of the pair prompts whose pairs are held out to measure the reward model's accuracy."""
    ppo_epochs: int = 2
    """PPO passes over each rollout batch (Ziegler et al.: 4; 2 learn as much per unit of compute here)."""
    ppo_lr: float = 1e-3
    ppo_kl_gain: float = 0.5
    """K_β of Ziegler et al.'s KL controller per iteration (their 0.1 is for thousands of iterations)."""
    ppo_normalize_samples: int = 256
    """π_SFT samples (one per pair prompt) that set each PPO reward's normalisation to mean 0, std 1."""
    ppo_normalize_seed: int = 4
    """π_SFT's samples for that normalisation."""


@dataclass(frozen=True)
class Method:
    """One trained policy of the frontier: a dpokit loss from π_SFT on the pairs."""

    name: str
    setting: str
    loss: dict[str, Any]
    reference: str = "precomputed"
    """π_SFT's log-probs of the pairs, computed once for every run (`Demo.build_reference_logps`); `none` for the
    reference-free baselines."""


def sft_recipe(s: Sizes, d: Design) -> dict[str, Any]:
    """π_SFT's training config, less the paths."""
    return {
        "data": {"max_length": s.review_tokens, "max_prompt_length": 8},
        "reference": {"mode": "none"},
        "loss": {"name": "sft"},
        "train": {
            "batch_size": 32,
            "micro_batch_size": 32,
            "epochs": s.sft_epochs,
            "lr": s.sft_lr,
            "warmup_steps": 20,
            "schedule": "cosine",
            "seed": d.build_seed,
        },
    }


def pairs_data(s: Sizes) -> dict[str, Any]:
    """How the pairs are tokenized for training (prompts are at most 9 tokens, completions `new_tokens`)."""
    return {"max_length": 16 + s.new_tokens + 4, "max_prompt_length": 16}


def reference_recipe(s: Sizes) -> dict[str, Any]:
    """`precompute-ref`'s config for π_SFT's log-probs of the pairs, less the paths (the loss only says: pairs)."""
    return {
        "data": pairs_data(s),
        "reference": {"mode": "precomputed"},
        "loss": {"name": "sigmoid"},
        "train": {"batch_size": 64, "micro_batch_size": 64},
    }


def method_recipe(s: Sizes, method: Method, seed: int) -> dict[str, Any]:
    """A method's training config from π_SFT on the pairs, less the paths and the checkpoint spacing."""
    return {
        "data": pairs_data(s),
        "reference": {"mode": method.reference},
        "loss": method.loss,
        "train": {
            "batch_size": s.pref_batch,
            "micro_batch_size": s.pref_batch,
            "epochs": s.pref_epochs,
            "lr": s.pref_lr,
            "warmup_steps": 5,
            "seed": seed,
        },
    }


def prefix_prompts(
    tokenizer: Any, reviews: list[dict[str, Any]], seed: int, lengths: tuple[int, int]
) -> list[list[int]]:
    """[BOS] + the first 2–8 (`lengths`) tokens of each review."""
    rng = random.Random(seed)
    ids = [tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in reviews]
    return [[tokenizer.bos_token_id, *i[: rng.randint(*lengths)]] for i in ids]


@dataclass(frozen=True)
class Judge:
    """What every policy is measured with: π_SFT (the KL reference), the reward and the held-out prompts."""

    tokenizer: Any
    sft_model: Any
    reward: SentimentReward
    prompts: list[list[int]]
    samples: int
    new_tokens: int
    seed: int

    def decode(self, prompt: list[int], completion: tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(prompt) + list(completion), skip_special_tokens=True)

    def evaluate(self, model: Any, seed: int) -> dict[str, float]:
        return evaluate_policy(
            model,
            self.sft_model,
            self.tokenizer,
            self.prompts,
            self.reward,
            self.samples,
            self.new_tokens,
            self.seed + seed,
        )
