"""Exit policies: when does a sample leave, and where do the samples go that no exit accepts?

An :class:`ExitPolicy` has three parts:

* a **score** of how confident exit k is about a sample (higher exits earlier):

  * ``maxprob`` (default, the MSDNet reference): the largest softmax probability;
  * ``entropy``: one minus the softmax entropy normalised by ``log(classes)``;
  * ``margin``: the largest minus the second largest softmax probability;
  * ``patience`` (PABEE-style): how many consecutive exits up to k agree with exit k's prediction
    (1 at the first exit, reset to 1 when the prediction changes);

* a **comparison** with the threshold: ``score >= threshold`` (MSDNet, the default) or, with
  ``strict``, ``score > threshold`` (ZTW, RC-EENN; ZTW's patience rule is ``count > t``);

* a **fallback** for the samples that exits 0..K-2 do not accept (the last exit's threshold is
  never used): ``last`` (MSDNet) answers them with the last exit; ``most_confident`` (SDN) with the
  exit of highest *score* over all K exits (the policy's own score: the max-softmax for
  ``maxprob``, as in SDN; the earliest such exit on ties). With one global threshold this is SDN's
  rule "the first exit above q, else the most confident of all outputs".

A policy scores one exit from its probabilities and a small per-sample history, so the same code
serves cached evaluation (all exits at once) and the early-exit executor (one exit at a time).
A policy name (``"maxprob"``) is shorthand for ``ExitPolicy("maxprob")``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple, Union

import torch

__all__ = ["POLICIES", "SCORES", "FALLBACKS", "ExitPolicy", "PolicyLike", "resolve_policy", "exit_scores",
           "score_step"]

SCORES = ("maxprob", "entropy", "margin", "patience")
POLICIES = SCORES  # the names accepted wherever a policy is
FALLBACKS = ("last", "most_confident")

History = Optional[Tuple[torch.Tensor, torch.Tensor]]  # (previous prediction, agreement count)


def score_step(policy: str, probs: torch.Tensor, history: History = None) -> Tuple[torch.Tensor, History]:
    """Scores of one exit for ``probs`` (samples x classes) and the history to pass to the next.

    Args:
        policy: the score's name, one of ``SCORES``.
        probs: one exit's probabilities, ``(samples, classes)``.
        history: what the previous exit's step returned; ``None`` at the first exit.

    Returns:
        ``(scores, history)``: a score per sample, ``(samples,)``, and the history for the next exit
        (``None`` but for ``patience``: the previous prediction and the agreement count).
    """
    if policy == "maxprob":
        return probs.max(-1).values, None
    if policy == "entropy":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return 1 - entropy / math.log(probs.shape[-1]), None
    if policy == "margin":
        if probs.shape[-1] < 2:
            raise ValueError("the margin score needs at least 2 classes")
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1], None
    if policy == "patience":
        pred = probs.argmax(-1)
        count = torch.ones_like(pred) if history is None else torch.where(pred == history[0], history[1] + 1, 1)
        return count.float(), (pred, count)
    raise ValueError(f"policy must be one of {SCORES}, got {policy!r}")


@dataclass(frozen=True)
class ExitPolicy:
    """A score, a fallback rule and a comparison (see the module docstring).

    Args:
        score: how confident an exit is, one of ``SCORES``.
        fallback: where the samples no exit accepts go, one of ``FALLBACKS``.
        strict: compare ``score > threshold`` instead of ``>=``.
    """

    score: str = "maxprob"
    fallback: str = "last"
    strict: bool = False

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"policy must be one of {SCORES}, got {self.score!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False, got {self.strict!r}")

    def step(self, probs: torch.Tensor, history: History = None) -> Tuple[torch.Tensor, History]:
        """Scores of one exit (samples) and the history for the next exit.

        Args:
            probs: one exit's probabilities, ``(samples, classes)``.
            history: what the previous exit's step returned; ``None`` at the first exit.

        Returns:
            ``(scores, history)``, as :func:`score_step`.
        """
        return score_step(self.score, probs, history)

    def scores(self, probs: torch.Tensor) -> torch.Tensor:
        """Scores of every exit (exits x samples) from probabilities (exits x samples x classes)."""
        scores, history = [], None
        for p in probs:
            s, history = self.step(p, history)
            scores.append(s)
        return torch.stack(scores)

    def accepts(self, scores: torch.Tensor, threshold: Union[float, torch.Tensor]) -> torch.Tensor:
        """Which samples leave at an exit with this threshold (compared in float64, as thresholds are
        stored; in float32 on Apple's MPS, which has no float64).

        Args:
            scores: the exit's scores, ``(samples,)`` (or stacked exits with a threshold per row).
            threshold: the exit's threshold, a number or a tensor that broadcasts against ``scores``.

        Returns:
            A boolean tensor of the shape of ``scores``: True where the sample leaves.
        """
        scores = scores.float() if scores.device.type == "mps" else scores.double()
        return scores > threshold if self.strict else scores >= threshold

    def assign(self, scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Exit (0-based) of every sample from all exits' ``scores`` (exits x samples): the first of
        exits 0..K-2 that accepts it, else the fallback.

        Args:
            scores: the score of every exit and sample, ``(exits, samples)``.
            thresholds: one per exit (the last is not used).

        Returns:
            The exit of every sample, ``(samples,)`` long.
        """
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=scores.device).view(-1, 1)
        if thresholds.shape[0] != scores.shape[0]:
            raise ValueError(f"{thresholds.shape[0]} thresholds for {scores.shape[0]} exits")
        if scores.shape[0] == 1:
            return torch.zeros(scores.shape[1], dtype=torch.long, device=scores.device)
        accepted = self.accepts(scores.double()[:-1], thresholds[:-1])
        fallback = (scores.double().argmax(0) if self.fallback == "most_confident"
                    else torch.full_like(scores[0], scores.shape[0] - 1, dtype=torch.long))
        return torch.where(accepted.any(0), accepted.int().argmax(0), fallback)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


PolicyLike = Union[str, ExitPolicy]


def resolve_policy(policy: PolicyLike) -> ExitPolicy:
    """An :class:`ExitPolicy` from itself or from a score name (the MSDNet rule: ``>=``, fallback
    to the last exit)."""
    if isinstance(policy, ExitPolicy):
        return policy
    if not isinstance(policy, str):
        raise ValueError(f"policy must be an ExitPolicy or one of {SCORES}, got {policy!r}")
    return ExitPolicy(policy)


def exit_scores(probs: torch.Tensor, policy: PolicyLike = "maxprob") -> torch.Tensor:
    """Scores of every exit (exits x samples) from cached probabilities (exits x samples x classes).

    Args:
        probs: every exit's probabilities, ``(exits, samples, classes)``.
        policy: an :class:`ExitPolicy` or a score name.

    Returns:
        The scores, ``(exits, samples)``.
    """
    return resolve_policy(policy).scores(probs)
