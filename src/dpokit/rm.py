"""Bradley-Terry reward models: a causal-LM backbone with a scalar head (a Hugging Face sequence-classification
model), scored at the last token of prompt + response.

r(x, y) is the head's output at the response's last token. The response's final EOS is left out of the scored
sequence, so that the score sits where `AutoModelForSequenceClassification`'s own pooling (the rightmost token that
is not the pad token) puts it, whether or not the tokenizer pads with EOS: a saved reward model scores the same in
dpokit and in plain transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dpokit.data.collate import Batch, collate
from dpokit.data.tokenize import TokenizedExample
from dpokit.model import DTYPES, load_tokenizer, split_model_path


def without_final_eos(example: TokenizedExample, eos_id: int) -> TokenizedExample:
    completions = tuple(c[:-1] if len(c) > 1 and c[-1] == eos_id else c for c in example.completion_ids)
    return TokenizedExample(example.prompt_ids, completions, example.source)


def load_reward_model(path: str, dtype: str = "fp32") -> tuple[Any, Any]:
    """A reward model and its tokenizer. A sequence-classification folder (one label) loads as it is; a causal LM
    (folder or .gguf) gets a new scalar head on its backbone, initialised at zero so that every first score is 0."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dpokit.model import load_model

    tokenizer = load_tokenizer(path)
    folder, gguf = split_model_path(path)
    architectures = [] if gguf else (AutoConfig.from_pretrained(folder).architectures or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=DTYPES[dtype])
    else:
        causal = load_model(path, dtype=DTYPES[dtype])
        config = causal.config
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[dtype])
        missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
        if [k for k in missing if not k.startswith("score.")]:
            raise ValueError(f"{path}: backbone weights missing from the reward model: {missing[:5]}")
        torch.nn.init.zeros_(model.score.weight)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def sequence_scores(model: Any, batch: Batch) -> torch.Tensor:
    """(B, K) rewards of a right-padded batch (rows b·K + k), in fp32."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits[:, 0].float().view(batch.num_examples, batch.num_completions)


@torch.no_grad()
def score_examples(
    model: Any, examples: Sequence[TokenizedExample], pad_id: int, eos_id: int, batch_size: int = 16
) -> list[float]:
    """r(x, y) of each single-completion example."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(examples), batch_size):
        chunk = [without_final_eos(e, eos_id) for e in examples[i : i + batch_size]]
        batch = collate(chunk, range(len(chunk)), pad_id).to(device)
        scores += sequence_scores(model, batch)[:, 0].tolist()
    return scores
