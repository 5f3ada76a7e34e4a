"""The paper's controlled-sentiment experiment (Sec. 6.1) in miniature: `dpokit demo`.

x is a 2–8 token prefix of an IMDb review; the policy should continue it positively. Stages, each cached in the
output folder so that an interrupted demo resumes where it stopped:

1. tokenizer   BPE trained on the training reviews (0–3999)
2. sft         π_SFT: a small Llama trained by dpokit on the training reviews (held-out perplexity reported)
3. reward      the ground truth: p(positive) of a TF-IDF + logistic-regression classifier on the training reviews
4. samples     4 samples from π_SFT for each training prompt (prefixes of reviews 4000–4799)
5. pairs       all 6 pairs of each prompt's samples, ordered by the reward; ties dropped and counted
6. methods     DPO over several β, Preferred-FT, Unlikelihood (all trained by dpokit, evaluated at several
               checkpoints), Best-of-N and SFT; PPO has its place in `Demo.methods` and comes in its own issue
7. evaluation  on held-out prompts (prefixes of reviews 4800–4999): mean reward and KL(π ‖ π_SFT) of each policy's
               own samples; frontier.png, results.json, results.csv, report.md
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpokit.config import from_dict
from dpokit.eval.frontier import best_of_n, dominance, evaluate_policy, plot_frontier
from dpokit.experiments.demo_data import DemoData, find_demo_data
from dpokit.experiments.reward import SentimentReward
from dpokit.generate import sample
from dpokit.model import init_model, load_model, load_tokenizer, train_tokenizer


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
    train_prompts: int = 256
    eval_prompts: int = 100
    eval_samples: int = 2
    new_tokens: int = 32
    betas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0, 5.0)
    unlikelihood_alphas: tuple[float, ...] = (0.1, 1.0)
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    pref_epochs: int = 1
    pref_lr: float = 6e-4
    pref_batch: int = 32
    checkpoints: int = 5


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
    checkpoints=4,
)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.rename(path)
    return path


def _stage(path: Path, name: str, build: Callable[[], Any]) -> Any:
    """Run `build` unless its output already exists (what makes an interrupted demo resume)."""
    if path.exists():
        print(f"[demo] {name}: cached ({path})")
        return None
    started = time.perf_counter()
    print(f"[demo] {name} ...")
    result = build()
    print(f"[demo] {name}: done in {time.perf_counter() - started:.0f}s")
    return result


def _train(raw: dict[str, Any]) -> dict[str, Any]:
    from dpokit.train import train

    return train(from_dict(raw), overwrite=True)  # a stage that did not finish starts again


class Demo:
    def __init__(self, out: Path, sizes: Sizes, seeds: tuple[int, ...], data: DemoData) -> None:
        self.out, self.sizes, self.seeds, self.vader = out, sizes, seeds, data.vader
        out.mkdir(parents=True, exist_ok=True)
        print(f"[demo] IMDb reviews from {data.source}")
        self.reviews = data.reviews
        self.train_reviews, self.heldout_reviews = self.reviews[:4000], self.reviews[4000:]

    # --- stages -------------------------------------------------------------------------------------------------
    def build_tokenizer(self) -> None:
        path = self.out / "tokenizer"
        _stage(
            path,
            "tokenizer",
            lambda: train_tokenizer((r["text"] for r in self.train_reviews), self.sizes.vocab_size).save_pretrained(
                path
            ),
        )

    def build_sft(self) -> None:
        s = self.sizes
        final = self.out / "sft" / "final"

        def build() -> None:
            texts = [r["text"] for r in self.train_reviews]
            tokenizer = load_tokenizer(str(self.out / "tokenizer"))
            init_model(
                texts, self.out / "init", s.vocab_size, s.hidden_size, s.layers, s.heads, seed=0, tokenizer=tokenizer
            )
            data = self.out / "data"
            data.mkdir(exist_ok=True)
            _write_jsonl(data / "lm_train.jsonl", [{"text": t} for t in texts])
            _write_jsonl(data / "lm_eval.jsonl", [{"text": r["text"]} for r in self.heldout_reviews[:500]])
            _train(
                {
                    "model": {"path": str(self.out / "init")},
                    "data": {
                        "train_path": str(data / "lm_train.jsonl"),
                        "eval_path": str(data / "lm_eval.jsonl"),
                        "max_length": s.review_tokens,
                        "max_prompt_length": 8,
                    },
                    "reference": {"mode": "none"},
                    "loss": {"name": "sft"},
                    "train": {
                        "output_dir": str(self.out / "sft"),
                        "batch_size": 32,
                        "micro_batch_size": 32,
                        "epochs": s.sft_epochs,
                        "lr": s.sft_lr,
                        "warmup_steps": 20,
                        "schedule": "cosine",
                        "seed": 0,
                    },
                }
            )

        _stage(final, "pi_SFT", build)

    def build_reward(self) -> None:
        path = self.out / "reward.pkl"

        def build() -> None:
            reward = SentimentReward.fit(
                [r["text"] for r in self.train_reviews], [r["label"] for r in self.train_reviews]
            )
            reward.save(path)

        _stage(path, "reward", build)

    def prompts(self, reviews: list[dict[str, Any]], seed: int) -> list[list[int]]:
        """[BOS] + the first 2–8 tokens of each review."""
        rng = random.Random(seed)
        bos = self.tokenizer.bos_token_id
        out = []
        for review in reviews:
            ids = self.tokenizer(review["text"], add_special_tokens=False)["input_ids"]
            out.append([bos, *ids[: rng.randint(2, 8)]])
        return out

    def build_pairs(self) -> None:
        path = self.out / "data" / "pairs.jsonl"

        def build() -> None:
            s = self.sizes
            prompts = self.prompts(self.heldout_reviews[: s.train_prompts], seed=1)
            samples = sample(self.sft_model, prompts, 4, s.new_tokens, self.tokenizer.eos_token_id, seed=2)
            texts = [[self.decode(p, c) for c in group] for p, group in zip(prompts, samples, strict=True)]
            rewards = [self.reward(group) for group in texts]
            rows, ties = [], 0
            for prompt, group, r in zip(prompts, samples, rewards, strict=True):
                prompt_text = self.tokenizer.decode(prompt, skip_special_tokens=True)
                for i in range(4):
                    for j in range(i + 1, 4):
                        if r[i] == r[j] or group[i] == group[j]:
                            ties += 1
                            continue
                        win, lose = (i, j) if r[i] > r[j] else (j, i)
                        rows.append(
                            {
                                "prompt": prompt_text,
                                "chosen": self.tokenizer.decode(group[win], skip_special_tokens=True),
                                "rejected": self.tokenizer.decode(group[lose], skip_special_tokens=True),
                                "reward_chosen": float(r[win]),
                                "reward_rejected": float(r[lose]),
                            }
                        )
            (self.out / "data" / "pairs_counts.json").write_text(
                json.dumps(
                    {"prompts": len(prompts), "samples": 4 * len(prompts), "pairs": len(rows), "ties_dropped": ties}
                )
            )
            _write_jsonl(path, rows)

        _stage(path, "samples and pairs", build)

    # --- helpers ------------------------------------------------------------------------------------------------
    def load_shared(self) -> None:
        self.tokenizer = load_tokenizer(str(self.out / "sft" / "final"))
        self.sft_model = load_model(str(self.out / "sft" / "final")).eval()
        self.reward = SentimentReward.load(self.out / "reward.pkl")
        self.eval_prompts = self.prompts(self.heldout_reviews[800 : 800 + self.sizes.eval_prompts], seed=3)

    def decode(self, prompt: list[int], completion: tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(prompt) + list(completion), skip_special_tokens=True)

    def evaluate(self, model: Any, seed: int) -> dict[str, float]:
        s = self.sizes
        return evaluate_policy(
            model,
            self.sft_model,
            self.tokenizer,
            self.eval_prompts,
            self.reward,
            s.eval_samples,
            s.new_tokens,
            seed=1000 + seed,
        )

    # --- methods ------------------------------------------------------------------------------------------------
    def run_method(self, method: str, setting: str, seed: int, loss: dict[str, Any], use_sft: bool) -> list[dict]:
        """Train from π_SFT on the pairs, then evaluate every checkpoint; cached as points.json."""
        s = self.sizes
        run = self.out / "runs" / f"{method}-{setting}-seed{seed}".replace(" ", "")
        points_file = run / "points.json"
        if points_file.exists():
            return list(json.loads(points_file.read_text()))
        pairs = self.out / "data" / "pairs.jsonl"
        n_pairs = sum(1 for _ in pairs.open())
        total = s.pref_epochs * (n_pairs // s.pref_batch)
        # Frontier points at geometrically spaced steps (total, total/2, total/4, ...): early ones fill the low-KL end.
        every = max(1, total // 2 ** (s.checkpoints - 1))
        eval_steps = {total} | {every * max(1, total // 2**i // every) for i in range(1, s.checkpoints)}
        raw = {
            "model": {"path": str(self.out / "sft" / "final")},
            "data": {"train_path": str(pairs), "max_length": 16 + s.new_tokens + 4, "max_prompt_length": 16},
            "reference": {"mode": "none" if use_sft else "copy"},
            "loss": loss,
            "train": {
                "output_dir": str(run),
                "batch_size": s.pref_batch,
                "micro_batch_size": s.pref_batch,
                "epochs": s.pref_epochs,
                "lr": s.pref_lr,
                "warmup_steps": 5,
                "save_every": every,
                "seed": seed,
            },
        }
        _train(raw)
        points = []
        for step in sorted(eval_steps):
            folder = run / "final" if step == total else run / "checkpoints" / f"step-{step}"
            metrics = self.evaluate(load_model(str(folder)).eval(), seed)
            points.append({"method": method, "setting": setting, "step": step, "seed": seed, **metrics})
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the points are what the demo keeps
        points_file.write_text(json.dumps(points))
        return points

    def methods(self, seed: int) -> list[dict]:
        s = self.sizes
        results = []
        for beta in s.betas:
            results += self.run_method("DPO", f"beta={beta}", seed, {"name": "sigmoid", "beta": beta}, use_sft=False)
        results += self.run_method("Preferred-FT", "chosen", seed, {"name": "sft"}, use_sft=True)
        for alpha in s.unlikelihood_alphas:
            results += self.run_method(
                "Unlikelihood",
                f"alpha={alpha}",
                seed,
                {"name": "unlikelihood", "unlikelihood_alpha": alpha},
                use_sft=False,
            )
        # PPO (and PPO-GT) take their place here once the PPO issue lands.
        return results

    def reference_points(self, seed: int) -> list[dict]:
        """SFT itself (KL 0) and Best-of-N over reference samples."""
        cache = self.out / "runs" / f"reference-seed{seed}.json"
        if cache.exists():
            return list(json.loads(cache.read_text()))
        s = self.sizes
        sft = self.evaluate(self.sft_model, seed)
        points = [{"method": "SFT", "setting": "pi_SFT", "step": 0, "seed": seed, **sft}]
        samples = sample(
            self.sft_model,
            self.eval_prompts,
            max(s.best_of),
            s.new_tokens,
            self.tokenizer.eos_token_id,
            seed=2000 + seed,
        )
        rewards = torch.tensor(
            np.stack(
                [
                    self.reward([self.decode(p, c) for c in group])
                    for p, group in zip(self.eval_prompts, samples, strict=True)
                ]
            )
        )
        points += [
            {"method": "Best-of-N", "step": 0, "seed": seed, "samples": len(self.eval_prompts), **p}
            for p in best_of_n(rewards, s.best_of)
        ]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(points))
        return points

    # --- the whole demo -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.build_tokenizer()
        self.build_sft()
        self.build_reward()
        self.load_shared()
        self.build_pairs()
        results: list[dict] = []
        for seed in tqdm(self.seeds, desc="seeds"):
            results += self.reference_points(seed)
            results += self.methods(seed)
        facts = self.facts()
        self.write_outputs(results, facts, time.perf_counter() - started)
        return {"results": results, "facts": facts}

    def facts(self) -> dict[str, Any]:
        """Sizes and qualities of the pieces: π_SFT's size and perplexity, the reward's accuracy and agreement
        with people."""
        cache = self.out / "facts.json"
        if cache.exists():
            return dict(json.loads(cache.read_text()))
        summary = json.loads((self.out / "sft" / "summary.json").read_text())
        heldout = self.heldout_reviews
        pearson = None
        if self.vader is not None:
            vader = [line.rstrip("\r\n").split("\t") for line in self.vader.open(encoding="utf-8") if line.strip()]
            ratings = np.array([float(r[1]) for r in vader])
            pearson = float(np.corrcoef(self.reward([r[2] for r in vader]), ratings)[0, 1])
        facts = {
            "sft_parameters": sum(p.numel() for p in self.sft_model.parameters()),
            "sft_heldout_perplexity": math.exp(summary["eval"]["eval/loss"]),
            "reward_heldout_accuracy": self.reward.accuracy(
                [r["text"] for r in heldout], [r["label"] for r in heldout]
            ),
            "reward_vader_pearson": pearson,
            "pairs": json.loads((self.out / "data" / "pairs_counts.json").read_text()),
            "sizes": asdict(self.sizes),
        }
        cache.write_text(json.dumps(facts, indent=2))
        return facts

    def write_outputs(self, results: list[dict], facts: dict[str, Any], seconds: float) -> None:
        (self.out / "results.json").write_text(json.dumps(results, indent=2))
        fields = ["method", "setting", "step", "seed", "reward", "reward_se", "kl", "samples"]
        with (self.out / "results.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)
        plot_frontier(
            results,
            self.out / "frontier.png",
            f"IMDb controlled sentiment: reward vs KL ({len(self.seeds)} seed{'s' * (len(self.seeds) > 1)})",
        )
        (self.out / "report.md").write_text(report(results, facts, seconds), encoding="utf-8")


def report(results: list[dict], facts: dict[str, Any], seconds: float) -> str:
    verdicts = dominance(results)
    checked = [v for v in verdicts if v["dominated"] is not None]
    beaten = [v for v in checked if not v["dominated"]]
    lines = [
        "# Controlled sentiment (IMDb): reward/KL frontier",
        "",
        "![frontier](frontier.png)",
        "",
        f"π_SFT: {facts['sft_parameters']:,} parameters, held-out perplexity {facts['sft_heldout_perplexity']:.1f}. "
        f"Reward: TF-IDF + logistic regression, held-out accuracy {facts['reward_heldout_accuracy']:.3f}, "
        + (
            f"Pearson r = {facts['reward_vader_pearson']:.2f} against the human ratings of the VADER movie snippets. "
            if facts["reward_vader_pearson"] is not None
            else "agreement with human ratings not measured (no VADER snippets file; pass --vader). "
        )
        + f"Pairs: {facts['pairs']['pairs']} from {facts['pairs']['prompts']} prompts "
        f"({facts['pairs']['ties_dropped']} ties dropped). Runtime {seconds:.0f}s.",
        "",
        "| method | setting | seed | step | reward | KL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['seed']} | {r['step']} | {r['reward']:.3f} | {r['kl']:.2f} |"
        )
    lines += ["", "## What it shows", ""]
    for seed in sorted({r["seed"] for r in results}):
        sft = next(r["reward"] for r in results if r["method"] == "SFT" and r["seed"] == seed)
        dpo01 = [
            r["reward"] for r in results if r["method"] == "DPO" and r["setting"] == "beta=0.1" and r["seed"] == seed
        ]
        best = {
            m: max((r["reward"] for r in results if r["method"] == m and r["seed"] == seed), default=float("nan"))
            for m in ("DPO", "Preferred-FT", "Unlikelihood", "Best-of-N")
        }
        dpo_text = f"DPO β=0.1 final {dpo01[-1]:.3f} ({dpo01[-1] - sft:+.3f})" if dpo01 else "no DPO β=0.1 run"
        lines.append(
            f"- seed {seed}: π_SFT reward {sft:.3f}; {dpo_text}; best reward per method: "
            + ", ".join(f"{m} {v:.3f}" for m, v in best.items())
        )
    noisy = [v for v in beaten if v["within_noise"]]
    lines.append(
        f"- Frontier check: at the KL of each of the {len(verdicts)} Preferred-FT, Unlikelihood and SFT points, DPO's "
        f"best reward at that KL or less is at least the baseline's for {len(checked) - len(beaten)} of "
        f"{len(checked)} points ({len(verdicts) - len(checked)} lie below every DPO point's KL: not comparable); "
        f"{len(noisy)} of the other {len(beaten)} are within two standard errors of the baseline's mean reward."
    )
    for v in beaten:
        lines.append(
            f"  - not dominated: {v['method']} {v['setting']} seed {v['seed']} step {v['step']}: reward "
            f"{v['reward']:.3f} at KL {v['kl']:.2f}, DPO best {v['dpo_best']:.3f} (gap "
            f"{v['reward'] - v['dpo_best']:.3f}{', within noise' if v['within_noise'] else ''})"
        )
    return "\n".join(lines) + "\n"


def run_demo(out: Path, quick: bool, seeds: tuple[int, ...], imdb: str | None = None, vader: str | None = None) -> dict:
    """The demo, with its data found as `find_demo_data` says (before anything is written)."""
    data = find_demo_data(imdb, vader)
    return Demo(out, QUICK if quick else Sizes(), seeds, data).run()
