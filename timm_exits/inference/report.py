"""The evaluation report shared by ``timm-exits evaluate`` and the training recipes: anytime
accuracy per exit, the budgeted curve, on request the threshold and patience sweeps with their
cost tables and calibration; printed tables, a JSON file and a PNG plot. The report records the
protocol variant: the exit policy, the q grid and the split the thresholds were fitted on."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, TypedDict, Union

from ..files import write_json
from .budgeted import Q_GRIDS, REFERENCE_Q, budgeted_curve
from .calibration import ECE_BINS, curve_calibration, exit_calibration
from .outputs import ExitOutputs, anytime_accuracy
from .plot import plot_accuracy_vs_cost
from .policies import PolicyLike, resolve_policy
from .protocols import COST_FRACTIONS, SWEEP_GRIDS, accuracy_at_cost, patience_policy, patience_sweep, threshold_sweep

__all__ = ["ExitRow", "EvaluationReport", "evaluation_report", "format_report", "format_latency", "report_paths",
           "write_report"]


class ExitRow(TypedDict):
    """One exit's line of a report: its cumulative cost, top-1 / top-5 (%) and the running-average ensemble's top-1."""

    exit: int
    cost: float
    top1: float
    top5: float
    ensemble_top1: float


class EvaluationReport(TypedDict, total=False):
    """An evaluation as ``evaluation.json`` (and each phase of a run's ``results.json``) stores it.
    First what was evaluated, as the caller recorded it (``model``, ``convention``, ... : those of
    ``timm-exits evaluate`` and of a training phase are listed), then the protocols' results: always
    ``policy``, ``exit_policy``, ``test_samples`` and ``exits``; with a validation split ``val_samples``,
    ``budgeted_protocol`` and ``budgeted``; on request ``threshold_sweep``, ``patience_sweep``,
    ``calibration``; ``latency`` is added by ``timm-exits evaluate --latency``."""

    model: str
    predictor: str
    fused: bool
    source: str
    checkpoint: Optional[str]
    phase: str
    data_dir: str
    val_dir: Optional[str]
    val_fraction: Optional[float]
    seed: int
    test_split: Optional[str]
    convention: str
    data_config: Dict[str, Any]
    epochs: int
    technique: Dict[str, Any]
    policy: str
    exit_policy: Dict[str, Any]
    test_samples: int
    exits: List[ExitRow]
    val_samples: int
    budgeted_protocol: Dict[str, Any]
    budgeted: List[Dict[str, Any]]
    threshold_sweep: Dict[str, Any]
    patience_sweep: Dict[str, Any]
    calibration: Dict[str, Any]
    latency: Dict[str, Any]


def evaluation_report(
        val: Optional[ExitOutputs],
        test: ExitOutputs,
        costs: Sequence[float],
        policy: PolicyLike = "maxprob",
        q_grid: Union[str, Sequence[float]] = REFERENCE_Q,
        *,
        fit_split: str = "validation",
        envelope: bool = False,
        sweep: Optional[str] = None,
        patience: bool = False,
        calibration: bool = False,
        cost_fractions: Sequence[float] = COST_FRACTIONS,
        **info: Any,
) -> EvaluationReport:
    """Anytime top-1 / top-5 (and the ensemble) per exit on ``test``; the budgeted curve with
    thresholds fitted on ``val``. On request: the global-threshold sweep, the patience sweep, each
    with its accuracy at fractions of the last exit's cost, and calibration per exit and at every
    operating point.

    Args:
        val: the outputs the budgeted thresholds are fitted on; ``None`` skips the budgeted curve.
        test: the outputs every protocol is measured on.
        costs: the cumulative cost of each exit.
        policy: an :class:`~timm_exits.inference.policies.ExitPolicy` or a score name, used by every
            protocol (the patience sweep: its fallback).
        q_grid: the budgeted curve's q values, or a grid's name in ``Q_GRIDS``.
        fit_split: a free-text description of what ``val`` is, recorded in the report.
        envelope: make the budgeted curve validation-monotone (:func:`.flat_envelope`).
        sweep: add the global-threshold sweep over ``SWEEP_GRIDS[sweep]`` (``"ztw"`` or ``"sdn"``).
        patience: add the patience sweep.
        calibration: add ECE, NLL and Brier per exit and at every operating point.
        cost_fractions: the fractions of the last exit's cost the sweeps' accuracy is read at.
        **info: what was evaluated, stored first in the report as is.

    Returns:
        The report.
    """
    exit_policy = resolve_policy(policy)
    if sweep is not None and sweep not in SWEEP_GRIDS:
        raise ValueError(f"sweep grid must be one of {tuple(SWEEP_GRIDS)}, got {sweep!r}")
    if isinstance(q_grid, str):
        if q_grid not in Q_GRIDS:
            raise ValueError(f"q grid must be one of {tuple(Q_GRIDS)} or a list of q values, got {q_grid!r}")
        q_grid = Q_GRIDS[q_grid]
    top = anytime_accuracy(test)
    ensemble = anytime_accuracy(test, topk=(1,), ensemble=True)["top1"]
    exits = [{"exit": k + 1, "cost": float(c), "top1": top["top1"][k], "top5": top["top5"][k], "ensemble_top1": ensemble[k]}
             for k, c in enumerate(costs)]
    report = {**info, "policy": exit_policy.score, "exit_policy": exit_policy.as_dict(), "test_samples": test.num_samples,
              "exits": exits}
    curves: Dict[str, List[List[float]]] = {}  # operating points (per-exit thresholds) for calibration
    if val is not None:
        report["val_samples"] = val.num_samples
        grid_name = next((name for name, grid in Q_GRIDS.items() if list(q_grid) == grid), "custom")
        report["budgeted_protocol"] = {"q_grid": grid_name, "q": [float(q) for q in q_grid], "fit_split": fit_split,
                                       "fit_samples": val.num_samples, "envelope": envelope}
        points = budgeted_curve(val, test, costs, q_grid, exit_policy, envelope)
        report["budgeted"] = [asdict(p) for p in points]
        curves["budgeted"] = [p.thresholds for p in points]
    num_exits, full_cost = test.num_exits, float(costs[-1])

    def swept(points, **protocol) -> Dict[str, Any]:
        return {**protocol, "points": [asdict(p) for p in points],
                "cost_table": accuracy_at_cost(points, full_cost, cost_fractions),
                "cost_table_ztw": accuracy_at_cost(points, full_cost, cost_fractions, rule="ztw")}

    if sweep is not None:
        points = threshold_sweep(test, costs, SWEEP_GRIDS[sweep], exit_policy)
        report["threshold_sweep"] = swept(points, grid=sweep, exit_policy=exit_policy.as_dict())
        curves["threshold_sweep"] = [[p.threshold] * num_exits for p in points]
    if patience:
        points = patience_sweep(test, costs, exit_policy.fallback)
        report["patience_sweep"] = swept(points, rule="exit when the consecutive agreeing exits are > t, t = 0..K-1",
                                         fallback=exit_policy.fallback)
        curves["patience_sweep"] = [[p.threshold] * num_exits for p in points]
    if calibration:
        report["calibration"] = {"ece_bins": ECE_BINS, "exits": exit_calibration(test)}
        for name, thresholds in curves.items():
            used = patience_policy(exit_policy.fallback) if name == "patience_sweep" else exit_policy
            report["calibration"][name] = curve_calibration(test, thresholds, used)
    return report


def format_report(report: EvaluationReport, cost_unit: str = "MMACs", scale: float = 1e-6) -> str:
    """The report as text tables.

    Args:
        report: a report from :func:`evaluation_report`.
        cost_unit: the cost column's heading.
        scale: the factor the costs are shown multiplied by (1e-6: MACs shown as MMACs).

    Returns:
        The tables, one line per row.
    """
    lines = [f"{'exit':>4}  {cost_unit:>10}  {'top-1':>6}  {'top-5':>6}  {'ensemble':>8}"]
    for e in report["exits"]:
        lines.append(f"{e['exit']:>4}  {e['cost'] * scale:>10.2f}  {e['top1']:>6.2f}  {e['top5']:>6.2f}  "
                     f"{e['ensemble_top1']:>8.2f}")
    if "budgeted" in report:
        lines += ["", f"budgeted ({_policy_label(report)}): thresholds on {report['val_samples']} validation images, "
                      f"{report['test_samples']} test images",
                  f"{'q':>5}  {cost_unit:>10}  {'top-1':>6}  exit fractions"]
        for p in report["budgeted"]:
            fractions = " ".join(f"{f:.2f}" for f in p["exit_fractions"])
            lines.append(f"{p['q']:>5.2f}  {p['cost'] * scale:>10.2f}  {p['accuracy']:>6.2f}  {fractions}")
    for key, title in (("threshold_sweep", "threshold sweep"), ("patience_sweep", "patience sweep")):
        if key in report:
            lines += ["", _cost_table(f"{title} ({len(report[key]['points'])} points)", report[key]["cost_table"])]
    if "calibration" in report:
        lines += ["", f"calibration per exit (ECE with {report['calibration']['ece_bins']} bins, NLL, Brier)",
                  f"{'exit':>4}  {'ECE':>6}  {'NLL':>7}  {'Brier':>6}"]
        for k, c in enumerate(report["calibration"]["exits"]):
            lines.append(f"{k + 1:>4}  {c['ece']:>6.4f}  {c['nll']:>7.4f}  {c['brier']:>6.4f}")
    if "latency" in report:
        lines += ["", format_latency(report["latency"])]
    return "\n".join(lines)


def _policy_label(report: Dict[str, Any]) -> str:
    """The score name, plus the fallback and comparison when they are not MSDNet's."""
    policy = report.get("exit_policy", {})
    extra = ([f"fallback {policy['fallback']}"] if policy.get("fallback", "last") != "last" else []) + \
        (["strict >"] if policy.get("strict") else [])
    return ", ".join([report["policy"], *extra])


def format_latency(latency: Dict[str, Any]) -> str:
    """One line: batch-1 p50 / p95 and the batched throughput of the executor."""
    return (f"early-exit latency on {latency['device']} ({latency['threads']} threads, {latency['images']} images): "
            f"batch 1 p50 {latency['batch1_p50_ms']:.2f} ms, p95 {latency['batch1_p95_ms']:.2f} ms; "
            f"batch {latency['batch_size']}: {latency['throughput']:.1f} images/s")


def _cost_table(title: str, table: Dict[str, Any]) -> str:
    """One line per cost fraction: the best accuracy within it ('-': no point is)."""
    cells = [f"<={100 * f:g}%: {'-' if a is None else f'{a:.2f}'}" for f, a in zip(table["fractions"], table["accuracy"])]
    return f"{title}, top-1 within a fraction of the full cost: " + ", ".join(cells) + f", max: {table['max_accuracy']:.2f}"


def report_paths(folder: str, name: str = "evaluation") -> Dict[str, str]:
    """Where :func:`write_report` puts a report: ``{"json": <folder>/<name>.json, "png": <folder>/<name>.png}``.

    Args:
        folder: the folder the files go to.
        name: the files' name, without extension.

    Returns:
        The two paths, by kind.
    """
    return {"json": os.path.join(folder, f"{name}.json"), "png": os.path.join(folder, f"{name}.png")}


def write_report(report: EvaluationReport, folder: str, name: str = "evaluation", label: str = "model",
                 cost_label: str = "MMACs per image", cost_scale: float = 1e-6) -> Dict[str, str]:
    """Write ``<name>.json`` and ``<name>.png`` into ``folder`` (atomically).

    Args:
        report: a report from :func:`evaluation_report`.
        folder: the folder to write to, created if missing.
        name: the files' name, without extension.
        label: the model's name in the plot's legend.
        cost_label: the plot's cost axis label.
        cost_scale: the factor the costs are plotted multiplied by.

    Returns:
        The paths written, as :func:`report_paths` gives them.
    """
    os.makedirs(folder, exist_ok=True)
    paths = report_paths(folder, name)
    write_json(paths["json"], report)
    anytime = {label: [(e["cost"] * cost_scale, e["top1"]) for e in report["exits"]]}
    budgeted = {label: [(p["cost"] * cost_scale, p["accuracy"]) for p in report["budgeted"]]} if "budgeted" in report else {}
    plot_accuracy_vs_cost(paths["png"], anytime, budgeted, cost_label=cost_label, title=str(report.get("model", "")))
    return paths
