"""The sentiment demo's plumbing, without training anything: every setting reaches the cache key of each stage that
reads it (and of no stage that does not), and the stage cache reuses, rebuilds and recovers."""

import dataclasses
from pathlib import Path

import pytest

from dpokit.experiments.demo_data import DemoData
from dpokit.experiments.sentiment import Demo
from dpokit.experiments.sentiment_ppo import split_by_prompt
from dpokit.experiments.sentiment_setup import QUICK, Design, Sizes
from dpokit.experiments.stages import digest, run_stage

PREFERENCE = ("DPO", "Preferred-FT", "Unlikelihood")
PPO = ("PPO-GT", "PPO")  # PPO-GT first: a PPO-GT stage name also starts with "PPO-"
METHODS = PREFERENCE + PPO
# The science, written down apart from the code: the stages (or groups of runs) that read each setting directly.
# "judge" is π_SFT + reward + held-out prompts and sampling, which every evaluated stage reads; "runs" is every
# preference method (trained on the pairs by dpokit's loop).
READS = {
    "vocab_size": {"tokenizer"},
    **dict.fromkeys(["hidden_size", "layers", "heads", "review_tokens", "sft_epochs", "sft_lr"], {"sft"}),
    "train_prompts": {"pairs"},
    "eval_prompts": {"judge"},
    "eval_samples": {"judge"},
    "new_tokens": {"pairs", "judge", "runs", "reference_logps", "reward_model", *PPO},
    "betas": {"DPO"},
    "unlikelihood_alphas": {"Unlikelihood"},
    "best_of": {"reference"},
    **dict.fromkeys(["pref_epochs", "pref_lr", "pref_batch", "checkpoints"], {"runs"}),
    **dict.fromkeys(["ppo_target_kls", "ppo_updates", "ppo_rollout_batch", "ppo_snapshots"], set(PPO)),
    # Design
    "train_reviews": {"tokenizer", "reward", "facts"},
    "perplexity_reviews": {"sft"},
    "eval_offset": {"judge"},
    "prefix_tokens": {"pairs", "judge"},
    "samples_per_prompt": {"pairs"},
    "build_seed": {"sft", "reward", "reward_model"},
    "pair_prompt_seed": {"pairs"},
    "pair_sample_seed": {"pairs"},
    "eval_prompt_seed": {"judge"},
    "eval_sample_seed": {"judge"},
    "best_of_seed": {"reference"},
    **dict.fromkeys(["rm_epochs", "rm_lr", "rm_heldout"], {"reward_model"}),
    **dict.fromkeys(["ppo_epochs", "ppo_lr", "ppo_kl_gain", "ppo_normalize_samples", "ppo_normalize_seed"], set(PPO)),
    # Data
    "reviews": {"tokenizer", "reward", "facts"},
    "vader": {"facts"},
}
AFTER = {
    "tokenizer": {"sft"},
    "sft": {"pairs", "judge"},
    "reward": {"pairs", "judge"},
    "pairs": {"runs", "facts", "reference_logps", "reward_model", *PPO},
    "reference_logps": {"DPO", "Unlikelihood"},  # Preferred-FT has no reference
    "judge": {"runs", "reference", *PPO},
    "reward_model": {"PPO", "facts"},
    "runs": set(PREFERENCE),
}


def _rebuilt(direct: set[str]) -> set[str]:
    """The stage groups a change to settings read by `direct` must rebuild: those and everything after them."""
    seen, todo = set(), list(direct)
    while todo:
        group = todo.pop()
        if group not in seen:
            seen.add(group)
            todo += AFTER.get(group, ())
    return seen - {"judge", "runs"}


def _group(stage: str) -> str:
    return next((m for m in METHODS if stage.startswith(m + "-")), stage.split("-seed")[0])


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {_group(name) for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def _perturb(value):
    if isinstance(value, tuple):
        return tuple(_perturb(v) for v in value)
    return value * 2 if isinstance(value, float) else value + 1


def _data(tmp_path: Path, reviews: int = 6, vader_rows: int = 3) -> DemoData:
    vader = tmp_path / f"vader{vader_rows}.txt"
    vader.write_text("".join(f"{i}\t1.5\tsnippet {i}\n" for i in range(vader_rows)), encoding="utf-8")
    return DemoData([{"text": f"review {i}", "label": i % 2} for i in range(reviews)], "test", vader)


def _keys(tmp_path: Path, sizes: Sizes = QUICK, design: Design | None = None, data=None, seeds=(0,)) -> dict[str, str]:
    demo = Demo(tmp_path / "out", sizes, seeds, data or _data(tmp_path), design)
    return {name: digest(settings) for name, settings in demo.settings.items()}


def test_every_setting_rebuilds_the_stages_that_read_it_and_only_those(tmp_path: Path) -> None:
    base = _keys(tmp_path)
    assert base == _keys(tmp_path), "the same settings must give the same keys (a rerun reuses every stage)"
    settings = {f.name for f in dataclasses.fields(Sizes)} | {f.name for f in dataclasses.fields(Design)}
    assert set(READS) == settings | {"reviews", "vader"}, "a new setting needs a line in READS: which stages read it"
    for field in dataclasses.fields(Sizes):
        sizes = dataclasses.replace(QUICK, **{field.name: _perturb(getattr(QUICK, field.name))})
        # facts.json records the sizes, so every size rebuilds it too
        assert _changed(base, _keys(tmp_path, sizes=sizes)) == _rebuilt(READS[field.name] | {"facts"}), field.name
    for field in dataclasses.fields(Design):
        design = dataclasses.replace(Design(), **{field.name: _perturb(getattr(Design(), field.name))})
        assert _changed(base, _keys(tmp_path, design=design)) == _rebuilt(READS[field.name]), field.name
    data = _data(tmp_path)
    more_reviews = DemoData(_data(tmp_path, reviews=7).reviews, "test", data.vader)
    assert _changed(base, _keys(tmp_path, data=more_reviews)) == _rebuilt(READS["reviews"])
    other_vader = DemoData(data.reviews, "test", _data(tmp_path, vader_rows=4).vader)
    assert _changed(base, _keys(tmp_path, data=other_vader)) == _rebuilt(READS["vader"])


def test_another_training_seed_adds_its_runs_and_reuses_the_rest(tmp_path: Path) -> None:
    one, two = _keys(tmp_path, seeds=(0,)), _keys(tmp_path, seeds=(0, 1))
    assert one.items() <= two.items()
    assert {_group(name) for name in two.keys() - one.keys()} == {"reference", *METHODS}


def test_a_stage_is_reused_rebuilt_or_recovered(tmp_path: Path) -> None:
    out, made = tmp_path / "out", tmp_path / "out" / "made.txt"
    builds: list[str] = []

    def build(text: str):
        def run() -> None:
            assert not made.exists(), "an earlier build's output must be cleared first"
            builds.append(text)
            made.parent.mkdir(parents=True, exist_ok=True)
            made.write_text(text)

        return run

    assert run_stage(out, "s", "stage", {"a": 1}, [made], build("one"))
    assert not run_stage(out, "s", "stage", {"a": 1}, [made], build("again")), "same settings: reused"
    assert run_stage(out, "s", "stage", {"a": 2}, [made], build("two")) and made.read_text() == "two"

    def interrupted() -> None:
        made.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(out, "s", "stage", {"a": 3}, [made], interrupted)
    assert run_stage(out, "s", "stage", {"a": 3}, [made], build("three")), "an interrupted stage is built again"
    assert builds == ["one", "two", "three"] and made.read_text() == "three"


def test_the_reward_model_holds_out_whole_prompts() -> None:
    """A prompt's 6 pairs share its 4 samples: the held-out pairs must come from prompts the model never saw."""
    rows = [
        {"prompt": f"prefix {i}", "chosen": f"c{i}{j}", "rejected": f"r{i}{j}"} for i in range(200) for j in range(6)
    ]
    train, heldout = split_by_prompt(rows, 0.1)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in heldout})
    assert sorted(map(str, train + heldout)) == sorted(map(str, rows)) and 60 <= len(heldout) <= 200
