"""PPO and PPO-GT in the sentiment demo (the DPO paper's Fig. 2 comparison): a Bradley-Terry reward model trained by
`dpokit rm` on the demo's preference pairs, and PPO runs from π_SFT on the pair prompts at several target KLs, against
that model (PPO) or against the ground-truth classifier (PPO-GT), each evaluated at snapshots along the way as the
preference methods are at their checkpoints.

Both rewards are normalised on π_SFT's samples (Ziegler et al.: mean 0, standard deviation 1), so that one β means
the same for PPO and PPO-GT; each run starts at β = 1/KL_target (the KL penalty at the target then equals one standard
deviation of the reward) and Ziegler et al.'s controller moves β towards the target from there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.data.prepare import stable_bucket
from dpokit.eval.samples import read_jsonl, write_jsonl
from dpokit.experiments.sentiment_setup import Design, Sizes, pairs_data
from dpokit.experiments.stages import digest, run_stage
from dpokit.generate import sample
from dpokit.model import load_model
from dpokit.ppo_train import PPOConfig, RewardFn, normalized, ppo_train, reward_model_reward, text_reward

if TYPE_CHECKING:
    from dpokit.experiments.sentiment import Demo
    from dpokit.experiments.sentiment_setup import Judge

PPO_METHODS = ("PPO-GT", "PPO")
"""PPO-GT optimises the ground-truth classifier; PPO the reward model trained on the pairs."""


def ppo_runs(s: Sizes) -> list[tuple[str, float]]:
    return [(method, target) for method in PPO_METHODS for target in s.ppo_target_kls]


def ppo_run_name(method: str, target: float, seed: int) -> str:
    return f"{method}-target_kl={target}-seed{seed}"


def rm_recipe(s: Sizes, d: Design) -> dict[str, Any]:
    """`dpokit rm` on the pairs from π_SFT's backbone, less the paths (its held-out pairs: `split_by_prompt`)."""
    return {
        "data": pairs_data(s),
        "train": {
            "batch_size": 32,
            "micro_batch_size": 32,
            "epochs": d.rm_epochs,
            "lr": d.rm_lr,
            "warmup_steps": 5,
            "layout": "padded",
            "seed": d.build_seed,
        },
    }


def ppo_config(s: Sizes, d: Design, target_kl: float, seed: int) -> PPOConfig:
    every = max(1, s.ppo_updates // s.ppo_snapshots)
    return PPOConfig(
        updates=s.ppo_updates,
        rollout_batch=s.ppo_rollout_batch,
        ppo_epochs=d.ppo_epochs,
        lr=d.ppo_lr,
        max_new_tokens=s.new_tokens,
        kl_coef=1.0 / target_kl,
        target_kl=target_kl,
        kl_horizon=s.ppo_rollout_batch / d.ppo_kl_gain,
        seed=seed,
        save_at=tuple(range(every, s.ppo_updates, every)),
    )


def ppo_stage_settings(
    s: Sizes, d: Design, pairs_key: str, judge_key: str, seeds: tuple[int, ...]
) -> dict[str, dict[str, Any]]:
    """The settings of the reward-model stage and of every PPO run (see `Demo.stage_settings`)."""
    rm = {"pairs": pairs_key, "recipe": rm_recipe(s, d), "heldout_prompts": d.rm_heldout}
    stages: dict[str, dict[str, Any]] = {"reward_model": rm}
    normalization = [d.ppo_normalize_samples, d.ppo_normalize_seed]
    for seed in seeds:
        for method, target in ppo_runs(s):
            stages[ppo_run_name(method, target, seed)] = {
                "pairs": pairs_key,  # the prompts PPO samples from are the pairs' prompts
                "judge": judge_key,
                "reward_model": digest(stages["reward_model"]) if method == "PPO" else None,
                "normalization": normalization,
                "recipe": asdict(ppo_config(s, d, target, seed)),
            }
    return stages


def split_by_prompt(rows: list[dict[str, Any]], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held out): every pair of a prompt on the same side. Each π_SFT sample is in 3 of its prompt's 6 pairs,
    so a split by pair would hold out pairs whose completions the model was trained on."""
    train: list[dict] = []
    heldout: list[dict] = []
    for r in rows:
        (heldout if stable_bucket(r["prompt"]) < fraction * 10_000 else train).append(r)
    return train, heldout


def build_reward_model(demo: Demo) -> None:
    """`dpokit rm` on the demo's pairs from π_SFT, some prompts' pairs held out: the reward PPO optimises (in
    `reward_model/final`)."""
    from dpokit.config import from_dict
    from dpokit.rm import RM_SETTINGS, train_reward_model

    data, out = demo.out / "data", demo.out / "reward_model"
    outputs = [out, data / "rm_train.jsonl", data / "rm_heldout.jsonl"]

    def build() -> None:
        train, heldout = split_by_prompt(list(read_jsonl(data / "pairs.jsonl")), demo.design.rm_heldout)
        write_jsonl(outputs[1], train)
        write_jsonl(outputs[2], heldout)
        raw: dict[str, Any] = rm_recipe(demo.sizes, demo.design)
        raw["model"] = {"path": str(demo.out / "sft" / "final")}
        raw["data"] |= {"train_path": str(outputs[1]), "eval_path": str(outputs[2])}
        raw["train"]["output_dir"] = str(out)
        for section, values in RM_SETTINGS.items():
            raw[section] = raw.get(section, {}) | values
        train_reward_model(from_dict(raw), overwrite=True)

    run_stage(demo.out, "reward_model", "reward model", demo.settings["reward_model"], outputs, build)


def reward_model_facts(out: Path) -> dict[str, Any]:
    """The reward model's held-out pairwise accuracy and pair counts, from its run summary."""
    summary = json.loads((out / "reward_model" / "summary.json").read_text())
    return {
        "heldout_accuracy": summary["eval"]["eval/rewards/accuracies"],
        "train_pairs": summary["data"]["train"]["kept"],
        "heldout_pairs": summary["data"]["eval"]["kept"],
    }


def ppo_reward(demo: Demo, judge: Judge, method: str, prompts: list[list[int]]) -> RewardFn:
    """PPO-GT's reward (the classifier on the decoded text) or PPO's (the reward model on token ids), normalised on
    π_SFT's samples for the first prompts."""
    if method == "PPO-GT":
        reward = text_reward(judge.tokenizer, judge.reward)
    else:
        reward = reward_model_reward(demo.out / "reward_model" / "final")
    d, base = demo.design, prompts[: demo.design.ppo_normalize_samples]
    eos = judge.tokenizer.eos_token_id
    samples = [g[0] for g in sample(judge.sft_model, base, 1, demo.sizes.new_tokens, eos, d.ppo_normalize_seed)]
    return normalized(reward, base, samples)


def run_ppo(demo: Demo, judge: Judge, method: str, target: float, seed: int) -> list[dict[str, Any]]:
    """One PPO run from π_SFT, then each snapshot evaluated as the other methods' checkpoints are; the points are
    kept in points.json (the snapshots are deleted: the points are what the demo keeps)."""
    from dpokit.experiments.sentiment_setup import prefix_prompts

    name = ppo_run_name(method, target, seed)
    run = demo.out / "runs" / name

    def build() -> None:
        s, d = demo.sizes, demo.design
        prompts = prefix_prompts(
            judge.tokenizer, demo.heldout_reviews[: s.train_prompts], d.pair_prompt_seed, d.prefix_tokens
        )
        config = ppo_config(s, d, target, seed)
        ppo_train(demo.out / "sft" / "final", prompts, ppo_reward(demo, judge, method, prompts), config, run)
        points = []
        for update in [*config.save_at, config.updates]:
            folder = run / "final" if update == config.updates else run / "snapshots" / f"update-{update}"
            metrics = judge.evaluate(load_model(str(folder)).eval(), seed)
            points.append({"method": method, "setting": f"target_kl={target}", "step": update, "seed": seed, **metrics})
        shutil.rmtree(run / "snapshots", ignore_errors=True)
        (run / "points.json").write_text(json.dumps(points))

    run_stage(demo.out, name, f"{method} target KL {target} seed {seed}", demo.settings[name], [run], build)
    return list(json.loads((run / "points.json").read_text()))
