"""The training techniques: one registered type each (``technique=dict(type='HDKD', ...)``), with a
typed options dataclass holding its defaults once and its own training step, written against the
trainer interface (:mod:`timm_exits.train.trainer`):

* :class:`CrossEntropy`: the exits' cross-entropies, weighted by a fixed or per-epoch schedule
  (SDN's warm-up, PABEE's depth weights), in a training regime (``joint``, ``heads_only``, ``backbone``);
* :class:`PCGrad`: the same, with parameter-level gradient deconfliction;
* :class:`OneForAll`: IMTA phase II, ISC heads on the frozen phase-I network;
* :class:`HDKD`: dense distillation with harmonized weights learnt on held-out batches;
* :class:`ADN`: self-distillation of the base-net from the super-net;
* :class:`BoostNet`: the exits as a boosted ensemble;
* :class:`ZTW`: Zero Time Waste's cascading heads and geometric ensembles;
* :class:`L2W`: L2W-DEN's learnt sample weights;
* :class:`DynPerceiver`: Dynamic Perceiver's weighted exits and distillation from its merged exit;
* :class:`JEIGates`: JEI-DNN's learned exit gates on the frozen network;
* :class:`PhuongLampert`: distillation from the last exit at an adaptive temperature;
* :class:`DFSDistillation`: Deep Feature Surgery's distillation from the last exit.

Every technique takes the forward-graph switches of a multi-exit network (Gradient Equilibrium,
branch-level deconfliction, Deep Feature Surgery) as options. :func:`build_technique` builds one from its config
section.
"""
from .base import (TECHNIQUES, Options, OutputsTechnique, StepResult, Technique, TrainingForward, build_technique,
                   register_technique, technique_config, technique_type)
from .cross_entropy import CrossEntropy, PCGrad
from .one_for_all import OneForAll
from .hdkd import HDKD
from .adn import ADN
from .boostnet import BoostNet
from .ztw import ZTW
from .l2w import L2W
from .dyn_perceiver import DynPerceiver
from .jei_dnn import JEIGates
from .phuong_lampert import PhuongLampert
from .dfs import DFSDistillation

DEFAULT_TECHNIQUE = CrossEntropy.__name__  # what a trainer runs when no technique is named: the MSDNet baseline

__all__ = ["DEFAULT_TECHNIQUE", "TECHNIQUES", "Options", "OutputsTechnique", "StepResult", "Technique", "TrainingForward",
           "build_technique", "register_technique", "technique_config", "technique_type", "CrossEntropy", "PCGrad", "OneForAll", "HDKD", "ADN", "BoostNet",
           "ZTW", "L2W", "DynPerceiver", "JEIGates", "PhuongLampert", "DFSDistillation"]
