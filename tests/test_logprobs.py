"""The one concatenated, padded forward gives each sequence the log-prob it has when run alone."""

import torch

from dpokit.data.collate import collate
from dpokit.data.tokenize import TokenizedExample
from dpokit.logprobs import sequence_logps
from dpokit.model import load_model


def test_padded_batch_equals_sequences_run_alone(tiny_model) -> None:
    model = load_model(str(tiny_model)).eval()
    examples = [
        TokenizedExample((1, 50, 60), ((70, 80, 2), (90, 2)), "a"),
        TokenizedExample((1, 51, 61, 71, 81, 91), ((100,), (101, 102, 103, 104, 2)), "b"),
    ]
    batch = collate(examples, [0, 1], pad_id=0)
    with torch.no_grad():
        logps, lengths, log1m = sequence_logps(model, batch)
    assert lengths.tolist() == [[3, 2], [1, 5]]
    for b, example in enumerate(examples):
        for k, completion in enumerate(example.completion_ids):
            ids = torch.tensor([example.prompt_ids + completion])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            token_lp = torch.stack([lp[len(example.prompt_ids) + t - 1, tok] for t, tok in enumerate(completion)])
            assert torch.allclose(logps[b, k].double(), token_lp.sum(), atol=1e-4), (b, k)
            assert torch.allclose(log1m[b, k].double(), torch.log1p(-token_lp.exp()).sum(), atol=1e-4), (b, k)
