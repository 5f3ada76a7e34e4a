"""Sampling completions from a causal LM.

`generate` is the engine: prompts of any lengths in batches, left-padded, with a KV cache, each row stopping at EOS
or after `max_new_tokens`. Every row draws its tokens from its own random generator, seeded from (seed, row key), so
a completion depends on its prompt, key and seed only: not on which other rows share its batch, the batch size, the
number of processes or an earlier interrupted run. `sample` is the older grouped-by-length sampler the sentiment
experiment uses (temperature 1, one global generator).
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    """Softmax temperature; 0 picks the likeliest token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    max_new_tokens: int = 128
    """Completion tokens at most (EOS included)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one row from the run's seed and the row's key (e.g. `id/sample`)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1


def next_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: greedy at temperature 0, else top-p sampling, row i from generators[i]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens likelier than it already reach top_p (the likeliest always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask with each prompt pushed to the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p))
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[str],
    sampling: Sampling,
    eos_id: int,
    pad_id: int,
    seed: int,
) -> list[tuple[int, ...]]:
    """One batch: prefill the left-padded prompts, then decode a token per step through the KV cache until every
    row has produced EOS (kept) or `max_new_tokens`."""
    device = next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(row_seed(seed, k)) for k in keys]
    input_ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    # transformers 5 names the cache argument `cache`, 4.x `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens = []
    position = positions[:, -1:]
    for _ in range(sampling.max_new_tokens):
        token = next_tokens(logits, sampling, generators).masked_fill(done, pad_id)
        tokens.append(token)
        done |= token == eos_id
        if bool(done.all()) or len(tokens) == sampling.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True, **{cache_arg: cache}
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
    rows = torch.stack(tokens, dim=1).tolist()
    completions = []
    for row in rows:
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        completions.append(tuple(row[:end]))
    return completions


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[str],
    sampling: Sampling,
    eos_id: int,
    pad_id: int,
    seed: int,
    batch_size: int = 16,
    on_batch: Callable[[list[int], list[tuple[int, ...]]], None] | None = None,
    progress: Any = None,
) -> list[tuple[int, ...]]:
    """A completion for each prompt (rows sharing a prompt need distinct keys). Rows are batched by prompt length
    to keep padding low; `on_batch(indices, completions)` is called after each batch (to write results as they come)
    and `progress` (a tqdm bar) is advanced by rows and shows tokens per second."""
    if len(keys) != len(prompts) or len(set(keys)) != len(keys):
        raise ValueError("generate needs one distinct key per prompt")
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[tuple[int, ...]] = [() for _ in prompts]
    started, new_tokens = time.perf_counter(), 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        completions = generate_batch(
            model, [prompts[i] for i in chunk], [keys[i] for i in chunk], sampling, eos_id, pad_id, seed
        )
        for i, c in zip(chunk, completions, strict=True):
            results[i] = c
        if on_batch is not None:
            on_batch(chunk, completions)
        new_tokens += sum(len(c) for c in completions)
        if progress is not None:
            progress.update(len(chunk))
            progress.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
    return results


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
                use_cache=True,  # whatever the model's config says (a training checkpoint's may say false)
            )[:, length:].tolist()
            for row, ids in enumerate(generated):
                if eos_id in ids:
                    ids = ids[: ids.index(eos_id) + 1]
                out[chunk[row // n]].append(tuple(ids))
    torch.set_rng_state(generator_state)
    return out
