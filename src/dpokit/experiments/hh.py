"""The paper's single-turn dialogue experiment (Sec. 6.2, Fig. 3) on Anthropic HH: `dpokit experiment hh`.

The paper: Pythia-2.8B; no SFT model exists for HH, so π_ref is Preferred-FT (fine-tuned on the chosen responses);
DPO from it; samples for held-out single-turn prompts at temperatures 0.25–1.0, judged by GPT-4 against the data
set's chosen responses. Here (only HH's test splits are on disk, 8,552 pairs, split by a hash of each row):

1. data       15% of rows held out (their single-turn prompts are the evaluation prompts, all their pairs the reward
              model's held-out set), 40% for the reward model, 45% for the policies
2. base       by default a small Llama trained from scratch on the transcripts of the non-held-out rows (with its
              own BPE tokenizer): the pretrained model this machine can afford; `--model` gives a real one instead
3. sft        Preferred-FT: the base fine-tuned on the policy rows' chosen responses (π_ref)
4. dpo        DPO from Preferred-FT on the policy pairs, checkpoints along the way
5. rm         the judge: a Bradley-Terry reward model (`dpokit rm`) on the base, trained on the reward-model rows
6. samples    Preferred-FT and DPO (final and each checkpoint) on the evaluation prompts at every temperature
7. win rates  DPO and Preferred-FT against the chosen responses, DPO against Preferred-FT, under the reward model
              (and any `--judge`); bootstrap 95% intervals; plots, results.json/csv, report.md

Stages are cached in the output folder, keyed by a digest of the settings they depend on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.config import DataConfig, from_dict
from dpokit.data.formats import load_records
from dpokit.data.prepare import stable_bucket
from dpokit.errors import UserError
from dpokit.eval.samples import write_jsonl

TEMPERATURES = (0.25, 0.5, 0.75, 1.0)
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def default_hh_dir() -> Path:
    """`$DPOKIT_DATA_DIR/hh-rlhf`, else `../shared/data/hh-rlhf` from the working directory (the project root)."""
    return Path(os.environ.get("DPOKIT_DATA_DIR", "../shared/data")) / "hh-rlhf"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the default run, `--quick` and a GPU-sized run (`--set field=value`)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    max_length: int = 96
    max_prompt_length: int = 48
    batch: int = 32
    pretrain_epochs: int = 1
    pretrain_lr: float = 2e-3
    sft_epochs: int = 1
    sft_lr: float = 1e-3
    dpo_epochs: int = 1
    dpo_lr: float = 7e-4
    beta: float = 0.1
    rm_epochs: int = 1
    rm_lr: float = 5e-4
    max_pairs: int = 2000
    """At most this many policy, reward-model and held-out pairs each (0: all)."""
    pretrain_texts: int = 3000
    """At most this many transcripts to pretrain the small base model on (0: all)."""
    eval_prompts: int = 200
    samples: int = 2
    """Samples per prompt, model and temperature."""
    new_tokens: int = 48
    temperatures: tuple[float, ...] = TEMPERATURES
    checkpoints: int = 3
    """DPO checkpoints sampled for the win rate over training steps (the final model included)."""
    resamples: int = 2000
    held_out_share: float = 0.15
    rm_share: float = 0.40


QUICK = Sizes(
    vocab_size=512,
    hidden_size=32,
    layers=2,
    heads=2,
    max_length=64,
    max_prompt_length=32,
    batch=16,
    max_pairs=128,
    pretrain_texts=256,
    eval_prompts=12,
    samples=1,
    new_tokens=12,
    checkpoints=2,
    resamples=1000,
)


def with_settings(sizes: Sizes, settings: Sequence[str]) -> Sizes:
    """`field=value` changes, typed by the field's default (`temperatures=0.5,1.0` for the tuple)."""
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(Sizes)}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise UserError(f"--set {item}: expected field=value with a field of: {', '.join(fields)}")
        current = getattr(sizes, key)
        try:
            if isinstance(current, tuple):
                changes[key] = tuple(float(v) for v in value.split(","))
            else:
                changes[key] = type(current)(value)
        except ValueError as e:
            raise UserError(f"--set {item}: {e}") from e
    return dataclasses.replace(sizes, **changes)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _bucket(text: str) -> float:
    return stable_bucket(text) / 10_000


class Experiment:
    def __init__(
        self, out: Path, sizes: Sizes, hh: Path, model: str | None = None, chat: bool = False, seed: int = 0
    ) -> None:
        self.out, self.sizes, self.hh, self.base_model, self.chat, self.seed = out, sizes, hh, model, chat, seed
        self.data = out / "data"
        out.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    # --- caching ------------------------------------------------------------------------------------------------
    def stage(self, name: str, key: str, build: Callable[[Path], Any]) -> Path:
        """`out/name` built by `build(folder)` unless it was built with the same key (what makes a rerun resume)."""
        folder = self.out / name
        stamp = folder / ".dpokit-stage"
        if stamp.exists() and stamp.read_text() == key:
            print(f"[hh] {name}: cached")
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        print(f"[hh] {name} ...")
        build(folder)
        self.timings[name] = time.perf_counter() - started
        print(f"[hh] {name}: done in {self.timings[name]:.0f}s")
        stamp.write_text(key)
        return folder

    # --- 1. data ------------------------------------------------------------------------------------------------
    def build_data(self, folder: Path) -> None:
        s = self.sizes
        split: dict[str, list[dict[str, Any]]] = {"policy": [], "rm": [], "held_out": [], "prompts": []}
        texts: list[dict[str, str]] = []
        counts: dict[str, Any] = {}
        for subset in SUBSETS:
            path = self.hh / subset / "test.jsonl.gz"
            if not path.exists():
                raise UserError(f"{path}: not found; point --hh at the hh-rlhf folder (or set DPOKIT_DATA_DIR)")
            records, report = load_records(path, "implicit", "pairs", "skip")
            counts[subset] = report.to_dict()
            for r in records:
                row = {"prompt": r.prompt, "chosen": r.completions[0], "rejected": r.completions[1]}
                u = _bucket(str(r.prompt) + str(r.completions[0]))
                name = "held_out" if u < s.held_out_share else "rm" if u < s.held_out_share + s.rm_share else "policy"
                split[name].append(row)
                if name == "held_out" and str(r.prompt).count("\n\nHuman:") == 1:
                    split["prompts"].append(row)
                if name != "held_out":
                    texts += [{"text": str(r.prompt) + str(c)} for c in r.completions]
        for name in ("policy", "rm", "held_out"):
            if s.max_pairs:
                split[name] = split[name][: s.max_pairs]
        texts = sorted(texts, key=lambda t: zlib.crc32(t["text"].encode()))[: s.pretrain_texts or None]  # all subsets
        split["prompts"] = split["prompts"][: s.eval_prompts]
        for name, rows in split.items():
            write_jsonl(folder / f"{name}.jsonl", rows)
        write_jsonl(folder / "text.jsonl", texts)
        counts["rows"] = {name: len(rows) for name, rows in split.items()} | {"text": len(texts)}
        (folder / "counts.json").write_text(json.dumps(counts, indent=2))

    # --- 2-5. models --------------------------------------------------------------------------------------------
    def data_config(self, train: str, held_out: str | None = None) -> dict[str, Any]:
        s = self.sizes
        return {
            "train_path": str(self.data / train),
            "eval_path": str(self.data / held_out) if held_out else None,
            "max_length": s.max_length,
            "max_prompt_length": s.max_prompt_length,
            "chat": self.chat,
        }

    def _train(self, folder: Path, model: str, data: dict[str, Any], loss: dict[str, Any], **train: Any) -> None:
        from dpokit.rm import RM_SETTINGS, train_reward_model
        from dpokit.train import train as train_policy

        s = self.sizes
        raw: dict[str, Any] = {
            "model": {"path": model},
            "data": data,
            "reference": {"mode": "none" if loss["name"] == "sft" else "copy"},
            "loss": loss,
            "train": {"output_dir": str(folder), "batch_size": s.batch, "micro_batch_size": s.batch, "seed": self.seed}
            | train,
        }
        if loss["name"] == "bradley_terry":
            raw = {k: v | RM_SETTINGS.get(k, {}) for k, v in raw.items()}
            train_reward_model(from_dict(raw))
        else:
            train_policy(from_dict(raw))

    def build_base(self, folder: Path) -> None:
        from dpokit.model import init_model, train_tokenizer

        s = self.sizes
        rows = [json.loads(line)["text"] for line in (self.data / "text.jsonl").open(encoding="utf-8")]
        tokenizer = train_tokenizer(rows, s.vocab_size)
        init_model([], folder / "init", s.vocab_size, s.hidden_size, s.layers, s.heads, seed=0, tokenizer=tokenizer)
        data = self.data_config("text.jsonl") | {"max_prompt_length": 8, "chat": False}
        lm = {"epochs": s.pretrain_epochs, "lr": s.pretrain_lr, "warmup_steps": 20, "schedule": "cosine"}
        self._train(folder / "lm", str(folder / "init"), data, {"name": "sft"}, **lm)

    def base_path(self) -> str:
        return self.base_model or str(self.out / "base" / "lm" / "final")

    def build_sft(self, folder: Path) -> None:
        s = self.sizes
        sft = {"epochs": s.sft_epochs, "lr": s.sft_lr, "warmup_steps": 10, "schedule": "cosine"}
        self._train(folder, self.base_path(), self.data_config("policy.jsonl"), {"name": "sft"}, **sft)

    def dpo_total_steps(self) -> int:
        pairs = sum(1 for _ in (self.data / "policy.jsonl").open())
        return self.sizes.dpo_epochs * (pairs // self.sizes.batch)

    def build_dpo(self, folder: Path) -> None:
        s = self.sizes
        every = max(1, self.dpo_total_steps() // s.checkpoints)
        dpo = {"epochs": s.dpo_epochs, "lr": s.dpo_lr, "warmup_steps": 10, "save_every": every}
        loss = {"name": "sigmoid", "beta": s.beta}
        self._train(folder, str(self.out / "sft" / "final"), self.data_config("policy.jsonl"), loss, **dpo)

    def build_rm(self, folder: Path) -> None:
        s = self.sizes
        rm = {"epochs": s.rm_epochs, "lr": s.rm_lr, "warmup_steps": 10}
        data = self.data_config("rm.jsonl", "held_out.jsonl")
        self._train(folder, self.base_path(), data, {"name": "bradley_terry"}, **rm)

    def dpo_steps(self) -> dict[int, Path]:
        """Saved DPO models by step: the checkpoints and the final model (step 0 is Preferred-FT)."""
        dpo = self.out / "dpo"
        steps = {int(p.name.split("-")[1]): p for p in (dpo / "checkpoints").glob("step-*") if p.is_dir()}
        return {0: self.out / "sft" / "final"} | steps | {self.dpo_total_steps(): dpo / "final"}

    # --- 6. samples ---------------------------------------------------------------------------------------------
    def build_samples(self, folder: Path) -> None:
        from dpokit.eval.samples import generate_file
        from dpokit.generate import Sampling
        from dpokit.model import load_model, load_tokenizer

        s = self.sizes
        data = DataConfig(**self.data_config("prompts.jsonl"))
        for step, path in sorted(self.dpo_steps().items()):
            model, tokenizer = load_model(str(path)), load_tokenizer(str(path))
            for t in s.temperatures:
                out = folder / f"step{step}-t{t}.jsonl"
                sampling = Sampling(t, 1.0, s.new_tokens)
                generate_file(
                    str(path), data, out, sampling, s.samples, self.seed, 64, model=model, tokenizer=tokenizer
                )

    # --- the whole experiment -----------------------------------------------------------------------------------
    def run(self, judges: Sequence[str] = (), judge_options: dict[str, Any] | None = None) -> dict[str, Any]:
        from dpokit.experiments.hh_report import judge_all, write_outputs

        started = time.perf_counter()
        keys = self.keys()
        self.stage("data", keys["data"], self.build_data)
        if self.base_model is None:
            self.stage("base", keys["base"], self.build_base)
        for name, build in (("sft", self.build_sft), ("dpo", self.build_dpo), ("rm", self.build_rm)):
            self.stage(name, keys[name], build)
        self.stage("samples", keys["samples"], self.build_samples)
        rm_judge = str(self.out / "rm" / "final")
        results = judge_all(self, [f"rm:{rm_judge}", *judges], judge_options or {}, keys["winrates"])
        facts = self.facts()
        write_outputs(self, results, facts, time.perf_counter() - started)
        return {"results": results, "facts": facts}

    def keys(self) -> dict[str, str]:
        """Each stage's cache key: a digest of its upstream stages' keys and of the settings it reads itself, so that
        changing, say, dpo_lr retrains DPO and redoes what follows it, and nothing before."""
        s = dataclasses.asdict(self.sizes)

        def key(*parts: Any, fields: Sequence[str] = ()) -> str:
            return _digest(*parts, *(s[f] for f in fields))

        rendering = ("max_length", "max_prompt_length", "batch")
        data = key(
            "data", str(self.hh), fields=("max_pairs", "eval_prompts", "pretrain_texts", "held_out_share", "rm_share")
        )
        model = ("vocab_size", "hidden_size", "layers", "heads", "pretrain_epochs", "pretrain_lr", *rendering)
        base = key(data, self.base_model, fields=() if self.base_model else model)
        sft = key(base, "sft", self.chat, self.seed, fields=("sft_epochs", "sft_lr", *rendering))
        dpo = key(sft, "dpo", fields=("dpo_epochs", "dpo_lr", "beta", "checkpoints"))
        rm = key(base, "rm", self.chat, self.seed, fields=("rm_epochs", "rm_lr", *rendering))
        samples = key(dpo, "samples", self.seed, fields=("samples", "new_tokens", "temperatures"))
        winrates = key(samples, rm, fields=("resamples",))
        return {"data": data, "base": base, "sft": sft, "dpo": dpo, "rm": rm, "samples": samples, "winrates": winrates}

    def facts(self) -> dict[str, Any]:
        rm = json.loads((self.out / "rm" / "summary.json").read_text())
        sft = json.loads((self.out / "sft" / "summary.json").read_text())
        dpo = json.loads((self.out / "dpo" / "summary.json").read_text())
        from dpokit.model import load_model

        return {
            "base": self.base_model or "a Llama trained from scratch on HH transcripts (stage base)",
            "parameters": sum(p.numel() for p in load_model(str(self.out / "sft" / "final")).parameters()),
            "rm_heldout_accuracy": rm["eval"].get("eval/rewards/accuracies"),
            "rm_heldout_margin": rm["eval"].get("eval/rewards/margins"),
            "rm_train_accuracy": rm["train"].get("rewards/accuracies"),
            "sft_final_loss": sft["train"].get("loss"),
            "dpo_final_accuracy": dpo["train"].get("rewards/accuracies"),
            "counts": json.loads((self.data / "counts.json").read_text())["rows"],
            "sizes": dataclasses.asdict(self.sizes),
            "timings_s": self.timings,
            "lengths": [
                (t, self.lengths(0, t), self.lengths(self.dpo_total_steps(), t)) for t in self.sizes.temperatures
            ],
        }

    def lengths(self, step: int, temperature: float) -> tuple[float, float]:
        """Mean completion tokens of a samples file, and the share that ended with EOS."""
        rows = [json.loads(x) for x in (self.out / "samples" / f"step{step}-t{temperature}.jsonl").open()]
        return sum(r["tokens"] for r in rows) / len(rows), sum(r["finished"] for r in rows) / len(rows)


def run_experiment(
    out: Path,
    quick: bool = False,
    settings: Sequence[str] = (),
    hh: Path | None = None,
    model: str | None = None,
    chat: bool = False,
    judges: Sequence[str] = (),
    judge_options: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    sizes = with_settings(QUICK if quick else Sizes(), settings)
    return Experiment(out, sizes, hh or default_hh_dir(), model, chat, seed).run(judges, judge_options)
