"""The training loop on a tiny model and real HH rows: DPO from ln 2, accumulation, resume, reference modes."""

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import load_config
from dpokit.reference import ReferenceMismatch
from dpokit.train import train
from tests.conftest import read_metrics, tiny_run, write_jsonl


def _config(tiny_model: Path, data: Path, out: Path, *extra: str):
    return load_config(
        None, [*tiny_run(tiny_model, data, out), "train.micro_batch_size=8", "train.max_grad_norm=null", *extra]
    )


_metrics = read_metrics
PRE = ("reference.mode=precomputed",)  # the config of the run that will use the cache


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_dpo_starts_at_ln2_learns_and_writes_everything(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(
        _config(tiny_model, hh_file, out, "train.max_steps=12", "data.eval_fraction=0.2", "train.eval_every=6")
    )
    metrics = [m for m in _metrics(out) if "loss" in m]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[-1]["loss"] < 0.5 and metrics[-1]["rewards/accuracies"] >= 0.75
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "tokens_per_second",
    ):
        assert name in metrics[-1]
    assert any("eval/rewards/accuracies" in m for m in _metrics(out))
    assert summary["data"]["train"]["skipped"] == {"identical_chosen_rejected": 1}
    assert summary["eval"]["eval/loss"] > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 12 and (out / "config.yaml").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is a dev dependency
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "final" / "model.safetensors").exists() and model.config.num_hidden_layers == 2


def test_gradient_accumulation_gives_the_large_batch_update(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    for name, micro in (("big", 8), ("accum", 2)):
        train(_config(tiny_model, hh_file, tmp_path / name, "train.max_steps=2", f"train.micro_batch_size={micro}"))
    big, accum = _weights(tmp_path / "big"), _weights(tmp_path / "accum")
    for key in big:
        assert torch.allclose(big[key], accum[key], atol=1e-5), key


def test_statistics_reach_the_host_once_per_step(
    tiny_model: Path, hh_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step adds its micro-batches' statistics where they were computed and converts them in one `to_host`,
    instead of a float() per statistic and micro-batch (each a wait for the device on a GPU)."""
    train_module = importlib.import_module("dpokit.train")  # `dpokit.train` itself is the function

    calls = {"to_host": 0, "float": 0}
    real_to_host, real_float = train_module.to_host, torch.Tensor.__float__

    def counting_to_host(sums):
        calls["to_host"] += 1
        return real_to_host(sums)

    def counting_float(tensor):
        calls["float"] += 1
        return real_float(tensor)

    monkeypatch.setattr(train_module, "to_host", counting_to_host)
    monkeypatch.setattr(torch.Tensor, "__float__", counting_float)
    train(_config(tiny_model, hh_file, tmp_path / "run", "train.max_steps=3", "train.micro_batch_size=4"))
    assert calls == {"to_host": 3, "float": 0}


def test_sft_accumulation_normalises_by_tokens(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    for name, micro in (("big", 8), ("accum", 4)):
        train(
            _config(
                tiny_model,
                hh_file,
                tmp_path / name,
                "train.max_steps=2",
                f"train.micro_batch_size={micro}",
                "loss.name=sft",
                "reference.mode=none",
            )
        )
    big, accum = _weights(tmp_path / "big"), _weights(tmp_path / "accum")
    assert all(torch.allclose(big[k], accum[k], atol=1e-5) for k in big)
    first = _metrics(tmp_path / "big")[0]
    assert 3.0 < first["loss"] < 8.0  # a per-token NLL near log(vocab) at the start, not a per-sequence sum


def test_resume_equals_uninterrupted(
    tiny_model: Path, hh_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cut after step 2's checkpoint and resumed gives the uninterrupted run's weights and losses, and the
    resumed process starts at the checkpoint: it computes steps 3-6 only (a seeded restart from step 0 would give the
    same weights, so the weights alone cannot tell)."""
    extra = (
        "train.max_steps=6",
        "train.save_every=2",
        "train.optimizer=rmsprop",
        "train.warmup_steps=3",
        "train.schedule=cosine",
    )
    assert train(_config(tiny_model, hh_file, tmp_path / "full", *extra))["resumed_from_step"] == 0
    cut = tmp_path / "cut"
    train(_config(tiny_model, hh_file, cut, *extra))
    # Leave what a run killed during step 3 leaves: the step-2 checkpoint, no later one, no final model or summary.
    shutil.rmtree(cut / "checkpoints" / "step-4")
    shutil.rmtree(cut / "final")
    (cut / "summary.json").unlink()
    train_module = importlib.import_module("dpokit.train")  # `dpokit.train` itself is the function

    computed, real_batch_loss = [], train_module.batch_loss

    def counted(*args):
        computed.append(args[-1])  # the split the batch belongs to
        return real_batch_loss(*args)

    monkeypatch.setattr(train_module, "batch_loss", counted)
    summary = train(_config(tiny_model, hh_file, cut, *extra), resume=True)
    assert summary["resumed_from_step"] == 2
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 2
    assert computed == ["train"] * 4  # one micro-batch per step, steps 3 to 6
    full, resumed = _weights(tmp_path / "full"), _weights(cut)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [m["loss"] for m in _metrics(cut)] == [m["loss"] for m in _metrics(tmp_path / "full")]


def test_reference_from_path_equals_copy(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    train(_config(tiny_model, hh_file, tmp_path / "copy", "train.max_steps=2"))
    train(
        _config(
            tiny_model,
            hh_file,
            tmp_path / "path",
            "train.max_steps=2",
            "reference.mode=path",
            f"reference.path={tiny_model}",
        )
    )
    assert [m["loss"] for m in _metrics(tmp_path / "copy")] == pytest.approx(
        [m["loss"] for m in _metrics(tmp_path / "path")], abs=1e-6
    )


def test_precomputed_reference_matches_and_mismatch_is_refused(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    from dpokit.precompute import precompute_reference

    cache = tmp_path / "ref.safetensors"
    precompute_reference(
        _config(tiny_model, hh_file, tmp_path / "pre", *PRE, f"reference.cache={cache}", "data.eval_fraction=0.2")
    )
    train(_config(tiny_model, hh_file, tmp_path / "copy", "train.max_steps=3", "data.eval_fraction=0.2"))
    train(
        _config(
            tiny_model,
            hh_file,
            tmp_path / "cached",
            "train.max_steps=3",
            "data.eval_fraction=0.2",
            "reference.mode=precomputed",
            f"reference.cache={cache}",
        )
    )
    copy_metrics, cached_metrics = _metrics(tmp_path / "copy"), _metrics(tmp_path / "cached")
    for a, b in zip(copy_metrics, cached_metrics, strict=True):
        assert a.keys() == b.keys()
        assert a.get("loss", a.get("eval/loss")) == pytest.approx(b.get("loss", b.get("eval/loss")), abs=1e-5)
    # Other tokenization settings: other token ids, so the cache no longer applies.
    with pytest.raises(ReferenceMismatch, match="precompute-ref"):
        train(
            _config(
                tiny_model,
                hh_file,
                tmp_path / "bad",
                "train.max_steps=1",
                "data.eval_fraction=0.2",
                "data.max_length=48",
                "reference.mode=precomputed",
                f"reference.cache={cache}",
            )
        )


def test_precompute_ref_with_flex_attention_gives_the_sdpa_cache(
    tiny_model: Path, hh_file: Path, tmp_path: Path
) -> None:
    """The block-sparse layout (one row per micro-batch) scores the reference like the dense one: forward only, so
    it runs on CPU too; the cache does not depend on the attention kernel."""
    from dpokit.precompute import precompute_reference

    caches = {}
    for attn in ("sdpa", "flex_attention"):
        caches[attn] = tmp_path / f"{attn}.safetensors"
        extra = (f"model.attn_implementation={attn}", f"reference.cache={caches[attn]}", "data.eval_fraction=0.2")
        precompute_reference(_config(tiny_model, hh_file, tmp_path / attn, *PRE, *extra))
    dense, flex = load_file(str(caches["sdpa"])), load_file(str(caches["flex_attention"]))
    assert dense.keys() == flex.keys() and len(dense) >= 2
    for name in dense:
        torch.testing.assert_close(flex[name], dense[name], rtol=1e-5, atol=1e-4)


def test_bf16_weights_train_and_match_their_precomputed_reference(
    tiny_model: Path, hh_file: Path, tmp_path: Path
) -> None:
    from dpokit.precompute import precompute_reference

    cache = tmp_path / "ref.safetensors"
    bf16 = ("model.dtype=bf16", f"reference.cache={cache}")
    precompute_reference(_config(tiny_model, hh_file, tmp_path / "pre", *PRE, *bf16))
    train(_config(tiny_model, hh_file, tmp_path / "run", "train.max_steps=2", "reference.mode=precomputed", *bf16))
    assert {w.dtype for w in _weights(tmp_path / "run").values()} == {torch.bfloat16}
    # Policy and cached reference are the same bf16 model at step 1; only the row packing differs.
    assert _metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)
    # An fp32 run does not accept the bf16 model's cache: the weights digest differs.
    with pytest.raises(ReferenceMismatch):
        train(
            _config(
                tiny_model, hh_file, tmp_path / "fp32", "train.max_steps=1", "reference.mode=precomputed", *bf16[1:]
            )
        )


def test_reference_free_and_other_losses_run(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    for i, extra in enumerate(
        (
            ["reference.mode=none"],
            ["loss.name=ipo"],
            ["loss.name=hinge"],
            ["loss.name=dpo_nll"],
            ["loss.label_smoothing=0.1"],
        )
    ):
        summary = train(_config(tiny_model, hh_file, tmp_path / str(i), "train.max_steps=2", *extra))
        assert math.isfinite(summary["train"]["loss"])


def test_a_loss_registered_in_the_registry_alone_trains(
    tiny_model: Path, hh_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding a loss touches only `LOSSES`: config, data loading and the loop all read it from there. The toy loss
    is softplus(1 − β·h), whose value at π_θ = π_ref (h = 0) is log(1 + e), not DPO's ln 2."""
    import torch.nn.functional as F

    from dpokit.losses import LOSSES, LossOutput, LossSpec

    def toy_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    ) -> LossOutput:
        h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
        rewards = beta * torch.stack(
            [policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps], 1
        )
        return LossOutput(F.softplus(1 - beta * h), rewards.detach())

    monkeypatch.setitem(LOSSES, "toy", LossSpec(toy_loss, "pairs", "required", {"beta": "beta"}))
    summary = train(_config(tiny_model, hh_file, tmp_path / "toy", "train.max_steps=2", "loss.name=toy"))
    metrics = _metrics(tmp_path / "toy")
    assert metrics[0]["loss"] == pytest.approx(math.log(1 + math.e), abs=1e-4)
    assert metrics[1]["rewards/margins"] != 0 and math.isfinite(metrics[1]["loss"])
    assert summary["config"]["loss"]["name"] == "toy"


def test_plackett_luce_on_rankings(tiny_model: Path, tmp_path: Path) -> None:
    rows = [
        {
            "prompt": f"Question {i}?",
            "responses": [f" good answer {i}", f" fine {i}", f" bad {i} no"],
            "ranking": [0, 1, 2],
        }
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "rank.jsonl", rows)
    train(_config(tiny_model, data, tmp_path / "pl", "train.max_steps=4", "loss.name=plackett_luce"))
    metrics = _metrics(tmp_path / "pl")
    # K = 3 at π_θ = π_ref: loss = log 3! (every ordering equally likely).
    assert metrics[0]["loss"] == pytest.approx(math.log(6), abs=1e-4)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_packed_and_padded_layouts_train_alike(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    # A small learning rate: Adam's first update is about lr·sign(g), so gradient entries within 1e-7 of zero (equal
    # in both layouts to 1e-5, see test_pack.py) may flip sign and move a weight by up to lr.
    for layout in ("padded", "packed"):
        train(
            _config(
                tiny_model,
                hh_file,
                tmp_path / layout,
                "train.max_steps=3",
                f"train.layout={layout}",
                "data.eval_fraction=0.2",
                "train.micro_batch_size=4",
                "train.pack_length=256",
                "train.lr=1e-4",
            )
        )
    padded, packed = _metrics(tmp_path / "padded"), _metrics(tmp_path / "packed")
    assert packed[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-6)  # before any update
    # Reward margins are not compared: they are differences of nearly equal fp32 sums of ~100 log-probs, whose
    # rounding depends on summation order; the losses and log-probs are.
    for a, b in zip(padded, packed, strict=True):
        for key in ("loss", "eval/loss", "logps/chosen", "logps/rejected", "eval/logps/chosen"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_activation_checkpointing_gives_the_same_step(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        train(
            _config(tiny_model, hh_file, tmp_path / name, "train.max_steps=2", f"train.activation_checkpointing={flag}")
        )
    assert [m["loss"] for m in _metrics(tmp_path / "plain")] == pytest.approx(
        [m["loss"] for m in _metrics(tmp_path / "ckpt")]
    )


@pytest.mark.slow
def test_compiled_layers_give_the_same_losses(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    runs = {
        "eager": [],
        "compiled": ["train.compile=true"],
        "budget": ["train.compile=true", "train.compile_memory_budget=0.3"],
    }
    for name, extra in runs.items():
        train(_config(tiny_model, hh_file, tmp_path / name, "train.max_steps=3", *extra))
    eager, compiled, budget = ([m["loss"] for m in _metrics(tmp_path / n)] for n in runs)
    assert compiled == pytest.approx(eager, rel=1e-4) and budget == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_compile_memory_budget_saves_fewer_activations(tiny_model: Path) -> None:
    """Every decoder layer is compiled, and a budget below 1 makes the compiler keep fewer activations for backward
    (the bytes autograd saves, counted once per storage, parameters excluded)."""
    from bench.activation_memory import SavedActivations
    from dpokit.data.pack import pack
    from dpokit.data.tokenize import TokenizedExample
    from dpokit.logprobs import packed_sequence_logps
    from dpokit.model import compile_layers, compiler_memory_budget, load_model

    examples = [TokenizedExample((1, *range(5, 25)), (tuple(range(30, 60)), tuple(range(70, 90))), "x")] * 4
    batch = pack(examples, range(4), pad_id=0)

    def saved_bytes(budget: float) -> int:
        torch._dynamo.reset()
        model = load_model(str(tiny_model)).train()
        compile_layers(model)
        assert all(layer._compiled_call_impl is not None for layer in model.get_decoder().layers)
        with compiler_memory_budget(budget), SavedActivations(model) as saved:
            packed_sequence_logps(model, batch).logps.sum().backward()
        return saved.bytes

    assert saved_bytes(0.3) < 0.8 * saved_bytes(1.0)
