"""mmengine adapters, registered in mmengine's registries on import
(``custom_imports=dict(imports=['timm_exits.integrations.mmengine'])``), one component per file:

* :mod:`.model`: ``MultiExitClassifier`` (MODELS), any multi-exit timm model trained by its
  technique's own step (``technique=dict(type='HDKD', ...)``, the types of
  :mod:`timm_exits.train.techniques`) through :mod:`.trainer`;
* :mod:`.wrapper`: ``MultiExitDistributedDataParallel`` (MODEL_WRAPPERS), the DDP wrapper to use;
* :mod:`.hooks`: ``GradientEquilibriumHook``, ``GradientDeconflictionHook`` (the forward-graph
  switches) and ``HeldOutBatchesHook`` (held-out batches, for HDKD) (HOOKS);
* :mod:`.metrics`: ``MultiExitAccuracy`` (METRICS), top-1 of every exit;
* :mod:`.datasets`: ``ImageFolderDataset`` (DATASETS), timm's reader and transforms;
* :mod:`.convert`: a checkpoint as a timm model folder (``timm-exits convert``), read without
  unpickling code.

mmengine 0.10.7 with torch >= 2.6 needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` to resume (its
checkpoints hold non-tensor objects); :func:`enable_resume` sets it.
"""
import os


from .convert import convert_checkpoint, load_checkpoint_model
from .datasets import ImageFolderDataset
from .hooks import GradientDeconflictionHook, GradientEquilibriumHook, HeldOutBatchesHook
from .metrics import MultiExitAccuracy
from .model import MultiExitClassifier
from .trainer import MMEngineTrainer
from .wrapper import MultiExitDistributedDataParallel

__all__ = ["MultiExitClassifier", "MultiExitDistributedDataParallel", "MultiExitAccuracy", "ImageFolderDataset",
           "GradientEquilibriumHook", "GradientDeconflictionHook", "HeldOutBatchesHook", "MMEngineTrainer",
           "enable_resume", "load_checkpoint_model", "convert_checkpoint"]


def enable_resume() -> None:
    """Let mmengine 0.10.7 load its own checkpoints under torch >= 2.6 (see the module docstring)."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
