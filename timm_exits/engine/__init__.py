"""The accelerate training engine that runs every recipe.

``accelerate launch recipes/cifar.py --data-dir data/cifar10`` (or ``timm-exits launch CONFIG``)
reads an mmengine config (:mod:`timm_exits.config`) and, for each of its phases:

1. builds the data with timm (ImageFolder or tar splits, timm transforms, mixup / cutmix), the
   model with ``timm.create_model``, the optimizer, scheduler and EMA with timm's factories;
2. trains under an :class:`accelerate.Accelerator` (one process, DDP or FSDP on one or many
   machines, as ``accelerate config`` / ``accelerate launch`` say; mixed precision, bf16 on CPU too;
   gradient accumulation) with the technique of the config, which takes its own step through the
   engine's :class:`~timm_exits.train.trainer.Trainer` (:mod:`.trainer`);
3. checkpoints (safetensors + weights-only training state, atomic) every epoch and every
   ``train.checkpoint_every`` steps; ``--resume`` continues exactly where a killed run stopped;
4. evaluates: anytime accuracy per exit and the budgeted curve (thresholds on the held-out split),
   printed, written as ``evaluation.json`` and ``evaluation.png``.

The steps, top to bottom: :mod:`.checks` (before any data is read), :mod:`.splits` (the data),
:mod:`.phase` (build, resume, train an epoch, validate, save, evaluate), :mod:`.run_folder` (the
run's folder and record), :mod:`.run` (every phase, the command line).
"""
from .checks import batch_plan, check_factories, sized_model_kwargs
from .phase import TrainingPhase, train_phase
from .run import main, run
from .splits import MIN_VAL_IMAGES, Splits

__all__ = ["main", "run", "train_phase", "TrainingPhase", "Splits", "MIN_VAL_IMAGES", "batch_plan", "check_factories",
           "sized_model_kwargs"]
