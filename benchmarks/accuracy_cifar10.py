"""The CIFAR-10 accuracy study: every training technique side by side on real data.

Each configuration in benchmarks/cifar10_study/ is one resumable command; this script runs the ones
asked for (each with ``--resume``, so an interrupted study continues where it stopped), then writes
the table and the combined plot of every finished one:

    python benchmarks/accuracy_cifar10.py --data-dir ../shared/datasets/cifar10-jpeg \
        [--configs baseline ge imta ...] [--epochs N] [--output output/cifar10_study]
    python benchmarks/accuracy_cifar10.py --report-only      # table and plot of what has finished

One configuration by hand: ``accelerate launch recipes/train.py benchmarks/cifar10_study/ge.py
--data-dir ../shared/datasets/cifar10-jpeg --output-dir output/cifar10_study/ge --resume``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "cifar10_study"
CONFIGS = ["baseline", "ge", "imta", "deconfliction", "hdkd", "resnet18_exits", "resnet18_exits_imta", "boostnet", "l2w",
           "sdn", "ztw", "jei_gates", "phuong_lampert", "ranet", "dfs", "dyn_perceiver", "dfs_kd", "jei_gates_alternating"]
# IMTA's phase I is the GE configuration run for run (same seed and settings), JEI-DNN's classifier
# phase the baseline's: a finished run is taken as it (a finished phase is not trained again on --resume)
SAME_RUN = {("imta", "phase1_ge"): "ge", ("jei_gates", "classifiers"): "baseline",
            ("jei_gates_alternating", "classifiers"): "baseline"}


def reuse_finished_runs(name: str, output: Path) -> None:
    for (config, phase), source in SAME_RUN.items():
        done = output / source / "checkpoint" / "state.json"
        target = output / config / phase
        if config == name and done.is_file() and json.loads(done.read_text())["finished"] and not target.exists():
            shutil.copytree(output / source, target, ignore=shutil.ignore_patterns("results.json", "tensorboard",
                                                                                  "run.json"))
            for state in target.glob("*/state.json"):  # the copy is this run's phase now, not the source run
                record = json.loads(state.read_text())
                record.pop("run_id", None)  # (the engine refuses another run's checkpoint; adopts one with no id)
                record["phase"] = phase
                state.write_text(json.dumps(record, indent=2))
            print(f"{name}: phase {phase} is the finished {source} run", flush=True)


def train(name: str, data_dir: str, output: Path, epochs: int | None) -> float:
    options = ["--cfg-options", f"train.epochs={epochs}"] if epochs else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "train.py"),
               str(STUDY / f"{name}.py"), "--data-dir", data_dir, "--output-dir", str(output / name), "--resume",
               *options]
    reuse_finished_runs(name, output)
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.time() - start


def _best_within(curve: list, budget: float) -> str:
    """The best accuracy of a budgeted curve at an average cost within ``budget`` ("-" if none)."""
    inside = [accuracy for cost, accuracy in curve if cost <= budget]
    return f"{max(inside):.2f}" if inside else "-"


def report(output: Path) -> str:
    """A markdown table of every finished configuration (the last phase of each; training minutes
    of all its phases, evaluation excluded), and the plot."""
    from timm_exits.inference.plot import plot_accuracy_vs_cost

    rows, anytime, budgeted = [], {}, {}
    for name in CONFIGS:
        path = output / name / "results.json"
        if not path.is_file():
            continue
        phase = json.loads(path.read_text())["phases"][-1]
        top1 = [e["top1"] for e in phase["exits"]]
        costs = [e["cost"] * 1e-6 for e in phase["exits"]]
        anytime[name] = list(zip(costs, top1))
        budgeted[name] = [(p["cost"] * 1e-6, p["accuracy"]) for p in phase["budgeted"]]
        states = (output / name).glob("**/checkpoint/state.json")  # every phase's
        minutes = sum(json.loads(f.read_text()).get("seconds", 0) for f in states) / 60
        quarter, half = (_best_within(budgeted[name], share * costs[-1]) for share in (0.25, 0.5))
        rows.append(f"| {name} | " + " / ".join(f"{t:.2f}" for t in top1) +
                    f" | {quarter} | {half} | {', '.join(f'{c:.1f}' for c in costs)} | {minutes:.0f} |")
    if not rows:
        return "no finished configuration yet"
    plot_accuracy_vs_cost(str(output / "accuracy_cifar10.png"), anytime, budgeted, cost_label="MMACs per image",
                          title="CIFAR-10 (5,000 test images)")
    return "\n".join(["| configuration | anytime top-1 per exit (%) | budgeted top-1 at <= 25 % of the full cost | "
                      "at <= 50 % | MMACs per exit | training minutes |", "|---|---|---|---|---|---|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
    parser.add_argument("--configs", nargs="*", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--epochs", type=int, default=None, help="override every configuration's epochs")
    parser.add_argument("--output", default=str(ROOT / "output" / "cifar10_study"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    output = Path(args.output)
    if not args.report_only:
        for name in args.configs:
            seconds = train(name, args.data_dir, output, args.epochs)
            print(f"{name}: {seconds / 60:.1f} min", flush=True)
    table = report(output)
    if output.is_dir():
        (output / "accuracy_cifar10.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
