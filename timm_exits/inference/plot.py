"""Accuracy against cost: anytime points per exit and budgeted curves, as a PNG."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

from ..files import atomic_file

__all__ = ["plot_accuracy_vs_cost"]

Curve = Sequence[Tuple[float, float]]  # (cost, accuracy) points


def plot_accuracy_vs_cost(path: str, anytime: Dict[str, Curve], budgeted: Dict[str, Curve],
                          cost_label: str = "MACs per image", title: str = "") -> None:
    """Write a PNG (atomically): per name, its budgeted curve as a line and its exits as markers,
    in one colour per name. Drawn on a :class:`matplotlib.figure.Figure` of its own: pyplot's state and
    the process's backend are left alone.

    Args:
        path: the PNG file to write.
        anytime: per name, the ``(cost, accuracy)`` point of each exit, in exit order.
        budgeted: per name, the ``(cost, accuracy)`` points of its budgeted curve (sorted by cost
            when drawn).
        cost_label: the cost axis label.
        title: the plot's title; empty for none.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 5.0), dpi=120)
    ax = fig.subplots()
    for i, name in enumerate(dict.fromkeys([*budgeted, *anytime])):
        colour = f"C{i % 10}"
        if name in budgeted:
            xs, ys = zip(*sorted(budgeted[name]))
            ax.plot(xs, ys, "-", color=colour, label=name)
        if name in anytime:
            xs, ys = zip(*anytime[name])
            ax.plot(xs, ys, "o:", color=colour, label=None if name in budgeted else name)
    ax.plot([], [], "k-", label="line: budgeted")
    ax.plot([], [], "ko:", label="markers: each exit")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
