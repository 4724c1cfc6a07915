"""Calibration of every exit and of the prediction a policy actually returns.

* ECE: 15 equal-width confidence bins (lo, hi] over [0, 1] (boundaries ``torch.linspace(0, 1, 16)``
  in float32, as Guo et al.); confidence is the max softmax probability; the sum over bins of
  (samples in the bin / samples) x |accuracy - mean confidence|, as a fraction (0..1).
* NLL: mean negative log-likelihood of the label (nats), from the logits (outputs given as
  probabilities: from those probabilities).
* Brier: mean over samples of sum over classes of (p_c - 1[c = label])^2 (0..2).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .outputs import ExitOutputs
from .policies import PolicyLike, resolve_policy

__all__ = ["ECE_BINS", "expected_calibration_error", "calibration_metrics", "exit_calibration", "curve_calibration"]

ECE_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE of ``probs`` (samples x classes) with ``bins`` equal-width bins (lo, hi].

    Args:
        probs: probabilities, ``(samples, classes)``; the confidence is their maximum.
        labels: the class index of each sample, ``(samples,)``.
        bins: the number of equal-width confidence bins over [0, 1], >= 1.

    Returns:
        The ECE as a fraction (0..1).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence, pred = probs.max(-1)
    correct = (pred == labels).double()
    # bucketize (right=False) gives i with boundaries[i-1] < c <= boundaries[i]; c = 0 joins the first bin
    which = (torch.bucketize(confidence, torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)) - 1).clamp(0, bins - 1)
    ece = 0.0
    for b in which.unique().tolist():
        in_bin = which == b
        ece += in_bin.double().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].double().mean().item())
    return ece


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> Dict[str, float]:
    """``{"ece", "nll", "brier"}`` of ``logits`` (samples x classes) against ``labels``.

    Args:
        logits: raw logits, ``(samples, classes)``.
        labels: the class index of each sample, ``(samples,)``.
        bins: the number of ECE bins.

    Returns:
        ``{"ece": ..., "nll": ..., "brier": ...}`` (see the module docstring for the units).
    """
    logits = logits.float()
    return _metrics(logits.softmax(-1), logits.double().log_softmax(-1), labels, bins)


def _metrics(probs: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor, bins: int) -> Dict[str, float]:
    """ECE, NLL and Brier from probabilities and log-probabilities (samples x classes)."""
    brier = (probs - F.one_hot(labels, probs.shape[-1]).to(probs.dtype)).pow(2).sum(-1).double().mean().item()
    return {"ece": expected_calibration_error(probs, labels, bins), "nll": F.nll_loss(log_probs, labels).item(),
            "brier": brier}


def _taken(outputs: ExitOutputs, exits: torch.Tensor, bins: int) -> Dict[str, float]:
    """Calibration of the output of exit ``exits[i]`` for every sample i: from the logits, or from the
    probabilities as given (NLL: minus their logarithm)."""
    samples = torch.arange(outputs.num_samples)
    if outputs.logits is not None:
        return calibration_metrics(outputs.logits[exits, samples], outputs.labels, bins)
    probs = outputs.probs[exits, samples]
    return _metrics(probs, probs.double().log(), outputs.labels, bins)


def exit_calibration(outputs: ExitOutputs, bins: int = ECE_BINS) -> List[Dict[str, float]]:
    """Calibration of every exit on all samples.

    Args:
        outputs: every exit's outputs and the labels.
        bins: the number of ECE bins.

    Returns:
        One ``{"ece", "nll", "brier"}`` mapping per exit.
    """
    return [_taken(outputs, torch.full((outputs.num_samples,), k), bins) for k in range(outputs.num_exits)]


def curve_calibration(
        outputs: ExitOutputs,
        thresholds: Sequence[Sequence[float]],
        policy: PolicyLike = "maxprob",
        bins: int = ECE_BINS,
) -> List[Dict[str, float]]:
    """Calibration of the exited prediction (the logits of the exit each sample takes) at each
    operating point.

    Args:
        outputs: every exit's outputs and the labels.
        thresholds: the per-exit thresholds of each operating point (a budgeted point's
            ``thresholds``, or a sweep's global threshold repeated for every exit).
        policy: an :class:`~timm_exits.inference.policies.ExitPolicy` or a score name.
        bins: the number of ECE bins.

    Returns:
        One ``{"ece", "nll", "brier"}`` mapping per operating point.
    """
    policy = resolve_policy(policy)
    scores = policy.scores(outputs.probs)
    return [_taken(outputs, policy.assign(scores, torch.tensor(t, dtype=torch.float64)), bins) for t in thresholds]
