"""MSDNet training and inference throughput on this machine, measured side by side in one
process, alternating, with the same weights and inputs:

* training: the straightforward channels-first step (``channels_last_training=False``) against the
  default fast path (channels-last convolutions, batch norms computed channels-first, shared-input
  1x1 bottlenecks merged: :mod:`timm_exits.models.channels_last_norm`);
* inference: the plain model against the fused path (``timm.utils.reparameterize_model``: batch
  norms folded, shared-input 1x1 bottlenecks merged, channels-last, preallocated buffers);
* each also under bf16 autocast (training then runs channels-first: channels-last is slower there).

    python benchmarks/msdnet_speed.py [--rounds 5] [--json]

Training step: forward of every exit, the sum of their cross-entropies, backward, SGD step.
Error column: inference, the largest relative L2 error of an exit's logits against the plain fp32
model; training, the relative L2 error of the whole gradient against the plain fp32 step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model
from torch import nn

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.cpu import bf16_advice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # run from anywhere: the tests' helpers
from helpers import randomise_norms  # noqa: E402

SETTINGS = [  # (model, training batch, inference batch)
    ("msdnet_cifar_7exit", 64, 256),
    ("msdnet_imagenet_5exit", 8, 8),
]


def _bf16(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def _rate(fn: Callable[[], None], images: int, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitives, allocator)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return images * repeats / (time.perf_counter() - start)


def measure(name: str, train_batch: int, infer_batch: int, rounds: int, compile: bool = False) -> List[Dict]:
    torch.manual_seed(0)
    model = timm.create_model(name)
    size = model.pretrained_cfg["input_size"]
    x_train, y = torch.randn(train_batch, *size), torch.randint(0, model.num_classes, (train_batch,))
    x_infer = torch.randn(infer_batch, *size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def exits_loss(x: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(z.float(), y) for z in model.forward_exits(x))

    compiled_loss = torch.compile(exits_loss) if compile else None

    def training_loss(fast: bool, bf16: bool, compiled: bool = False) -> torch.Tensor:
        model.train()
        model.channels_last_training = fast
        with _bf16(bf16):
            return (compiled_loss if compiled else exits_loss)(x_train)

    def train_step(fast: bool, bf16: bool, compiled: bool = False) -> Callable[[], None]:
        def step():
            loss = training_loss(fast, bf16, compiled)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    def infer(net: nn.Module, bf16: bool) -> Callable[[], None]:
        def run():
            net.eval()
            with torch.no_grad(), _bf16(bf16):
                net.forward_exits(x_infer)
        return run

    randomise_norms(model)  # trained-looking norms: folding them is not a no-op
    model.eval()
    fused = reparameterize_model(model)
    with torch.no_grad():
        reference = model.forward_exits(x_infer)
        errors = {}
        for path, net in (("plain", model), ("fused", fused)):
            for precision in ("fp32", "bf16"):
                with _bf16(precision == "bf16"):
                    out = net.forward_exits(x_infer)
                errors[("infer", path, precision)] = max(float((o.float() - r).norm() / r.norm()) for o, r in zip(out, reference))
    def gradient(fast: bool, bf16: bool, compiled: bool = False) -> torch.Tensor:
        loss = training_loss(fast, bf16, compiled)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = gradient(False, False)
    for path, precision in (("fast", "fp32"), ("plain", "bf16")):
        model.load_state_dict(state)  # the same batch-norm statistics for every gradient
        errors[("train", path, precision)] = float((gradient(path == "fast", precision == "bf16") - reference).norm()
                                                   / reference.norm())
    compile_seconds = None
    if compile:  # the first call compiles (forward and backward): its time is reported apart
        model.load_state_dict(state)
        start = time.perf_counter()
        errors[("train", "compiled", "fp32")] = float((gradient(True, False, True) - reference).norm() / reference.norm())
        compile_seconds = time.perf_counter() - start
    model.load_state_dict(state)
    cases = {
        ("train", "plain", "fp32"): (train_step(False, False), train_batch),
        ("train", "fast", "fp32"): (train_step(True, False), train_batch),
        ("train", "plain", "bf16"): (train_step(False, True), train_batch),  # the fast path steps aside
        **({("train", "compiled", "fp32"): (train_step(True, False, True), train_batch)} if compile else {}),
        ("infer", "plain", "fp32"): (infer(model, False), infer_batch),
        ("infer", "fused", "fp32"): (infer(fused, False), infer_batch),
        ("infer", "plain", "bf16"): (infer(model, True), infer_batch),
        ("infer", "fused", "bf16"): (infer(fused, True), infer_batch),
    }
    repeats = 2 if train_batch <= 8 else 1
    rates = {key: [] for key in cases}
    for _ in range(rounds):  # alternate, so that drift of the machine hits every case alike
        for key, (fn, images) in cases.items():
            rates[key].append(_rate(fn, images, repeats))

    rows = []
    for (task, path, precision), values in rates.items():
        base = statistics.median(rates[(task, "plain", "fp32")])
        rate = statistics.median(values)
        row = {"model": name, "task": task, "path": path, "precision": precision,
               "batch_size": train_batch if task == "train" else infer_batch,
               "images_per_s": round(rate, 1), "speedup": round(rate / base, 2)}
        if (task, path, precision) in errors:
            row["rel_error"] = float(f"{errors[(task, path, precision)]:.3g}")
        if path == "compiled":
            row["compile_s"] = round(compile_seconds, 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=[s[0] for s in SETTINGS])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time the fast training step under torch.compile (inductor; minutes of compilation)")
    args = parser.parse_args()
    rows = [r for name, tb, ib in SETTINGS if name in args.models for r in measure(name, tb, ib, args.rounds, args.compile)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(bf16_advice())
    print(f"{'model':<24}{'task':<7}{'path':<9}{'prec':<6}{'batch':>6}{'img/s':>9}{'speedup':>9}{'rel err':>10}")
    for r in rows:
        err = f"{r['rel_error']:>10.2e}" if "rel_error" in r else ""
        compiled = f"  (compiled in {r['compile_s']:.0f} s)" if "compile_s" in r else ""
        print(f"{r['model']:<24}{r['task']:<7}{r['path']:<9}{r['precision']:<6}{r['batch_size']:>6}"
              f"{r['images_per_s']:>9.1f}{r['speedup']:>9.2f}{err}{compiled}")


if __name__ == "__main__":
    main()
