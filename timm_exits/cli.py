"""The ``timm-exits`` command.

    timm-exits profile MODEL [--json] [--convention macs|msdnet|macs_norm] [--depth TTFF] [--num-classes N]
                       [--input-size C H W]
    timm-exits evaluate MODEL|FOLDER|WEIGHTS|CHECKPOINT --data-dir DIR [--checkpoint F] [--val-dir DIR | --val-fraction F]
                        [--input-size C H W] [--mean ..] [--std ..] [--crop-pct F] [--interpolation I] [--output DIR]
                        [--policy P] [--fallback last|most_confident] [--strict] [--envelope] [--sweep [ztw|sdn]]
                        [--patience-sweep] [--cost-fractions F ..] [--calibration] [--latency] [--mie]
    timm-exits calibrate MODEL|FOLDER|WEIGHTS|CHECKPOINT --train-dir DIR [--val-dir DIR | --val-fraction F] [--mie]
                         --output FOLDER [--prior-vars V ..] [--temperatures T ..] [--num-samples S] ...
    timm-exits convert CHECKPOINT OUTPUT_FOLDER [--model NAME] [--model-kwargs K=V ..] [--input-size C H W] ...
    timm-exits models [--markdown]
    timm-exits train CONFIG [--data-dir DIR] [--output-dir DIR] [--resume] [--cfg-options k=v ...]
        (``timm-exits launch -m timm_exits.cli train CONFIG ...`` for several processes)
    timm-exits launch [accelerate launch options] SCRIPT [ARGS ...]
        (``accelerate launch --quiet``; the run's error, if any, is the last line, printed once)

torch, timm and the models are imported by the commands that use them, not by ``--help``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

CONVENTIONS = ("macs", "msdnet", "macs_norm")  # timm_exits.profile.CONVENTIONS, named here without importing torch
SCORES = ("maxprob", "entropy", "margin", "patience")  # timm_exits.inference.SCORES, FALLBACKS, likewise
LEARNED_SCORES = ("gate",)  # timm_exits.inference.policies.LEARNED_SCORES: their parameters come from the model
FALLBACKS = ("last", "most_confident")


def _check_model_name(name: str, or_else: str = "") -> None:
    """A ValueError (``error: ...``, exit code 2) unless ``name`` is a registered timm model."""
    import timm

    if name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}: expected a timm model name (see `timm-exits models` or "
                         f"timm.list_models()){or_else}")


def _profile(args: argparse.Namespace) -> int:
    import timm
    import torch

    from . import profile as profiling
    from .models import adaptive_depth_of

    from .config import check_value

    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes must be an integer >= 1, got {args.num_classes}")
    if args.input_size is not None:
        check_value("data.input_size", args.input_size, "--input-size")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    _check_model_name(args.model)
    with torch.device("meta"):
        model = timm.create_model(args.model, **kwargs)
        input_size = args.input_size or model.pretrained_cfg["input_size"]
        if model.pretrained_cfg.get("fixed_input_size") and tuple(input_size) != tuple(model.pretrained_cfg["input_size"]):
            model = timm.create_model(args.model, in_chans=input_size[0], img_size=tuple(input_size[1:]), **kwargs)
    if args.depth is not None:
        adaptive = adaptive_depth_of(model)
        if adaptive is None:
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
    import timm

    rows = ["| model | exits | input | classes | params (M) | MMACs per exit (cumulative) |", "|---|---|---|---|---|---|"]
    for name, v in variants.items():
        e, cfg = v["expected"], timm.models.get_pretrained_cfg(name)
        size = "x".join(str(s) for s in cfg.input_size[1:])
        macs = " / ".join(f"{m / 1e6:.1f}" for m in e["macs"])
        rows.append(f"| `{name}` | {len(e['macs'])} | {size} | {cfg.num_classes} | {e['params'][-1] / 1e6:.2f} | {macs} |")
    return rows


def _exits_rows(variants: dict) -> List[str]:
    import timm
    import torch

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


_TABLES = {"msdnet": _msdnet_rows, "exits": _exits_rows, "adn": _adn_rows, "ranet": _msdnet_rows}


def models_table(family: str) -> str:
    """Markdown table of a catalogued family (the README's model tables)."""
    from .catalogue import load_catalogue

    return "\n".join(_TABLES[family](load_catalogue(family)["variants"]))


def _models(args: argparse.Namespace) -> int:
    from .catalogue import families, load_catalogue

    if args.markdown:
        print("\n\n".join(models_table(f) for f in families()))
    else:
        for family in families():
            for name, v in load_catalogue(family)["variants"].items():
                print(f"{name:32s} {v['description']}")
    return 0


def _techniques(args: argparse.Namespace) -> int:
    """The technique types, or one type's options: each with its default and the values it takes."""
    import dataclasses

    from .train.techniques import TECHNIQUES, technique_type

    if args.type is None:
        for name, cls in sorted(TECHNIQUES.items()):
            print(f"{name:14s} {(cls.__doc__ or '').strip().splitlines()[0]}")
        return 0
    options = technique_type(args.type).Options
    print(f"technique=dict(type={args.type!r}, ...) options:")
    for field in dataclasses.fields(options):
        valid = field.metadata.get("valid")
        print(f"  {field.name:22s} default {field.default!r}" + (f"; {valid}" if valid is not None else ""))
    print("\n" + " ".join((options.__doc__ or "").split()))
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


_DATA_FLAGS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _data_overrides(args: argparse.Namespace) -> dict:
    """The preprocessing flags given, each checked against the config schema's range."""
    from .config import check_preprocessing

    return check_preprocessing({k: getattr(args, k) for k in _DATA_FLAGS if getattr(args, k) is not None}, _flag)


def _named_model(args: argparse.Namespace, num_classes: int, given: dict):
    """A registered model name (with ``--checkpoint``): timm loads the file, as ``create_model`` does.
    Returns the model, its data config, its label and its class names (None: not known)."""
    import timm

    from .config import resolve_preprocessing

    _check_model_name(args.model, ", a model folder, or a weights file with config.json beside it")
    kwargs = {"num_classes": num_classes, **_parse_kwargs(args.model_kwargs)}
    cfg = timm.models.get_pretrained_cfg(args.model)
    if "input_size" in given:
        kwargs["in_chans"] = given["input_size"][0]
        if cfg.fixed_input_size:
            kwargs["img_size"] = tuple(given["input_size"][1:])
    if kwargs.get("in_chans") not in (None, cfg.input_size[0]):
        given.setdefault("input_size", (kwargs["in_chans"], *cfg.input_size[1:]))
    if args.checkpoint:  # the file's classes and channels are the model's, not the default cfg's
        overlay = dict(file=args.checkpoint, num_classes=kwargs["num_classes"],
                       input_size=(kwargs.get("in_chans", cfg.input_size[0]), *cfg.input_size[1:]))
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    else:
        print("warning: no --checkpoint, evaluating randomly initialised weights", file=sys.stderr)
    try:
        model = timm.create_model(args.model, **kwargs)
    except RuntimeError as e:  # torch's load_state_dict: missing / unexpected keys, size mismatches
        raise ValueError(f"{args.checkpoint} does not fit {args.model} with {kwargs['num_classes']} classes: {e}") from None
    return model, resolve_preprocessing(model, given, _flag), args.model, None


def _saved_model(args: argparse.Namespace, given: dict):
    """A model folder, a weights file with config.json beside it, or an mmengine checkpoint of
    MultiExitClassifier: architecture, classes (and their names, if recorded) and preprocessing come
    from the file(s)."""
    from .config import resolve_preprocessing
    from .model_folder import CONFIG_FILE, load_model_folder, read_model_config

    if args.checkpoint:
        raise ValueError(f"--checkpoint goes with a model name; {args.model!r} is a path, its own weights are evaluated")
    kwargs = _parse_kwargs(args.model_kwargs)
    beside = os.path.dirname(args.model) or "."
    if os.path.isfile(args.model) and not os.path.isfile(os.path.join(beside, CONFIG_FILE)) and \
            args.model.endswith(".pth"):
        from .integrations.mmengine import load_checkpoint_model

        model, recorded, info = load_checkpoint_model(args.model, model_kwargs=kwargs)
        name = lambda key: _flag(key) if key in given else f"the stored config's data_config[{key!r}]"  # noqa: E731
        return model, resolve_preprocessing(model, {**recorded, **given}, name), info["mmengine_model"]["model"], None
    model, _ = load_model_folder(args.model, {"input_size": given.get("input_size")}, **kwargs)
    config = read_model_config(args.model)
    return model, resolve_preprocessing(model, given, _flag), config["architecture"], config.get("label_names")


def _check_classes(names: List[str], expected: List[str], what: str, expected_what: str) -> None:
    """The same class names in the same order (the outputs' order), or a ValueError naming the first difference."""
    if names == expected:
        return
    first = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), min(len(names), len(expected)))
    at = lambda found, i: repr(found[i]) if i < len(found) else "nothing"  # noqa: E731
    raise ValueError(f"{what} has {len(names)} classes, {expected_what} {len(expected)}, and class {first} is "
                     f"{at(names, first)} there but {at(expected, first)} in {expected_what}: the same class folders "
                     f"(names and order) are needed, or the accuracy is measured against the wrong labels")


def _holds_output(folder: str) -> bool:
    """Whether ``folder`` holds anything but an output lock."""
    return any(entry != ".lock" for entry in os.listdir(folder))


def _check_protocol_flags(args: argparse.Namespace) -> None:
    """The evaluation protocol flags that cannot work together, refused before any work."""
    if args.sweep and args.policy == "patience":
        raise ValueError("--sweep needs a probability score (--policy maxprob, entropy, margin or gate); for patience "
                         "use --patience-sweep")
    if args.policy in LEARNED_SCORES and args.fallback == "most_confident":
        raise ValueError(f"--policy {args.policy} has no gate at the last exit to compare with the others, so "
                         f"--fallback most_confident does not apply: the samples no gate takes leave at the last exit")
    if args.policy in LEARNED_SCORES and (args.mie or args.product_anytime):
        raise ValueError(f"--policy {args.policy} runs the gates on the probabilities of the exits they were trained "
                         f"on; --mie and --product-anytime change those answers: evaluate the gates alone")
    if args.mie and args.product_anytime:
        raise ValueError("--mie or --product-anytime: each is a predictor answering at the exits, one at a time")
    if args.envelope and not (args.val_dir or args.val_fraction):
        raise ValueError("--envelope shapes the budgeted curve, which needs a validation split (--val-dir or "
                         "--val-fraction)")
    if any(not f > 0 for f in args.cost_fractions):
        raise ValueError(f"--cost-fractions must be positive fractions of the full cost, got {args.cost_fractions}")
    if args.latency and args.target_macs is None and args.target_accuracy is None:
        raise ValueError("--latency times the early-exit executor with the thresholds this run fits: add --target-macs "
                         "or --target-accuracy (and a validation split)")
    if args.latency_images < 1 or args.latency_repeats < 1 or (args.latency_batch_size or 1) < 1:
        raise ValueError(f"--latency-images, --latency-repeats and --latency-batch-size must be >= 1, got "
                         f"{args.latency_images}, {args.latency_repeats} and {args.latency_batch_size}")
    if args.target_macs is not None and args.target_accuracy is not None:
        raise ValueError("--target-macs or --target-accuracy: one thresholds file is fitted, for one of them")
    if (args.target_macs is not None or args.target_accuracy is not None) and not (args.val_dir or args.val_fraction):
        raise ValueError("--target-macs / --target-accuracy need a validation split (--val-dir or --val-fraction)")


def _evaluate(args: argparse.Namespace) -> int:
    """Evaluate into ``--output``, or, if that holds earlier output, into the first free ``<output>-1``,
    ``-2``, ... (locked while it runs): an earlier evaluation is never overwritten, and one that fails
    leaves nothing behind."""
    from .files import claim_fresh_folder

    _check_protocol_flags(args)
    given = _data_overrides(args)
    with claim_fresh_folder(args.output, _holds_output) as lock:
        if lock.folder != args.output:
            print(f"{args.output} holds earlier output; this evaluation writes to {lock.folder}")
        try:
            return _evaluate_into(args, given, lock.folder)
        except BaseException:
            lock.abandon()
            raise


def _load_model(args: argparse.Namespace, given: dict, images: str, flag: str):
    """The model of ``args.model`` in eval mode, checked against the class folders of ``images``.
    Returns the model, its data config, its label and the class names (the data's, the same as the
    model's recorded ones if it records them)."""
    from .data import ImageFiles, class_names
    from .models import is_multi_exit

    classes = class_names(ImageFiles(images))
    model, data_config, label, trained_on = (_saved_model(args, given) if os.path.exists(args.model)
                                             else _named_model(args, len(classes), given))
    model.eval()
    if not is_multi_exit(model):
        raise ValueError(f"{label} is not a multi-exit model")
    if model.num_classes != len(classes):
        raise ValueError(f"the model has {model.num_classes} classes but {flag} {images!r} has {len(classes)} "
                         f"class folders")
    if trained_on is not None:
        _check_classes(classes, list(trained_on), f"{flag} {images!r}", "the model's config.json")
    return model, data_config, label, classes


def _image_sets(args: argparse.Namespace, data_config: dict, images: str, flag: str, classes: List[str]):
    """The images of ``images`` and the validation split (``--val-dir``, ``--val-fraction`` of them, or
    None), decoded and transformed as the model expects for evaluation; and what the split is."""
    from .data import IMAGE_MODES, ImageFiles, class_names, image_transform, split_dataset

    channels = data_config["input_size"][0]
    modes = {count: mode for mode, count in IMAGE_MODES.items()}
    if channels not in modes:
        raise ValueError(f"input channels must be 1 (grey) or 3 (RGB), got input size {tuple(data_config['input_size'])}")
    if len(data_config["mean"]) != channels or len(data_config["std"]) != channels:
        raise ValueError(f"{channels}-channel input needs {channels} --mean and --std values, got mean "
                         f"{tuple(data_config['mean'])} and std {tuple(data_config['std'])}")
    transform, mode = image_transform(data_config, train=False), modes[channels]
    main_set = ImageFiles(images, transform, img_mode=mode)
    if args.val_dir:
        val_set = ImageFiles(args.val_dir, transform, img_mode=mode)
        _check_classes(class_names(val_set), classes, f"--val-dir {args.val_dir!r}", f"{flag} {images!r}")
        return main_set, val_set, f"--val-dir {args.val_dir}"
    if args.val_fraction:
        val_set, main_set = split_dataset(main_set, args.val_fraction, args.seed)
        return main_set, val_set, f"--val-fraction {args.val_fraction} of {flag} (seed {args.seed})"
    return main_set, None, None


def _batches(args: argparse.Namespace, images):
    """A loader of ``images`` in batches of ``--batch-size`` with ``--workers`` processes (None for None)."""
    from torch.utils.data import DataLoader

    return None if images is None else DataLoader(images, batch_size=args.batch_size, num_workers=args.workers)


def _exit_policy(args: argparse.Namespace, model, label: str):
    """The exit policy of ``--policy``, ``--fallback`` and ``--strict``; a learned score's parameters
    come from the model, which must carry them."""
    import dataclasses

    from .inference import resolve_policy

    if args.policy in LEARNED_SCORES and not callable(getattr(model, "policy_params", None)):
        raise ValueError(f"--policy {args.policy} evaluates the learned exit gates a jei_gates model carries; {label} "
                         f"has none. Evaluate a jei_gates model: the model folder of the gates phase of a run with "
                         f"technique JEIGates (recipes/_base_/techniques/jei_gates.py), an mmengine checkpoint of "
                         f"MultiExitClassifier(technique=dict(type='JEIGates')), or a JEIGatesModel saved with "
                         f"timm_exits.model_folder.save_model_folder")
    return dataclasses.replace(resolve_policy(args.policy, model), fallback=args.fallback, strict=args.strict)


def _with_mie(model, profiled, label: str, input_size, convention: str):
    """MIE around ``model``, weighted by the cumulative costs of ``profiled`` (the model as built)."""
    from .inference.calibrated import mie_model
    from .models import MIEModel
    from .models.predictors import predictor_of

    if "mie" in predictor_of(model).split("+"):
        raise ValueError(f"{label} already answers with MIE (predictor {predictor_of(model)!r}): --mie would "
                         f"ensemble its answers a second time; leave --mie out")
    mie = mie_model(profiled, input_size, convention)
    return mie if model is profiled else MIEModel(model, mie.weights)


def _evaluate_into(args: argparse.Namespace, given: dict, output: str) -> int:
    import torch
    from timm.utils import reparameterize_model

    from .files import write_json
    from .inference import THRESHOLDS_FILE, EarlyExitExecutor, Thresholds, evaluate, measure_latency, predictor_of
    from .inference.report import format_latency, format_report, report_paths
    from .models import ProductAnytimeModel

    model, data_config, label, classes = _load_model(args, given, args.data_dir, "--data-dir")
    policy = _exit_policy(args, model, label)
    profiled = model  # a fused model's operators differ, and some conventions count them differently
    if args.fuse:
        model = reparameterize_model(model)
    if args.product_anytime:
        model = ProductAnytimeModel(model)
    if args.mie:
        model = _with_mie(model, profiled, label, data_config["input_size"], args.convention)
    predictor = predictor_of(model)
    test_set, val_set, fit_split = _image_sets(args, data_config, args.data_dir, "--data-dir", classes)
    report = evaluate(model, _batches(args, test_set), _batches(args, val_set),
                      input_size=data_config["input_size"], convention=args.convention, policy=policy,
                      q_grid=args.q_grid, fit_split=fit_split, envelope=args.envelope, sweep=args.sweep,
                      patience=args.patience_sweep, calibration=args.calibration, cost_fractions=args.cost_fractions,
                      target_cost=args.target_macs, target_accuracy=args.target_accuracy, profiled=profiled,
                      output_dir=output, label=label, progress=True,
                      info=dict(model=label, predictor=predictor, fused=args.fuse, source=args.model,
                                checkpoint=args.checkpoint, data_dir=args.data_dir, val_dir=args.val_dir,
                                val_fraction=args.val_fraction, seed=args.seed, convention=args.convention,
                                data_config={k: data_config[k] for k in (*_DATA_FLAGS, "crop_mode") if k in data_config}))
    paths = report_paths(output)
    print(f"{format_report(report)}\n\nwrote {paths['json']} and {paths['png']}")
    if args.target_macs is not None or args.target_accuracy is not None:
        path = os.path.join(output, THRESHOLDS_FILE)
        thresholds = Thresholds.load(path, model=label, num_exits=model.num_exits)
        print(f"wrote {path} ({thresholds.note})")
        if args.latency:
            images = torch.stack([test_set[i][0] for i in range(min(args.latency_images, len(test_set)))])
            report["latency"] = measure_latency(EarlyExitExecutor(model, thresholds),
                                                images.to(next(model.parameters()).device),
                                                args.latency_batch_size or args.batch_size, repeats=args.latency_repeats)
            write_json(paths["json"], report)
            print(f"{format_latency(report['latency'])}\nadded the latency to {paths['json']}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """Fit last-layer Laplace (with ``--mie``: for Laplace + MIE) and write its model folder, whole
    or not at all; a non-empty ``--output`` is refused before any work."""
    from .files import atomic_folder
    from .inference.calibrated import fit_laplace
    from .model_folder import save_model_folder
    from .models import MIEModel
    from .models.predictors import predictor_of

    if os.path.isdir(args.output) and os.listdir(args.output):
        raise ValueError(f"--output {args.output!r} exists and is not empty: choose a new or empty folder for the "
                         f"calibrated model folder (nothing there is replaced)")
    given = _data_overrides(args)
    with atomic_folder(args.output, kind="model folder") as tmp:
        model, data_config, label, classes = _load_model(args, given, args.train_dir, "--train-dir")
        train_set, val_set, fit_split = _image_sets(args, data_config, args.train_dir, "--train-dir", classes)
        mie = _with_mie(model, model, label, data_config["input_size"], args.convention) if args.mie else None
        laplace = fit_laplace(model, _batches(args, train_set), _batches(args, val_set),
                              args.prior_vars, args.temperatures, mie_costs=mie.weights if mie else None,
                              num_samples=args.num_samples, seed=args.seed)
        calibrated = laplace if mie is None else MIEModel(laplace, mie.weights)
        save_model_folder(calibrated, tmp, data_config, label_names=classes,
                          calibrated=dict(predictor=predictor_of(calibrated), source=args.model, model=label,
                                          checkpoint=args.checkpoint, train_dir=args.train_dir, fit_split=fit_split,
                                          num_samples=args.num_samples, seed=args.seed, settings=laplace.settings))
    chosen = ", ".join(f"{s['prior_var']:g} / {s['temperature']:g}" for s in laplace.settings)
    print(f"wrote {args.output}: {predictor_of(calibrated)} around {label}; var0 / temperature per exit: {chosen}\n"
          f"evaluate it with timm-exits evaluate {args.output} --data-dir ..., or load it with "
          f"timm.create_model('local-dir:{args.output}', pretrained=True)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .integrations.mmengine import convert_checkpoint

    folder = convert_checkpoint(args.checkpoint, args.output, args.model, _parse_kwargs(args.model_kwargs),
                                _data_overrides(args))
    print(f"wrote {folder}: model.safetensors and config.json (timm.create_model('local-dir:{folder}', "
          f"pretrained=True), or timm-exits evaluate {folder} --data-dir ...)")
    return 0


def _add_data_flags(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                        help=f"input channels (1: grey images, 3: RGB), height and width (default: {default})")
    parser.add_argument("--mean", type=float, nargs="+", default=None, help=f"normalisation mean per channel (default: {default})")
    parser.add_argument("--std", type=float, nargs="+", default=None, help=f"normalisation std per channel (default: {default})")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help=f"centre-crop fraction: images are resized to size / crop-pct, then cropped (default: {default})")
    parser.add_argument("--interpolation", default=None, choices=("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"),
                        help=f"resize interpolation (default: {default})")


def _add_model_flags(parser: argparse.ArgumentParser, images: str, images_help: str, fitted: str,
                     seed_help: str) -> None:
    """MODEL and what loads it, the images (``images``, the flag) and their validation split, and the
    preprocessing flags: the arguments ``evaluate`` and ``calibrate`` share."""
    parser.add_argument("model", help="a timm model name, a model folder, a weights file with config.json beside it, "
                                      "or an mmengine checkpoint (epoch_N.pth)")
    parser.add_argument("--checkpoint", default=None,
                        help="with a model name: .safetensors / .pth weights (ours or a reference checkpoint)")
    parser.add_argument(images, required=True, help=images_help)
    parser.add_argument("--val-dir", default=None, help=f"validation images {fitted}")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"or hold out this fraction of {images} (seeded) {fitted}")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE",
                        help="timm.create_model arguments (override a folder's saved ones), e.g. in_chans=1")
    _add_data_flags(parser, "the model folder's config.json, else the model's pretrained cfg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-exits", description="Multi-exit models for timm.")
    sub = parser.add_subparsers(dest="command", required=True)
    conventions = ("macs: conv + linear + attention MACs (default); msdnet: the MSDNet reference op counter; macs_norm: "
                   "MACs + 1 per batch-norm and 5 per layer-norm element, the ADN paper's convention")
    p = sub.add_parser("profile", help="per-exit cumulative MACs and parameters of a model")
    p.add_argument("model", help="a timm model name, e.g. msdnet_cifar_7exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--convention", choices=CONVENTIONS, default="macs", help=conventions)
    p.add_argument("--num-classes", type=int, default=None, help="classes of the model (default: its cfg's)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="input channels, height and width (default: the model's cfg)")
    p.add_argument("--depth", default=None, help="sub-network of an adaptive-depth model, e.g. TTFF")
    p.set_defaults(run=_profile)

    e = sub.add_parser("evaluate", help="anytime and budgeted evaluation on an image folder; JSON and PNG",
                       description="Evaluate a multi-exit model on an image folder. MODEL is a timm model name (weights "
                                   "from --checkpoint), a model folder (model.safetensors + config.json, e.g. a run's "
                                   "output folder), a weights file with config.json beside it, or an mmengine "
                                   "checkpoint of MultiExitClassifier. From a folder, the architecture, classes, "
                                   "channels and preprocessing come from config.json; the flags below override them.")
    _add_model_flags(e, "--data-dir", "test images, ImageFolder layout (<class>/<image>) or a .tar",
                     "for the thresholds", "seed of the --val-fraction split")
    e.add_argument("--policy", choices=SCORES + LEARNED_SCORES, default="maxprob",
                   help="exit confidence score, for every protocol (margin: top-1 minus top-2 probability; patience: "
                        "consecutive agreeing exits; gate: the exit probability of a jei_gates model's learned gates)")
    e.add_argument("--fallback", choices=FALLBACKS, default="last",
                   help="where samples no exit accepts go: the last exit (MSDNet, default) or the exit of highest "
                        "score over all exits (SDN)")
    e.add_argument("--strict", action="store_true",
                   help="exit when the score is > the threshold (ZTW, RC-EENN) instead of >= (MSDNet)")
    e.add_argument("--product-anytime", action="store_true",
                   help="evaluate product anytime's answers (Jazbec et al.: exit l answers with the product of the "
                        "ReLU'd logits of exits 1..l, weights l/L) instead of the exits' own, computed online: every "
                        "protocol, thresholds.json (recorded as predictor product_anytime) and --latency use them")
    e.add_argument("--mie", action="store_true",
                   help="evaluate MIE's answers (exit k: the mean of the probabilities of exits 1..k weighted by their "
                        "cumulative cost, profiled with --convention) instead of the exits' own: every protocol, "
                        "thresholds.json (recorded as predictor mie) and --latency use them; on a Laplace model folder "
                        "of timm-exits calibrate, Laplace + MIE")
    e.add_argument("--fuse", action="store_true",
                   help="run the model's inference form, timm.utils.reparameterize_model (MSDNet: batch norms folded, "
                        "buffers instead of concatenations, about 2x faster on CPU; other models: whatever timm fuses), "
                        "for the outputs and --latency; the costs stay those of the model as built")
    e.add_argument("--envelope", action="store_true",
                   help="budgeted curve made validation-monotone (BoostNet's flat_curve)")
    e.add_argument("--sweep", nargs="?", const="ztw", choices=("ztw", "sdn"), default=None,
                   help="also sweep one global threshold for all exits on the test split: ztw (default) = "
                        "linspace(0, 1, 100), sdn = SDN's 11 values; ZTW's protocol is --sweep --strict, SDN's "
                        "--sweep sdn --fallback most_confident")
    e.add_argument("--patience-sweep", action="store_true",
                   help="also ZTW's patience sweep: t = 0..K-1, exit when more than t consecutive exits agree")
    e.add_argument("--cost-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], metavar="F",
                   help="the sweeps' tables: best top-1 within these fractions of the last exit's cost "
                        "(default: ZTW's 0.25 0.5 0.75 1.0)")
    e.add_argument("--calibration", action="store_true",
                   help="also ECE (15 bins), NLL and Brier per exit and at every operating point of the curves")
    e.add_argument("--latency", action="store_true",
                   help="time the early-exit executor with the fitted thresholds (needs --target-macs or "
                        "--target-accuracy): batch-1 p50 / p95 and batched throughput")
    e.add_argument("--latency-images", type=int, default=64, help="test images timed by --latency (default 64)")
    e.add_argument("--latency-repeats", type=int, default=5, help="timed passes over them (default 5)")
    e.add_argument("--latency-batch-size", type=int, default=None,
                   help="batch size of the throughput measurement (default: --batch-size)")
    e.add_argument("--q-grid", choices=("reference", "imta"), default="reference",
                   help="MSDNet-PyTorch's 39 q values (0.05..1.95) or IMTA's 40 (..2.0)")
    e.add_argument("--convention", choices=CONVENTIONS, default="macs", help=conventions)
    e.add_argument("--target-macs", type=float, default=None, help="also write thresholds.json for this average cost")
    e.add_argument("--target-accuracy", type=float, default=None, help="or for this validation top-1 (%%)")
    e.add_argument("--batch-size", type=int, default=128, help="images per batch")
    e.add_argument("--workers", type=int, default=2, help="data loader processes")
    e.add_argument("--output", default="output/evaluate",
                   help="new or empty folder for evaluation.json, .png and thresholds.json (if it holds anything, "
                        "the first free <output>-1, -2, ...: earlier output is never overwritten)")
    e.set_defaults(run=_evaluate)

    k = sub.add_parser("calibrate", help="fit last-layer Laplace (optionally with MIE) and write its model folder",
                       description="Fit the last-layer Laplace posterior of every exit's linear classifier on the images "
                                   "of --train-dir (not augmented), choose var0 and each exit's temperature on the "
                                   "validation images (--val-dir or --val-fraction; without them var0 2 and temperature "
                                   "1), and write the calibrated model as a model folder for timm-exits evaluate and "
                                   "timm.create_model('local-dir:FOLDER', pretrained=True). MODEL is as for evaluate.")
    _add_model_flags(k, "--train-dir", "the images the posterior is fitted on, ImageFolder layout (<class>/<image>) "
                     "or a .tar: the model's training images", "to choose var0 and the temperatures on",
                     "seed of the --val-fraction split and of the predictive's draws")
    k.add_argument("--mie", action="store_true",
                   help="Laplace + MIE: each exit's setting chosen on MIE's NLL at that exit (the reference's rule), "
                        "the folder's model MIE around Laplace (predictor mie+laplace)")
    k.add_argument("--convention", choices=CONVENTIONS, default="macs", help="how --mie's costs are counted: " + conventions)
    k.add_argument("--prior-vars", type=float, nargs="+", default=None, metavar="V",
                   help="the var0 candidates (default: the reference's 0.5 .. 4.0 with a validation split, else 2)")
    k.add_argument("--temperatures", type=float, nargs="+", default=None, metavar="T",
                   help="the temperature candidates (default: the reference's 0.3 .. 3.0 with a validation split, else 1)")
    k.add_argument("--num-samples", type=int, default=50, help="draws of the predictive per image (default 50)")
    k.add_argument("--batch-size", type=int, default=128, help="images per batch")
    k.add_argument("--workers", type=int, default=2, help="data loader processes")
    k.add_argument("--output", required=True, help="the model folder to write: new or empty")
    k.set_defaults(run=_calibrate)

    c = sub.add_parser("convert", help="an mmengine checkpoint (epoch_N.pth) into a timm model folder",
                       description="Turn a checkpoint of timm_exits' mmengine MultiExitClassifier (epoch_N.pth / "
                                   "iter_N.pth of mmengine's CheckpointHook) into a model folder: model.safetensors "
                                   "and timm's config.json. The file is read without unpickling code. The model and "
                                   "preprocessing come from the run's config stored in the checkpoint; the flags "
                                   "override them, and --model is needed when no config is stored.")
    c.add_argument("checkpoint", help="the mmengine checkpoint (.pth)")
    c.add_argument("output", help="the model folder to write")
    c.add_argument("--model", default=None, help="timm model name (default: the stored config's model.model)")
    c.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE",
                   help="timm.create_model arguments (default: the stored config's model.model_kwargs)")
    _add_data_flags(c, "the stored config's dataset data_config, else the model's pretrained cfg")
    c.set_defaults(run=_convert)

    m = sub.add_parser("models", help="list the catalogued models")
    m.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    m.set_defaults(run=_models)
    t = sub.add_parser("techniques", help="list the training technique types, or one type's options and defaults")
    t.add_argument("type", nargs="?", default=None, help="a technique type, e.g. HDKD")
    t.set_defaults(run=_techniques)
    sub.add_parser("train", help="train from a config with the accelerate engine (timm-exits train --help)")
    sub.add_parser("launch", help="accelerate launch (its options, then a recipe) ending with the run's error line, "
                                  "if any, printed once (timm-exits launch --help)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the engine's own command line
        from .engine import main as train

        return train(argv=argv[1:], prog="timm-exits train")
    if argv[:1] == ["launch"]:  # accelerate launch's own command line
        from .errors import launch

        return launch(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:
        from .errors import is_user_error

        if not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
