"""A ``MultiExitClassifier`` checkpoint of mmengine's ``CheckpointHook`` (``epoch_N.pth`` /
``iter_N.pth``) as a timm model folder (``timm-exits convert``), read without unpickling code: the
log history's objects become inert stand-ins, the stored config is parsed, never executed."""
from __future__ import annotations

import ast
import os
import pickle
from typing import Any, Dict, Optional, Tuple

import timm
import torch

from ...config import resolve_preprocessing
from ...model_folder import build_model, save_model_folder
from ...train.techniques import build_technique

__all__ = ["load_checkpoint_model", "convert_checkpoint"]


class _Discarded:
    """Stands in for what an mmengine checkpoint holds besides weights and settings (the message hub's
    log history): built from anything, keeps nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# the globals of mmengine's message hub: HistoryBuffer, its statistics methods (pickled through getattr), numpy values
_LOG_GLOBALS = ("mmengine.logging.history_buffer.HistoryBuffer", "builtins.getattr", "numpy.ndarray", "numpy.dtype",
                "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
                "numpy.core.multiarray._reconstruct", "numpy.core.multiarray.scalar")


def _read_checkpoint(path: str) -> Dict[str, Any]:
    """An mmengine checkpoint loaded with ``weights_only=True``; the log history's objects are read
    as inert :class:`_Discarded` stand-ins, so nothing in the file is called."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        with torch.serialization.safe_globals([(_Discarded, name) for name in _LOG_GLOBALS]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path!r} is not an mmengine checkpoint that loads without unpickling code: "
                         f"{str(e).splitlines()[-1] if str(e) else type(e).__name__}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path!r} is not an mmengine checkpoint: expected a dict with 'state_dict' and 'meta'")
    return checkpoint


def _literal(node: ast.AST) -> Any:
    """The value of a config expression made of literals and ``dict(...)`` calls (what mmengine's
    ``Config.pretty_text`` writes); anything else is refused, never evaluated."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {k.arg: _literal(k.value) for k in node.keywords if k.arg is not None}
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


_CONFIG_LIMIT = 2 ** 20  # characters of a stored config parsed at most (mmengine's own are a few kB)


def _config_values(text: str, source: str) -> Dict[str, Any]:
    """Top-level ``name = value`` assignments of a stored mmengine config whose values are literal
    (others are skipped): parsed, not executed, and only up to :data:`_CONFIG_LIMIT` characters."""
    if isinstance(text, str) and len(text) > _CONFIG_LIMIT:
        raise ValueError(f"{source!r} stores a config of {len(text):,} characters, more than the {_CONFIG_LIMIT:,} "
                         f"read (a run's config is a few kB): it is not parsed; this is not a checkpoint "
                         f"mmengine wrote, convert one that is")
    values = {}
    try:
        tree = ast.parse(text or "")
    except SyntaxError:
        return values
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
            try:
                values[statement.targets[0].id] = _literal(statement.value)
            except (ValueError, TypeError, SyntaxError):
                pass
    return values


def _data_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """The evaluation preprocessing of a stored config: the ``data_config`` of its validation (else
    test, else training) ``ImageFolderDataset``."""
    for loader in ("val_dataloader", "test_dataloader", "train_dataloader"):
        dataset = (values.get(loader) or {}).get("dataset") or {}
        if isinstance(dataset, dict) and isinstance(dataset.get("data_config"), dict):
            return dict(dataset["data_config"])
    return {}


def load_checkpoint_model(
        checkpoint: str,
        model: Optional[str] = None,
        model_kwargs: Optional[dict] = None,
) -> Tuple[torch.nn.Module, Dict[str, Any], Dict[str, Any]]:
    """The multi-exit model of a ``MultiExitClassifier`` checkpoint. The model name and
    ``timm.create_model`` arguments come from the run's stored config (mmengine stores it in
    ``meta['cfg']``; it is parsed, not executed).

    Args:
        checkpoint: the mmengine checkpoint file.
        model: the timm model name, overriding the stored config's (needed when it is absent).
        model_kwargs: ``timm.create_model`` arguments, overriding the stored config's.

    Returns:
        The model in eval mode, the data config of the run's stored config, and what the checkpoint
        is (its ``model`` settings, epoch and iteration, for the folder's ``timm_exits`` section).
    """
    ckpt = _read_checkpoint(checkpoint)
    values = _config_values((ckpt.get("meta") or {}).get("cfg", ""), checkpoint)
    settings = values.get("model") if isinstance(values.get("model"), dict) else {}
    if settings and not str(settings.get("type", "MultiExitClassifier")).endswith("MultiExitClassifier"):
        raise ValueError(f"{checkpoint!r} is a checkpoint of a {settings.get('type')!r} model, not of "
                         f"timm_exits' MultiExitClassifier")
    name = model or settings.get("model")
    if not name:
        raise ValueError(f"{checkpoint!r} stores no config naming its model: give the timm model name (--model NAME) "
                         f"and its arguments (--model-kwargs num_classes=...)")
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see `timm-exits models` or timm.list_models()")
    kwargs = {k: v for k, v in {**(settings.get("model_kwargs") or {}), **(model_kwargs or {})}.items()
              if k not in ("pretrained", "pretrained_cfg_overlay", "checkpoint_path")}  # the weights are the checkpoint's
    weights = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not weights:
        raise ValueError(f"{checkpoint!r} holds no MultiExitClassifier weights (no 'model.' keys in its state_dict)")
    net = build_model(name, kwargs, f"the arguments {kwargs} (the stored config's and --model-kwargs)")
    technique = settings.get("technique")
    if technique is not None:  # IMTA phase II, BoostNet, ZTW: the network wrapped as the run's technique wraps it
        try:
            net = build_technique(technique).prepare(net)  # as the run prepared it (ZTW: the part it trained)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{checkpoint!r}: its config's technique {technique!r} does not build: {e}") from None
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{checkpoint!r} does not fit {name} built with {kwargs}: {e}") from None
    meta = ckpt.get("meta") or {}
    info = dict(source=os.path.abspath(checkpoint), epoch=meta.get("epoch"), iter=meta.get("iter"),
                mmengine_model={**settings, "model": name, "model_kwargs": kwargs})
    return net.eval(), _data_config(values), info


def convert_checkpoint(
        checkpoint: str,
        folder: str,
        model: Optional[str] = None,
        model_kwargs: Optional[dict] = None,
        data_config: Optional[dict] = None,
) -> str:
    """Write the model of a ``MultiExitClassifier`` checkpoint as a timm model folder
    (:func:`timm_exits.model_folder.save_model_folder`).

    Args:
        checkpoint, model, model_kwargs: as in :func:`load_checkpoint_model`.
        folder: the model folder to write.
        data_config: preprocessing (timm's ``input_size``, ``mean``, ``std``, ...) overriding the
            run's config; what neither gives is the model's default.

    Returns:
        What :func:`~timm_exits.model_folder.save_model_folder` returns.
    """
    net, recorded, info = load_checkpoint_model(checkpoint, model, model_kwargs)
    given = {**recorded, **(data_config or {})}
    name = lambda key: f"data_config[{key!r}]" if key in (data_config or {}) else \
        f"the stored config's data_config[{key!r}]"  # noqa: E731
    return save_model_folder(net, folder, resolve_preprocessing(net, given, name), **info)
