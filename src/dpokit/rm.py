"""Bradley-Terry reward models (`dpokit rm`): a causal-LM backbone with a scalar head, trained by dpokit's training
loop with `loss.name=bradley_terry`, saved as a Hugging Face sequence-classification folder.

r(x, y) is the head's output at the response's last token before its final EOS. That is where
`AutoModelForSequenceClassification`'s own pooling (the rightmost token that is not the pad token) lands on
prompt + response without the final EOS, whether or not the tokenizer pads with EOS, so a saved reward model scores
the same in dpokit and in plain transformers. From Python: `train_reward_model(config)` (or `reward_config(...)` to
build the config), `load_reward_model(path)`, `score_texts(model, tokenizer, prompts, responses)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dpokit.config import DataConfig, RunConfig, apply_override, from_dict, load_raw
from dpokit.data.collate import Batch, collate
from dpokit.data.formats import Text
from dpokit.data.tokenize import TokenizedExample
from dpokit.logprobs import SequenceLogps
from dpokit.model import DTYPES, load_tokenizer, split_model_path

RM_SETTINGS = {"model": {"head": "score"}, "loss": {"name": "bradley_terry"}, "reference": {"mode": "none"}}


def reward_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A config file (or defaults) with what makes a run a reward-model run: model.head=score,
    loss.name=bradley_terry, reference.mode=none; then the overrides."""
    raw = load_raw(path)
    for section, values in RM_SETTINGS.items():
        raw.setdefault(section, {})
        raw[section] = (raw[section] or {}) | values
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw)


def train_reward_model(config: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train a reward model with dpokit's loop; the summary's `eval` holds the held-out pairwise accuracy
    (`eval/rewards/accuracies`) and mean margin (`eval/rewards/margins`). The model lands in
    `train.output_dir/final`."""
    from dpokit.train import train

    if config.model.head != "score":
        raise ValueError("train_reward_model needs a reward-model config (see reward_config)")
    return train(config, resume, overwrite)


def load_reward_model(path: str, dtype: str = "fp32", attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """A reward model and its tokenizer. A sequence-classification folder (one label) loads as it is; a causal LM
    (folder or .gguf) gets a new scalar head on its backbone, initialised at zero so that every first score is 0."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dpokit.model import load_model

    tokenizer = load_tokenizer(path)
    folder, gguf = split_model_path(path)
    architectures = [] if gguf else (AutoConfig.from_pretrained(folder).architectures or [])
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "attn_implementation": attn_implementation}
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    else:
        causal = load_model(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
        config = causal.config
        config.num_labels = 1
        config.architectures = None
        model = AutoModelForSequenceClassification.from_config(config, **kwargs)
        missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
        if [k for k in missing if not k.startswith("score.")]:
            raise ValueError(f"{path}: backbone weights missing from the reward model: {missing[:5]}")
        torch.nn.init.zeros_(model.score.weight)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def sequence_scores(model: Any, batch: Batch) -> torch.Tensor:
    """(B, K) rewards of a right-padded batch (rows b·K + k), in fp32: the head at each row's last token, or the
    token before it when that is the completion's final EOS."""
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (B·K, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = batch.attention_mask.sum(dim=1) - 1
    completion = batch.completion_mask.sum(dim=1)
    ends_in_eos = (batch.input_ids[rows, last] == model.config.eos_token_id) & (completion > 1)
    scores = model.score(hidden[rows, last - ends_in_eos.long()]).float()  # (B·K, 1)
    return scores.view(batch.num_examples, batch.num_completions)


def reward_logps(model: Any, batch: Any, chunk: int = 0) -> SequenceLogps:
    """The training loop's view of a reward model: rewards where a policy's summed log-probs go."""
    if not isinstance(batch, Batch):
        raise ValueError("reward models train on padded batches (train.layout=padded)")
    scores = sequence_scores(model, batch)
    lengths = batch.completion_mask.sum(dim=1).view_as(scores)
    return SequenceLogps(scores, lengths, torch.zeros_like(scores))


@torch.no_grad()
def score_examples(model: Any, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int = 16) -> list[float]:
    """r(x, y) of each single-completion example."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        scores += sequence_scores(model, collate(chunk, range(len(chunk)), pad_id).to(device))[:, 0].tolist()
    return scores


def score_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Text],
    responses: Sequence[str],
    data: DataConfig | None = None,
    batch_size: int = 16,
) -> list[float]:
    """r(x, y) of each (prompt, response), tokenized as training tokenized its rows (`data` settings: chat,
    lengths; by default those saved with a dpokit reward model are not known here, so pass them)."""
    from dpokit.eval.judges import render

    data = data or DataConfig()
    pairs = zip(prompts, responses, strict=True)
    examples = [render(tokenizer, data, p, r, f"response {i}") for i, (p, r) in enumerate(pairs)]
    return score_examples(model, examples, tokenizer.pad_token_id, batch_size)
