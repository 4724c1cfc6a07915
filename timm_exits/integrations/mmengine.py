"""mmengine adapters: thin callers of the plain-PyTorch techniques in :mod:`timm_exits.train`.

Registered in mmengine's registries on import (``custom_imports=dict(imports=['timm_exits.integrations.mmengine'])``):

* ``MultiExitClassifier`` (MODELS): any multi-exit timm model as an mmengine ``BaseModel``; losses
  ``ce`` (weighted multi-exit cross-entropy), ``ofa`` (IMTA phase II around a phase-I checkpoint,
  One-for-all KD), ``hdkd`` (dense KD with harmonized weights) and ``adn`` (ADN self-distillation);
* ``MultiExitAccuracy`` (METRICS): top-1 of every exit;
* ``ImageFolderDataset`` (DATASETS): an image folder through timm's reader and transforms;
* ``GradientEquilibriumHook``, ``GradientDeconflictionHook``, ``HarmonizedWeightsHook`` (HOOKS);
* ``PCGradOptimWrapper`` (OPTIM_WRAPPERS): parameter-level gradient deconfliction.

mmengine 0.10.7 with torch >= 2.6 needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` to resume (its
checkpoints hold non-tensor objects); :func:`enable_resume` sets it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS, OPTIM_WRAPPERS

import timm_exits  # noqa: F401  (registers the models with timm)
from ..data import image_dataset
from ..models.multi_exit import exit_logits
from ..train import adn_losses, pcgrad_backward
from ..train.hdkd import BalancedValidationLoss, HarmonizedWeights, hdkd_weight_step
from ..train.objective import TrainingForward, apply_switches, create_training_model, training_losses

__all__ = ["MultiExitClassifier", "MultiExitAccuracy", "ImageFolderDataset", "GradientEquilibriumHook", "GradientDeconflictionHook",
           "HarmonizedWeightsHook", "PCGradOptimWrapper", "enable_resume"]


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
        loss_kwargs: ``ce``: ``weights``, ``label_smoothing``; ``ofa``: ``temperature``, ``gamma``,
            ``reduction``; ``hdkd``: ``alpha``, ``temperature``; ``adn``: ``alpha``, ``temperature``, ``topk``.
        phase_one_checkpoint: with ``loss='ofa'``, the phase-I weights; the model becomes an
            :class:`~timm_exits.train.IMTAModel` (frozen network + ISC heads).
        isc: ISC form for phase II (``reference``, ``detach`` or None); ``freeze_bn_stats`` likewise.
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
            data_preprocessor: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.loss_type, self.loss_kwargs = loss, dict(loss_kwargs or {})
        self.model = create_training_model(model, model_kwargs, loss, phase_one_checkpoint, isc, freeze_bn_stats)
        self.hdkd_weights = None  # set by HarmonizedWeightsHook for loss='hdkd'

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None, mode: str = "tensor"):
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self._predict(inputs, data_samples)
        return self.model(inputs)

    def _predict(self, inputs, labels) -> List[Dict[str, torch.Tensor]]:
        logits = torch.stack(exit_logits(self.model, inputs), 1)  # batch x exits x classes
        return [{"logits": z, "label": y} for z, y in zip(logits, labels)]

    def loss(self, inputs: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-exit losses (``loss_exit<k>``), which ``parse_losses`` sums."""
        if self.loss_type == "adn":
            # one backward on the sum (mmengine's) equals the reference's two: the teacher is detached
            losses = adn_losses(self.model, inputs, target, **self.loss_kwargs)
        else:
            losses = training_losses(TrainingForward(self.model)(inputs), target, self.loss_type, self.hdkd_weights,
                                     **self.loss_kwargs)
        return {f"loss_{name}": loss for name, loss in losses.items()}

    def parse_losses(self, losses: Dict[str, torch.Tensor]):
        total, log_vars = super().parse_losses(losses)
        total.exit_losses = [v for k, v in losses.items() if k.startswith("loss_exit")]  # for PCGradOptimWrapper
        return total, log_vars


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


@HOOKS.register_module()
class HarmonizedWeightsHook(Hook):
    """HDKD: before every training iteration, update the harmonized loss weights on a batch of the
    validation split (a held-out part of the training data, never the test set)."""

    def __init__(self, val_dataloader: Union[dict, Any], lr: float = 3e-4, xi: Optional[float] = None,
                 init: str = "uniform", ratio_reg: bool = True, interval: int = 1):
        self.val_dataloader_cfg, self.lr, self.xi, self.init = val_dataloader, lr, xi, init
        self.ratio_reg, self.interval = ratio_reg, interval

    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        loader = self.val_dataloader_cfg
        self._loader = runner.build_dataloader(loader) if isinstance(loader, dict) else loader
        self._iter = iter(self._loader)
        device = next(model.parameters()).device
        self.weights = HarmonizedWeights(model.model.num_exits, self.init).to(device)
        self.optimizer = torch.optim.Adam(self.weights.parameters(), lr=self.lr, betas=(0.5, 0.999), weight_decay=1e-3)
        self.val_loss = BalancedValidationLoss(model.model.num_exits, ratio_reg=self.ratio_reg)
        model.hdkd_weights = self.weights()

    def _val_batch(self, model):
        try:
            batch = next(self._iter)
        except StopIteration:
            self._iter = iter(self._loader)
            batch = next(self._iter)
        data = model.data_preprocessor(batch, True)
        return data["inputs"], data["data_samples"]

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        if batch_idx % self.interval:
            return
        model = _unwrap(runner.model)
        train = model.data_preprocessor(data_batch, True)
        xi = self.xi if self.xi is not None else runner.optim_wrapper.get_lr()["lr"][0]
        kw = model.loss_kwargs
        hdkd_weight_step(model.model, self.weights, self.optimizer, (train["inputs"], train["data_samples"]),
                         self._val_batch(model), self.val_loss, xi, kw.get("alpha", 0.5), kw.get("temperature", 4.0))
        model.hdkd_weights = self.weights()


@OPTIM_WRAPPERS.register_module()
class PCGradOptimWrapper(OptimWrapper):
    """Parameter-level gradient deconfliction (PCGrad between the exits' gradients); see
    :func:`timm_exits.train.pcgrad_backward` for ``scope``, ``order`` and ``protect_deeper``
    (``scope='segment'``: one segment per optimizer param group, e.g. from ``paramwise_cfg``).
    Under DDP the per-exit gradients are averaged explicitly, so DDP's own sync is switched off."""

    def __init__(self, optimizer, scope: str = "global", order: str = "random", protect_deeper: bool = False,
                 seed: int = 0, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.scope, self.order, self.protect_deeper = scope, order, protect_deeper
        self.generator = torch.Generator().manual_seed(seed)

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
        scale = 1.0 / self._accumulative_counts
        pcgrad_backward([l * scale for l in exit_losses], [p for g in groups for p in g], self.scope, groups=groups,
                        order=self.order, protect_deeper=self.protect_deeper, generator=self.generator)
        self._inner_count += 1
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))
