"""Calibrated exits on a finished run of the CIFAR-10 study: the plain exits, MIE, last-layer Laplace
and Laplace + MIE, each evaluated on the run's own test split.

The Laplace factors are fitted on the run's training images (not augmented), var0 and the
temperature of each exit, and the budgeted thresholds, on its validation split (the reference's
grids and protocol; Laplace + MIE chooses each exit's setting on MIE's NLL, as the reference does).
Per predictor it writes every exit's top-1, NLL and ECE, and the best budgeted top-1 at an average
cost within 25 % and 50 % of the last exit's:

    python benchmarks/calibrated_exits.py --run output/cifar10_study/baseline \
        --data-dir ../shared/datasets/cifar10-jpeg [--output calibrated_exits.json]
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.engine import Splits  # the run's own splits, seeded as in training
from timm_exits.files import write_json
from timm_exits.inference import evaluate
from timm_exits.inference.calibrated import fit_laplace, mie_model
from timm_exits.model_folder import load_model_folder
from timm_exits.models import MIEModel

PREDICTORS = ("exits", "mie", "laplace", "laplace+mie")
BUDGETS = (0.25, 0.5)  # fractions of the last exit's cost


def best_within(curve: Sequence[Dict[str, Any]], budget: float) -> Optional[float]:
    """The best budgeted top-1 (%) at an average cost within ``budget`` (None if no point is).

    Args:
        curve: the report's ``budgeted`` points (``cost``, ``accuracy``).
        budget: the largest average cost per image.

    Returns:
        The accuracy, or None.
    """
    inside = [p["accuracy"] for p in curve if p["cost"] <= budget]
    return max(inside) if inside else None


def calibrated_rows(network: nn.Module, train: Iterable, val: Iterable, test: Iterable,
                    input_size: Sequence[int], progress: bool = True) -> Dict[str, Dict[str, Any]]:
    """Every predictor's per-exit top-1, NLL and ECE and its budgeted top-1 within :data:`BUDGETS`.

    Args:
        network: the trained multi-exit network, in eval mode.
        train: the loader the Laplace factors are fitted on.
        val: the loader var0, the temperatures and the budgeted thresholds are fitted on.
        test: the loader everything is reported on.
        input_size: (C, H, W) the costs are profiled at.
        progress: show progress bars.

    Returns:
        ``{predictor: {"top1": [...], "nll": [...], "ece": [...], "costs": [...], "budgeted_top1": {...}}}``.
    """
    mie = mie_model(network, input_size)
    laplace = fit_laplace(network, train, val, progress=progress)
    laplace_mie = fit_laplace(network, train, val, mie_costs=mie.weights, progress=progress)
    models = {"exits": network, "mie": mie, "laplace": laplace, "laplace+mie": MIEModel(laplace_mie, mie.weights)}
    settings = {"laplace": laplace.settings, "laplace+mie": laplace_mie.settings}
    rows = {}
    for name in PREDICTORS:
        report = evaluate(models[name], test, val, input_size=input_size, calibration=True, q_grid="reference",
                          progress=progress)
        full = report["exits"][-1]["cost"]
        rows[name] = {"top1": [e["top1"] for e in report["exits"]],
                      "nll": [e["nll"] for e in report["calibration"]["exits"]],
                      "ece": [e["ece"] for e in report["calibration"]["exits"]],
                      "costs": [e["cost"] for e in report["exits"]],
                      "budgeted_top1": {f"{share:.0%}": best_within(report["budgeted"], share * full)
                                        for share in BUDGETS},
                      **({"laplace_settings": settings[name]} if name in settings else {})}
    return rows


def table(rows: Dict[str, Dict[str, Any]]) -> str:
    """The rows as a markdown table.

    Args:
        rows: :func:`calibrated_rows`'s result.

    Returns:
        The table.
    """
    fmt = lambda values, spec: " / ".join(format(v, spec) for v in values)  # noqa: E731
    lines = ["| predictor | top-1 per exit | NLL per exit | ECE per exit | " +
             " | ".join(f"budgeted top-1 <= {share:.0%}" for share in BUDGETS) + " |",
             "|---|---|---|---|" + "---|" * len(BUDGETS)]
    for name, row in rows.items():
        budgeted = " | ".join("-" if v is None else f"{v:.2f}" for v in row["budgeted_top1"].values())
        lines.append(f"| {name} | {fmt(row['top1'], '.2f')} | {fmt(row['nll'], '.3f')} | {fmt(row['ece'], '.3f')} | "
                     f"{budgeted} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run folder of the study (e.g. its baseline)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output", default=None, help="the JSON file (default: calibrated_exits.json in the run)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    config = json.load(open(os.path.join(args.run, "run.json")))["config"]
    config["data"]["dir"] = args.data_dir
    data = Splits(config, Accelerator(cpu=True))
    network, _ = load_model_folder(args.run)
    data_config = data.set_transforms(config, network.eval())
    if data.val is None:
        raise ValueError(f"the run in {args.run} has no validation split: Laplace's settings and the budgeted "
                         f"thresholds are fitted on one")
    loader = lambda dataset: DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)  # noqa: E731
    rows = calibrated_rows(network, loader(Subset(data.held_out_files, data.train.indices)), loader(data.val),
                           loader(data.test), data_config["input_size"], progress=not args.no_progress)
    write_json(args.output or os.path.join(args.run, "calibrated_exits.json"), rows)
    print(table(rows))


if __name__ == "__main__":
    main()
