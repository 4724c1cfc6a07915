"""MSDNet inference speed: the fused path (``timm.utils.reparameterize_model``) against the plain model
and, with ``--reference-dir``, the reference implementation (a checkout of kalviny/MSDNet-PyTorch, read
from where it is, never copied here), under ``torch.no_grad`` and ``torch.inference_mode``; and the
early-exit executor on the plain and the fused model with thresholds giving a MACs ratio near 0.5, at
the given batch and at batch 1.

The three networks get the same weights (the reference's random initialisation with randomised batch-norm
statistics, loaded into ours through the reference-checkpoint loader; the script prints their largest
output difference). fp32, the cases alternating within each round (each timed call right after an untimed one of the same case),
the fastest round reported (``--clock
wall``, the default, needs an idle machine; ``--clock cpu`` measures this process's CPU time, steadier on
a shared machine when ``--threads 1``).

    python benchmarks/msdnet_inference.py --reference-dir ~/MSDNet-PyTorch [--model msdnet_cifar_7exit] [--batch 256]
        [--export /tmp/msdnet_exports]   # also the exported plain and fused models (timm_exits.inference.export_model)
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import shlex
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import timm
import torch
from timm.utils import reparameterize_model

import timm_exits
from timm_exits.catalogue import load_catalogue
from timm_exits.cpu import cpu_bf16
from timm_exits.inference import EarlyExitExecutor, ExportedModel, export_model
from timm_exits.models.msdnet import checkpoint_filter_fn
from timm_exits.profile import profile_exits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # run from anywhere: the tests' helpers
from helpers import randomise_norms  # noqa: E402

GRAD = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def reference_model(folder: str, model_name: str) -> torch.nn.Module:
    """The reference network of ``model_name`` (its command line from our catalogue), built by the
    reference's own ``models/msdnet.py`` in ``folder``."""
    command = load_catalogue("msdnet")["variants"][model_name]["reference_command"]
    words = shlex.split(command)
    options = {words[i].lstrip("-"): words[i + 1] for i in range(0, len(words), 2)}
    args = Namespace(data=options["data"], nBlocks=int(options["nBlocks"]), stepmode=options["stepmode"],
                     step=int(options["step"]), base=int(options["base"]), nChannels=int(options["nChannels"]),
                     growthRate=int(options["growthRate"]), grFactor=[int(g) for g in options["grFactor"].split("-")],
                     bnFactor=[int(g) for g in options["bnFactor"].split("-")], prune="max", reduction=0.5,
                     bottleneck=True)
    args.nScales = len(args.grFactor)
    spec = importlib.util.spec_from_file_location("reference_msdnet", Path(folder).expanduser() / "models" / "msdnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its architecture
        return module.MSDNet(args)


def thresholds_near_half(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """Max-probability thresholds letting the same fraction of samples leave at each exit, that
    fraction chosen for a MACs ratio (exits taken over the full network) nearest 0.5."""
    macs = np.array([c.macs for c in profile_exits(model)], dtype=float)
    with torch.no_grad():
        conf = np.stack([z.softmax(1).amax(1).numpy() for z in model.forward_exits(x)])
    best = None
    for q in np.linspace(0.02, 0.6, 59):
        th = [float(np.quantile(c, 1 - q)) for c in conf[:-1]] + [-1e9]
        exits = np.array([next(k for k in range(len(th)) if conf[k, i] >= th[k]) for i in range(conf.shape[1])])
        ratio = macs[exits].mean() / macs[-1]
        if best is None or abs(ratio - 0.5) < abs(best[1] - 0.5):
            best = (th, ratio)
    return best[0], best[1], macs


def measure(cases: Dict[tuple, Callable[[], None]], rounds: int, clock: Callable[[], float]) -> Dict[tuple, float]:
    """Fastest of ``rounds`` alternating rounds per case. Each timed call follows an untimed call of the
    same case: the memory the allocator keeps (and the pages it has touched) depend on what ran just
    before, which otherwise favours whichever case follows a bigger one."""
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            fn()
            start = clock()
            fn()
            times[k].append(clock() - start)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="msdnet_cifar_7exit")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--single", type=int, default=32, help="images run one at a time for the batch-1 rows")
    p.add_argument("--reference-dir", help="a checkout of kalviny/MSDNet-PyTorch; without it the reference rows are skipped")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=CLOCKS, default="wall")
    p.add_argument("--export", metavar="DIR", help="also export the plain and the fused model there "
                   "(timm_exits.inference.export_model) and time the exported full networks")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    allocator = {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")}
    print(f"timm_exits from {timm_exits.__file__}; torch {torch.__version__}, {args.threads} threads, {args.clock} clock; "
          f"CPU bf16: {cpu_bf16() or 'emulated'}; allocator settings: "
          + ", ".join(f"{k}={v or 'unset'}" for k, v in allocator.items()))
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    reference: Optional[torch.nn.Module] = None
    if args.reference_dir:
        reference = randomise_norms(reference_model(args.reference_dir, args.model)).eval()
        model = timm.create_model(args.model, num_classes=reference.classifier[0].linear.out_features).eval()
        model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model))
    else:
        randomise_norms(model)
    fused = reparameterize_model(model)
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(args.batch, *size)
    singles = x[:args.single].unsqueeze(1)  # the first images of the batch, one at a time

    with torch.no_grad():
        plain_out = model.forward_exits(x[:8])
        report = {"fused": fused.forward_exits(x[:8])}
        if reference is not None:
            report["reference"] = reference(x[:8])
    for name, outputs in report.items():
        err = max(float((a - b).norm() / a.norm()) for a, b in zip(plain_out, outputs))
        print(f"{name} vs plain: largest relative L2 error of an exit's logits {err:.1e}")
    thresholds, macs_ratio, macs = thresholds_near_half(model, x)
    executors = {"plain": EarlyExitExecutor(model, thresholds), "fused": EarlyExitExecutor(fused, thresholds)}
    same = torch.equal(executors["plain"](x).exits, executors["fused"](x).exits)
    macs_ratio_b1 = float(np.mean([macs[int(executors["fused"](s).exits)] for s in singles]) / macs[-1])
    print(f"thresholds for a MACs ratio of {macs_ratio:.3f} ({macs_ratio_b1:.3f} on the {args.single} batch-1 images); "
          f"plain and fused executors take the same exits: {same}")

    nets = {"plain": model.forward_exits, "fused": fused.forward_exits}
    if reference is not None:
        nets["reference"] = reference
    if args.export:
        for name, net in (("plain", model), ("fused", fused)):
            folder = os.path.join(args.export, name)
            export_model(net, x[:2], folder, name=f"{args.model} ({name})")
            nets[f"{name} export"] = ExportedModel(folder).forward_exits
    cases = {}
    for mode, ctx in GRAD.items():
        for name, net in nets.items():
            cases[(name, "full", mode)] = _in(ctx, lambda n=net: n(x))
        for name, ex in executors.items():
            cases[(name, "executor", mode)] = _in(ctx, lambda e=ex: e(x))
            cases[(name, "full b1", mode)] = _in(ctx, lambda n=nets[name]: [n(s) for s in singles])
            cases[(name, "executor b1", mode)] = _in(ctx, lambda e=ex: [e(s) for s in singles])
    t = measure(cases, args.rounds, clock)

    print(f"\n{args.model}, batch {args.batch} (b1: {args.single} images one at a time), fp32")
    print(f"{'model':12} {'run':12} {'grad mode':15} {'s / batch':>10} {'img/s':>8}")
    for (name, run, mode), seconds in t.items():
        n = args.single if run.endswith("b1") else args.batch
        print(f"{name:12} {run:12} {mode:15} {seconds:10.4f} {n / seconds:8.1f}")
    summary: Dict[str, Dict[str, float]] = {}
    for mode in GRAD:
        s = summary[mode] = {
            "fused_vs_plain": t[("plain", "full", mode)] / t[("fused", "full", mode)],
            "macs_ratio": macs_ratio,
            "executor_time_ratio_plain": t[("plain", "executor", mode)] / t[("plain", "full", mode)],
            "executor_time_ratio_fused": t[("fused", "executor", mode)] / t[("fused", "full", mode)],
            "macs_ratio_b1": macs_ratio_b1,
            "executor_time_ratio_fused_b1": t[("fused", "executor b1", mode)] / t[("fused", "full b1", mode)],
            "fused_executor_vs_plain_executor": t[("plain", "executor", mode)] / t[("fused", "executor", mode)],
            "fused_executor_vs_plain_executor_b1": t[("plain", "executor b1", mode)] / t[("fused", "executor b1", mode)],
        }
        if reference is not None:
            s["fused_vs_reference"] = t[("reference", "full", mode)] / t[("fused", "full", mode)]
            s["plain_vs_reference"] = t[("reference", "full", mode)] / t[("plain", "full", mode)]
        if args.export:
            s["fused_export_vs_plain_export"] = t[("plain export", "full", mode)] / t[("fused export", "full", mode)]
            s["fused_export_vs_fused"] = t[("fused", "full", mode)] / t[("fused export", "full", mode)]
        print(f"\n{mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()))
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "threads": args.threads, "clock": args.clock,
                          "allocator": allocator,
                          "seconds": {" / ".join(k): v for k, v in t.items()}, "summary": summary}))


def _in(ctx, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with ctx():
            fn()
    return run


if __name__ == "__main__":
    main()
