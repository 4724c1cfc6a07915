"""mmengine adapters: thin callers of the technique objects of :mod:`timm_exits.train.techniques`.

Registered in mmengine's registries on import (``custom_imports=dict(imports=['timm_exits.integrations.mmengine'])``):

* ``MultiExitClassifier`` (MODELS): any multi-exit timm model as an mmengine ``BaseModel``; losses
  ``ce`` (weighted multi-exit cross-entropy), ``ofa`` (IMTA phase II around a phase-I checkpoint,
  One-for-all KD), ``hdkd`` (dense KD with harmonized weights), ``adn`` (ADN self-distillation),
  ``boostnet``, ``ztw`` and ``l2w`` (L2W-DEN's own steps);
* ``MultiExitDistributedDataParallel`` (MODEL_WRAPPERS): mmengine's DDP wrapper that lets L2W-DEN take
  its own steps under DDP (``model_wrapper_cfg=dict(type='MultiExitDistributedDataParallel')``);
* ``MultiExitAccuracy`` (METRICS): top-1 of every exit;
* ``ImageFolderDataset`` (DATASETS): an image folder through timm's reader and transforms;
* ``GradientEquilibriumHook``, ``GradientDeconflictionHook``, ``HarmonizedWeightsHook`` (HOOKS; the
  last saves HDKD's learned weights in the checkpoint and restores them on resume),
  ``ExitWeightScheduleHook`` (HOOKS: tells the technique the epoch, for per-epoch loss weights such
  as SDN's ``weights='sdn'``), ``L2WHook`` (HOOKS: L2W-DEN's iteration and weight net);
* ``PCGradOptimWrapper`` (OPTIM_WRAPPERS): parameter-level gradient deconfliction.

A checkpoint of a ``MultiExitClassifier`` run (``epoch_N.pth`` / ``iter_N.pth`` of mmengine's
``CheckpointHook``) becomes a timm model folder with :func:`convert_checkpoint` (``timm-exits convert``),
read without unpickling code.

mmengine 0.10.7 with torch >= 2.6 needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` to resume (its
checkpoints hold non-tensor objects); :func:`enable_resume` sets it.
"""
from __future__ import annotations

import ast
import os
import pickle
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, MMDistributedDataParallel, is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import DATASETS, HOOKS, METRICS, MODEL_WRAPPERS, MODELS, OPTIM_WRAPPERS

from .. import models  # noqa: F401  (registers the models with timm)
from ..config import resolve_preprocessing
from ..data import image_dataset
from ..model_folder import build_model, save_model_folder
from ..models.multi_exit import exit_logits
from ..train.l2w import L2W
from ..train.techniques import (HDKD, PCGrad, TrainingForward, apply_switches, create_technique,
                                create_training_model)

__all__ = ["MultiExitClassifier", "MultiExitDistributedDataParallel", "MultiExitAccuracy", "ImageFolderDataset",
           "GradientEquilibriumHook", "GradientDeconflictionHook", "HarmonizedWeightsHook", "L2WHook",
           "ExitWeightScheduleHook", "PCGradOptimWrapper", "enable_resume", "load_checkpoint_model", "convert_checkpoint"]


def enable_resume() -> None:
    """Let mmengine 0.10.7 load its own checkpoints under torch >= 2.6 (see the module docstring)."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@MODELS.register_module()
class MultiExitClassifier(BaseModel):
    """A multi-exit timm model as an mmengine model.

    Args:
        model: timm model name (e.g. ``msdnet_cifar_7exit``, ``resnet18_exits``, ``resnet18_adn``).
        model_kwargs: ``timm.create_model`` arguments (``num_classes``, ``pretrained``, ...).
        loss: ``ce`` | ``ofa`` | ``hdkd`` | ``adn``.
        loss_kwargs: ``ce``: ``weights`` (a list, ``'sdn'``, ``'pabee'``, see :mod:`timm_exits.train.schedules`;
            ``'sdn'`` needs ``ExitWeightScheduleHook``), ``label_smoothing``; ``ofa``: ``temperature``, ``gamma``,
            ``reduction``; ``hdkd``: ``alpha``, ``temperature``; ``adn``: ``alpha``, ``temperature``, ``topk``.
        phase_one_checkpoint: with ``loss='ofa'``, the phase-I weights; the model becomes an
            :class:`~timm_exits.train.IMTAModel` (frozen network + ISC heads).
        isc: ISC form for phase II (``reference``, ``detach`` or None); ``freeze_bn_stats`` likewise, and
            for ``regime='heads_only'`` (see :mod:`timm_exits.train.regimes`).
        regime: ``ce``: ``joint``, ``heads_only`` (frozen backbone: its parameters take no gradient and
            keep their values, though mmengine's default optimizer constructor still lists them) or
            ``backbone``.

    ``technique`` is the :mod:`timm_exits.train.techniques` object built from ``loss`` and
    ``loss_kwargs``; its losses are the model's, ``HarmonizedWeightsHook`` sets its HDKD options.
    """

    def __init__(
            self,
            model: str,
            model_kwargs: Optional[dict] = None,
            loss: str = "ce",
            loss_kwargs: Optional[dict] = None,
            phase_one_checkpoint: Optional[str] = None,
            isc: Optional[str] = "reference",
            freeze_bn_stats: bool = False,
            regime: str = "joint",
            data_preprocessor: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.loss_type, self.loss_kwargs = loss, dict(loss_kwargs or {})
        options = {"exit_weights" if k == "weights" else k: v for k, v in self.loss_kwargs.items()}
        self.technique = create_technique(loss, isc=isc, freeze_bn_stats=freeze_bn_stats, regime=regime, **options)
        self.model = self.technique.prepare(create_training_model(model, self.technique, model_kwargs,
                                                                  phase_one_checkpoint))
        self.l2w_iteration: Optional[int] = None  # set by L2WHook before every training iteration

    def train_step(self, data: Union[dict, tuple, list], optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """L2W-DEN takes its own steps (:meth:`l2w_train_step`); every other technique trains through
        mmengine's ``train_step``."""
        if not isinstance(self.technique, L2W):
            return super().train_step(data, optim_wrapper)
        return self.l2w_train_step(data, optim_wrapper, TrainingForward(self.model))

    def l2w_train_step(self, data: Union[dict, tuple, list], optim_wrapper: OptimWrapper,
                       forward: Callable[[torch.Tensor], Any]) -> Dict[str, torch.Tensor]:
        """L2W-DEN's steps on one batch (:meth:`~timm_exits.train.l2w.L2W.step`: per half batch a meta
        step and an optimizer update), the training outputs from ``forward`` (under DDP: through the
        wrapper, so that the gradients are averaged)."""
        if self.l2w_iteration is None:
            raise ValueError("loss='l2w' needs custom_hooks=[dict(type='L2WHook')]: it tells the model the iteration "
                             "(the meta step runs every meta_interval-th) and keeps the weight net in checkpoints")
        if optim_wrapper._accumulative_counts != 1:
            raise ValueError("loss='l2w' takes an optimizer step after each half of a batch: it does not accumulate "
                             "gradients (set optim_wrapper accumulative_counts=1)")
        with optim_wrapper.optim_context(self):
            data = self.data_preprocessor(data, True)
            terms = self.technique.step(self.model, forward, data["inputs"], data["data_samples"],
                                        backward=optim_wrapper.backward, optimizer=optim_wrapper.optimizer,
                                        update=lambda _: (optim_wrapper.step(), optim_wrapper.zero_grad()),
                                        index=self.l2w_iteration)
        optim_wrapper.step()
        optim_wrapper.zero_grad()
        return self.parse_losses({f"loss_{name}": loss for name, loss in terms.items()})[1]

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None, mode: str = "tensor"):
        """mmengine's modes ``loss``, ``predict`` and ``tensor``, and ``exits``: the technique's training
        outputs (every exit's logits), which L2W-DEN's steps take through a DDP wrapper."""
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self._predict(inputs, data_samples)
        if mode == "exits":
            return TrainingForward(self.model)(inputs)
        return self.model(inputs)

    def _predict(self, inputs, labels) -> List[Dict[str, torch.Tensor]]:
        logits = torch.stack(exit_logits(self.model, inputs), 1)  # batch x exits x classes
        return [{"logits": z, "label": y} for z, y in zip(logits, labels)]

    def loss(self, inputs: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The technique's loss terms (``loss_exit<k>``, ``loss_hdkd``, ...), which ``parse_losses``
        sums (ADN: one backward on the sum equals the reference's two, the teacher is detached)."""
        if isinstance(self.technique, L2W):  # reached for training only through MMDistributedDataParallel
            raise ValueError("loss='l2w' takes its own steps in MultiExitClassifier.train_step, which "
                             "MMDistributedDataParallel does not call: under DDP set "
                             "model_wrapper_cfg=dict(type='MultiExitDistributedDataParallel')")
        losses = self.technique.batch_losses(self.model, TrainingForward(self.model), inputs, target)
        return {f"loss_{name}": loss for name, loss in losses.items()}

    def parse_losses(self, losses: Dict[str, torch.Tensor]):
        total, log_vars = super().parse_losses(losses)
        # PCGradOptimWrapper back-propagates each exit's loss: parse_losses is where both the model's
        # train_step and MMDistributedDataParallel's hand the losses over, so they travel with the total
        total.exit_losses = {k: v for k, v in losses.items() if k.startswith("loss_exit")}
        return total, log_vars


@MODEL_WRAPPERS.register_module()
class MultiExitDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for :class:`MultiExitClassifier`: L2W-DEN takes its own steps (two
    updates per batch, each forward through this wrapper so that DDP averages the gradients; the
    weight net's meta gradients are averaged by the technique); every other technique trains as
    under ``MMDistributedDataParallel``."""

    def train_step(self, data: Union[dict, tuple, list], optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        if isinstance(getattr(self.module, "technique", None), L2W):
            return self.module.l2w_train_step(data, optim_wrapper, lambda images: self(images, mode="exits"))
        return super().train_step(data, optim_wrapper)


@DATASETS.register_module()
class ImageFolderDataset(torch.utils.data.Dataset):
    """An ImageFolder (or tar) through timm's reader and transforms, as mmengine samples
    ``dict(inputs=image, data_samples=label)``. ``data_config``: timm's ``input_size``, ``mean``,
    ``std``, ``crop_pct``, ``interpolation``; ``train`` selects timm's training augmentation."""

    def __init__(self, root: str, data_config: Optional[dict] = None, train: bool = False, **transform_kwargs):
        self.dataset = image_dataset(root, train=train, config=dict(data_config or {}), **transform_kwargs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image, label = self.dataset[index]
        return {"inputs": image, "data_samples": label}


@METRICS.register_module()
class MultiExitAccuracy(BaseMetric):
    """Top-1 accuracy (%) of every exit: ``exit1_top1``, ``exit2_top1``, ..."""

    default_prefix = "multi_exit"

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            self.results.append((sample["logits"].argmax(-1) == sample["label"]).cpu())

    def compute_metrics(self, results: list) -> Dict[str, float]:
        correct = torch.stack(results).float().mean(0)
        return {f"exit{k + 1}_top1": 100 * float(c) for k, c in enumerate(correct)}


@HOOKS.register_module()
class GradientEquilibriumHook(Hook):
    """Train with Gradient Equilibrium (IMTA): switches it on in the model's forward graph."""

    priority = "NORMAL"

    def before_train(self, runner) -> None:
        apply_switches(_unwrap(runner.model).model, gradient_equilibrium=True)


@HOOKS.register_module()
class GradientDeconflictionHook(Hook):
    """Branch-level gradient deconfliction (one backward): ``mode`` is ``symmetric`` or ``protect_deeper``."""

    def __init__(self, mode: str = "symmetric"):
        if mode not in ("symmetric", "protect_deeper"):
            raise ValueError(f"GradientDeconflictionHook mode must be 'symmetric' or 'protect_deeper' (parameter-level "
                             f"PCGrad is PCGradOptimWrapper), got {mode!r}")
        self.mode = mode

    def before_train(self, runner) -> None:
        apply_switches(_unwrap(runner.model).model, deconfliction=self.mode)


class _TechniqueStateHook(Hook):
    """Keeps the model's technique state (learnt weights and their optimizer) in the checkpoint under
    ``key`` and restores it on resume."""

    key = ""

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[self.key] = _unwrap(runner.model).technique.state_dict()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.key in checkpoint:
            _unwrap(runner.model).technique.load_state_dict(checkpoint[self.key])


@HOOKS.register_module()
class HarmonizedWeightsHook(_TechniqueStateHook):
    """HDKD: before every ``interval``-th training iteration, update the harmonized loss weights on a
    batch of the validation split (a held-out part of the training data, never the test set). The
    weights, their optimizer and the validation loss's averages are saved in the checkpoint
    (``checkpoint['hdkd']``) and restored on resume."""

    key = "hdkd"

    def __init__(self, val_dataloader: Union[dict, Any], lr: float = 3e-4, xi: Optional[float] = None,
                 init: str = "uniform", ratio_reg: bool = True, interval: int = 1):
        self.val_dataloader_cfg = val_dataloader
        self.options = dict(lr=lr, xi=xi, init=init, ratio_reg=ratio_reg, interval=interval)

    def before_run(self, runner) -> None:
        """The model's HDKD technique with this hook's options, on the model's device (before a
        resumed checkpoint is loaded)."""
        model = _unwrap(runner.model)
        if not isinstance(model.technique, HDKD):
            raise ValueError(f"HarmonizedWeightsHook learns the weights of loss='hdkd', the model's loss is "
                             f"{model.loss_type!r}")
        model.technique = create_technique("hdkd", **model.loss_kwargs, hdkd=self.options)
        model.technique.prepare(model.model)

    def before_train(self, runner) -> None:
        loader = self.val_dataloader_cfg
        self._loader = runner.build_dataloader(loader) if isinstance(loader, dict) else loader
        self._iter = iter(self._loader)

    def _val_batch(self, model):
        try:
            batch = next(self._iter)
        except StopIteration:
            self._iter = iter(self._loader)
            batch = next(self._iter)
        data = model.data_preprocessor(batch, True)
        return data["inputs"], data["data_samples"]

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        model = _unwrap(runner.model)
        if not model.technique.due(batch_idx):
            return
        train = model.data_preprocessor(data_batch, True)
        model.technique.update_weights(model.model, (train["inputs"], train["data_samples"]), self._val_batch(model),
                                       runner.optim_wrapper.get_lr()["lr"][0])



@HOOKS.register_module()
class L2WHook(_TechniqueStateHook):
    """L2W-DEN (``loss='l2w'``): tells the model the iteration before each training iteration (its meta
    step runs every ``meta_interval``-th) and keeps the weight net and its Adam state in the checkpoint
    (``checkpoint['l2w']``), restored on resume."""

    priority = "HIGH"
    key = "l2w"

    def before_run(self, runner) -> None:
        model = _unwrap(runner.model)
        if not isinstance(model.technique, L2W):
            raise ValueError(f"L2WHook drives loss='l2w', the model's loss is {model.loss_type!r}")

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        _unwrap(runner.model).l2w_iteration = runner.iter



@HOOKS.register_module()
class ExitWeightScheduleHook(Hook):
    """Tells the model's technique the epoch, before every training iteration: the epoch is
    ``iteration // len(train_dataloader)`` of ``ceil(max_iters / len(train_dataloader))``, which is
    the runner's epoch in an epoch-based loop and counts passes over the data in an iteration-based
    one. Per-epoch loss weights (``loss_kwargs=dict(weights='sdn')``) need it."""

    priority = "HIGH"

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        per_epoch = len(runner.train_dataloader)
        _unwrap(runner.model).technique.set_epoch(runner.iter // per_epoch, -(-runner.max_iters // per_epoch))


@OPTIM_WRAPPERS.register_module()
class PCGradOptimWrapper(OptimWrapper):
    """Parameter-level gradient deconfliction (PCGrad between the exits' gradients, the
    :class:`~timm_exits.train.PCGrad` technique): ``scope``, ``order``, ``protect_deeper``, ``seed``
    (``scope='segment'``: one segment per optimizer param group, e.g. from ``paramwise_cfg``).
    Under DDP the per-exit gradients are averaged explicitly, so DDP's own sync is switched off."""

    def __init__(self, optimizer, scope: str = "global", order: str = "random", protect_deeper: bool = False,
                 seed: int = 0, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.technique = PCGrad(scope=scope, order=order, protect_deeper=protect_deeper, seed=seed)

    @contextmanager
    def optim_context(self, model):
        if hasattr(model, "no_sync"):
            with model.no_sync():
                yield
        else:
            yield

    def update_params(self, loss: torch.Tensor, step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> None:
        exit_losses = getattr(loss, "exit_losses", None)
        if not exit_losses:
            raise ValueError("PCGradOptimWrapper needs per-exit losses: use MultiExitClassifier with loss='ce'")
        groups = [group["params"] for group in self.optimizer.param_groups]  # segments: the param groups
        self.technique.backward(exit_losses, [p for g in groups for p in g], groups,
                                scale=1.0 / self._accumulative_counts)
        self._inner_count += 1
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))


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
    """The multi-exit model of a ``MultiExitClassifier`` checkpoint, in eval mode, the data config of
    the run's stored config, and what the checkpoint is (its ``model`` settings, epoch and iteration,
    for the folder's ``timm_exits`` section). The model name and ``timm.create_model``
    arguments come from that config (mmengine stores it in ``meta['cfg']``; it is parsed, not
    executed), ``model`` / ``model_kwargs`` override them and are needed when the config is absent."""
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
    if settings.get("loss") in ("ofa", "boostnet", "ztw"):  # IMTA phase II, BoostNet, ZTW: the network wrapped
        options = {"exit_weights" if k == "weights" else k: v for k, v in (settings.get("loss_kwargs") or {}).items()}
        net = create_technique(settings["loss"], isc=settings.get("isc", "reference"),  # as the run prepared it
                               freeze_bn_stats=settings.get("freeze_bn_stats", False), **options).prepare(net)
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
    (:func:`timm_exits.model_folder.save_model_folder`); preprocessing from the run's config,
    overridden by ``data_config``, else the model's defaults. See :func:`load_checkpoint_model`."""
    net, recorded, info = load_checkpoint_model(checkpoint, model, model_kwargs)
    given = {**recorded, **(data_config or {})}
    name = lambda key: f"data_config[{key!r}]" if key in (data_config or {}) else \
        f"the stored config's data_config[{key!r}]"  # noqa: E731
    return save_model_folder(net, folder, resolve_preprocessing(net, given, name), **info)
