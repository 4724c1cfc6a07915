"""The evaluation report shared by ``timm-exits evaluate`` and the training recipes: anytime
accuracy per exit, the budgeted curve, printed tables, a JSON file and a PNG plot."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Dict, Optional, Sequence

from ..files import write_json
from .budgeted import REFERENCE_Q, budgeted_curve
from .outputs import ExitOutputs, anytime_accuracy
from .plot import plot_accuracy_vs_cost

__all__ = ["evaluation_report", "format_report", "write_report"]


def evaluation_report(
        val: Optional[ExitOutputs],
        test: ExitOutputs,
        costs: Sequence[float],
        policy: str = "maxprob",
        q_grid: Sequence[float] = REFERENCE_Q,
        **info: Any,
) -> Dict[str, Any]:
    """Anytime top-1 / top-5 (and the ensemble) per exit on ``test``; the budgeted curve with
    thresholds fitted on ``val`` (skipped without a validation split). ``info`` is stored as is."""
    top = anytime_accuracy(test)
    ensemble = anytime_accuracy(test, topk=(1,), ensemble=True)["top1"]
    exits = [{"exit": k + 1, "cost": float(c), "top1": top["top1"][k], "top5": top["top5"][k], "ensemble_top1": ensemble[k]}
             for k, c in enumerate(costs)]
    report = {**info, "policy": policy, "test_samples": test.num_samples, "exits": exits}
    if val is not None:
        report["val_samples"] = val.num_samples
        report["budgeted"] = [asdict(p) for p in budgeted_curve(val, test, costs, q_grid, policy)]
    return report


def format_report(report: Dict[str, Any], cost_unit: str = "MMACs", scale: float = 1e-6) -> str:
    """The report as two text tables."""
    lines = [f"{'exit':>4}  {cost_unit:>10}  {'top-1':>6}  {'top-5':>6}  {'ensemble':>8}"]
    for e in report["exits"]:
        lines.append(f"{e['exit']:>4}  {e['cost'] * scale:>10.2f}  {e['top1']:>6.2f}  {e['top5']:>6.2f}  "
                     f"{e['ensemble_top1']:>8.2f}")
    if "budgeted" in report:
        lines += ["", f"budgeted ({report['policy']}): thresholds on {report['val_samples']} validation images, "
                      f"{report['test_samples']} test images",
                  f"{'q':>5}  {cost_unit:>10}  {'top-1':>6}  exit fractions"]
        for p in report["budgeted"]:
            fractions = " ".join(f"{f:.2f}" for f in p["exit_fractions"])
            lines.append(f"{p['q']:>5.2f}  {p['cost'] * scale:>10.2f}  {p['accuracy']:>6.2f}  {fractions}")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], folder: str, name: str = "evaluation", label: str = "model",
                 cost_label: str = "MMACs per image", cost_scale: float = 1e-6) -> Dict[str, str]:
    """Write ``<name>.json`` and ``<name>.png`` into ``folder`` (atomically); returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, f"{name}.json"), "png": os.path.join(folder, f"{name}.png")}
    write_json(paths["json"], report)
    anytime = {label: [(e["cost"] * cost_scale, e["top1"]) for e in report["exits"]]}
    budgeted = {label: [(p["cost"] * cost_scale, p["accuracy"]) for p in report["budgeted"]]} if "budgeted" in report else {}
    plot_accuracy_vs_cost(paths["png"], anytime, budgeted, cost_label=cost_label, title=str(report.get("model", "")))
    return paths
