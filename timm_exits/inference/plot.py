"""Accuracy against cost: anytime points per exit and budgeted curves, as a PNG."""
from __future__ import annotations

import os
from typing import Dict, Sequence, Tuple

__all__ = ["plot_accuracy_vs_cost"]

Curve = Sequence[Tuple[float, float]]  # (cost, accuracy) points


def plot_accuracy_vs_cost(path: str, anytime: Dict[str, Curve], budgeted: Dict[str, Curve],
                          cost_label: str = "MACs per image", title: str = "") -> None:
    """Write a PNG (atomically) with one marker series per anytime set and one line per budgeted curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, points in budgeted.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "-", label=f"{label} (budgeted)")
    for label, points in anytime.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o--", label=f"{label} (each exit)")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
