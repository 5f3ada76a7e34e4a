"""Tokenized examples -> a padded batch of B·K sequences (prompt + completion), completions in rank order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dpokit.data.report import DataError
from dpokit.data.tokenize import TokenizedExample


@dataclass
class Batch:
    input_ids: Tensor
    """(B·K, T) prompt + completion ids, right-padded; row b·K + k is completion k of example b."""
    attention_mask: Tensor
    """(B·K, T) 1 on real tokens."""
    completion_mask: Tensor
    """(B·K, T) 1 where the token is a completion token (scored by the logits of the position before)."""
    indices: Tensor
    """(B,) positions of the examples in their data set (for precomputed reference log-probs)."""
    num_completions: int
    num_completion_tokens: int
    """Completion tokens in the batch (counted when it is built, so that reading it never waits for a device)."""
    num_tokens: int
    """Real (non-pad) tokens."""

    @property
    def num_examples(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.indices,
            self.num_completions,
            self.num_completion_tokens,
            self.num_tokens,
        )


def check_same_completions(examples: Sequence[TokenizedExample]) -> int:
    """K, the number of completions every example of a batch has (rankings of one length)."""
    k = len(examples[0].completion_ids)
    for e in examples:
        if len(e.completion_ids) != k:
            raise DataError(
                f"{e.source} has {len(e.completion_ids)} completions and {examples[0].source} has {k}: every "
                "ranking of a data set needs the same number of responses"
            )
    return k


def collate(examples: Sequence[TokenizedExample], indices: Sequence[int], pad_id: int) -> Batch:
    k = check_same_completions(examples)
    rows = [(e.prompt_ids, c) for e in examples for c in e.completion_ids]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        completion_mask[i, len(prompt) : n] = 1
    tokens = (int(completion_mask.sum()), int(attention_mask.sum()))
    return Batch(input_ids, attention_mask, completion_mask, torch.tensor(list(indices)), k, *tokens)
