"""Exit policies: when does a sample leave, and where do the samples go that no exit accepts?

An :class:`ExitPolicy` has three parts:

* a **score** of how confident exit k is about a sample (higher exits earlier):

  * ``maxprob`` (default, the MSDNet reference): the largest softmax probability;
  * ``entropy``: one minus the softmax entropy normalised by ``log(classes)``;
  * ``margin``: the largest minus the second largest softmax probability;
  * ``patience`` (PABEE-style): how many consecutive exits up to k agree with exit k's prediction
    (1 at the first exit, reset to 1 when the prediction changes);
  * ``gate`` (learned, JEI-DNN's): exit k's gate probability ``sigmoid(w_k . f + b_k)`` over four
    confidence features f of its probabilities (:mod:`timm_exits.models.gates`), with the policy's
    ``params`` holding ``w_k`` and ``b_k`` of exits 0..K-2 (the last exit has no gate and scores 1);

* a **comparison** with the threshold: ``score >= threshold`` (MSDNet, the default) or, with
  ``strict``, ``score > threshold`` (ZTW, RC-EENN; ZTW's patience rule is ``count > t``);

* a **fallback** for the samples that exits 0..K-2 do not accept (the last exit's threshold is
  never used): ``last`` (MSDNet) answers them with the last exit; ``most_confident`` (SDN) with the
  exit of highest *score* over all K exits (the policy's own score: the max-softmax for
  ``maxprob``, as in SDN; the earliest such exit on ties). With one global threshold this is SDN's
  rule "the first exit above q, else the most confident of all outputs".

A policy scores one exit from its probabilities, the exit's index and a small per-sample history, so
the same code serves cached evaluation (all exits at once) and the early-exit executor (one exit at a
time). A learned score carries its parameters in the policy (``params``, a few numbers per exit),
which a thresholds file and an export's manifest keep. A policy name (``"maxprob"``) is shorthand
for ``ExitPolicy("maxprob")``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from ..models.gates import GATE_FEATURES, gate_scores

__all__ = ["POLICIES", "SCORES", "LEARNED_SCORES", "FALLBACKS", "ExitPolicy", "PolicyLike", "resolve_policy",
           "exit_scores", "score_step"]

SCORES = ("maxprob", "entropy", "margin", "patience")
POLICIES = SCORES  # the names accepted wherever a policy is named alone (a learned score needs its params)
LEARNED_SCORES = ("gate",)  # scores with per-exit parameters (ExitPolicy.params)
FALLBACKS = ("last", "most_confident")
Params = Optional[Tuple[Tuple[float, ...], ...]]  # a learned score's numbers, one row per exit it scores

History = Optional[Tuple[torch.Tensor, torch.Tensor]]  # (previous prediction, agreement count)


def score_step(policy: str, probs: torch.Tensor, history: History = None, index: int = 0,
               params: Params = None) -> Tuple[torch.Tensor, History]:
    """Scores of one exit for ``probs`` (samples x classes) and the history to pass to the next.

    Args:
        policy: the score's name, one of ``SCORES`` or ``LEARNED_SCORES``.
        probs: one exit's probabilities, ``(samples, classes)``.
        history: what the previous exit's step returned; ``None`` at the first exit.
        index: the exit scored (0-based), which a learned score picks its parameters by.
        params: a learned score's parameters, one row per exit it scores.

    Returns:
        ``(scores, history)``: a score per sample, ``(samples,)``, and the history for the next exit
        (``None`` but for ``patience``: the previous prediction and the agreement count).
    """
    if policy == "gate":
        if params is None:
            raise ValueError("the gate score needs the gates' parameters: ExitPolicy('gate', params=...)")
        if index >= len(params):  # the last exit has no gate: everyone left leaves
            return torch.ones(probs.shape[0], dtype=torch.float64, device=probs.device), None
        return gate_scores(probs, params[index]), None
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
    raise ValueError(f"policy must be one of {SCORES + LEARNED_SCORES}, got {policy!r}")


def _rows(params: Sequence[Sequence[float]]) -> Tuple[Tuple[float, ...], ...]:
    """``params`` as a tuple of tuples of finite floats (hashable, as a frozen policy is)."""
    try:
        rows = tuple(tuple(float(v) for v in row) for row in params)
    except (TypeError, ValueError):
        raise ValueError(f"params must be one row of numbers per exit, got {params!r}") from None
    if not rows or any(not row for row in rows) or not all(math.isfinite(v) for row in rows for v in row):
        raise ValueError(f"params must be one non-empty row of finite numbers per exit, got {params!r}")
    return rows


@dataclass(frozen=True)
class ExitPolicy:
    """A score, a fallback rule and a comparison (see the module docstring).

    Args:
        score: how confident an exit is, one of ``SCORES`` or ``LEARNED_SCORES``.
        fallback: where the samples no exit accepts go, one of ``FALLBACKS``.
        strict: compare ``score > threshold`` instead of ``>=``.
        params: a learned score's parameters, one row of numbers per exit it scores (for ``gate``:
            exits 0..K-2, each 4 weights and a bias); ``None`` for the other scores.
    """

    score: str = "maxprob"
    fallback: str = "last"
    strict: bool = False
    params: Params = None

    def __post_init__(self):
        if self.score not in SCORES + LEARNED_SCORES:
            raise ValueError(f"policy must be one of {SCORES + LEARNED_SCORES}, got {self.score!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False, got {self.strict!r}")
        if (self.params is None) != (self.score not in LEARNED_SCORES):
            raise ValueError(f"the {self.score!r} score takes " + ("its parameters (params=...)"
                             if self.score in LEARNED_SCORES else "no params"))
        if self.params is not None:
            object.__setattr__(self, "params", _rows(self.params))
            if any(len(row) != len(GATE_FEATURES) + 1 for row in self.params):
                raise ValueError(f"each gate has {len(GATE_FEATURES)} weights and a bias, got rows of "
                                 f"{sorted({len(row) for row in self.params})} numbers")
            if self.fallback == "most_confident":
                raise ValueError(f"the {self.score!r} score has no gate at the last exit to compare: use fallback='last'")

    def check_exits(self, num_exits: int) -> None:
        """Refuse a learned score whose parameters are for another number of exits.

        Args:
            num_exits: the model's exits (a gate per exit but the last).
        """
        if self.params is not None and len(self.params) != num_exits - 1:
            raise ValueError(f"the {self.score!r} policy has parameters for {len(self.params)} gates; a model with "
                             f"{num_exits} exits has {num_exits - 1} (one per exit but the last)")

    def step(self, probs: torch.Tensor, history: History = None, index: int = 0) -> Tuple[torch.Tensor, History]:
        """Scores of one exit (samples) and the history for the next exit.

        Args:
            probs: one exit's probabilities, ``(samples, classes)``.
            history: what the previous exit's step returned; ``None`` at the first exit.
            index: the exit (0-based); a learned score reads its parameters by it.

        Returns:
            ``(scores, history)``, as :func:`score_step`.
        """
        return score_step(self.score, probs, history, index, self.params)

    def scores(self, probs: torch.Tensor) -> torch.Tensor:
        """Scores of every exit (exits x samples) from probabilities (exits x samples x classes)."""
        self.check_exits(probs.shape[0])
        scores, history = [], None
        for k, p in enumerate(probs):
            s, history = self.step(p, history, k)
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
        """The policy as plain values (``params`` as lists, and only for a learned score)."""
        out = asdict(self)
        if self.params is None:
            del out["params"]
        else:
            out["params"] = [list(row) for row in self.params]
        return out


PolicyLike = Union[str, ExitPolicy]


def resolve_policy(policy: PolicyLike, model: Optional[object] = None) -> ExitPolicy:
    """An :class:`ExitPolicy` from itself or from a score name (the MSDNet rule: ``>=``, fallback
    to the last exit).

    Args:
        policy: an :class:`ExitPolicy`, or a score name of ``SCORES`` or ``LEARNED_SCORES``.
        model: for a learned score named alone, the model that carries its parameters: its
            ``policy_params(score)`` gives them (e.g. a ``jei_gates`` model's gates).

    Returns:
        The policy.
    """
    if isinstance(policy, ExitPolicy):
        return policy
    if not isinstance(policy, str):
        raise ValueError(f"policy must be an ExitPolicy or one of {SCORES + LEARNED_SCORES}, got {policy!r}")
    if policy in LEARNED_SCORES:
        carried = getattr(model, "policy_params", None)
        if carried is None:
            raise ValueError(f"the {policy!r} score is learned: give ExitPolicy({policy!r}, params=...) with its "
                             f"parameters, or evaluate a model that carries them (e.g. a jei_gates model)")
        return ExitPolicy(policy, params=carried(policy))
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
