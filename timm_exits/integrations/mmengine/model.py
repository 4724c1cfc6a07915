"""``MultiExitClassifier``: any multi-exit timm model (or ADN network) as an mmengine model,
trained by its technique's own step (:mod:`timm_exits.train.techniques`)."""
from __future__ import annotations

import io
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS
from torch import nn

from ...models.multi_exit import exit_logits
from ...train.techniques import DEFAULT_TECHNIQUE, Technique, build_technique
from ...train.trainer import Outputs, check_trainer
from .trainer import MMEngineTrainer

__all__ = ["MultiExitClassifier"]


@MODELS.register_module()
class MultiExitClassifier(BaseModel):
    """A multi-exit timm model as an mmengine model.

    Args:
        model: timm model name (e.g. ``msdnet_cifar_7exit``, ``resnet18_exits``, ``resnet18_adn``).
        model_kwargs: ``timm.create_model`` arguments (``num_classes``, ``pretrained``, ...).
        technique: the technique's config section, ``dict(type='CrossEntropy', ...)`` (any type of
            :data:`~timm_exits.train.techniques.TECHNIQUES` with its options), or a technique.
        previous: a weights file the model starts from (IMTA phase II's ``OneForAll`` needs the
            phase-I weights).
        data_preprocessor, init_cfg: mmengine's.

    Every training step is the technique's (:meth:`train_step`), through mmengine's optimizer
    wrapper (its accumulation, AMP and clipping apply). The technique's state (HDKD's weights, PCGrad's
    random order, L2W's weight net) and the update count are part of the model's state dict, so
    mmengine's checkpoints keep them and a resume restores them. Under DDP, wrap the model with
    ``model_wrapper_cfg=dict(type='MultiExitDistributedDataParallel')``.
    """

    def __init__(
            self,
            model: str,
            model_kwargs: Optional[dict] = None,
            technique: Union[Dict[str, Any], Technique, None] = None,
            previous: Optional[str] = None,
            data_preprocessor: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.technique = build_technique(technique if technique is not None else {"type": DEFAULT_TECHNIQUE})
        self.model = self.technique.prepare(self.technique.create_model(model, model_kwargs, previous))
        self.updates = 0  # optimizer updates taken (one per accumulation window)
        self.held_out: Optional[Callable[[], Any]] = None  # set by HeldOutBatchesHook: the next held-out batch

    def training_forward(self, images: torch.Tensor) -> Outputs:
        """The technique's training outputs of ``images``."""
        return self.technique.training_outputs(self.model, images)

    def train_step(self, data: Union[dict, tuple, list], optim_wrapper: OptimWrapper,
                   forward: Optional[Callable[[torch.Tensor], Outputs]] = None,
                   ddp: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """One batch: the technique's step through an :class:`~.trainer.MMEngineTrainer`, then the
        optimizer wrapper's ``update_params`` on its loss.

        Args:
            data: the data loader's batch (through the data preprocessor).
            optim_wrapper: mmengine's optimizer wrapper.
            forward, ddp: the DDP wrapper's forward and the wrapper
                (``MultiExitDistributedDataParallel`` passes them); None: no DDP.

        Returns:
            The loss terms to log (``loss_<term>`` and their sum, ``loss``).
        """
        trainer = MMEngineTrainer(self, optim_wrapper, forward, ddp)
        check_trainer(self.technique, trainer)
        self.technique.to(next(self.model.parameters()).device)
        with optim_wrapper.optim_context(ddp if ddp is not None else self):
            data = self.data_preprocessor(data, True)
            result = self.technique.train_step(trainer, data["inputs"], data["data_samples"])
            _, log_vars = self.parse_losses({f"loss_{name}": term for name, term in result.terms.items()})
        optim_wrapper.update_params(result.loss)
        if optim_wrapper.should_update():  # this batch ended an update
            self.updates += 1
        return log_vars

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None, mode: str = "tensor"):
        """mmengine's forward. Training goes through :meth:`train_step`: mode ``loss`` (what
        ``MMDistributedDataParallel`` calls) is refused.

        Args:
            inputs: the images, (B, C, H, W).
            data_samples: the labels (for ``predict``).
            mode: ``'tensor'`` (the model's output), ``'predict'`` or ``'exits'`` (the technique's
                training outputs, what ``MultiExitDistributedDataParallel`` runs through DDP).

        Returns:
            ``'tensor'``: the logits (B, classes); ``'predict'``: per sample
            ``dict(logits=(exits, classes), label=...)``; ``'exits'``: the training outputs.
        """
        if mode == "predict":
            return self._predict(inputs, data_samples)
        if mode == "exits":
            return self.training_forward(inputs)
        if mode == "loss":
            raise ValueError(f"MultiExitClassifier trains through its technique's own step ({type(self.technique).__name__}), "
                             f"which MMDistributedDataParallel does not call: under DDP set "
                             f"model_wrapper_cfg=dict(type='MultiExitDistributedDataParallel')")
        return self.model(inputs)

    def _predict(self, inputs, labels) -> List[Dict[str, torch.Tensor]]:
        logits = torch.stack(exit_logits(self.model, inputs), 1)  # batch x exits x classes
        return [{"logits": z, "label": y} for z, y in zip(logits, labels)]

    def get_extra_state(self) -> torch.Tensor:
        """The technique's state and the update count, serialised into one byte tensor: a distributed
        Runner broadcasts every entry of the model's state dict, which must be a tensor."""
        buffer = io.BytesIO()
        torch.save({"technique": self.technique.state_dict(), "updates": self.updates}, buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        saved = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
        self.technique.load_state_dict(saved["technique"])
        self.updates = saved["updates"]
