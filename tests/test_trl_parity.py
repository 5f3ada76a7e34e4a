"""Parity with TRL 1.16's DPOTrainer on identical inputs (TRL is a test-only dependency).

A tiny Llama and a word-level tokenizer (every word one token, so both libraries see the same ids); the same
batch through both; the sigmoid-DPO loss and the per-sequence log-probs agree to 1e-5 in fp32.
"""

import pytest
import torch

trl = pytest.importorskip("trl")

from dpokit.data.collate import collate  # noqa: E402
from dpokit.data.formats import Record  # noqa: E402
from dpokit.data.pack import pack  # noqa: E402
from dpokit.data.report import DataReport  # noqa: E402
from dpokit.data.tokenize import tokenize_record  # noqa: E402
from dpokit.logprobs import packed_sequence_logps, sequence_logps  # noqa: E402
from dpokit.losses import sigmoid_loss  # noqa: E402

WORDS = "the a cat dog sat ran on mat rug fast slow why how is was good bad yes no maybe it".split()
ROWS = [
    {"prompt": "why is the cat on the mat", "chosen": " it sat on the mat", "rejected": " no"},
    {"prompt": "how was the dog", "chosen": " good dog ran fast", "rejected": " bad dog was slow yes"},
    {"prompt": "is it good", "chosen": " yes", "rejected": " maybe it is bad maybe"},
    {"prompt": "the rug", "chosen": " a cat sat on the rug", "rejected": " a dog"},
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def _model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).float().eval()


def test_sigmoid_loss_and_logps_match_trl(tmp_path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = _tokenizer()
    policy, reference = _model(tokenizer, 0), _model(tokenizer, 1)
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        beta=1.0,
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=None,
        dataset_num_proc=None,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )
    rows = [trainer.train_dataset[i] for i in range(len(ROWS))]
    inputs = trainer.data_collator(rows)
    with torch.no_grad():
        trl_policy_chosen, trl_policy_rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)

    # dpokit on the same rows, tokenized by dpokit: the ids must already agree.
    report = DataReport()
    examples = [
        tokenize_record(Record(r["prompt"], (r["chosen"], r["rejected"]), f"row:{i}"), tokenizer, 64, 32, report)
        for i, r in enumerate(ROWS)
    ]
    for ours, theirs in zip(examples, rows, strict=True):
        assert list(ours.prompt_ids) == theirs["prompt_ids"]
        assert [list(c) for c in ours.completion_ids] == [theirs["chosen_ids"], theirs["rejected_ids"]]
    batch = collate(examples, range(len(examples)), tokenizer.pad_token_id)
    with torch.no_grad():
        policy_logps = sequence_logps(trainer.model, batch).logps
        reference_logps = sequence_logps(reference, batch).logps
    out = sigmoid_loss(policy_logps[:, 0], policy_logps[:, 1], reference_logps[:, 0], reference_logps[:, 1], beta=1.0)

    # The packed prefix-shared layout agrees with TRL as well.
    with torch.no_grad():
        packed_logps = packed_sequence_logps(
            trainer.model, pack(examples, range(len(examples)), tokenizer.pad_token_id)
        ).logps
    assert torch.allclose(packed_logps[:, 0], trl_policy_chosen.float(), atol=1e-5, rtol=0)
    assert torch.allclose(packed_logps[:, 1], trl_policy_rejected.float(), atol=1e-5, rtol=0)
    assert torch.allclose(policy_logps[:, 0], trl_policy_chosen.float(), atol=1e-5, rtol=0)
    assert torch.allclose(policy_logps[:, 1], trl_policy_rejected.float(), atol=1e-5, rtol=0)
    assert out.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert (out.losses - 0.693147).abs().max() > 1e-2  # two different models: not the trivial ln 2
