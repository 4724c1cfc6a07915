"""One evaluation of a multi-exit model, written once: the outputs of every exit on a test (and a
validation) loader, the cumulative cost per exit, the report
(:func:`~timm_exits.inference.report.evaluation_report`) and, given a folder, its files.
``timm-exits evaluate``, the training engine's evaluation of every phase and the benchmarks all call
:func:`evaluate`; the caller builds the loaders (its data, its split, its transforms)."""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..profile import profile_exits
from .budgeted import Thresholds, thresholds_for_accuracy, thresholds_for_cost
from .executor import weights_sha256
from .outputs import collect_outputs, predictor_of
from .policies import PolicyLike, resolve_policy
from .report import EvaluationReport, evaluation_report, write_report

__all__ = ["THRESHOLDS_FILE", "evaluate"]

THRESHOLDS_FILE = "thresholds.json"  # written next to evaluation.json for a target cost or accuracy
# the protocol options evaluate() passes on: evaluation_report's, but for the policy and the outputs
_PROTOCOLS = tuple(name for name, p in inspect.signature(evaluation_report).parameters.items()
                   if p.default is not p.empty and name != "policy")


def evaluate(
        model: nn.Module,
        test: Iterable,
        val: Optional[Iterable] = None,
        *,
        input_size: Sequence[int],
        convention: str = "macs",
        policy: PolicyLike = "maxprob",
        target_cost: Optional[float] = None,
        target_accuracy: Optional[float] = None,
        profiled: Optional[nn.Module] = None,
        output_dir: Optional[str] = None,
        label: Optional[str] = None,
        device: Optional[torch.device] = None,
        gather: Optional[Callable] = None,
        progress: bool = False,
        info: Optional[Mapping[str, Any]] = None,
        **protocols: Any,
) -> EvaluationReport:
    """Evaluate ``model`` on the batches ``(images, labels)`` of ``test``, the budgeted thresholds
    fitted on those of ``val`` (None: no budgeted curve).

    With ``output_dir``, ``evaluation.json`` and ``evaluation.png`` are written there, and for a
    target cost or accuracy the thresholds fitted on ``val`` as ``thresholds.json`` (load it with
    :meth:`Thresholds.load` for the :class:`~timm_exits.inference.executor.EarlyExitExecutor`).

    Args:
        model: the multi-exit model to evaluate.
        test: the test loader, batches of ``(images, labels)``.
        val: the loader the budgeted thresholds are fitted on; ``None``: no budgeted curve.
        input_size: (C, H, W) the costs are measured at.
        convention: how the costs are counted, one of ``timm_exits.profile.CONVENTIONS``.
        policy: an :class:`~timm_exits.inference.policies.ExitPolicy` or a score name, used by every
            protocol; a learned score named alone (``"gate"``) takes its parameters from ``model``.
        target_cost: fit thresholds on ``val`` for this average cost per image and write
            ``thresholds.json`` (needs ``val`` and ``output_dir``; not with ``target_accuracy``).
        target_accuracy: the same for this validation top-1 (%).
        profiled: the model whose costs are measured (default: ``model``; give the model as built
            when ``model`` is its fused form, whose operators some conventions count differently).
        output_dir: the folder the files are written to; ``None`` writes nothing.
        label: the model's name in the plot and in ``thresholds.json`` (default ``info["model"]``,
            else the model's class name).
        device: where the model runs (default: the model's device).
        gather: collects every process's samples (e.g. ``accelerator.gather_for_metrics``).
        progress: show a progress bar.
        info: what was evaluated (model name, data, ...), first in the report as given;
            ``convention`` is always recorded.
        **protocols: the options of :func:`~timm_exits.inference.report.evaluation_report`
            (``q_grid``: a grid or its name, ``"reference"`` / ``"imta"``; ``fit_split``: what ``val``
            is, recorded; ``envelope``, ``sweep``, ``patience``, ``calibration``,
            ``cost_fractions``); another option is a TypeError.

    Returns:
        The report (:class:`~timm_exits.inference.report.EvaluationReport`).
    """
    unknown = sorted(set(protocols) - set(_PROTOCOLS))
    if unknown:
        raise TypeError(f"evaluate() got unknown protocol options {unknown}: expected some of {_PROTOCOLS}")
    info = dict(info or {})
    label = label or str(info.get("model", type(model).__name__))
    if target_cost is not None or target_accuracy is not None:
        if target_cost is not None and target_accuracy is not None:
            raise ValueError("give target_cost or target_accuracy, not both")
        if val is None or output_dir is None:
            raise ValueError("target_cost / target_accuracy fit thresholds on the validation outputs and write "
                             "thresholds.json: give val (a validation split) and output_dir")
    policy = resolve_policy(policy, model)

    def outputs(loader: Optional[Iterable]):
        return None if loader is None else collect_outputs(model, loader, device, gather, progress)

    val_outputs, test_outputs = outputs(val), outputs(test)
    input_size = [int(s) for s in input_size]
    costs = [c.macs for c in profile_exits(profiled or model, input_size=input_size, convention=convention)]
    report = evaluation_report(val_outputs, test_outputs, costs, policy, **protocols,
                               **{**info, "convention": convention})
    if output_dir is None:
        return report
    write_report(report, output_dir, label=label, cost_label=f"M{convention} per image")
    if target_cost is not None or target_accuracy is not None:
        point = (thresholds_for_cost(val_outputs, costs, target_cost, policy) if target_cost is not None
                 else thresholds_for_accuracy(val_outputs, costs, target_accuracy, policy))
        Thresholds(label, model.num_exits, policy, point.thresholds, costs,
                   note=f"validation: top-1 {point.val_accuracy:.2f}%, {point.val_cost:.4g} per image",
                   input_size=input_size, predictor=predictor_of(model),
                   weights=weights_sha256(model)).save(os.path.join(output_dir, THRESHOLDS_FILE))
    return report
