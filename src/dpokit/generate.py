"""Sampling completions from a causal LM, batched without padding by grouping prompts of equal length."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    eos_id: int,
    seed: int,
    batch_size: int = 512,
) -> list[list[tuple[int, ...]]]:
    """`n` completions per prompt, sampled from the model's own distribution (temperature 1, no top-k or top-p,
    which is what a KL estimate on these samples assumes). Each completion ends at its first EOS (kept) or after
    `max_new_tokens`. Returns completions[prompt][sample]."""
    model.eval()
    device = next(model.parameters()).device
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    out: list[list[tuple[int, ...]]] = [[] for _ in prompts]
    per_batch = max(1, batch_size // n)
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), per_batch):
            chunk = indices[start : start + per_batch]
            input_ids = torch.tensor([prompts[i] for i in chunk], device=device).repeat_interleave(n, dim=0)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
            )[:, length:].tolist()
            for row, ids in enumerate(generated):
                if eos_id in ids:
                    ids = ids[: ids.index(eos_id) + 1]
                out[chunk[row // n]].append(tuple(ids))
    torch.set_rng_state(generator_state)
    return out
