"""`dpokit preview`: exactly which tokens are prompt and which are trained, with truncation and drop counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpokit.data.report import DataReport
from dpokit.data.tokenize import TokenizedExample

PROMPT, CHOSEN, REJECTED, RESET = "\033[2m", "\033[32m", "\033[31m", "\033[0m"


def show_tokens(tokenizer: Any, ids: Sequence[int], color: str, plain: bool) -> str:
    pieces = [repr(tokenizer.decode([i]))[1:-1] for i in ids]
    text = "|".join(pieces)
    return text if plain else f"{color}{text}{RESET}"


def histogram(lengths: Sequence[int], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of token lengths."""
    if not lengths:
        return ["(no examples)"]
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // step)] += 1
    top = max(counts)
    return [
        f"{low + i * step:>6}-{low + (i + 1) * step - 1:<6} {'#' * round(width * c / top):<{width}} {c}"
        for i, c in enumerate(counts)
    ]


def render(tokenizer: Any, examples: Sequence[TokenizedExample], report: DataReport, count: int, plain: bool) -> str:
    lines = []
    labels = ["chosen", "rejected"] + [f"completion {k}" for k in range(3, 100)]
    for example in examples[:count]:
        lines.append(f"=== {example.source}  prompt {len(example.prompt_ids)} tokens")
        lines.append(f"prompt (not trained): {show_tokens(tokenizer, example.prompt_ids, PROMPT, plain)}")
        for k, completion in enumerate(example.completion_ids):
            color = CHOSEN if k == 0 else REJECTED
            label = labels[k] if len(example.completion_ids) > 1 else "completion"
            lines.append(
                f"{label} (trained, {len(completion)} tokens): {show_tokens(tokenizer, completion, color, plain)}"
            )
    lines.append("=== counts")
    lines.extend(report.lines())
    lines.append("=== lengths (prompt + longest completion, tokens)")
    lines.extend(histogram([max(e.lengths) for e in examples]))
    return "\n".join(lines)
