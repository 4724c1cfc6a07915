"""Exit policies: how confident is exit k about a sample? Higher scores exit earlier.

* ``maxprob`` (default, the MSDNet reference): the largest softmax probability.
* ``entropy``: one minus the softmax entropy normalised by ``log(classes)``.
* ``patience`` (PABEE-style): how many consecutive exits up to k agree with exit k's prediction.

A policy scores one exit from its probabilities and a small per-sample history, so the same code
serves cached evaluation (all exits at once) and the early-exit executor (one exit at a time).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["POLICIES", "exit_scores", "score_step"]

POLICIES = ("maxprob", "entropy", "patience")

History = Optional[Tuple[torch.Tensor, torch.Tensor]]  # (previous prediction, agreement count)


def score_step(policy: str, probs: torch.Tensor, history: History = None) -> Tuple[torch.Tensor, History]:
    """Scores of one exit for ``probs`` (samples x classes) and the history to pass to the next."""
    if policy == "maxprob":
        return probs.max(-1).values, None
    if policy == "entropy":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return 1 - entropy / math.log(probs.shape[-1]), None
    if policy == "patience":
        pred = probs.argmax(-1)
        count = torch.ones_like(pred) if history is None else torch.where(pred == history[0], history[1] + 1, 1)
        return count.float(), (pred, count)
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def exit_scores(probs: torch.Tensor, policy: str = "maxprob") -> torch.Tensor:
    """Scores of every exit (exits x samples) from cached probabilities (exits x samples x classes)."""
    scores, history = [], None
    for p in probs:
        s, history = score_step(policy, p, history)
        scores.append(s)
    return torch.stack(scores)
