"""Win-rate plots: against sampling temperature with 95% interval bars (the DPO paper's Fig. 3, left), and over
training steps (Fig. 3, right)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = {
    "DPO vs chosen": ("tab:red", "o"),
    "Preferred-FT vs chosen": ("tab:blue", "s"),
    "DPO vs Preferred-FT": ("tab:purple", "D"),
}


def _axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5), dpi=130)


def _errorbar(ax: Any, rows: Sequence[dict[str, Any]], x: str, label: str, offset: float) -> None:
    color, marker = STYLE.get(label, ("black", "^"))
    xs = [r[x] + offset for r in rows]
    ys = [r["win_rate"] for r in rows]
    err = [[r["win_rate"] - r["ci_low"] for r in rows], [r["ci_high"] - r["win_rate"] for r in rows]]
    ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, capsize=3, lw=1.5, label=label)


def judge_label(judge: str) -> str:
    return "reward model (dpokit rm)" if judge.startswith("rm:") else judge


def plot_vs_temperature(results: Sequence[dict[str, Any]], judge: str, path: Path, title: str) -> None:
    """One line per comparison: win rate against temperature, bars at the bootstrap 95% interval."""
    fig, ax = _axes()
    comparisons = [c for c in STYLE if any(r["comparison"] == c for r in results)]
    for i, comparison in enumerate(comparisons):
        rows = sorted(
            (r for r in results if r["comparison"] == comparison and r["judge"] == judge and r["step"] is None),
            key=lambda r: r["temperature"],
        )
        _errorbar(ax, rows, "temperature", comparison, 0.008 * (i - 1))
    _finish(fig, ax, "sampling temperature", f"win rate  ({judge_label(judge)})", title, path)


def plot_over_steps(results: Sequence[dict[str, Any]], judge: str, path: Path, title: str) -> None:
    """DPO's win rate against the chosen responses at each saved step, one line per temperature."""
    import matplotlib

    fig, ax = _axes()
    rows = [r for r in results if r["judge"] == judge and r["comparison"] == "DPO vs chosen" and r["step"] is not None]
    temperatures = sorted({r["temperature"] for r in rows})
    colors = matplotlib.colormaps["viridis"]
    for i, t in enumerate(temperatures):
        line = sorted((r for r in rows if r["temperature"] == t), key=lambda r: r["step"])
        xs, ys = [r["step"] for r in line], [r["win_rate"] for r in line]
        err = [[r["win_rate"] - r["ci_low"] for r in line], [r["ci_high"] - r["win_rate"] for r in line]]
        color = colors(i / max(1, len(temperatures) - 1))
        ax.errorbar(xs, ys, yerr=err, color=color, marker="o", capsize=3, label=f"temperature {t}")
    _finish(fig, ax, "DPO training step (0: Preferred-FT)", f"win rate vs chosen  ({judge_label(judge)})", title, path)


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """What both win-rate plots share: the 50% line, labels, a 0-1 axis, grid and legend; then the file."""
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
