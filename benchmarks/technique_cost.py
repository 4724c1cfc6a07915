"""Training-step cost of each technique relative to plain multi-exit training, same model and batch.

All steps run in one process, alternating, on ``msdnet_cifar_5exit`` (CIFAR input, 100 classes) at
batch 64, fp32: forward over every exit, loss, backward, SGD step. Reported: mean seconds per step
and the ratio to the plain step (means over the repeats, a multiple of 4, so that ``hdkd_interval4``,
which updates the loss weights every 4th step, is charged its full cost).

    python benchmarks/technique_cost.py [--json] [--batch-size 64] [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.train import HDKD, CrossEntropy, OneForAll, PCGrad, Technique
from timm_exits.train.loop import PlainTrainer


def make_steps(model_name: str, batch: int):
    """One training step per technique, each on its own copy of the same initial model (a technique
    sets switches on the model it prepares)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    held_out = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))

    def step_of(technique: Technique, net: torch.nn.Module):
        net = technique.prepare(copy.deepcopy(net))
        sgd = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        loop = PlainTrainer(net, technique, sgd, held_out=[held_out])
        return lambda: loop.step(x, y)

    return {
        "plain": step_of(CrossEntropy(), model),
        "gradient_equilibrium": step_of(CrossEntropy(gradient_equilibrium=True), model),
        "imta_phase_two": step_of(OneForAll(), timm.create_model(model_name)),
        "branch_deconfliction": step_of(CrossEntropy(deconfliction="symmetric"), model),
        "pcgrad": step_of(PCGrad(), model),
        "hdkd": step_of(HDKD(xi=0.01), model),
        "hdkd_interval4": step_of(HDKD(xi=0.01, interval=4), model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="msdnet_cifar_5exit")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = make_steps(args.model, args.batch_size)
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.mean(times["plain"])  # means: interval techniques cost on some steps only
    for name, t in times.items():
        row = {"model": args.model, "batch_size": args.batch_size, "technique": name,
               "seconds_per_step": round(statistics.mean(t), 4), "ratio": round(statistics.mean(t) / base, 3)}
        print(json.dumps(row) if args.json else f"{name:22s} {row['seconds_per_step']:.3f} s/step  {row['ratio']:.2f}x")


if __name__ == "__main__":
    main()
