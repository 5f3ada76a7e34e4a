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
