"""Training-step cost of each technique relative to plain multi-exit training, same model and batch.

All steps run in one process, alternating, on ``msdnet_cifar_5exit`` (CIFAR input, 100 classes) at
batch 64, fp32: forward over every exit, loss, backward, SGD step. Reported: mean seconds per step
and the ratio to the plain step (means over the repeats, a multiple of 4, so that ``hdkd_interval4``,
which updates the loss weights every 4th step, is charged its full cost).

    python benchmarks/technique_cost.py [--json] [--batch-size 64] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_exits  # noqa: F401
from timm_exits.train import IMTAModel, multi_exit_cross_entropy, one_for_all_distillation, pcgrad_backward
from timm_exits.train.hdkd import BalancedValidationLoss, HarmonizedWeights, harmonized_loss, hdkd_weight_step, loss_terms


def make_steps(model_name: str, batch: int):
    torch.manual_seed(0)
    model = timm.create_model(model_name).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    xv, yv = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    phase2 = IMTAModel(timm.create_model(model_name)).train()
    sgd2 = torch.optim.SGD([p for p in phase2.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    weights = HarmonizedWeights(model.num_exits)
    wopt = torch.optim.Adam(weights.parameters(), lr=3e-4)
    val_loss = BalancedValidationLoss(model.num_exits)

    def plain():
        sgd.zero_grad()
        multi_exit_cross_entropy(model.forward_exits(x), y).backward()
        sgd.step()

    def equilibrium():
        model.gradient_equilibrium = True
        plain()
        model.gradient_equilibrium = False

    def branch_deconfliction():
        model.gradient_deconfliction = "symmetric"
        plain()
        model.gradient_deconfliction = None

    def pcgrad():
        sgd.zero_grad()
        pcgrad_backward([F.cross_entropy(z, y) for z in model.forward_exits(x)], list(model.parameters()))
        sgd.step()

    def imta_phase_two():
        sgd2.zero_grad()
        logits, teacher = phase2.forward_train(x)
        one_for_all_distillation(logits, teacher, y).backward()
        sgd2.step()

    def hdkd(interval: int = 1):
        calls = [0]

        def step():
            if calls[0] % interval == 0:
                hdkd_weight_step(model, weights, wopt, (x, y), (xv, yv), val_loss, xi=0.01)
            calls[0] += 1
            sgd.zero_grad()
            ce, kd = loss_terms(model.forward_exits(x), y)
            harmonized_loss(ce, kd, tuple(w.detach() for w in weights())).backward()
            sgd.step()
        return step

    return {"plain": plain, "gradient_equilibrium": equilibrium, "imta_phase_two": imta_phase_two,
            "branch_deconfliction": branch_deconfliction, "pcgrad": pcgrad, "hdkd": hdkd(1), "hdkd_interval4": hdkd(4)}


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
