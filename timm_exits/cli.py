"""The ``timm-exits`` command.

    timm-exits profile MODEL [--json] [--convention macs|msdnet] [--num-classes N] [--input-size C H W]
    timm-exits models [--markdown]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import timm
import torch

from . import profile as profiling
from .registry import families, load_catalogue


def _profile(args: argparse.Namespace) -> int:
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.model not in timm.list_models():
        raise SystemExit(f"unknown model {args.model!r}; see `timm-exits models` or timm.list_models()")
    with torch.device("meta"):
        model = timm.create_model(args.model, **kwargs)
        input_size = args.input_size or model.pretrained_cfg["input_size"]
        if model.pretrained_cfg.get("fixed_input_size") and tuple(input_size) != tuple(model.pretrained_cfg["input_size"]):
            model = timm.create_model(args.model, in_chans=input_size[0], img_size=tuple(input_size[1:]), **kwargs)
    costs = profiling.profile_exits(model, input_size=input_size, convention=args.convention)
    if args.json:
        print(json.dumps({"model": args.model, "input_size": list(input_size), "convention": args.convention,
                          "exits": [c.as_dict() for c in costs]}))
        return 0
    unit = "MACs" if args.convention == "macs" else "ops (MSDNet counter)"
    print(f"{args.model}, input {tuple(input_size)}, cumulative per exit ({unit})")
    print(f"{'exit':>4}  {'params (M)':>10}  {'M' + unit:>12}")
    for c in costs:
        print(f"{c.exit:>4}  {c.params / 1e6:>10.4f}  {c.macs / 1e6:>12.4f}")
    return 0


def models_table() -> str:
    """Markdown table of every catalogued variant (the README's model table)."""
    lines = ["| model | exits | input | classes | params (M) | MMACs per exit (cumulative) |",
             "|---|---|---|---|---|---|"]
    for family in families():
        for name, v in load_catalogue(family)["variants"].items():
            e, cfg = v["expected"], v["cfg"]
            macs = " / ".join(f"{m / 1e6:.1f}" for m in e["macs"])
            size = "x".join(str(s) for s in cfg["input_size"][1:])
            lines.append(f"| `{name}` | {len(e['macs'])} | {size} | {cfg['num_classes']} | "
                         f"{e['params'][-1] / 1e6:.2f} | {macs} |")
    return "\n".join(lines)


def _models(args: argparse.Namespace) -> int:
    if args.markdown:
        print(models_table())
    else:
        for family in families():
            for name, v in load_catalogue(family)["variants"].items():
                print(f"{name:32s} {v['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-exits", description="Multi-exit models for timm.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="per-exit cumulative MACs and parameters of a model")
    p.add_argument("model", help="a timm model name, e.g. msdnet_cifar_7exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--convention", choices=profiling.CONVENTIONS, default="macs",
                   help="macs: conv + linear MACs (default); msdnet: the MSDNet reference op counter")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    p.set_defaults(run=_profile)
    m = sub.add_parser("models", help="list the catalogued models")
    m.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    m.set_defaults(run=_models)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import timm_exits  # noqa: F401  (registers the models)

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
