"""Generation: the batched left-padded KV-cache engine against Hugging Face's one-prompt greedy search, per-row seeds
(same seed -> same samples whatever the batching), EOS and max_new_tokens, top-p, and `dpokit generate`'s files:
prompt tokens equal training's, resume without redoing finished prompts, and rank shards that merge."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dpokit import distributed
from dpokit.config import DataConfig
from dpokit.data.prepare import prepare_data
from dpokit.eval import samples as samples_module
from dpokit.eval.samples import data_prompts, generate_file, read_jsonl
from dpokit.generate import Sampling, generate, sample
from dpokit.model import load_model
from tests.conftest import hh_rows, write_jsonl


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    """The tiny model with large random weights, so that its distributions are far from uniform."""
    m = load_model(str(tiny_model)).eval()
    torch.manual_seed(0)
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    rows = hh_rows(5)
    return [tokenizer(r["chosen"][:n])["input_ids"] for r, n in zip(rows, [20, 90, 45, 130, 10], strict=True)]


def _generate(model, tokenizer, prompts, sampling, seed=0, batch_size=3, keys=None):
    keys = keys or [str(i) for i in range(len(prompts))]
    return generate(model, prompts, keys, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, seed, batch_size)


def test_greedy_batched_equals_one_prompt_at_a_time(model, tokenizer, prompts) -> None:
    """Left padding, position ids and the KV cache leave each row's greedy continuation exactly as Hugging Face's
    generate gives it for the prompt alone (no padding)."""
    out = _generate(model, tokenizer, prompts, Sampling(temperature=0, max_new_tokens=6))
    for prompt, completion in zip(prompts, out, strict=True):
        ids = torch.tensor([prompt])
        expected = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
        assert list(completion) == expected


def test_same_seed_same_samples_whatever_the_batching(model, tokenizer, prompts) -> None:
    sampling = Sampling(temperature=1.0, max_new_tokens=12)
    a = _generate(model, tokenizer, prompts, sampling, seed=3, batch_size=5)
    assert _generate(model, tokenizer, prompts, sampling, seed=3, batch_size=1) == a
    reverse = [str(i) for i in range(5)][::-1]
    assert _generate(model, tokenizer, prompts[::-1], sampling, seed=3, keys=reverse) == a[::-1]
    b = _generate(model, tokenizer, prompts, sampling, seed=4, batch_size=5)
    assert sum(x != y for x, y in zip(a, b, strict=True)) >= 4


def test_top_p_and_temperature(model, tokenizer, prompts) -> None:
    greedy = _generate(model, tokenizer, prompts, Sampling(temperature=0, max_new_tokens=5))
    # A nucleus this small holds the likeliest token only.
    assert _generate(model, tokenizer, prompts, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=5)) == greedy
    # Near-zero temperature sharpens sampling to the greedy choice.
    assert _generate(model, tokenizer, prompts, Sampling(temperature=1e-4, max_new_tokens=5)) == greedy
    assert _generate(model, tokenizer, prompts, Sampling(temperature=1.0, max_new_tokens=5)) != greedy


def test_eos_and_max_new_tokens(tiny_model, tokenizer, prompts) -> None:
    m = load_model(str(tiny_model)).eval()
    out = _generate(m, tokenizer, prompts, Sampling(max_new_tokens=5))
    assert all(1 <= len(c) <= 5 for c in out)
    assert all(tokenizer.eos_token_id not in c[:-1] for c in out)

    def eos_first(module, inputs, logits):  # make EOS the likeliest token everywhere: every completion is EOS alone
        logits[..., tokenizer.eos_token_id] += 100.0
        return logits

    m.get_output_embeddings().register_forward_hook(eos_first)
    out = _generate(m, tokenizer, prompts, Sampling(temperature=0, max_new_tokens=5))
    assert out == [(tokenizer.eos_token_id,)] * len(prompts)


def _decode_step_lengths(model: Any, run: Callable[[], object]) -> list[int]:
    """The sequence length of every forward `run` makes: after the prompt, 1 a step when the KV cache is used."""
    lengths: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    try:
        run()
    finally:
        hook.remove()
    return lengths


def test_runs_and_checkpoints_sample_with_the_kv_cache(base_run: Path, tokenizer, tmp_path: Path) -> None:
    """A finished run and a training checkpoint generate with the KV cache, as the start model does: training once
    saved use_cache=false in config.json, and a checkpoint assembled from that config sampled every step over the
    whole sequence (three times slower in the demo's evaluations). `sample` asks for the cache whatever the config
    says, and a checkpoint keeps its generation_config.json."""
    prompt = tokenizer("Human: hello", add_special_tokens=False)["input_ids"]
    for folder in (base_run / "final", base_run / "checkpoints" / "step-1"):
        m = load_model(str(folder)).eval()
        assert m.config.use_cache and m.generation_config.use_cache, folder
    old = tmp_path / "old-checkpoint"  # a checkpoint written before: use_cache false in config.json only
    shutil.copytree(base_run / "checkpoints" / "step-1", old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(config | {"use_cache": False}))
    assert load_model(str(old)).generation_config.use_cache
    m.config.use_cache = m.generation_config.use_cache = False
    lengths = _decode_step_lengths(m, lambda: sample(m, [prompt], 2, 5, tokenizer.eos_token_id, seed=0))
    assert lengths[0] == len(prompt) and lengths[1:] == [1] * (len(lengths) - 1) and len(lengths) > 1


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_tokens_equal_training(tmp_path, tokenizer, chat) -> None:
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(30))
    config = DataConfig(train_path=str(data), chat=chat, max_length=96, max_prompt_length=48)
    rows = data_prompts(config, tokenizer)
    training = prepare_data(config, tokenizer, "pairs").train
    assert len(rows) == len(training) > 20
    assert [r.prompt_ids for r in rows] == [e.prompt_ids for e in training]
    assert any(len(r.prompt_ids) == 48 for r in rows)  # truncation applies as in training
    if chat:
        assert tokenizer.decode(rows[0].prompt_ids).endswith("<|assistant|>\n")


def _spy(monkeypatch) -> list[int]:
    """Count the rows each call to the engine samples."""
    calls: list[int] = []
    real = samples_module.generate

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(samples_module, "generate", counting)
    return calls


def test_generate_file_resumes(tmp_path, tiny_model, monkeypatch) -> None:
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(12))
    config = DataConfig(train_path=str(data), max_length=96, max_prompt_length=48)
    sampling = Sampling(temperature=0.7, max_new_tokens=6)
    whole = tmp_path / "whole.jsonl"
    generate_file(str(tiny_model), config, whole, sampling, samples=2, seed=5, batch_size=4)
    rows = list(read_jsonl(whole))
    assert len(rows) == 24 and {r["sample"] for r in rows} == {0, 1}
    assert {"id", "prompt", "completion", "model", "temperature", "top_p", "seed"} <= set(rows[0])
    assert rows[0]["temperature"] == 0.7 and rows[0]["seed"] == 5

    # A run killed after 9 rows, its last line cut short: the rerun samples the 15 others only, and the file then
    # equals the uninterrupted run's.
    killed = tmp_path / "killed.jsonl"
    lines = whole.read_text().splitlines(keepends=True)
    killed.write_text("".join(lines[:9]) + lines[9][:25])
    calls = _spy(monkeypatch)
    generate_file(str(tiny_model), config, killed, sampling, samples=2, seed=5, batch_size=4)
    assert calls == [15]
    assert list(read_jsonl(killed)) == rows
    generate_file(str(tiny_model), config, killed, sampling, samples=2, seed=5, batch_size=4)
    assert calls == [15]  # nothing left to do: the engine is not called


def test_generate_file_shards_across_ranks(tmp_path, tiny_model, monkeypatch) -> None:
    """Two ranks, run one after the other in this process: each samples its share into a part file; rank 0 merges
    them into the same file a single process writes."""
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(10))
    config = DataConfig(train_path=str(data), max_length=96, max_prompt_length=48)
    sampling = Sampling(max_new_tokens=5)
    single = generate_file(str(tiny_model), config, tmp_path / "single.jsonl", sampling, samples=2, seed=1)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    sharded = tmp_path / "sharded.jsonl"
    for rank in (1, 0):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        generate_file(str(tiny_model), config, sharded, sampling, samples=2, seed=1)
    assert calls == [10, 10]
    assert not list(tmp_path.glob("sharded.jsonl.rank*"))
    assert list(read_jsonl(sharded)) == list(read_jsonl(single))
    assert json.loads(single.read_text().splitlines()[0])["id"] == "1"
