"""Multi-exit training as a ``timm.task`` training task, for timm-style training scripts.

timm's ``train.py`` builds a task (``timm.task.ClassificationTask``, ``LogitDistillationTask``, ...),
creates the optimizer from ``task.get_trainable_module()``, and per batch calls
``result = task(input, target)`` and back-propagates ``result['loss']``; EMA, ``torch.compile``, DDP
and checkpoints go through the task too. :class:`MultiExitTask` is that task for every technique
of :mod:`timm_exits.train.techniques`: the technique takes its own step through the task's
:class:`~timm_exits.train.trainer.Trainer`, as it does in the accelerate engine and under mmengine::

    task = MultiExitTask(model, "CrossEntropy", label_smoothing=0.1, device=device)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    result = task(input, target)        # {'loss', 'output', 'loss_exit1', ...}
    result["loss"].backward()
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Dict, FrozenSet, Iterable, Optional, Tuple, Union

import torch
from torch import nn
from timm.models import group_parameters
from timm.task import TrainingTask
from timm.utils import unwrap_model

from .train.techniques import DEFAULT_TECHNIQUE, Technique, TrainingForward, build_technique
from .train.trainer import EPOCH, HELD_OUT, OPTIMIZER, Batch, Need, Outputs, Trainer, check_trainer, cycle

__all__ = ["MultiExitTask", "MultiExitTrainable", "TaskTrainer"]

_logger = logging.getLogger(__name__)

class MultiExitTrainable(TrainingForward):
    """The trainable module of :class:`MultiExitTask` (what the optimizer, EMA and DDP see): the
    technique's training forward (:class:`~timm_exits.train.techniques.TrainingForward`) with timm's optimizer hooks
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


class TaskTrainer(Trainer):
    """What timm's training loop gives a technique through :class:`MultiExitTask`: the loop calls
    ``task(input, target)`` once per batch and back-propagates the returned loss itself, so a batch
    is one call, an update every ``grad_accum_steps`` calls, and no update can be taken inside a
    batch. The optimizer comes from :meth:`MultiExitTask.attach_optimizer`, the epoch from
    :meth:`MultiExitTask.set_epoch`.

    Args:
        task: the task whose technique this trainer runs.
        held_out: batches ``(images, target)`` of a held-out split, cycled; None: none.
        grad_accum_steps: calls per optimizer update, an integer >= 1.
    """

    name = "timm's training task (MultiExitTask)"

    def __init__(self, task: "MultiExitTask", held_out: Optional[Iterable[Batch]], grad_accum_steps: int):
        if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
            raise ValueError(f"grad_accum_steps must be an integer >= 1 (train.py's --grad-accum-steps), got "
                             f"{grad_accum_steps!r}")
        self.task, self.held_out, self.grad_accum_steps = task, held_out, grad_accum_steps
        self.calls = 0  # training calls so far: batches
        self.attached: Optional[torch.optim.Optimizer] = None
        self.progress: Optional[Tuple[int, int]] = None
        self._next_held_out = cycle(held_out) if held_out is not None else None

    @property
    def provides(self) -> FrozenSet[Need]:
        return frozenset({OPTIMIZER, EPOCH} | ({HELD_OUT} if self.held_out is not None else set()))

    @property
    def model(self) -> nn.Module:
        return self.task.model

    def forward(self, images: torch.Tensor) -> Outputs:
        return self.task.trainable_module(images)

    @property
    def updates(self) -> int:
        return self.calls // self.grad_accum_steps

    @property
    def ends_update(self) -> bool:
        return self.task.trains() and (self.calls + 1) % self.grad_accum_steps == 0

    @property
    def accumulation(self) -> int:
        return self.grad_accum_steps

    def no_sync(self) -> ContextManager:
        module = self.task.trainable_module
        return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self.attached is None:
            raise ValueError("the technique needs the network's optimizer: call task.attach_optimizer(optimizer)")
        return self.attached

    @property
    def epoch(self) -> int:
        return self._progress()[0]

    @property
    def epochs(self) -> int:
        return self._progress()[1]

    def _progress(self) -> Tuple[int, int]:
        if self.progress is None:
            raise ValueError("the technique changes with the epoch: call task.set_epoch(epoch, epochs) at the start of "
                             "every epoch (timm's train.py loop does not)")
        return self.progress

    def held_out_batch(self, like: torch.Tensor) -> Batch:
        if self._next_held_out is None:  # a technique that did not declare HELD_OUT
            raise self._lacks(HELD_OUT)
        images, target = self._next_held_out()
        return images.to(device=like.device, dtype=like.dtype), target.to(like.device)


class MultiExitTask(TrainingTask):
    """Trains every exit of a multi-exit timm model (or an ADN network) with one of the techniques
    of :mod:`timm_exits.train.techniques`, as a timm training task.

    Args:
        model: a multi-exit model (``timm.create_model('msdnet_cifar_7exit')``, ``add_exits(...)``), an
            ADN network for ``ADN``, or a registered model name (built with ``model_kwargs`` by the
            technique's :meth:`~timm_exits.train.techniques.Technique.create_model`, from the weights
            file ``previous`` if given: IMTA phase II's ``OneForAll`` needs the phase-I weights).
        technique: a technique type's name (``'CrossEntropy'``, ``'PCGrad'``, ``'OneForAll'``,
            ``'HDKD'``, ``'ADN'``, ``'BoostNet'``, ``'ZTW'``), a config section ``dict(type=...,
            **options)`` or a :class:`~timm_exits.train.techniques.Technique`.
        held_out: batches ``(images, target)`` of a split held out from training (e.g. a
            ``DataLoader``; never the test set), cycled: HDKD learns its loss weights on them.
        grad_accum_steps: train.py's ``--grad-accum-steps``: an optimizer update every that many
            calls (the techniques' intervals count updates).
        **options: the technique's options (its ``Options`` dataclass; with a type name only).

    ``forward(input, target)`` returns ``loss`` (what to back-propagate), ``output`` (for timm's
    accuracy metric: the last exit's logits; ADN: the super-net's; IMTA: the new last head's) and the
    technique's named terms as ``loss_<term>`` (``loss_exit1`` ..., ``loss_ofa``, ``loss_hdkd``,
    ``loss_super`` and ``loss_base``, ...). The loss is always the technique's: there is no
    ``criterion`` argument. A technique that takes optimizer updates inside a batch (L2W) is
    refused: timm's loop takes one update per batch itself.
    """

    def __init__(
            self,
            model: Union[str, nn.Module],
            technique: Union[str, Dict[str, Any], Technique] = DEFAULT_TECHNIQUE,
            *,
            held_out: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None,
            grad_accum_steps: int = 1,
            model_kwargs: Optional[dict] = None,
            previous: Optional[str] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            **options: Any,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(technique, str) and options:
            raise ValueError(f"options {sorted(options)} go with a technique's type name; a config section or a "
                             f"technique holds its own")
        self.technique = build_technique({"type": technique, **options} if isinstance(technique, str) else technique)
        self.trainer = TaskTrainer(self, held_out, grad_accum_steps)
        check_trainer(self.technique, self.trainer)
        if held_out is not None and HELD_OUT not in self.technique.needs:  # it would be silently unused
            raise ValueError(f"held_out is for a technique that learns on held-out batches; "
                             f"{type(self.technique).__name__} does not: leave it out")
        if isinstance(model, str):
            model = self.technique.create_model(model, model_kwargs, previous)
        elif model_kwargs is not None or previous is not None:
            raise ValueError("model_kwargs and previous need a model name; a module is used as given "
                             "(load phase-I weights into it, e.g. timm's --initial-checkpoint)")
        model = self.technique.prepare(model)
        self.trainable_module = MultiExitTrainable(model, self.technique)
        if self.verbose:
            _logger.info(f"MultiExitTask: {self.technique.config()}, model={type(model).__name__}")

    @property
    def model(self) -> nn.Module:
        """The network being trained (unwrapped from DDP / torch.compile)."""
        return unwrap_model(self.trainable_module).model

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Tell the technique the epoch: call it at the start of every epoch (timm's ``train.py`` loop
        does not) when the loss weights change with the epoch (``exit_weights='sdn'``).

        Args:
            epoch: the 0-based epoch about to start.
            epochs: the run's number of epochs.
        """
        self.trainer.progress = (epoch, epochs)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> "MultiExitTask":
        """The network's optimizer: HDKD's virtual step ``xi`` is its current learning rate unless
        set, PCGrad's ``scope='segment'`` segments are its parameter groups."""
        self.trainer.attached = optimizer
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "MultiExitTask":
        """Wrap the trainable module in DistributedDataParallel (HDKD's weight update and PCGrad
        average their own gradients over the processes).

        Args:
            device_ids: DDP's ``device_ids`` (e.g. ``[local_rank]``).
            **ddp_kwargs: further ``DistributedDataParallel`` arguments.

        Returns:
            ``self``.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the training forward and, separately, the network for evaluation.

        Args:
            backend, mode, **compile_kwargs: ``torch.compile``'s.

        Returns:
            The compiled network for evaluation.
        """
        self.eval_model = torch.compile(self.model, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The network itself (not the training wrapper): ``model(x)`` in eval mode is the last exit.

        Args:
            module: the module to resolve (default: the task's eval model, else its trainable one).
            ema: the EMA's instead.

        Returns:
            The network under the DDP / ``torch.compile`` wrappers and the training forward, or what
            timm's task resolves if it is none of those.
        """
        current = resolved = super().get_eval_model(module=module, ema=ema)
        while current is not None:
            if isinstance(current, TrainingForward):
                return current.model
            current = getattr(current, "module", None) if hasattr(current, "module") else \
                getattr(current, "_orig_mod", None)
        return resolved

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The technique's state (PCGrad's random order; HDKD's weights, their optimizer, the
        validation loss's averages) and the calls so far.

        Args:
            module: not read (timm's signature).
            ema: for the EMA model, which has none.

        Returns:
            ``{'technique': ..., 'calls': ...}``, or ``{}`` for the EMA.
        """
        if ema:
            return {}
        return {"technique": self.technique.state_dict(), "calls": self.trainer.calls}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        """Restore :meth:`get_task_state`.

        Args:
            state: what it returned; None or empty: nothing to restore.
            strict, module: not read (timm's signature).
            ema: for the EMA model: nothing to restore.
        """
        if ema or not state:
            return
        self.technique.load_state_dict(state["technique"])
        self.trainer.calls = state["calls"]

    def trains(self) -> bool:
        """Whether a call now trains: the network in training mode with gradients on."""
        return self.model.training and torch.is_grad_enabled()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The training loss of one batch (the technique's step).

        Args:
            input: the batch's images.
            target: class indices, or soft targets (mixup).

        Returns:
            ``loss``, ``output`` and the technique's terms as ``loss_<term>`` (see the class
            docstring).
        """
        training = self.trains()
        result = self.technique.train_step(self.trainer, input, target)
        if training:
            self.trainer.calls += 1
        return {"loss": result.loss, "output": result.output,
                **{f"loss_{name}": term for name, term in result.terms.items()}}
