"""The ``timm-exits`` command.

    timm-exits profile MODEL [--json] [--convention macs|msdnet|fvcore] [--depth TTFF] [--num-classes N]
                       [--input-size C H W]
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
    if args.depth is not None:
        adaptive = model if hasattr(model, "set_depth") else getattr(model, "backbone", None)
        if not hasattr(adaptive, "set_depth"):
            raise ValueError(f"--depth needs an adaptive-depth model (e.g. resnet50_adn); {args.model} has no "
                             f"skippable sub-paths")
        adaptive.set_depth(args.depth)
    costs = profiling.profile_exits(model, input_size=input_size, convention=args.convention)
    if args.json:
        out = {"model": args.model, "input_size": list(input_size), "convention": args.convention}
        if args.depth is not None:
            out["depth"] = args.depth.upper()
        print(json.dumps({**out, "exits": [c.as_dict() for c in costs]}))
        return 0
    unit = {"macs": "MACs", "msdnet": "ops (MSDNet counter)", "fvcore": "FLOPs (fvcore)"}[args.convention]
    depth = f", depth {args.depth.upper()}" if args.depth else ""
    print(f"{args.model}{depth}, input {tuple(input_size)}, cumulative per exit ({unit})")
    print(f"{'exit':>4}  {'params (M)':>10}  {'M' + unit:>12}")
    for c in costs:
        print(f"{c.exit:>4}  {c.params / 1e6:>10.4f}  {c.macs / 1e6:>12.4f}")
    return 0


def _msdnet_rows(variants: dict) -> List[str]:
    rows = ["| model | exits | input | classes | params (M) | MMACs per exit (cumulative) |", "|---|---|---|---|---|---|"]
    for name, v in variants.items():
        e, cfg = v["expected"], v["cfg"]
        size = "x".join(str(s) for s in cfg["input_size"][1:])
        macs = " / ".join(f"{m / 1e6:.1f}" for m in e["macs"])
        rows.append(f"| `{name}` | {len(e['macs'])} | {size} | {cfg['num_classes']} | {e['params'][-1] / 1e6:.2f} | {macs} |")
    return rows


def _exits_rows(variants: dict) -> List[str]:
    rows = ["| model | backbone | exits after units | params (M) | GMACs per exit (cumulative) |", "|---|---|---|---|---|"]
    for name, v in variants.items():
        e = v["expected"]
        macs = " / ".join(f"{m / 1e9:.3f}" for m in e["macs"])
        rows.append(f"| `{name}` | `{v['backbone']}` | {v['args']['exits']} | {e['params'][-1] / 1e6:.2f} | {macs} |")
    return rows


def _adn_rows(variants: dict) -> List[str]:
    rows = ["| model | backbone | params (M) | GMACs super-net / base-net | fvcore GFLOPs super-net / base-net |",
            "|---|---|---|---|---|"]
    for name, v in variants.items():
        e = v["expected"]
        first, last = list(e["macs"])[0], list(e["macs"])[-1]
        rows.append(f"| `{name}` | `{v['backbone']}` | {e['params'] / 1e6:.2f} | {e['macs'][first] / 1e9:.2f} / "
                    f"{e['macs'][last] / 1e9:.2f} | {e['fvcore'][first] / 1e9:.2f} / {e['fvcore'][last] / 1e9:.2f} |")
    return rows


_TABLES = {"msdnet": _msdnet_rows, "exits": _exits_rows, "adn": _adn_rows}


def models_table(family: str) -> str:
    """Markdown table of a catalogued family (the README's model tables)."""
    return "\n".join(_TABLES[family](load_catalogue(family)["variants"]))


def _models(args: argparse.Namespace) -> int:
    if args.markdown:
        print("\n\n".join(models_table(f) for f in families()))
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
                   help="macs: conv + linear + attention MACs (default); msdnet: the MSDNet reference op "
                        "counter; fvcore: MACs + norm elements, as fvcore / timm's tables / the ADN paper")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    p.add_argument("--depth", default=None, help="sub-network of an adaptive-depth model, e.g. TTFF")
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
