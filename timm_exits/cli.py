"""The ``timm-exits`` command.

    timm-exits profile MODEL [--json] [--convention macs|msdnet|macs_norm] [--depth TTFF] [--num-classes N]
                       [--input-size C H W]
    timm-exits evaluate MODEL --data-dir DIR [--checkpoint F] [--val-dir DIR | --val-fraction F] [--output DIR]
    timm-exits models [--markdown]
    timm-exits train CONFIG [--data-dir DIR] [--output-dir DIR] [--resume] [--cfg-options k=v ...]
        (``accelerate launch -m timm_exits.cli train CONFIG ...`` for several processes)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import timm
import torch

from . import profile as profiling
from .catalogue import families, load_catalogue


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
    unit = {"macs": "MACs", "msdnet": "ops (MSDNet counter)", "macs_norm": "MACs + norm elements"}[args.convention]
    depth = f", depth {args.depth.upper()}" if args.depth else ""
    print(f"{args.model}{depth}, input {tuple(input_size)}, cumulative per exit ({unit})")
    print(f"{'exit':>4}  {'params (M)':>10}  {'M' + unit:>12}")
    for c in costs:
        print(f"{c.exit:>4}  {c.params / 1e6:>10.4f}  {c.macs / 1e6:>12.4f}")
    return 0


def _msdnet_rows(variants: dict) -> List[str]:
    rows = ["| model | exits | input | classes | params (M) | MMACs per exit (cumulative) |", "|---|---|---|---|---|---|"]
    for name, v in variants.items():
        e, cfg = v["expected"], timm.models.get_pretrained_cfg(name)
        size = "x".join(str(s) for s in cfg.input_size[1:])
        macs = " / ".join(f"{m / 1e6:.1f}" for m in e["macs"])
        rows.append(f"| `{name}` | {len(e['macs'])} | {size} | {cfg.num_classes} | {e['params'][-1] / 1e6:.2f} | {macs} |")
    return rows


def _exits_rows(variants: dict) -> List[str]:
    rows = ["| model | backbone | exits after units | params (M) | GMACs per exit (cumulative) |", "|---|---|---|---|---|"]
    for name, v in variants.items():
        e = v["expected"]
        macs = " / ".join(f"{m / 1e9:.3f}" for m in e["macs"])
        with torch.device("meta"):
            exits = timm.create_model(name).exit_after
        rows.append(f"| `{name}` | `{v['backbone']}` | {exits} | {e['params'][-1] / 1e6:.2f} | {macs} |")
    return rows


def _adn_rows(variants: dict) -> List[str]:
    rows = ["| model | backbone | params (M) | GMACs super-net / base-net | GMACs + norms super-net / base-net |",
            "|---|---|---|---|---|"]
    for name, v in variants.items():
        e = v["expected"]
        first, last = list(e["macs"])[0], list(e["macs"])[-1]
        rows.append(f"| `{name}` | `{v['backbone']}` | {e['params'] / 1e6:.2f} | {e['macs'][first] / 1e9:.2f} / "
                    f"{e['macs'][last] / 1e9:.2f} | {e['macs_norm'][first] / 1e9:.2f} / {e['macs_norm'][last] / 1e9:.2f} |")
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


def _parse_kwargs(items: Optional[List[str]]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model arguments are KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from timm.data import resolve_data_config

    from .data import image_dataset, image_transform, num_classes_of, split_dataset
    from .inference import IMTA_Q, REFERENCE_Q, Thresholds, collect_outputs, thresholds_for_accuracy, thresholds_for_cost
    from .inference.report import evaluation_report, format_report, write_report

    if args.model not in timm.list_models():
        raise ValueError(f"unknown model {args.model!r}; see `timm-exits models` or timm.list_models()")
    test_set = image_dataset(args.data_dir)
    num_classes = num_classes_of(test_set)
    kwargs = {"num_classes": num_classes, **_parse_kwargs(args.model_kwargs)}
    if args.checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint, num_classes=num_classes))
    else:
        print("warning: no --checkpoint, evaluating randomly initialised weights", file=sys.stderr)
    try:
        model = timm.create_model(args.model, **kwargs).eval()
    except RuntimeError as e:  # torch's load_state_dict: missing / unexpected keys, size mismatches
        raise ValueError(f"{args.checkpoint} does not fit {args.model} with {num_classes} classes (the class "
                         f"folders of --data-dir): {e}") from None
    if not hasattr(model, "forward_exits"):
        raise ValueError(f"{args.model} is not a multi-exit model")
    test_set = test_set.with_transform(image_transform(resolve_data_config({}, model=model), train=False))
    if args.val_dir:
        val_set = image_dataset(args.val_dir, model)
    elif args.val_fraction:
        val_set, test_set = split_dataset(test_set, args.val_fraction, args.seed)
    else:
        val_set = None
    loader = lambda ds: DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)  # noqa: E731
    val = collect_outputs(model, loader(val_set)) if val_set is not None else None
    test = collect_outputs(model, loader(test_set))
    costs = [c.macs for c in profiling.profile_exits(model, convention=args.convention)]
    q_grid = IMTA_Q if args.q_grid == "imta" else REFERENCE_Q
    report = evaluation_report(val, test, costs, args.policy, q_grid, model=args.model, checkpoint=args.checkpoint,
                               data_dir=args.data_dir, val_dir=args.val_dir, val_fraction=args.val_fraction,
                               seed=args.seed, convention=args.convention)
    print(format_report(report))
    paths = write_report(report, args.output, label=args.model, cost_label=f"M{args.convention} per image")
    print(f"\nwrote {paths['json']} and {paths['png']}")
    if args.target_macs is not None or args.target_accuracy is not None:
        if val is None:
            raise ValueError("--target-macs / --target-accuracy need a validation split (--val-dir or --val-fraction)")
        point = (thresholds_for_cost(val, costs, args.target_macs, args.policy) if args.target_macs is not None
                 else thresholds_for_accuracy(val, costs, args.target_accuracy, args.policy))
        path = f"{args.output}/thresholds.json"
        Thresholds(args.model, model.num_exits, args.policy, point.thresholds, costs,
                   note=f"validation: top-1 {point.val_accuracy:.2f}%, {point.val_cost:.4g} per image").save(path)
        print(f"wrote {path}: validation top-1 {point.val_accuracy:.2f}% at {point.val_cost * 1e-6:.2f} M per image")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-exits", description="Multi-exit models for timm.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="per-exit cumulative MACs and parameters of a model")
    p.add_argument("model", help="a timm model name, e.g. msdnet_cifar_7exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--convention", choices=profiling.CONVENTIONS, default="macs",
                   help="macs: conv + linear + attention MACs (default); msdnet: the MSDNet reference op "
                        "counter; macs_norm: MACs + 1 per batch-norm and 5 per layer-norm element, the ADN paper's convention")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    p.add_argument("--depth", default=None, help="sub-network of an adaptive-depth model, e.g. TTFF")
    p.set_defaults(run=_profile)
    e = sub.add_parser("evaluate", help="anytime and budgeted evaluation on an image folder; JSON and PNG")
    e.add_argument("model", help="a timm model name, e.g. msdnet_cifar_7exit")
    e.add_argument("--checkpoint", default=None, help=".safetensors / .pth weights (ours or a reference checkpoint)")
    e.add_argument("--data-dir", required=True, help="test images, ImageFolder layout (<class>/<image>) or a .tar")
    e.add_argument("--val-dir", default=None, help="validation images for the thresholds")
    e.add_argument("--val-fraction", type=float, default=None,
                   help="or hold out this fraction of --data-dir (seeded) for the thresholds")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", help="extra timm.create_model arguments")
    e.add_argument("--policy", choices=("maxprob", "entropy", "patience"), default="maxprob")
    e.add_argument("--q-grid", choices=("reference", "imta"), default="reference",
                   help="MSDNet-PyTorch's 39 q values (0.05..1.95) or IMTA's 40 (..2.0)")
    e.add_argument("--convention", choices=profiling.CONVENTIONS, default="macs")
    e.add_argument("--target-macs", type=float, default=None, help="also write thresholds.json for this average cost")
    e.add_argument("--target-accuracy", type=float, default=None, help="or for this validation top-1 (%%)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--output", default="output/evaluate")
    e.set_defaults(run=_evaluate)
    m = sub.add_parser("models", help="list the catalogued models")
    m.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    m.set_defaults(run=_models)
    sub.add_parser("train", help="train from a config with the accelerate engine (timm-exits train --help)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import timm_exits  # noqa: F401  (registers the models)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the engine's own command line
        from .integrations.accelerate import main as train

        return train(argv=argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
