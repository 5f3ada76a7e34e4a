"""LoRA through peft: π_ref = the policy with its adapters disabled (exactly the base model), the packed layout with
adapters on the LM head, adapter checkpoints in PEFT's format, merged export, resume, other reference modes, and a
model that already carries an adapter."""

from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import ConfigError, LoraConfig, load_config
from dpokit.data.collate import collate
from dpokit.data.pack import pack
from dpokit.errors import UserError
from dpokit.logprobs import batch_logps
from dpokit.lora import adapter_off_reference, apply_lora
from dpokit.model import load_model
from tests.conftest import read_metrics, tiny_run
from tests.test_pack import _close, _examples, _grads

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "padded": lambda ex: collate(ex, range(len(ex)), 0),
    "packed": lambda ex: pack(ex, range(len(ex)), 0, 0),
}


def _lora_policy(tiny_model: Path, **settings) -> torch.nn.Module:
    """The tiny model with adapters whose B matrices are random (they start at 0, which would hide them)."""
    policy = apply_lora(load_model(str(tiny_model)), LoraConfig(r=4, **settings), str(tiny_model))
    torch.manual_seed(1)
    for name, p in policy.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(p, std=0.2)
    return policy


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_with_adapters_disabled_is_the_base_model_exactly(tiny_model: Path, layout: str) -> None:
    batch = LAYOUTS[layout](_examples(random.Random(0), 6))
    policy = _lora_policy(tiny_model).train()
    reference = adapter_off_reference(policy, chunk=16)(batch, "train")
    with torch.no_grad():
        base = batch_logps(load_model(str(tiny_model)).eval(), batch, 16).logps
        adapted = batch_logps(policy, batch, 16).logps
    assert torch.equal(reference, base)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapters are on outside the reference
    assert policy.training  # the reference forward leaves the policy in training mode


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ("q_proj", "v_proj", "lm_head")},  # LoRA on the (tied) LM head
        {"target_modules": ("q_proj",), "modules_to_save": ("lm_head",)},  # a trained copy of the head
        {"target_modules": ("q_proj", "embed_tokens")},  # LoRA on the embedding the head is tied to
    ],
)
def test_packed_layout_equals_padded_with_adapters_on_the_head(tiny_model: Path, settings: dict) -> None:
    examples = _examples(random.Random(1), 5)
    policy = _lora_policy(tiny_model, **settings)
    out = {}
    for layout, make in LAYOUTS.items():
        logps = batch_logps(policy, make(examples), 7).logps
        out[layout] = (logps, _grads(policy, logps.sum()))
    (padded, padded_grads), (packed, packed_grads) = out["padded"], out["packed"]
    assert _close(packed, padded)
    assert padded_grads.keys() == packed_grads.keys() and any("lm_head" in k or "embed" in k for k in padded_grads)
    assert all(_close(packed_grads[k], padded_grads[k], rel=1e-4) for k in padded_grads)


def test_lora_with_several_processes_is_refused(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dpokit import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(UserError, match="LoRA is not yet supported with torchrun / FSDP2"):
        apply_lora(load_model(str(tiny_model)), LoraConfig(), str(tiny_model))


def test_all_linear_stands_alone() -> None:
    with pytest.raises(ConfigError, match="all-linear stands alone"):
        load_config(None, ["model.lora.target_modules=[all-linear, lm_head]"])


def _run(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny_run(tiny_model, data, out), "train.micro_batch_size=8", "train.report_to=[]", *extra]


def _seq_logps(model: torch.nn.Module, examples) -> torch.Tensor:
    with torch.no_grad():
        return batch_logps(model.eval(), collate(examples, range(len(examples)), 0)).logps


@pytest.mark.slow
def test_adapter_checkpoint_loads_with_peft_and_merged_export_gives_its_logps(
    tiny_model: Path, hh_file: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    targets = "model.lora.target_modules=[q_proj, v_proj, down_proj, lm_head, embed_tokens]"
    assert main(["dpo", *_run(tiny_model, hh_file, out, targets, "train.max_steps=3")]) == 0
    assert not (out / "final" / "model.safetensors").exists()  # the adapter only
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert any("lm_head" in k for k in adapter) and any("embed_tokens" in k for k in adapter)

    assert main(["export", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "final")
    examples = _examples(random.Random(2), 6, vocab=390)
    expected = _seq_logps(with_adapter, examples)
    assert (_seq_logps(merged, examples) - expected).abs().max() <= 1e-5
    assert (_seq_logps(base, examples) - expected).abs().max() > 1e-3  # training moved it
    # The merged head and embedding differ (untied): the head's adapter is in the head only.
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)


@pytest.mark.slow
def test_reference_modes_under_lora_agree(tiny_model: Path, hh_file: Path, tmp_path: Path) -> None:
    """copy (adapters off), precomputed (from the plain model) and path (the same model loaded again) give the same
    reference log-probs at every step, and the run starts at ln 2."""
    steps = ("train.max_steps=2", "model.lora.r=4")
    cache = tmp_path / "ref.safetensors"
    assert main(["precompute-ref", *_run(tiny_model, hh_file, tmp_path / "p", f"reference.cache={cache}")]) == 0
    modes = {
        "copy": [],
        "precomputed": ["reference.mode=precomputed", f"reference.cache={cache}"],
        "path": ["reference.mode=path", f"reference.path={tiny_model}"],
    }
    for name, extra in modes.items():
        assert main(["dpo", *_run(tiny_model, hh_file, tmp_path / name, *steps, *extra)]) == 0
    rows = {name: read_metrics(tmp_path / name) for name in modes}
    assert rows["copy"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("precomputed", "path"):
        for a, b in zip(rows["copy"], rows[name], strict=True):
            assert b["logps/ref_chosen"] == pytest.approx(a["logps/ref_chosen"], rel=1e-6)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_model_that_carries_an_adapter_is_merged_and_is_the_reference(
    tiny_model: Path, hh_file: Path, tmp_path: Path
) -> None:
    """model.path = a LoRA run's final folder: its base with the adapter merged in is the model DPO starts from
    (π_ref), and a new adapter trains on top; the same as starting from the merged export."""
    sft = tmp_path / "sft"
    assert main(["sft", *_run(tiny_model, hh_file, sft, "train.max_steps=2", "model.lora.r=4")]) == 0
    assert main(["export", str(sft), str(tmp_path / "merged"), "--merge"]) == 0
    for name, start in (("from_adapter", sft / "final"), ("from_merged", tmp_path / "merged")):
        args = [*_run(tiny_model, hh_file, tmp_path / name, "train.max_steps=1", "model.lora.r=4")]
        assert main(["dpo", *args, f"model.path={start}"]) == 0
    a, b = read_metrics(tmp_path / "from_adapter")[0], read_metrics(tmp_path / "from_merged")[0]
    assert a["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert a["logps/ref_chosen"] == pytest.approx(b["logps/ref_chosen"], rel=1e-6)
    # The SFT adapter changed the model, so this reference is not the base model's.
    base_run = tmp_path / "base"
    assert main(["dpo", *_run(tiny_model, hh_file, base_run, "train.max_steps=1", "model.lora.r=4")]) == 0
    assert read_metrics(base_run)[0]["logps/ref_chosen"] != pytest.approx(a["logps/ref_chosen"], rel=1e-4)


def _cli(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    lora = ["model.lora.r=4", "model.lora.dropout=0.1", "train.max_steps=8", "train.save_every=1"]
    return [sys.executable, "-m", "dpokit", "dpo", *_run(tiny_model, data, out, *lora, *extra)]


@pytest.mark.slow
def test_lora_resume_after_sigkill_equals_the_uninterrupted_run(
    tiny_model: Path, hh_file: Path, tmp_path: Path
) -> None:
    """Adapter dropout on, so the RNG state matters too. The resumed process says which checkpoint it started from,
    and that checkpoint is one the killed process wrote."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(tiny_model, hh_file, full), check=True, capture_output=True, env=env)
    process = subprocess.Popen(
        _cli(tiny_model, hh_file, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()
    written = sorted(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*") if "tmp" not in p.name)
    resumed = subprocess.run(
        [*_cli(tiny_model, hh_file, killed), "--resume"], check=True, capture_output=True, env=env, text=True
    )
    step = int(re.search(r"\[resume\] from .*step-(\d+) at step (\d+)", resumed.stdout).group(2))
    assert 1 <= step < 8 and step == written[-1]
    assert [r["loss"] for r in read_metrics(killed)] == [r["loss"] for r in read_metrics(full)]
    a, b = (load_file(str(p / "final" / "adapter_model.safetensors")) for p in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
