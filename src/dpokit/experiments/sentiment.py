"""The paper's controlled-sentiment experiment (Sec. 6.1) in miniature: `dpokit demo`.

x is a 2–8 token prefix of an IMDb review; the policy should continue it positively. Stages, each cached in the
output folder under a digest of the settings that built it (an interrupted demo resumes where it stopped; a changed
size or seed rebuilds the stages that read it and those after them):

1. tokenizer   BPE trained on the training reviews (0–3999)
2. sft         π_SFT: a small Llama trained by dpokit on the training reviews (held-out perplexity reported)
3. reward      the ground truth: p(positive) of a TF-IDF + logistic-regression classifier on the training reviews
4. samples     4 samples from π_SFT for each pair prompt (prefixes of reviews 4000–4799)
5. pairs       all 6 pairs of each prompt's samples, ordered by the reward; ties dropped and counted
6. methods     DPO over several β, Preferred-FT, Unlikelihood (all trained by dpokit, evaluated at several
               checkpoints; π_SFT's log-probs of the pairs are computed once for all of them by
               `precompute_reference`), Best-of-N and SFT
7. PPO         a Bradley-Terry reward model trained on the pairs (`dpokit rm`), then PPO against it and PPO-GT
               against the ground truth at several target KLs, evaluated at snapshots (sentiment_ppo.py)
8. evaluation  on held-out prompts (prefixes of reviews 4800–4999): mean reward and KL(π ‖ π_SFT) of each policy's
               own samples; frontier.png, results.json, results.csv, report.md

Stages 1–5 run one after another on every core; stages 6 and 7 are independent runs, spread over worker processes
of one thread each (workers.py).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpokit.config import from_dict
from dpokit.eval.frontier import best_of_n
from dpokit.eval.samples import write_jsonl
from dpokit.experiments.demo_data import DemoData, find_demo_data
from dpokit.experiments.reward import SentimentReward
from dpokit.experiments.sentiment_ppo import (
    build_reward_model,
    ppo_runs,
    ppo_stage_settings,
    run_ppo,
)
from dpokit.experiments.sentiment_report import measure_facts, write_outputs
from dpokit.experiments.sentiment_setup import (
    QUICK,
    Design,
    Judge,
    Method,
    Sizes,
    method_recipe,
    prefix_prompts,
    reference_recipe,
    sft_recipe,
)
from dpokit.experiments.stages import digest, file_digest, run_stage
from dpokit.experiments.workers import Job, Workers, default_workers, one_thread
from dpokit.generate import sample
from dpokit.model import init_model, load_model, load_tokenizer, train_tokenizer


def _train(raw: dict[str, Any]) -> dict[str, Any]:
    from dpokit.train import train

    return train(from_dict(raw), overwrite=True)  # a stage that did not finish starts again


class Demo:
    def __init__(
        self, out: Path, sizes: Sizes, seeds: tuple[int, ...], data: DemoData, design: Design | None = None
    ) -> None:
        design = design or Design()
        if sizes.train_prompts > design.eval_offset:
            raise ValueError(
                f"{sizes.train_prompts} pair prompts would run into the held-out prompts (from {design.eval_offset})"
            )
        self.out, self.sizes, self.seeds, self.data, self.design = out, sizes, seeds, data, design
        print(f"[demo] IMDb reviews from {data.source}")
        reviews = data.reviews
        self.train_reviews, self.heldout_reviews = reviews[: design.train_reviews], reviews[design.train_reviews :]
        self.reviews_digest = digest(reviews)  # the reviews themselves, wherever they came from (file or Hub)
        self.settings = self.stage_settings()

    # --- what each stage is built from ---------------------------------------------------------------------------
    def stage_settings(self) -> dict[str, dict[str, Any]]:
        """The settings of each stage, by the name of its record in `stages/`. A stage's cache key is their digest;
        a stage that reads another holds that one's key, so a change rebuilds everything after it."""
        s, d = self.sizes, self.design
        reviews = {"imdb": self.reviews_digest, "train_reviews": d.train_reviews}
        stages = {"tokenizer": reviews | {"vocab": s.vocab_size}, "reward": reviews | {"seed": d.build_seed}}
        stages["sft"] = {
            "tokenizer": digest(stages["tokenizer"]),
            "model": [s.hidden_size, s.layers, s.heads, d.build_seed],
            "recipe": sft_recipe(s, d),
            "perplexity_reviews": d.perplexity_reviews,
        }
        after_sft = {"sft": digest(stages["sft"]), "reward": digest(stages["reward"])}
        stages["pairs"] = after_sft | {
            "prompts": [s.train_prompts, d.prefix_tokens, d.pair_prompt_seed],
            "samples": [d.samples_per_prompt, s.new_tokens, d.pair_sample_seed],
        }
        judge = after_sft | {
            "prompts": [d.eval_offset, s.eval_prompts, d.prefix_tokens, d.eval_prompt_seed],
            "samples": [s.eval_samples, s.new_tokens, d.eval_sample_seed],
        }
        stages["reference_logps"] = {"pairs": digest(stages["pairs"]), "recipe": reference_recipe(s)}
        stages |= ppo_stage_settings(s, d, digest(stages["pairs"]), digest(judge), self.seeds)
        vader = self.data.vader and file_digest(self.data.vader)
        # facts.json records the sizes, so every size is in its key
        stages["facts"] = reviews | {
            "vader": vader,
            "sizes": asdict(s),
            "pairs": digest(stages["pairs"]),
            "reward_model": digest(stages["reward_model"]),
        }
        for seed in self.seeds:
            stages[f"reference-seed{seed}"] = {
                "judge": digest(judge),
                "best_of": s.best_of,
                "seeds": [seed, d.best_of_seed],
            }
            for m in self.methods():
                stages[self.run_name(m, seed)] = {
                    "pairs": digest(stages["pairs"]),
                    "reference_logps": digest(stages["reference_logps"]) if m.reference != "none" else None,
                    "judge": digest(judge),
                    "recipe": method_recipe(s, m, seed),
                    "checkpoints": s.checkpoints,
                }
        return stages

    def methods(self) -> list[Method]:
        """The trained policies, in the order of the results; PPO (and PPO-GT) take their place here."""
        s = self.sizes
        return [
            *(Method("DPO", f"beta={beta}", {"name": "sigmoid", "beta": beta}) for beta in s.betas),
            Method("Preferred-FT", "chosen", {"name": "sft"}, reference="none"),
            *(
                Method("Unlikelihood", f"alpha={alpha}", {"name": "unlikelihood", "unlikelihood_alpha": alpha})
                for alpha in s.unlikelihood_alphas
            ),
        ]

    # --- stages -------------------------------------------------------------------------------------------------
    def build_tokenizer(self) -> None:
        path = self.out / "tokenizer"

        def build() -> None:
            texts = (r["text"] for r in self.train_reviews)
            train_tokenizer(texts, self.sizes.vocab_size).save_pretrained(path)

        run_stage(self.out, "tokenizer", "tokenizer", self.settings["tokenizer"], [path], build)

    def build_sft(self) -> None:
        s, data = self.sizes, self.out / "data"
        outputs = [self.out / "sft", self.out / "init", data / "lm_train.jsonl", data / "lm_eval.jsonl"]

        def build() -> None:
            texts = [r["text"] for r in self.train_reviews]
            tokenizer = load_tokenizer(str(self.out / "tokenizer"))
            init = self.out / "init"
            seed = self.design.build_seed
            init_model(texts, init, s.vocab_size, s.hidden_size, s.layers, s.heads, seed=seed, tokenizer=tokenizer)
            data.mkdir(exist_ok=True)
            write_jsonl(outputs[2], [{"text": t} for t in texts])
            heldout = self.heldout_reviews[: self.design.perplexity_reviews]
            write_jsonl(outputs[3], [{"text": r["text"]} for r in heldout])
            raw = sft_recipe(self.sizes, self.design)
            raw["model"] = {"path": str(init)}
            raw["data"] |= {"train_path": str(outputs[2]), "eval_path": str(outputs[3])}
            raw["train"]["output_dir"] = str(self.out / "sft")
            _train(raw)

        run_stage(self.out, "sft", "pi_SFT", self.settings["sft"], outputs, build)

    def build_reward(self) -> None:
        path = self.out / "reward.pkl"

        def build() -> None:
            texts, labels = [r["text"] for r in self.train_reviews], [r["label"] for r in self.train_reviews]
            SentimentReward.fit(texts, labels, seed=self.design.build_seed).save(path)

        run_stage(self.out, "reward", "reward", self.settings["reward"], [path], build)

    def load_judge(self) -> Judge:
        """Once π_SFT and the reward exist."""
        s, d, final = self.sizes, self.design, str(self.out / "sft" / "final")
        tokenizer = load_tokenizer(final)
        eval_reviews = self.heldout_reviews[d.eval_offset : d.eval_offset + s.eval_prompts]
        return Judge(
            tokenizer,
            load_model(final).eval(),
            SentimentReward.load(self.out / "reward.pkl"),
            prefix_prompts(tokenizer, eval_reviews, d.eval_prompt_seed, d.prefix_tokens),
            s.eval_samples,
            s.new_tokens,
            d.eval_sample_seed,
        )

    def build_pairs(self, judge: Judge) -> None:
        data = self.out / "data"
        outputs = [data / "pairs.jsonl", data / "pairs_counts.json"]

        def build() -> None:
            s, d, tokenizer = self.sizes, self.design, judge.tokenizer
            n = d.samples_per_prompt
            prompts = prefix_prompts(
                tokenizer, self.heldout_reviews[: s.train_prompts], d.pair_prompt_seed, d.prefix_tokens
            )
            samples = sample(judge.sft_model, prompts, n, s.new_tokens, tokenizer.eos_token_id, d.pair_sample_seed)
            rows, ties = [], 0
            for prompt, group in zip(prompts, samples, strict=True):
                r = judge.reward([judge.decode(prompt, c) for c in group])
                prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
                for i in range(n):
                    for j in range(i + 1, n):
                        if r[i] == r[j] or group[i] == group[j]:
                            ties += 1
                            continue
                        win, lose = (i, j) if r[i] > r[j] else (j, i)
                        chosen, rejected = (tokenizer.decode(group[k], skip_special_tokens=True) for k in (win, lose))
                        rows.append(
                            {"prompt": prompt_text, "chosen": chosen, "rejected": rejected}
                            | {"reward_chosen": float(r[win]), "reward_rejected": float(r[lose])}
                        )
            counts = {"prompts": len(prompts), "samples": n * len(prompts), "pairs": len(rows), "ties_dropped": ties}
            outputs[1].write_text(json.dumps(counts))
            write_jsonl(outputs[0], rows)

        run_stage(self.out, "pairs", "samples and pairs", self.settings["pairs"], outputs, build)

    @property
    def reference_logps_path(self) -> Path:
        return self.out / "data" / "reference_logps.safetensors"

    def build_reference_logps(self) -> None:
        """π_SFT's log-probs of every pair, computed once: the DPO and Unlikelihood runs read them instead of each
        running π_SFT beside its policy at every step (the same values: a run's loss is unchanged to the last digit;
        each run 25% shorter)."""
        from dpokit.precompute import precompute_reference

        path = self.reference_logps_path

        def build() -> None:
            raw = reference_recipe(self.sizes)
            raw["model"] = {"path": str(self.out / "sft" / "final")}
            raw["data"]["train_path"] = str(self.out / "data" / "pairs.jsonl")
            raw["reference"]["cache"] = str(path)
            precompute_reference(from_dict(raw))

        run_stage(self.out, "reference_logps", "reference log-probs", self.settings["reference_logps"], [path], build)

    def run_name(self, method: Method, seed: int) -> str:
        return f"{method.name}-{method.setting}-seed{seed}".replace(" ", "")

    def run_method(self, judge: Judge, method: Method, seed: int) -> list[dict]:
        """Train from π_SFT on the pairs, then evaluate every checkpoint; the points are kept in points.json."""
        s, name = self.sizes, self.run_name(method, seed)
        run = self.out / "runs" / name

        def build() -> None:
            pairs = self.out / "data" / "pairs.jsonl"
            total = s.pref_epochs * (sum(1 for _ in pairs.open()) // s.pref_batch)
            # Frontier points at geometrically spaced steps (total, total/2, total/4, ...): early ones fill the
            # low-KL end.
            every = max(1, total // 2 ** (s.checkpoints - 1))
            eval_steps = {total} | {every * max(1, total // 2**i // every) for i in range(1, s.checkpoints)}
            raw = method_recipe(self.sizes, method, seed)
            raw["model"] = {"path": str(self.out / "sft" / "final")}
            raw["data"]["train_path"] = str(pairs)
            if method.reference != "none":
                raw["reference"]["cache"] = str(self.reference_logps_path)
            raw["train"] |= {"output_dir": str(run), "save_every": every}
            _train(raw)
            points = []
            for step in sorted(eval_steps):
                folder = run / "final" if step == total else run / "checkpoints" / f"step-{step}"
                metrics = judge.evaluate(load_model(str(folder)).eval(), seed)
                points.append({"method": method.name, "setting": method.setting, "step": step, "seed": seed, **metrics})
            shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the points are what the demo keeps
            (run / "points.json").write_text(json.dumps(points))

        label = f"{method.name} {method.setting} seed {seed}"
        run_stage(self.out, name, label, self.settings[name], [run], build)
        return list(json.loads((run / "points.json").read_text()))

    def reference_points(self, judge: Judge, seed: int) -> list[dict]:
        """SFT itself (KL 0) and Best-of-N over reference samples."""
        name = f"reference-seed{seed}"
        path = self.out / "runs" / f"{name}.json"

        def build() -> None:
            s, sft = self.sizes, judge.sft_model
            points = [{"method": "SFT", "setting": "pi_SFT", "step": 0, "seed": seed, **judge.evaluate(sft, seed)}]
            eos = judge.tokenizer.eos_token_id
            samples = sample(sft, judge.prompts, max(s.best_of), s.new_tokens, eos, self.design.best_of_seed + seed)
            groups = zip(judge.prompts, samples, strict=True)
            rewards = torch.tensor(np.stack([judge.reward([judge.decode(p, c) for c in group]) for p, group in groups]))
            points += [
                {"method": "Best-of-N", "step": 0, "seed": seed, "samples": len(judge.prompts), **p}
                for p in best_of_n(rewards, s.best_of)
            ]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(points))

        run_stage(self.out, name, f"SFT and Best-of-N seed {seed}", self.settings[name], [path], build)
        return list(json.loads(path.read_text()))

    # --- the whole demo -----------------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        """The independent stages after the pairs, longest first within their kind, in an order that one worker
        can run them in (π_SFT's log-probs before the preference methods, the reward model before PPO)."""
        seeds = self.seeds
        methods = [
            Job("method", seed, index=i, after="reference_logps") for i in range(len(self.methods())) for seed in seeds
        ]
        ppo = [
            Job("ppo", seed, method=m, target=t, after="reward_model")
            for m, t in ppo_runs(self.sizes)
            for seed in seeds
        ]
        first = [Job("reward_model"), Job("reference_logps")]
        return [*first, *methods, *ppo, *(Job("reference", seed) for seed in seeds)]

    def run_job(self, judge: Judge | None, job: Job) -> list[dict]:
        """A stage handed to a worker (`judge` is None only for the reward classifier, which comes before it)."""
        if job.kind == "reward":
            self.build_reward()
            return []
        assert judge is not None
        if job.kind == "reference":
            return self.reference_points(judge, job.seed)
        if job.kind == "method":
            return self.run_method(judge, self.methods()[job.index], job.seed)
        if job.kind == "ppo":
            return run_ppo(self, judge, job.method, job.target, job.seed)
        if job.kind == "reference_logps":
            self.build_reference_logps()
        else:
            build_reward_model(self)
        return []

    def run(self, workers: int = 1) -> dict[str, Any]:
        """Every stage, the independent ones spread over `workers` processes at one PyTorch thread each."""
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        make_demo = functools.partial(Demo, self.out, self.sizes, self.seeds, self.data, self.design)
        with Workers(workers, make_demo, self) as pool:
            self.build_tokenizer()
            reward = pool.submit(Job("reward"))  # the classifier is fitted beside π_SFT's training
            # π_SFT and the pairs on every core this process has (nothing else is left to run beside them): the
            # same weights to the bit as on one thread, here, in 30% less time.
            self.build_sft()
            reward.result()
            judge = self.load_judge()
            self.build_pairs(judge)
            jobs = self.jobs()
            with one_thread():  # jobs are the same wherever they run: with one worker, they run here
                points = pool.run_all(jobs)
        # Per seed: SFT and Best-of-N, the preference methods, PPO-GT, PPO (the order of the tables).
        kinds = {"reference": 0, "method": 1, "ppo": 2}
        ordered = sorted((j for j in jobs if j.kind in kinds), key=lambda j: (j.seed, kinds[j.kind], j.index))
        results = [p for job in ordered for p in points[job]]
        facts = measure_facts(self, judge)
        write_outputs(self.out, results, facts, len(self.seeds), time.perf_counter() - started)
        return {"results": results, "facts": facts}


def run_demo(
    out: Path,
    quick: bool,
    seeds: tuple[int, ...],
    imdb: str | None = None,
    vader: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The demo, with its data found as `find_demo_data` says (before anything is written); the runs spread over
    `workers` processes (default: one per core)."""
    demo = Demo(out, QUICK if quick else Sizes(), seeds, find_demo_data(imdb, vader))
    return demo.run(workers or default_workers())
