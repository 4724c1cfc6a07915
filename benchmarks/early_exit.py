"""Does early exit turn saved MACs into saved seconds?

For each model and batch size: thresholds are fitted (reference quota rule, geometric exit
distribution, ``timm_exits.inference.thresholds_for_cost``) on 512 calibration images so that the
expected cost is at most half of the full network's; then, on fresh images, the early-exit executor
and the full network (every exit, the cost the cumulative per-exit MACs describe) are timed
alternately in one process. Reported per
setting: the realised MACs ratio (executor / full, from the exits the samples took) and the
wall-clock time ratio. Random weights and random inputs: only the exit distribution matters here.

    python benchmarks/early_exit.py [--json] [--plot benchmarks/early_exit.png]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.inference import EarlyExitExecutor, ExitOutputs, collect_outputs, thresholds_for_cost
from timm_exits.profile import profile_exits

SETTINGS = [  # (model, batch size, images timed at batch 1)
    ("msdnet_cifar_7exit", 256, None),
    ("msdnet_cifar_7exit", 1, 256),
    ("msdnet_imagenet_5exit", 256, None),
    ("msdnet_imagenet_5exit", 1, 16),
    ("resnet50_exits", 64, None),
    ("resnet50_exits", 1, 16),
    ("vit_tiny_patch16_224_exits", 256, None),
    ("vit_tiny_patch16_224_exits", 1, 256),
]


def calibrate(model, size, target_ratio: float, n: int = 512):
    """Thresholds whose average cost on ``n`` calibration images is at most ``target_ratio`` of the
    full network's. Random weights have no true labels: the full network's own predictions stand in,
    so the most accurate thresholds within the budget are those that agree most with it."""
    costs = [c.macs for c in profile_exits(model)]
    images = torch.randn(n, *size)
    outputs = collect_outputs(model, [(x, torch.zeros(len(x), dtype=torch.long)) for x in images.split(64)],
                              progress=False)
    val = ExitOutputs(outputs.logits, outputs.preds[-1])
    return thresholds_for_cost(val, costs, target_ratio * costs[-1]).thresholds, costs


@torch.no_grad()
def cumulative_times(model, inputs, repeats: int):
    """Median wall-clock time of stem + stages + exits up to each exit, summed over ``inputs``."""
    per_exit = []
    for _ in range(repeats):
        totals = [0.0] * model.num_exits
        for x in inputs:
            start = time.perf_counter()
            state = model.forward_stem(x)
            for k in range(model.num_exits):
                state = model.forward_stage(state, k)
                model.forward_exit(state, k)
                totals[k] += time.perf_counter() - start
        per_exit.append(totals)
    return [statistics.median(t[k] for t in per_exit) for k in range(model.num_exits)]


def _timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


@torch.no_grad()
def measure(name: str, batch: int, images: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg["input_size"]
    thresholds, costs = calibrate(model, size, 0.5)
    executor = EarlyExitExecutor(model, thresholds, costs=costs)
    inputs = [torch.randn(batch, *size) for _ in range((images or batch) // batch)]
    full_times, exit_times, paid = [], [], []
    model.forward_exits(inputs[0])  # warm-up
    executor(inputs[0])
    for _ in range(repeats):  # alternate, so both see the same machine state
        full_times.append(sum(_timed(model.forward_exits, x) for x in inputs))
        exit_times.append(sum(_timed(executor, x) for x in inputs))
    for x in inputs:
        paid.append(executor(x).costs)
    paid = torch.cat(paid)
    exits = torch.tensor([costs.index(c) for c in paid.tolist()])
    fractions = torch.bincount(exits, minlength=len(costs)) / len(exits)
    cum = cumulative_times(model, inputs, repeats)
    t_full, t_exit = statistics.median(full_times), statistics.median(exit_times)
    return {"model": name, "batch_size": batch, "images": len(paid),
            "macs_ratio": round(float(paid.mean()) / costs[-1], 4), "time_ratio": round(t_exit / t_full, 4),
            # what the exits taken would cost at the full network's own per-stage times: the ratio a
            # zero-overhead executor reaches; the gap to macs_ratio is the network's time-per-MAC profile
            "stage_time_ratio": round(sum(f * t for f, t in zip(fractions.tolist(), cum)) / cum[-1], 4),
            "full_ms_per_image": round(1000 * t_full / len(paid), 3), "exit_ms_per_image": round(1000 * t_exit / len(paid), 3),
            "exit_fractions": [round(f, 3) for f in fractions.tolist()]}


def plot(results, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    for r in results:
        ax.scatter(r["macs_ratio"], r["time_ratio"], label=f"{r['model']}, batch {r['batch_size']}")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="time ratio = MACs ratio")
    ax.plot([0, 1], [0, 1.2], "k:", lw=1, label="1.2 x MACs ratio (target bound)")
    ax.set_xlim(0.3, 0.7)
    ax.set_ylim(0.2, 1.2)
    ax.set_xlabel("MACs ratio (early exit / full)")
    ax.set_ylabel("wall-clock time ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per setting")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default=None, help="write a PNG of time ratio against MACs ratio")
    parser.add_argument("--only", default=None, help="run only the settings of this model")
    parser.add_argument("--images", type=int, default=None, help="images timed at batch 1 (default: per setting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name, batch, images in SETTINGS:
        if args.only and name != args.only:
            continue
        r = measure(name, batch, args.images if images and args.images else images, args.repeats)
        results.append(r)
        print(json.dumps(r) if args.json else
              f"{r['model']:28s} batch {r['batch_size']:>3}: MACs ratio {r['macs_ratio']:.3f}, time ratio "
              f"{r['time_ratio']:.3f}, stage-time ratio {r['stage_time_ratio']:.3f} "
              f"({r['exit_ms_per_image']:.2f} vs {r['full_ms_per_image']:.2f} ms/image), "
              f"exits {r['exit_fractions']}", flush=True)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    sys.exit(main())
