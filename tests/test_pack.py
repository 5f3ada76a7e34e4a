"""The packed prefix-shared layout gives the padded path's log-probs, losses and parameter gradients (fp32)."""

import random

import pytest
import torch

from dpokit.data.collate import collate
from dpokit.data.pack import first_fit_decreasing, pack
from dpokit.data.tokenize import TokenizedExample
from dpokit.logprobs import chunked_token_logps, packed_sequence_logps, sequence_logps
from dpokit.losses import sigmoid_loss
from dpokit.model import load_model


def _examples(
    rng: random.Random,
    n: int,
    k: int = 2,
    vocab: int = 300,
    short: bool = False,
    empty_last: bool = False,
    longest: tuple[int, int] = (20, 25),
) -> list[TokenizedExample]:
    """Random examples, prompts of BOS + 0..longest[0] tokens and completions of 1..longest[1]; `short`: length-1
    completions; `empty_last`: every other example's last completion has no token left (what truncation leaves when
    the prompt fills max_length)."""

    def ids(lo: int, hi: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi)))

    examples = []
    for i in range(n):
        completions = [ids(1, 1 if short else longest[1]) for _ in range(k)]
        if empty_last and i % 2 == 0:
            completions[-1] = ()
        examples.append(TokenizedExample((1, *ids(0, longest[0])), tuple(completions), f"ex:{i}"))
    return examples


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= rel * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize(
    ("n", "k", "capacity", "short", "empty_last"),
    [
        (7, 2, 0, False, False),
        (1, 2, 0, False, False),  # one pair per batch
        (6, 2, 0, True, False),  # length-1 completions
        (5, 2, 0, False, True),  # empty rejected completions
        (5, 3, 200, False, False),
        (8, 2, 512, False, False),
    ],
)
def test_packed_equals_padded(tiny_model, n: int, k: int, capacity: int, short: bool, empty_last: bool) -> None:
    model = load_model(str(tiny_model), attn_implementation="sdpa").float().train()
    torch.manual_seed(0)
    examples = _examples(random.Random(n * 31 + k), n, k, short=short, empty_last=empty_last)
    padded = collate(examples, range(n), pad_id=0)
    packed = pack(examples, range(n), pad_id=0, capacity=capacity)
    assert packed.num_tokens == sum(len(e.prompt_ids) + sum(map(len, e.completion_ids)) for e in examples)

    ref = sequence_logps(model, padded)
    fast = packed_sequence_logps(model, packed, chunk=16)
    assert torch.equal(ref.lengths, fast.lengths)
    assert bool((ref.lengths[:, -1] == 0).any()) == empty_last
    assert _close(fast.logps, ref.logps) and _close(fast.log1m, ref.log1m)

    reference = ref.logps.detach() + 0.3

    def loss_of(out):
        return sigmoid_loss(out.logps[:, 0], out.logps[:, 1], reference[:, 0], reference[:, 1], beta=0.5).losses.mean()

    grads_ref = _grads(model, loss_of(sequence_logps(model, padded)))
    grads_fast = _grads(model, loss_of(packed_sequence_logps(model, packed, chunk=16)))
    assert _close(loss_of(fast).detach(), loss_of(ref).detach())
    assert grads_ref.keys() == grads_fast.keys()
    for name in grads_ref:
        assert _close(grads_fast[name], grads_ref[name]), name


def test_packing_shares_prompts_and_isolates_completions() -> None:
    examples = [TokenizedExample((1, 5, 6), ((7, 8), (9,)), "a"), TokenizedExample((1, 4), ((3,), (3, 3, 3)), "b")]
    batch = pack(examples, [0, 1], pad_id=0, capacity=20)
    assert batch.input_ids.shape == (1, 12) and batch.num_tokens == 6 + 6  # as wide as the fullest row
    assert pack(examples, [0, 1], pad_id=0, capacity=20, multiple_of=8).input_ids.shape == (1, 16)
    row = batch.input_ids[0, :12].tolist()
    assert row == [1, 5, 6, 7, 8, 9, 1, 4, 3, 3, 3, 3]
    assert batch.position_ids[0, :12].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 4]
    mask = batch.dense_mask()[0, 0]
    # Built once per batch (policy and reference share it); a batch moved elsewhere builds its own there.
    assert batch.dense_mask() is batch.dense_mask() and not batch.to("cpu").masks
    assert mask[5, :6].tolist() == [True, True, True, False, False, True]  # rejected sees the prompt, not chosen
    assert not mask[6, :6].any()  # the second example sees nothing of the first
    # The first token of each completion is predicted from the last prompt token.
    assert batch.predictor.tolist()[:3] == [2, 3, 2] and batch.segment.tolist() == [0, 0, 1, 2, 3, 3, 3]


def test_first_fit_decreasing() -> None:
    bins = first_fit_decreasing([5, 4, 3, 2, 1], 6)
    assert sorted(sorted(b) for b in bins) == [[0, 4], [1, 3], [2]]


def test_chunked_logps_never_builds_full_logits() -> None:
    torch.manual_seed(0)
    hidden, head = torch.randn(50, 8, requires_grad=True), torch.nn.Linear(8, 40, bias=False)
    weight = head.weight
    targets = torch.randint(0, 40, (50,))
    full = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    chunked, _ = chunked_token_logps(hidden, head, targets, chunk=7)
    assert torch.allclose(full, chunked, atol=1e-6)
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    g_chunk = torch.autograd.grad(chunked_token_logps(hidden, head, targets, chunk=7)[0].sum(), (hidden, weight))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_full, g_chunk, strict=True))


@pytest.mark.parametrize(("n", "short", "empty_last"), [(7, False, False), (1, False, False), (6, True, True)])
def test_block_sparse_layout_gives_the_padded_logps(tiny_model, n: int, short: bool, empty_last: bool) -> None:
    """FlexAttention with the BlockMask, all examples in one row: the padded path's log-probs. Forward only: PyTorch
    has no FlexAttention backward on CPU (training with it is for GPUs; `train` refuses it on CPU)."""
    from dpokit.data.batching import FLEX_BLOCK

    examples = _examples(random.Random(n), n, short=short, empty_last=empty_last)
    plain = load_model(str(tiny_model), attn_implementation="sdpa").float().eval()
    flex = load_model(str(tiny_model), attn_implementation="flex_attention").float().eval()
    packed = pack(examples, range(n), pad_id=0, capacity=2**62, multiple_of=FLEX_BLOCK)
    assert packed.input_ids.shape[0] == 1 and packed.input_ids.shape[1] % FLEX_BLOCK == 0
    with torch.no_grad():
        ref = sequence_logps(plain, collate(examples, range(n), pad_id=0))
        fast = packed_sequence_logps(flex, packed, chunk=16)
    assert torch.equal(ref.lengths, fast.lengths)
    assert _close(fast.logps, ref.logps) and _close(fast.log1m, ref.log1m)
