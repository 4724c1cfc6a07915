"""What ``model(x)`` of a multi-exit or ADN network returns in training mode."""
import torch

__all__ = ["TrainingOutputs"]

_NOT_A_TENSOR = (
    "in training mode the model returns a tuple of logits tensors (every exit's; an ADN network: the super-net's "
    "and the base-net's), not one tensor, so a loss written for one output cannot take it. Train every exit with "
    "timm_exits.task.MultiExitTask (a timm.task training task) or `timm-exits train`; or create the model with "
    "multi_exit_training=False (timm's train.py: --model-kwargs multi_exit_training=False) so that model(x) is one "
    "tensor in training too: the last exit (an ADN network: the selected depth), which is then the only one trained")


class TrainingOutputs(tuple):
    """The training-mode output of ``model(x)``: a tuple of logits tensors (every exit's; an ADN
    network's super-net and base-net logits). It is a plain tuple to code that expects one (indexing,
    ``len``, ``torch.stack``); where a tensor is expected (a timm loss, ``output.argmax``), it fails
    with one message that says how to train such a model instead."""

    def __getattr__(self, name: str):
        if not name.startswith("_") and hasattr(torch.Tensor, name):
            raise AttributeError(f"no tensor attribute {name!r}: {_NOT_A_TENSOR}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch functions see a plain tuple; one that needs a tensor fails with the message above."""
        args = tuple(tuple(a) if isinstance(a, TrainingOutputs) else a for a in args)
        kwargs = {k: tuple(v) if isinstance(v, TrainingOutputs) else v for k, v in (kwargs or {}).items()}
        try:
            return func(*args, **kwargs)
        except (TypeError, AttributeError):
            raise TypeError(_NOT_A_TENSOR) from None
