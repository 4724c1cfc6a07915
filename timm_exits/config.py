"""Training configs: mmengine config files (``_base_`` inheritance, ``--cfg-options key=value``)
checked against the engine's schema, so that a misspelt key is an error, not a silent default.

A config has the sections of :data:`DEFAULTS`. ``model.kwargs``, ``data.augment``, ``optimizer``
and ``scheduler`` are free-form (timm's ``create_model``, ``create_transform``,
``create_optimizer_v2`` and ``create_scheduler_v2`` arguments, which check them). ``phases`` is an
optional list of runs done one after the other, each a ``name`` plus overrides of the sections
above (IMTA: phase I with Gradient Equilibrium, then phase II on its weights).
"""
from __future__ import annotations

import ast
import copy
import difflib
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from mmengine.config import Config
from timm.data import resolve_data_config
from timm.models._input import get_model_input_config
from torch import nn

from .data import IMAGE_MODES, TRANSFORMS
from .inference.budgeted import Q_GRIDS
from .inference.policies import LEARNED_SCORES, SCORES
from .profile import CONVENTIONS
from .values import (PREPROCESSING, PREPROCESSING_VALUES, ConfigError, Matches, Number, OneOf,  # noqa: F401
                     check_preprocessing, require)
from .train.techniques import DEFAULT_TECHNIQUE, technique_config

__all__ = ["DEFAULTS", "VALID", "PREPROCESSING", "ConfigError", "load_config", "resolve_config", "phase_configs", "check_value",
           "check_preprocessing", "resolve_preprocessing"]

DEFAULTS: Dict[str, Any] = dict(
    model=dict(name=None, kwargs={}),
    data=dict(
        dir=None,             # ImageFolder root with the splits below, or a .tar per split
        embedded=None,        # 'digits': write scikit-learn's digits into `dir` first (no download)
        train_split="train",
        test_split="val",     # or None: hold `test_fraction` of the training split out as the test set
        test_fraction=0.0,
        val_fraction=0.0,     # held out of the training split for the budgeted thresholds (and HDKD)
        split_seed=0,
        img_mode="RGB",
        input_size=None, mean=None, std=None, crop_pct=None, interpolation=None,  # default: the model's cfg
        transform="timm",     # or 'pad_crop' (MSDNet's CIFAR augmentation)
        augment={},           # timm create_transform training options (scale, hflip, auto_augment, re_prob, ...)
        batch_size=64,        # the global batch of a step: all processes together
        eval_batch_size=256,
        workers=None,         # data-loader processes; None: this process's share of the CPUs, at most 8
        check_files=True,     # before training, open every file's header (True), decode every image ('decode'), or not (False)
    ),
    mixup=dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch"),
    optimizer=dict(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
    scheduler=dict(sched="cosine"),
    train=dict(
        epochs=1,
        seed=0,
        mixed_precision="no",       # 'bf16' (CPU too) or 'fp16' (GPU); one value for every phase
        grad_accum_steps=1,         # one value for every phase
        clip_grad=None,
        ema_decay=None,             # timm ModelEmaV3; the EMA weights are the ones evaluated
        checkpoint_every=0,         # also save every N optimizer steps (0: at the end of each epoch only)
        log_every=10,
        val_interval=1,             # validate on the held-out split (data.val_fraction) every N epochs, and the last; 0: never
        best_metric="anytime_top1",  # best/ keeps the best epoch by this summary.csv column (eval_loss: the lowest)
    ),
    # the technique: a registered type and its options (timm_exits.train.techniques; each type's Options
    # dataclass holds the defaults); the resolved config lists every option
    technique=dict(type=DEFAULT_TECHNIQUE),
    evaluation=dict(policy="maxprob", q_grid="reference", convention="macs"),
    tracker="tensorboard",          # accelerate tracker name, or None
    output_dir="output/train",
    phases=None,
)

FREE_FORM = ("model.kwargs", "data.augment", "optimizer", "scheduler", "technique")  # technique: checked by its type
PROCESS_WIDE = ("train.mixed_precision", "train.grad_accum_steps", "tracker", "output_dir")


def _check_keys(config: Dict[str, Any], schema: Dict[str, Any], prefix: str = "") -> None:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; the keys of {prefix.rstrip('.') or 'a config'} "
                           f"are: {', '.join(schema)}")
        if isinstance(schema[key], dict) and re.sub(r"^phases\[\d+\]\.", "", path) not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a dict of {', '.join(schema[key])}, got {value!r}")
            _check_keys(value, schema[key], path + ".")


# the valid values of every numeric and named key (the free-form sections' keys when they are set), declared once
VALID: Dict[str, Union[Number, OneOf, Matches]] = {
    "data.test_fraction": Number(float, 0.0, 1.0, high_open=True),
    "data.val_fraction": Number(float, 0.0, 1.0, high_open=True),
    "data.split_seed": Number(int, 0),
    "data.img_mode": OneOf(tuple(IMAGE_MODES)),
    **{f"data.{key}": valid for key, valid in PREPROCESSING_VALUES.items()},
    "data.transform": OneOf(TRANSFORMS),
    "data.batch_size": Number(int, 1),
    "data.eval_batch_size": Number(int, 1),
    "data.workers": Number(int, 0, optional=True),
    "data.check_files": OneOf((True, False, "decode")),
    "mixup.mixup_alpha": Number(float, 0.0),
    "mixup.cutmix_alpha": Number(float, 0.0),
    "mixup.prob": Number(float, 0.0, 1.0),
    "mixup.switch_prob": Number(float, 0.0, 1.0),
    "mixup.mode": OneOf(("batch", "pair", "elem")),
    "optimizer.lr": Number(float, 0.0, low_open=True, optional=True),
    "optimizer.momentum": Number(float, 0.0, 1.0, high_open=True),
    "optimizer.weight_decay": Number(float, 0.0),
    "train.epochs": Number(int, 1),
    "train.seed": Number(int, 0),
    "train.grad_accum_steps": Number(int, 1),
    "train.clip_grad": Number(float, 0.0, low_open=True, optional=True),
    "train.ema_decay": Number(float, 0.0, 1.0, low_open=True, high_open=True, optional=True),
    "train.checkpoint_every": Number(int, 0),
    "train.log_every": Number(int, 1),
    "train.val_interval": Number(int, 0),
    "train.best_metric": Matches(r"anytime_top1|eval_(loss|top1|top5)|exit[1-9][0-9]*_top1",
                                 "'anytime_top1', 'eval_loss', 'eval_top1', 'eval_top5' or 'exit<k>_top1' (k from 1)"),
    "evaluation.policy": OneOf(SCORES + LEARNED_SCORES),
    "evaluation.q_grid": OneOf(tuple(Q_GRIDS)),
    "evaluation.convention": OneOf(CONVENTIONS),
}
_PHASE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MISSING = object()


def _value(config: Dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part, _MISSING) if isinstance(config, dict) else _MISSING
    return config


def check_value(key: str, value: Any, name: Optional[str] = None) -> None:
    """Check one config value against its declared range.

    Args:
        key: a key of :data:`VALID` (``'train.clip_grad'``).
        value: its value.
        name: what the error calls it (default: the key).

    Raises:
        ConfigError: :data:`VALID` does not admit ``value`` for ``key``.
    """
    require(VALID[key], value, name or key)


def _check_values(config: Dict[str, Any], where: str = "") -> None:
    """Every key of :data:`VALID` that is set (a negative fraction would silently invert a split, a
    negative clip_grad ascend the gradient), the preprocessing's channel counts, and the technique section,
    checked and completed with its type's defaults (its ``Options``)."""
    for key in VALID:
        value = _value(config, key)
        if value is not _MISSING:
            check_value(key, value, where + key)
    check_preprocessing(config["data"], lambda key: f"{where}data.{key}", (config["data"]["input_size"] or [None])[0])
    try:
        config["technique"] = technique_config(config["technique"])
    except ValueError as e:
        raise ConfigError(f"{where}technique: {e}") from None


def resolve_preprocessing(model: nn.Module, given: Dict[str, Any],
                          name: Callable[[str], str] = lambda key: key) -> Dict[str, Any]:
    """timm's data config of ``model`` (``resolve_data_config``) with the ``given`` preprocessing.

    Args:
        model: the model.
        given: preprocessing keys (``input_size``, ``mean``, ``std``, ...; None: not given),
            checked (:func:`check_preprocessing`) for the channels the model is run with
            (``given``'s ``input_size``, else the model's own, which its pretrained cfg may not
            say), so that a single mean or std serves every channel.
        name: what an error calls a key.

    Returns:
        The data config, with the channel count in ``input_size``.
    """
    given = {k: v for k, v in given.items() if v is not None}
    channels = (given.get("input_size") or get_model_input_config(model)["input_size"])[0]
    given = check_preprocessing(given, name, channels)
    config = resolve_data_config({**given, "in_chans": channels}, model=model)
    return {**config, "input_size": (channels, *config["input_size"][1:])}


def _merge(base: Dict[str, Any], override: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{prefix}{key}"
        if path == "technique" and isinstance(value, dict) and isinstance(out.get(key), dict) \
                and value.get("type", out[key].get("type")) == out[key].get("type"):
            out[key] = {**out[key], **copy.deepcopy(value)}  # the same technique: its options merge
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and path not in FREE_FORM:
            out[key] = _merge(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """``config`` checked against :data:`DEFAULTS` and completed with its defaults."""
    config = {k: v for k, v in config.items() if k not in ("custom_imports",)}
    _check_keys(config, DEFAULTS)
    for i, phase in enumerate(config.get("phases") or []):
        if not isinstance(phase, dict) or "name" not in phase:
            raise ConfigError(f"phases[{i}] must be a dict with a 'name' and overrides, got {phase!r}")
        overrides = {k: v for k, v in phase.items() if k != "name"}
        _check_keys(overrides, {k: v for k, v in DEFAULTS.items() if k != "phases"}, f"phases[{i}].")
        for key in PROCESS_WIDE:
            section, _, leaf = key.partition(".")
            if section in overrides and (not leaf or leaf in overrides[section]):
                raise ValueError(f"phases[{i}] overrides {key!r}, which is one value for the whole run")
    resolved = _merge(DEFAULTS, config)
    if resolved["model"]["name"] is None:
        raise ValueError("the config names no model: set model.name (e.g. msdnet_cifar_7exit)")
    _check_values(resolved)
    return resolved


def _merge_bases_in_order(path: str) -> Dict[str, Any]:
    """A config whose ``_base_`` files set the same keys (a recipe and a dataset base, say), which
    mmengine refuses: each base is read on its own and merged in the order listed, a later base
    overriding an earlier one key by key, then the file's own keys on top."""
    source = open(path).read()
    module = ast.parse(source)
    assignment = next((node for node in module.body if isinstance(node, ast.Assign)
                       and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets)), None)
    try:
        bases = ast.literal_eval(assignment.value)
    except (AttributeError, ValueError) as e:
        raise ConfigError(f"{path}: _base_ must be a literal list of file names to merge its bases in order") from e
    bases = [bases] if isinstance(bases, str) else list(bases)
    lines = source.splitlines(keepends=True)
    own = "".join(lines[:assignment.lineno - 1] + lines[assignment.end_lineno:])
    merged = Config()  # merge_from_dict is mmengine's inheritance rule: key by key, `_delete_=True` replaces
    for base in bases:
        merged.merge_from_dict(Config.fromfile(os.path.join(os.path.dirname(os.path.abspath(path)), base)).to_dict())
    merged.merge_from_dict(Config.fromstring(own, ".py").to_dict())
    return merged.to_dict()


def load_config(path: str, data_dir: Optional[str] = None, output_dir: Optional[str] = None,
                cfg_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read an mmengine config file (with its ``_base_`` files; bases that set the same keys are
    merged in the order listed, where mmengine alone refuses them), apply the overrides, then check
    and complete it.

    Args:
        path: the config file (a ``.py`` config is Python: mmengine executes it).
        data_dir: overrides ``data.dir``.
        output_dir: overrides ``output_dir``.
        cfg_options: ``--cfg-options`` style overrides (``{'train.epochs': 3}``).

    Returns:
        The resolved config, every default filled in.
    """
    if not os.path.lexists(path):
        raise FileNotFoundError(f"config file {path!r} not found (see recipes/ for examples)")
    if not os.path.isfile(path):
        raise ConfigError(f"config {path!r} is not a regular file (a folder?); expected an mmengine config file")
    try:
        try:
            cfg = Config.fromfile(path)
        except KeyError as e:  # mmengine refuses a key that two bases set: merge them in order instead
            if "Duplicate key is not allowed among bases" not in str(e):
                raise
            cfg = Config(_merge_bases_in_order(path))
    except SyntaxError as e:
        raise ConfigError(f"{e.filename if e.filename not in (None, '<unknown>') else path}, line {e.lineno}: "
                          f"{e.msg}; a .py config must be valid Python") from None
    except RecursionError:
        raise ConfigError(f"{path}: its _base_ files include each other (a cycle) or nest too deeply") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: a _base_ file it names is missing: {e.filename} (paths are relative to "
                                f"the file that names them)") from None
    except (AttributeError, TypeError) as e:  # mmengine reading a .json / .yaml that is not a mapping
        raise ConfigError(f"{path} is not an mmengine config: expected a mapping of sections (model, data, "
                          f"train, ...), got something mmengine cannot read ({e})") from None
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options), allow_list_keys=True)
    config = cfg.to_dict()
    if data_dir is not None:
        config.setdefault("data", {})["dir"] = data_dir
    if output_dir is not None:
        config["output_dir"] = output_dir
    return resolve_config(config)


def phase_configs(config: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """The runs of a config, in order: ``[(name, config of that run)]`` (one run named ``train``
    without ``phases``)."""
    phases: Sequence[dict] = config.get("phases") or [dict(name="train")]
    runs = []
    for phase in phases:
        if not isinstance(phase["name"], str) or not _PHASE_NAME.match(phase["name"]):
            raise ConfigError(f"a phase name is a folder name under the output folder (letters, digits, '_', '.', "
                              f"'-', not starting with '.' or '-'), got {phase['name']!r}")
        overrides = {k: v for k, v in phase.items() if k != "name"}
        run = {**_merge(config, overrides), "phases": None}
        _check_values(run, f"phase {phase['name']!r}: ")
        runs.append((phase["name"], run))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must differ, got {names}")
    return runs
