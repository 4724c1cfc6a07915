"""Multi-exit training as a ``timm.task`` training task, for timm-style training scripts.

timm's ``train.py`` builds a task (``timm.task.ClassificationTask``, ``LogitDistillationTask``, ...),
creates the optimizer from ``task.get_trainable_module()``, and per batch calls
``result = task(input, target)`` and back-propagates ``result['loss']``; EMA, ``torch.compile``, DDP
and checkpoints go through the task too. :class:`MultiExitTask` is that task for every technique
of :mod:`timm_exits.train`, with the technique objects the accelerate engine and the mmengine
adapter use (:mod:`timm_exits.train.techniques`)::

    task = MultiExitTask(model, loss="ce", label_smoothing=0.1, device=device)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    result = task(input, target)        # {'loss', 'output', 'loss_exit1', ...}
    result["loss"].backward()
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from timm.models import group_parameters
from timm.task import TrainingTask
from timm.utils import unwrap_model

from .train.l2w import L2W
from .train.techniques import HDKD, PCGrad, TrainingForward, create_technique, create_training_model

__all__ = ["MultiExitTask", "MultiExitTrainable"]

_logger = logging.getLogger(__name__)

class MultiExitTrainable(TrainingForward):
    """The trainable module of :class:`MultiExitTask` (what the optimizer, EMA and DDP see):
    :class:`~timm_exits.train.techniques.TrainingForward` with timm's optimizer hooks
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
            :func:`~timm_exits.train.techniques.create_training_model`, which loads
            ``phase_one_checkpoint`` for ``loss='ofa'``).
        loss: ``'ce'`` (sum of the exits' cross-entropies), ``'ofa'`` (IMTA phase II: ISC heads on the
            frozen phase-I network, One-for-all distillation; a phase-I model given as a module is
            wrapped in :class:`~timm_exits.train.IMTAModel` and must already hold its trained
            weights), ``'hdkd'`` (dense distillation with harmonized weights learnt on ``held_out``)
            or ``'adn'`` (ADN self-distillation: super-net and base-net passes, one loss).
        exit_weights, label_smoothing: ``ce``: weight of each exit's loss (a list, or ``'sdn'``: SDN's
            per-epoch warm-up, which needs :meth:`set_epoch` at each epoch's start; ``'pabee'``: depth
            weights; see :mod:`timm_exits.train.schedules`); label smoothing of hard targets (soft
            targets, e.g. from timm's ``Mixup``, are used as given).
        regime: ``ce``: ``joint``, ``heads_only`` (the backbone frozen: create the optimizer after the
            task, from :meth:`get_trainable_module`, and it holds the exit heads only) or ``backbone``;
            see :mod:`timm_exits.train.regimes`.
        gradient_equilibrium: IMTA's Gradient Equilibrium (a switch of the model's forward graph).
        deconfliction: ``'symmetric'`` / ``'protect_deeper'``: branch-level gradient deconfliction
            (a switch of the model's forward graph); ``'pcgrad'``: parameter-level PCGrad (``ce``
            only; see below), options in ``pcgrad``: ``scope``, ``order``, ``protect_deeper``,
            ``groups`` (for ``scope='segment'``), ``seed``.
        temperature, gamma, reduction, alpha, topk: the distillation losses' options (temperature
            default: 3 for ``ofa``, 4 for ``hdkd``, 1 for ``adn``).
        isc, freeze_bn_stats: IMTA phase II's ISC form and batch-norm mode (``freeze_bn_stats``: also the
            frozen backbone's in ``regime='heads_only'``).
        held_out: ``hdkd``: an iterable of ``(images, target)`` batches of a held-out split (e.g. a
            ``DataLoader``; never the test set), cycled; one batch per weight update.
        hdkd: ``hdkd`` options: ``xi`` (the virtual step; ``None``: the learning rate of the optimizer
            given to :meth:`attach_optimizer`), ``lr`` (Adam on the weights), ``init``, ``ratio_reg``,
            ``interval`` (update the weights every ``interval``-th training call).

    ``forward(input, target)`` returns ``loss`` (what to back-propagate), ``output`` (the last exit's
    logits, for timm's accuracy metric; ADN: the super-net's; IMTA: the new last head's) and the
    technique's named terms as ``loss_<term>``: ``loss_exit1`` ... (``ce``), ``loss_ofa``,
    ``loss_hdkd``, ``loss_super`` and ``loss_base`` (``adn``; one backward of their sum gives the
    gradients of the reference's two backward passes, since the teacher is detached).

    HDKD's bilevel step runs inside ``forward`` before the training loss (as the accelerate engine
    does): it draws the next ``held_out`` batch, moves it to the input's device, and updates the
    harmonized weights with autocast off. It counts calls, not optimizer steps: with gradient
    accumulation, set ``interval`` to the number of accumulated batches.

    Parameter-level PCGrad needs one backward per exit. Inside ``forward`` the task computes the
    per-exit gradients, deconflicts them with :meth:`PCGrad.backward <timm_exits.train.PCGrad.backward>` and returns
    a loss whose value is the plain sum of the exits' losses and whose gradient is the deconflicted
    one (a surrogate ``sum <p, g_p>``), so ``loss.backward()`` (scaled by a ``GradScaler`` or
    divided for accumulation, both linear) gives pcgrad_backward's gradients. The per-exit
    gradients are computed in ``forward``, so they are not loss-scaled: float16 autocast may
    underflow them (bfloat16 and float32 are safe). Under DDP, pcgrad_backward averages the per-exit
    gradients over the processes and DDP then averages the (identical) result once more.

    The loss is always the technique's (:attr:`technique`): there is no ``criterion`` argument (timm's BCE or JSD
    losses have no multi-exit counterpart here); label smoothing and mixup / cutmix targets are
    handled as the accelerate engine handles them.
    """

    def __init__(
            self,
            model: Union[str, nn.Module],
            loss: str = "ce",
            *,
            model_kwargs: Optional[dict] = None,
            exit_weights: Any = None,
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
            regime: str = "joint",
            held_out: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None,
            hdkd: Optional[dict] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if loss != "ce" and (label_smoothing or exit_weights is not None or regime != "joint"):
            raise ValueError(f"label_smoothing, exit_weights and regime belong to loss='ce', not {loss!r}")
        if loss != "hdkd" and (held_out is not None or hdkd):
            raise ValueError(f"held_out and hdkd options belong to loss='hdkd', not {loss!r}")
        if deconfliction != "pcgrad" and pcgrad:
            raise ValueError("pcgrad options need deconfliction='pcgrad'")
        self.technique = create_technique(
            loss, exit_weights=exit_weights, label_smoothing=label_smoothing, gradient_equilibrium=gradient_equilibrium,
            deconfliction=deconfliction, pcgrad=pcgrad, temperature=temperature, gamma=gamma, reduction=reduction,
            isc=isc, freeze_bn_stats=freeze_bn_stats, alpha=alpha, topk=topk, hdkd=hdkd, regime=regime)
        if isinstance(self.technique, L2W):  # its loss alone would train with a weight net that never learns
            raise ValueError("loss='l2w' takes a meta step and an optimizer step per half batch, which timm's task "
                             "does not run: train L2W with the accelerate engine (technique.loss='l2w')")
        if loss == "hdkd" and held_out is None:
            raise ValueError("loss='hdkd' learns its loss weights on held-out data: pass held_out, an iterable of "
                             "(images, target) batches of a split held out from training (e.g. a DataLoader)")
        if isinstance(model, str):
            model = create_training_model(model, self.technique, model_kwargs, phase_one_checkpoint)
        elif model_kwargs is not None or phase_one_checkpoint is not None:
            raise ValueError("model_kwargs and phase_one_checkpoint need a model name; a module is used as given "
                             "(load phase-I weights into it, e.g. timm's --initial-checkpoint)")
        model = self.technique.prepare(model)
        self.trainable_module = MultiExitTrainable(model)
        self.held_out = held_out
        self._held_out_iter: Optional[Iterator] = None
        self._hdkd_calls = 0
        self._optimizer = None
        if self.verbose:
            _logger.info(f"MultiExitTask: loss={loss}, model={type(model).__name__}, "
                         f"gradient_equilibrium={gradient_equilibrium}, deconfliction={deconfliction}")

    @property
    def model(self) -> nn.Module:
        """The network being trained (unwrapped from DDP / torch.compile)."""
        return unwrap_model(self.trainable_module).model

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The 0-based epoch about to start, of ``epochs``: call it at the start of every epoch (timm's
        ``train.py`` loop does not) when the loss weights change with the epoch (``exit_weights='sdn'``)."""
        self.technique.set_epoch(epoch, epochs)

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
        """The technique's state: PCGrad's random order; HDKD's weights, their optimizer, the validation
        loss's averages and the call count (the EMA model has none)."""
        if ema:
            return {}
        state = self.technique.state_dict()
        if isinstance(self.technique, HDKD):
            state["hdkd_calls"] = self._hdkd_calls
        return state

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if ema or not state:
            return
        self.technique.load_state_dict(state)
        if isinstance(self.technique, HDKD):
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
        if self.technique.xi is None and self._optimizer is None:
            raise RuntimeError("HDKD's virtual step xi is the network's learning rate: call "
                               "task.attach_optimizer(optimizer) or set hdkd=dict(xi=...)")
        lr = self._optimizer.param_groups[0]["lr"] if self._optimizer is not None else None
        return self.technique.update_weights(self.model, (input, target), self._next_held_out(input), lr)

    def _pcgrad_loss(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The exits' summed loss with PCGrad's deconflicted gradient (see the class doc)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        self.technique.backward(terms, params)
        grads = [p.grad for p in params]
        for p, g in zip(params, kept):
            p.grad = g
        surrogate = sum((p * g).sum() for p, g in zip(params, grads) if g is not None)
        return sum(terms.values()).detach() + (surrogate - surrogate.detach())

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The training loss of one batch; see the class docstring for the returned keys."""
        technique = self.technique
        training = self.model.training and torch.is_grad_enabled()
        if isinstance(technique, HDKD) and training:
            if technique.due(self._hdkd_calls):
                self.update_hdkd_weights(input, target)
            self._hdkd_calls += 1
        passes: List[Any] = []

        def forward(x: torch.Tensor):
            passes.append(self.trainable_module(x))
            return passes[-1]

        terms = technique.batch_losses(self.model, forward, input, target)
        output = technique.output(passes[0])  # ADN: the super-net's
        if isinstance(technique, PCGrad) and training:
            loss = self._pcgrad_loss(terms)
        else:
            loss = sum(terms.values())
        return {"loss": loss, "output": output, **{f"loss_{name}": term for name, term in terms.items()}}
