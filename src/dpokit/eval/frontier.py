"""The reward/KL frontier (DPO paper, Sec. 6.1, Fig. 2): mean reward of a policy's samples against the
sequence-level KL(π ‖ π_ref), estimated on the policy's own samples as mean_y Σ_t [log π(y_t|·) − log π_ref(y_t|·)]."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpokit.data.collate import collate
from dpokit.data.tokenize import TokenizedExample
from dpokit.generate import sample
from dpokit.logprobs import sequence_logps


@torch.no_grad()
def completion_logps(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """log π(completion | prompt) for each pair, summed over the completion's tokens."""
    examples = [TokenizedExample(tuple(p), (tuple(c),), "") for p, c in zip(prompts, completions, strict=True)]
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], range(i, min(i + batch_size, len(examples))), pad_id).to(device)
        out.append(sequence_logps(model, batch).logps[:, 0].cpu())
    return torch.cat(out)


def evaluate_policy(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    reward: Callable[[list[str]], Any],
    samples_per_prompt: int,
    max_new_tokens: int,
    seed: int,
) -> dict[str, float]:
    """Mean reward and KL(π ‖ π_ref) of the policy's samples on `prompts`."""
    samples = sample(policy, prompts, samples_per_prompt, max_new_tokens, tokenizer.eos_token_id, seed)
    flat_prompts = [p for p, group in zip(prompts, samples, strict=True) for _ in group]
    flat = [c for group in samples for c in group]
    texts = [
        tokenizer.decode(list(p) + list(c), skip_special_tokens=True) for p, c in zip(flat_prompts, flat, strict=True)
    ]
    pad = tokenizer.pad_token_id
    kl = completion_logps(policy, flat_prompts, flat, pad) - completion_logps(reference, flat_prompts, flat, pad)
    rewards = torch.as_tensor(reward(texts), dtype=torch.float64)
    return {
        "reward": float(rewards.mean()),
        "reward_se": float(rewards.std() / math.sqrt(len(flat))),
        "kl": float(kl.mean()),
        "samples": len(flat),
    }


def best_of_n(rewards: torch.Tensor, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Best-of-N from (prompts, N_max) rewards of reference samples: the mean best reward among the first N, with
    the analytic KL of the best-of-N policy, log N − (N − 1)/N (Stiennon et al. 2020; Beirami et al. 2024)."""
    points = []
    for n in sizes:
        best = rewards[:, :n].max(dim=1).values.double()
        points.append(
            {
                "setting": f"N={n}",
                "reward": float(best.mean()),
                "reward_se": float(best.std() / math.sqrt(len(best))),
                "kl": math.log(n) - (n - 1) / n,
            }
        )
    return points


METHOD_STYLE = {
    "DPO": ("tab:red", "o"),
    "Preferred-FT": ("tab:blue", "s"),
    "Unlikelihood": ("tab:green", "^"),
    "Best-of-N": ("tab:purple", "D"),
    "SFT": ("black", "*"),
    "PPO": ("tab:orange", "v"),
    "PPO-GT": ("tab:brown", "P"),
}


def upper_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with less or equal KL, by increasing KL."""
    frontier: list[tuple[float, float]] = []
    for kl, reward in sorted(points):
        if not frontier or reward > frontier[-1][1]:
            frontier.append((kl, reward))
    return frontier


def dominance(
    results: Sequence[dict[str, Any]],
    method: str = "DPO",
    baselines: Sequence[str] = ("Preferred-FT", "Unlikelihood", "SFT"),
) -> list[dict[str, Any]]:
    """For each baseline point: DPO's best reward at that KL or less, and whether it is at least the baseline's."""
    dpo = [(r["kl"], r["reward"]) for r in results if r["method"] == method]
    verdicts = []
    for r in results:
        if r["method"] not in baselines:
            continue
        within = [reward for kl, reward in dpo if kl <= max(r["kl"], 0.0) + 1e-9]
        best = max(within) if within else None
        se = r.get("reward_se", 0.0)
        verdicts.append(
            {
                "method": r["method"],
                "setting": r["setting"],
                "step": r["step"],
                "seed": r["seed"],
                "kl": r["kl"],
                "reward": r["reward"],
                "dpo_best": best,
                "dominated": None if best is None else best >= r["reward"],
                "within_noise": None if best is None else best >= r["reward"] - 2 * se,
            }
        )
    return verdicts


KL_EDGES = (0.0, 2.0, 5.0, 10.0, 20.0, math.inf)
"""Edges of the KL ranges of `compare_by_kl` (nats per sample)."""


def compare_by_kl(
    results: Sequence[dict[str, Any]], first: str, second: str, edges: Sequence[float] = KL_EDGES
) -> list[dict[str, Any]]:
    """Who is ahead in each KL range [lo, hi): each method's best reward among its points in the range, per seed,
    then the mean over the seeds both methods have a point for, with the standard error of each mean from the
    points' own standard errors (evaluation noise; seed-to-seed spread shows in the per-seed values). `ahead` names
    the method whose mean is higher by more than two standard errors of the difference, else "neither"; None when a
    method has no point in the range for any seed."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        best: dict[str, dict[int, dict[str, Any]]] = {first: {}, second: {}}
        for r in results:
            if r["method"] in best and lo <= r["kl"] < hi:
                current = best[r["method"]].get(r["seed"])
                if current is None or r["reward"] > current["reward"]:
                    best[r["method"]][r["seed"]] = r
        seeds = sorted(set(best[first]) & set(best[second]))
        row: dict[str, Any] = {"kl_low": lo, "kl_high": hi, "seeds": seeds, "ahead": None}
        for name in (first, second):
            points = [best[name][seed] for seed in seeds]
            row[name] = [p["reward"] for p in points]
            row[f"{name}_mean"] = sum(row[name]) / len(points) if points else None
            row[f"{name}_se"] = (
                math.sqrt(sum(p.get("reward_se", 0.0) ** 2 for p in points)) / len(points) if points else None
            )
        if seeds:
            gap = row[f"{first}_mean"] - row[f"{second}_mean"]
            se = math.hypot(row[f"{first}_se"], row[f"{second}_se"])
            row |= {"gap": gap, "gap_se": se}
            row["ahead"] = first if gap > 2 * se else second if gap < -2 * se else "neither"
        rows.append(row)
    return rows


def plot_frontier(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    methods = [m for m in METHOD_STYLE if any(r["method"] == m for r in results)]
    for method in methods:
        color, marker = METHOD_STYLE[method]
        points = [(r["kl"], r["reward"]) for r in results if r["method"] == method]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        size = 90 if method == "SFT" else 36
        ax.scatter(
            xs,
            ys,
            c=color,
            marker=marker,
            s=size,
            alpha=0.8,
            label=method,
            edgecolors="white",
            linewidths=0.5,
            zorder=3,
        )
        if method in ("DPO", "Best-of-N", "PPO", "PPO-GT"):
            frontier = upper_frontier(points)
            ax.plot([p[0] for p in frontier], [p[1] for p in frontier], c=color, alpha=0.6, lw=1.5, zorder=2)
    ax.set_xlabel("KL(π ‖ π_ref)  (nats per sample, estimated on policy samples)")
    ax.set_ylabel("mean reward  (classifier p(positive))")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_xlim(left=min(-0.5, min(r["kl"] for r in results) - 0.5))
    ax.legend(loc="lower right", frameon=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
