"""Multi-exit training as a ``timm.task`` training task, for timm-style training scripts.

timm's ``train.py`` builds a task (``timm.task.ClassificationTask``, ``LogitDistillationTask``, ...),
creates the optimizer from ``task.get_trainable_module()``, and per batch calls
``result = task(input, target)`` and back-propagates ``result['loss']``; EMA, ``torch.compile``, DDP
and checkpoints go through the task too. :class:`MultiExitTask` is that task for every technique
of :mod:`timm_exits.train`, on the same objective as the accelerate engine and the mmengine adapter
(:func:`~timm_exits.train.objective.training_losses`, :func:`~timm_exits.train.adn_losses`,
:func:`~timm_exits.train.hdkd.hdkd_weight_step`, :func:`~timm_exits.train.pcgrad_backward`)::

    task = MultiExitTask(model, loss="ce", label_smoothing=0.1, device=device)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    result = task(input, target)        # {'loss', 'output', 'loss_exit1', ...}
    result["loss"].backward()
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.models import group_parameters
from timm.task import TrainingTask
from timm.utils import unwrap_model

from .train import adn_losses, pcgrad_backward
from .train.hdkd import BalancedValidationLoss, HarmonizedWeights, hdkd_weight_step
from .train.imta import IMTAModel
from .train.objective import DECONFLICTION, LOSSES, TrainingForward, apply_switches, create_training_model, training_losses

__all__ = ["MultiExitTask", "MultiExitTrainable"]

_logger = logging.getLogger(__name__)

_PCGRAD_DEFAULTS = dict(scope="global", order="random", protect_deeper=False, groups=None, seed=0)
_HDKD_DEFAULTS = dict(xi=None, lr=3e-4, init="uniform", ratio_reg=True, interval=1)


def _options(given: Optional[dict], defaults: dict, name: str) -> dict:
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {sorted(unknown)}; expected some of {sorted(defaults)}")
    return {**defaults, **(given or {})}


class MultiExitTrainable(TrainingForward):
    """The trainable module of :class:`MultiExitTask` (what the optimizer, EMA and DDP see):
    :class:`~timm_exits.train.objective.TrainingForward` with timm's optimizer hooks
    (``no_weight_decay``, ``group_matcher``) of the wrapped model, its names prefixed ``model.``."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in names()} if names is not None else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Union[dict, Callable[[str], int]]:
        if not hasattr(self.model, "group_matcher"):
            return {}
        layer_of = group_parameters(self.model, self.model.group_matcher(coarse=coarse), reverse=True)
        last = max(layer_of.values(), default=0)
        return lambda name: layer_of.get(name[len("model."):], last) if name.startswith("model.") else last


class MultiExitTask(TrainingTask):
    """Trains every exit of a multi-exit timm model (or an ADN network) with one of the techniques
    of :mod:`timm_exits.train`, as a timm training task.

    Args:
        model: a multi-exit model (``timm.create_model('msdnet_cifar_7exit')``, ``add_exits(...)``), an
            ADN network for ``loss='adn'``, or a registered model name (built with ``model_kwargs`` by
            :func:`~timm_exits.train.objective.create_training_model`, which loads
            ``phase_one_checkpoint`` for ``loss='ofa'``).
        loss: ``'ce'`` (sum of the exits' cross-entropies), ``'ofa'`` (IMTA phase II: ISC heads on the
            frozen phase-I network, One-for-all distillation; a phase-I model given as a module is
            wrapped in :class:`~timm_exits.train.IMTAModel` and must already hold its trained
            weights), ``'hdkd'`` (dense distillation with harmonized weights learnt on ``held_out``)
            or ``'adn'`` (ADN self-distillation: super-net and base-net passes, one loss).
        exit_weights, label_smoothing: ``ce``: weight of each exit's loss; label smoothing of hard
            targets (soft targets, e.g. from timm's ``Mixup``, are used as given).
        gradient_equilibrium: IMTA's Gradient Equilibrium (a switch of the model's forward graph).
        deconfliction: ``'symmetric'`` / ``'protect_deeper'``: branch-level gradient deconfliction
            (a switch of the model's forward graph); ``'pcgrad'``: parameter-level PCGrad (``ce``
            only; see below), options in ``pcgrad``: ``scope``, ``order``, ``protect_deeper``,
            ``groups`` (for ``scope='segment'``), ``seed``.
        temperature, gamma, reduction, alpha, topk: the distillation losses' options (temperature
            default: 3 for ``ofa``, 4 for ``hdkd``, 1 for ``adn``).
        isc, freeze_bn_stats: IMTA phase II's ISC form and batch-norm mode.
        held_out: ``hdkd``: an iterable of ``(images, target)`` batches of a held-out split (e.g. a
            ``DataLoader``; never the test set), cycled; one batch per weight update.
        hdkd: ``hdkd`` options: ``xi`` (the virtual step; ``None``: the learning rate of the optimizer
            given to :meth:`attach_optimizer`), ``lr`` (Adam on the weights), ``init``, ``ratio_reg``,
            ``interval`` (update the weights every ``interval``-th training call).

    ``forward(input, target)`` returns ``loss`` (what to back-propagate), ``output`` (the last exit's
    logits, for timm's accuracy metric; ADN: the super-net's; IMTA: the new last head's) and the
    objective's named terms as ``loss_<term>``: ``loss_exit1`` ... (``ce``), ``loss_ofa``,
    ``loss_hdkd``, ``loss_super`` and ``loss_base`` (``adn``; one backward of their sum gives the
    gradients of the reference's two backward passes, since the teacher is detached).

    HDKD's bilevel step runs inside ``forward`` before the training loss (as the accelerate engine
    does): it draws the next ``held_out`` batch, moves it to the input's device, and updates the
    harmonized weights with autocast off. It counts calls, not optimizer steps: with gradient
    accumulation, set ``interval`` to the number of accumulated batches.

    Parameter-level PCGrad needs one backward per exit. Inside ``forward`` the task computes the
    per-exit gradients, deconflicts them with :func:`~timm_exits.train.pcgrad_backward` and returns
    a loss whose value is the plain sum of the exits' losses and whose gradient is the deconflicted
    one (a surrogate ``sum <p, g_p>``), so ``loss.backward()`` (scaled by a ``GradScaler`` or
    divided for accumulation, both linear) gives pcgrad_backward's gradients. The per-exit
    gradients are computed in ``forward``, so they are not loss-scaled: float16 autocast may
    underflow them (bfloat16 and float32 are safe). Under DDP, pcgrad_backward averages the per-exit
    gradients over the processes and DDP then averages the (identical) result once more.

    The loss is always the objective's: there is no ``criterion`` argument (timm's BCE or JSD
    losses have no multi-exit counterpart here); label smoothing and mixup / cutmix targets are
    handled as the accelerate engine handles them.
    """

    def __init__(
            self,
            model: Union[str, nn.Module],
            loss: str = "ce",
            *,
            model_kwargs: Optional[dict] = None,
            exit_weights: Optional[Sequence[float]] = None,
            label_smoothing: float = 0.0,
            gradient_equilibrium: bool = False,
            deconfliction: Optional[str] = None,
            pcgrad: Optional[dict] = None,
            temperature: Optional[float] = None,
            gamma: float = 0.9,
            reduction: str = "batchmean",
            alpha: float = 0.5,
            topk: Optional[int] = None,
            phase_one_checkpoint: Optional[str] = None,
            isc: Optional[str] = "reference",
            freeze_bn_stats: bool = False,
            held_out: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None,
            hdkd: Optional[dict] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if deconfliction not in DECONFLICTION:
            raise ValueError(f"deconfliction must be one of {DECONFLICTION}, got {deconfliction!r}")
        if deconfliction == "pcgrad" and loss != "ce":
            raise ValueError("deconfliction='pcgrad' projects the exits' cross-entropies: it needs loss='ce'")
        if loss != "ce" and (label_smoothing or exit_weights is not None):
            raise ValueError(f"label_smoothing and exit_weights belong to loss='ce', not {loss!r}")
        if loss != "hdkd" and (held_out is not None or hdkd):
            raise ValueError(f"held_out and hdkd options belong to loss='hdkd', not {loss!r}")
        if deconfliction != "pcgrad" and pcgrad:
            raise ValueError("pcgrad options need deconfliction='pcgrad'")

        if isinstance(model, str):
            model = create_training_model(model, model_kwargs, loss, phase_one_checkpoint, isc, freeze_bn_stats)
        elif model_kwargs is not None or phase_one_checkpoint is not None:
            raise ValueError("model_kwargs and phase_one_checkpoint need a model name; a module is used as given "
                             "(load phase-I weights into it, e.g. timm's --initial-checkpoint)")
        else:
            model = self._check_model(model, loss, isc, freeze_bn_stats)
        apply_switches(model, gradient_equilibrium, deconfliction)
        self.trainable_module = MultiExitTrainable(model)
        self.loss = loss
        self.ce_options = dict(weights=exit_weights, label_smoothing=label_smoothing)
        self.kd_options = dict(temperature=temperature, gamma=gamma, reduction=reduction, alpha=alpha)
        self.topk = topk

        self.pcgrad = None
        if deconfliction == "pcgrad":
            self.pcgrad = _options(pcgrad, _PCGRAD_DEFAULTS, "pcgrad")
            self.pcgrad_generator = torch.Generator().manual_seed(self.pcgrad.pop("seed"))

        self.hdkd = None
        if loss == "hdkd":
            if held_out is None:
                raise ValueError("loss='hdkd' learns its loss weights on held-out data: pass held_out, an iterable of "
                                 "(images, target) batches of a split held out from training (e.g. a DataLoader)")
            self.hdkd = _options(hdkd, _HDKD_DEFAULTS, "hdkd")
            if self.hdkd["interval"] < 1:
                raise ValueError(f"hdkd interval must be >= 1, got {self.hdkd['interval']}")
            self.held_out = held_out
            self._held_out_iter: Optional[Iterator] = None
            self._hdkd_calls = 0
            self._optimizer = None
            self.hdkd_weights = HarmonizedWeights(model.num_exits, self.hdkd["init"]).to(self.device)
            self.hdkd_optimizer = torch.optim.Adam(self.hdkd_weights.parameters(), lr=self.hdkd["lr"],
                                                   betas=(0.5, 0.999), weight_decay=1e-3)
            self.hdkd_val_loss = BalancedValidationLoss(model.num_exits, ratio_reg=self.hdkd["ratio_reg"])
        if self.verbose:
            _logger.info(f"MultiExitTask: loss={loss}, model={type(model).__name__}, "
                         f"gradient_equilibrium={gradient_equilibrium}, deconfliction={deconfliction}")

    @staticmethod
    def _check_model(model: nn.Module, loss: str, isc: Optional[str], freeze_bn_stats: bool) -> nn.Module:
        if loss == "ofa":
            if isinstance(model, IMTAModel):
                return model
            if not hasattr(model, "forward_exits"):
                raise ValueError(f"loss='ofa' needs a trained phase-I multi-exit model, got {type(model).__name__}")
            return IMTAModel(model, isc=isc, freeze_bn_stats=freeze_bn_stats)
        if loss == "adn":
            if not hasattr(model, "set_depth") and not hasattr(getattr(model, "backbone", None), "set_depth"):
                raise ValueError(f"loss='adn' needs an adaptive-depth model (e.g. resnet18_adn), "
                                 f"got {type(model).__name__}")
        elif not hasattr(model, "forward_exits"):
            raise ValueError(f"loss={loss!r} needs a multi-exit model (see timm_exits.add_exits), "
                             f"got {type(model).__name__}")
        return model

    @property
    def model(self) -> nn.Module:
        """The network being trained (unwrapped from DDP / torch.compile)."""
        return unwrap_model(self.trainable_module).model

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> "MultiExitTask":
        """HDKD: the network's optimizer, whose current learning rate is the virtual step ``xi`` of the
        weight update (DARTS) unless ``hdkd['xi']`` is set."""
        self._optimizer = optimizer
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "MultiExitTask":
        """Wrap the trainable module in DistributedDataParallel (the HDKD weight update and PCGrad
        average their own gradients over the processes)."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the training forward and, separately, the network for evaluation."""
        self.eval_model = torch.compile(self.model, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The network itself (not the training wrapper): ``model(x)`` in eval mode is the last exit."""
        current = resolved = super().get_eval_model(module=module, ema=ema)
        while current is not None:
            if isinstance(current, TrainingForward):
                return current.model
            current = getattr(current, "module", None) if hasattr(current, "module") else \
                getattr(current, "_orig_mod", None)
        return resolved

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """PCGrad's random order and HDKD's weights, their optimizer and the validation loss's averages
        (the EMA model has none)."""
        if ema:
            return {}
        state: Dict[str, Any] = {}
        if self.pcgrad is not None:
            state["pcgrad_generator"] = self.pcgrad_generator.get_state()
        if self.hdkd is not None:
            state.update(hdkd_weights=self.hdkd_weights.state_dict(), hdkd_optimizer=self.hdkd_optimizer.state_dict(),
                         hdkd_val_loss=self.hdkd_val_loss.state_dict(), hdkd_calls=self._hdkd_calls)
        return state

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if ema or not state:
            return
        if self.pcgrad is not None:
            self.pcgrad_generator.set_state(state["pcgrad_generator"])
        if self.hdkd is not None:
            self.hdkd_weights.load_state_dict(state["hdkd_weights"], strict=strict)
            self.hdkd_optimizer.load_state_dict(state["hdkd_optimizer"])
            self.hdkd_val_loss.load_state_dict(state["hdkd_val_loss"])
            self._hdkd_calls = state["hdkd_calls"]

    def _next_held_out(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._held_out_iter is None:
            self._held_out_iter = iter(self.held_out)
        try:
            images, target = next(self._held_out_iter)
        except StopIteration:
            self._held_out_iter = iter(self.held_out)
            try:
                images, target = next(self._held_out_iter)
            except StopIteration:
                raise ValueError("held_out gives no batch") from None
        return images.to(device=like.device, dtype=like.dtype), target.to(like.device)

    def update_hdkd_weights(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """One bilevel update of the harmonized weights on this training batch and the next held-out
        batch (``forward`` calls it every ``interval`` training calls)."""
        xi = self.hdkd["xi"]
        if xi is None:
            if self._optimizer is None:
                raise RuntimeError("HDKD's virtual step xi is the network's learning rate: call "
                                   "task.attach_optimizer(optimizer) or set hdkd=dict(xi=...)")
            xi = self._optimizer.param_groups[0]["lr"]
        val_batch = self._next_held_out(input)
        with torch.autocast(input.device.type, enabled=False):  # finite differences need full precision
            return hdkd_weight_step(self.model, self.hdkd_weights, self.hdkd_optimizer, (input, target), val_batch,
                                    self.hdkd_val_loss, xi, self.kd_options["alpha"],
                                    self.kd_options["temperature"] or 4.0)

    def _pcgrad_loss(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The exits' summed loss with pcgrad_backward's deconflicted gradient (see the class doc)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        options = {k: v for k, v in self.pcgrad.items() if k != "groups"}
        pcgrad_backward(list(terms.values()), params, groups=self.pcgrad["groups"], generator=self.pcgrad_generator,
                        **options)
        grads = [p.grad for p in params]
        for p, g in zip(params, kept):
            p.grad = g
        surrogate = sum((p * g).sum() for p, g in zip(params, grads) if g is not None)
        return sum(terms.values()).detach() + (surrogate - surrogate.detach())

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The training loss of one batch; see the class docstring for the returned keys."""
        training = self.model.training and torch.is_grad_enabled()
        if self.loss == "adn":
            passes: List[List[torch.Tensor]] = []

            def forward(x: torch.Tensor) -> List[torch.Tensor]:
                passes.append(self.trainable_module(x))
                return passes[-1]

            terms = adn_losses(self.model, input, target, self.kd_options["alpha"],
                               self.kd_options["temperature"] or 1.0, self.topk, forward=forward)
            output = passes[0][-1]
        else:
            if self.hdkd is not None and training:
                if self._hdkd_calls % self.hdkd["interval"] == 0:
                    self.update_hdkd_weights(input, target)
                self._hdkd_calls += 1
            outputs = self.trainable_module(input)
            smoothing = 0.0 if target.dim() > 1 else self.ce_options["label_smoothing"]  # soft targets: as given
            terms = training_losses(outputs, target, self.loss, self.hdkd_weights() if self.hdkd is not None else None,
                                    self.ce_options["weights"], smoothing, **self.kd_options)
            output = outputs[0][-1] if self.loss == "ofa" else outputs[-1]
        if self.pcgrad is not None and training:
            loss = self._pcgrad_loss(terms)
        else:
            loss = sum(terms.values())
        return {"loss": loss, "output": output, **{f"loss_{name}": term for name, term in terms.items()}}
