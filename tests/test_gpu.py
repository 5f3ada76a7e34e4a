"""The GPU-only path, checked where it runs: FlexAttention training (PyTorch has no FlexAttention backward on CPU).

The comparison is skipped without CUDA (`bench/gpu.sh` runs this file first on the GPU machine); the check that
it leaves the process-wide TF32 flags as it found them runs anywhere. The model is built here from a config
(no tokenizer, no shared data), so the file runs on a machine that has only the repository.
"""

import contextlib
import random
from collections.abc import Iterator

import pytest
import torch

from dpokit.data.batching import FLEX_BLOCK
from dpokit.data.collate import collate
from dpokit.data.pack import pack
from dpokit.logprobs import packed_sequence_logps, sequence_logps
from dpokit.losses import sigmoid_loss
from tests.test_pack import _examples

DEVICE = "cuda"


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Exact fp32 matmuls and convolutions for the comparison; the flags are process-wide, so the previous values
    come back afterwards (other tests in the session may rely on them)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_off_restores_the_flags_it_changes() -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    initial = matmul.allow_tf32, cudnn.allow_tf32
    try:
        for before in ((True, True), (True, False), (False, True)):
            matmul.allow_tf32, cudnn.allow_tf32 = before
            with tf32_off():
                assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
            assert (matmul.allow_tf32, cudnn.allow_tf32) == before
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = initial


def _model(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn)
    return model.to(DEVICE).float().train()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("n", "short", "empty_last"), [(9, False, False), (1, False, False), (6, True, True)])
def test_flex_training_gives_the_padded_logps_losses_and_gradients(n: int, short: bool, empty_last: bool) -> None:
    with tf32_off():
        _compare_flex_with_padded(n, short, empty_last)


def _compare_flex_with_padded(n: int, short: bool, empty_last: bool) -> None:
    examples = _examples(random.Random(n), n, vocab=512, short=short, empty_last=empty_last, longest=(150, 200))
    padded = collate(examples, range(n), pad_id=0).to(DEVICE)
    packed = pack(examples, range(n), pad_id=0, capacity=2**62, multiple_of=FLEX_BLOCK).to(DEVICE)
    assert packed.input_ids.shape[0] == 1
    plain, flex = _model("sdpa"), _model("flex_attention")
    reference = sequence_logps(plain, padded).logps.detach() + 0.3

    def run(model: torch.nn.Module, fn, batch):
        model.zero_grad(set_to_none=True)
        out = fn(model, batch)
        loss = sigmoid_loss(out.logps[:, 0], out.logps[:, 1], reference[:, 0], reference[:, 1], beta=0.5)
        loss.losses.mean().backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        return out, loss.losses.mean().detach(), grads

    ref_out, ref_loss, ref_grads = run(plain, sequence_logps, padded)
    out, loss, grads = run(flex, lambda m, b: packed_sequence_logps(m, b, chunk=64), packed)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach() - b.detach()).abs().max()) / max(1.0, float(b.detach().abs().max()))

    errors = {"logps": rel(out.logps, ref_out.logps), "loss": rel(loss, ref_loss)}
    errors |= {name: rel(grads[name], ref_grads[name]) for name in ref_grads}
    print(f"largest relative error: {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert torch.equal(out.lengths, ref_out.lengths) and grads.keys() == ref_grads.keys()
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_fsdp2_flex_training_matches_the_unwrapped_step(offload: bool) -> None:
    """FSDP2 at world size 1 on the GPU (a process group of one): FlexAttention training through the wrapped
    `LogpsModel` gives the unwrapped model's log-probs, gradients and AdamW update, also with parameters, gradients
    and optimizer state offloaded to CPU memory (fp32, TF32 off)."""
    from dpokit import distributed
    from dpokit.config import DistributedConfig
    from dpokit.logprobs import LogpsModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    examples = _examples(random.Random(3), 7, vocab=512, longest=(150, 200))
    packed = pack(examples, range(7), pad_id=0, capacity=2**62, multiple_of=FLEX_BLOCK).to(DEVICE)

    def step(model: LogpsModel) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        out = model(packed)
        loss = sigmoid_loss(
            out.logps[:, 0], out.logps[:, 1], out.logps[:, 0].detach() + 0.1, out.logps[:, 1].detach(), beta=0.5
        )
        loss.losses.mean().backward()
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        grads = {n: full(p.grad).detach().float().cpu() for n, p in model.named_parameters()}
        optimizer.step()
        weights = {n: full(p).detach().float().cpu() for n, p in model.named_parameters()}
        return out.logps.detach().cpu(), grads, weights

    plain_logps, plain_grads, plain_weights = step(LogpsModel(_model("flex_attention"), chunk=64))
    with distributed.process_group(torch.device(DEVICE), 120, single=True):
        model = LogpsModel(_model("flex_attention").cpu() if offload else _model("flex_attention"), chunk=64)
        settings = DistributedConfig(fsdp="on", cpu_offload=offload)
        distributed.place(model, torch.device(DEVICE), settings, frozen=False, bf16=False)
        logps, grads, weights = step(model)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))

    errors = {"logps": rel(logps, plain_logps)}
    errors |= {f"grad {n}": rel(grads[n], plain_grads[n]) for n in plain_grads}
    errors |= {f"weight {n}": rel(weights[n], plain_weights[n]) for n in plain_weights}
    print(f"offload={offload}: largest relative error {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert grads.keys() == plain_grads.keys() and max(errors.values()) <= 1e-4, errors
