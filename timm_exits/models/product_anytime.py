"""Product anytime (PA; Jazbec et al., NeurIPS 2023) online: exit l answers pi_l(c) ∝
prod_{m<=l} g(z_{m,c})^{w_m}, a product of experts over the exits so far, with g = ReLU (optionally
clipped from above) or softplus on the raw logits z and weights w_m (m/L by default), computed in
float64 in log space.

:class:`ProductAnytimeModel` is a multi-exit model whose exit l outputs PA's log-probabilities, the
running log-product carried in its exit-history state, so the early-exit executor (with batch
compaction) and every evaluation run on PA's answers. The pieces it is made of (:func:`product_weights`,
:func:`log_terms`, :func:`product_log_probs`) also compute PA on cached logits
(:func:`timm_exits.inference.anytime.product_anytime`). It is registered with timm as
``product_anytime`` (:mod:`timm_exits.models.wrappers`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .history import ExitHistoryModel
from .predictors import register_predictor
from .wrappers import create_wrapper, record_wrapper_args, wrapper_cfg

__all__ = ["ProductAnytimeModel", "product_weights", "log_terms", "product_log_probs"]  # + the entrypoint


def _log_activation(z: torch.Tensor, softplus: bool, floor: float, ceiling: Optional[float]) -> torch.Tensor:
    """log g(z) in float64: log of the (clipped) ReLU, -inf where it is 0, or log softplus (stable for z << 0)."""
    if softplus:
        return torch.where(z > -40, F.softplus(z).log(), z)  # softplus(z) = e^z (1 + O(e^z)) below -40
    return (z if ceiling is None else z.clamp(max=ceiling)).clamp(min=floor).log()


def product_weights(weights: Optional[Sequence[float]], num_exits: int, softplus: bool, floor: float,
                    ceiling: Optional[float]) -> torch.Tensor:
    """PA's exponents, after checking them and the activation's options.

    Args:
        weights: one non-negative exponent per exit; ``None``: m / L for exit m = 1..L.
        num_exits: L, the number of exits.
        softplus, floor, ceiling: the activation's options (see
            :func:`~timm_exits.inference.anytime.product_anytime`), checked to fit together.

    Returns:
        The exponents, ``(num_exits,)`` float64.

    Raises:
        ValueError: the weights or the options do not fit.
    """
    if weights is None:
        w = torch.arange(1, num_exits + 1, dtype=torch.float64) / num_exits
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != num_exits or (w < 0).any() or not w.isfinite().all():
            raise ValueError(f"expected {num_exits} finite non-negative weights (one per exit), got {w.tolist()}")
    if softplus and (floor != 0.0 or ceiling is not None):
        raise ValueError("floor and ceiling clip the ReLU; they do not apply with softplus=True")
    if ceiling is not None and ceiling <= floor:
        raise ValueError(f"ceiling must be above floor, got ceiling={ceiling} and floor={floor}")
    return w


def log_terms(z: torch.Tensor, w: torch.Tensor, softplus: bool, floor: float,
              ceiling: Optional[float]) -> torch.Tensor:
    """``w log g(z)`` (float64), 0 where the weight is 0 (``0 ** 0 = 1``).

    Args:
        z: the raw logits, float64.
        w: the exponents, broadcastable to ``z``.
        softplus, floor, ceiling: the activation g (see :func:`~timm_exits.inference.anytime.product_anytime`).

    Returns:
        A float64 tensor of ``z``'s shape (``-inf`` where the ReLU is 0 and the weight is not).
    """
    return torch.where(w == 0, 0.0, w * _log_activation(z, softplus, floor, ceiling))


def product_log_probs(log_product: torch.Tensor, z: torch.Tensor, fallback: bool) -> torch.Tensor:
    """PA's log-probabilities from the log-product.

    Args:
        log_product: ``sum_{m<=l} w_m log g(z_m)``, ``(..., classes)``.
        z: the current exit's logits, of the same shape.
        fallback: where the log-product is -inf for every class, answer ``log_softmax(z)``; else NaN.

    Returns:
        The log-probabilities, of ``log_product``'s shape.
    """
    collapsed = log_product.amax(-1, keepdim=True) == float("-inf")  # log_softmax gives NaN there
    return torch.where(collapsed, z.log_softmax(-1) if fallback else float("nan"), log_product.log_softmax(-1))


@register_predictor
class ProductAnytimeModel(ExitHistoryModel):
    """Product anytime online: exit l of ``model`` answers with PA's log-probabilities
    ``log pi_l`` (:func:`~timm_exits.inference.anytime.product_anytime`, same arguments; ``softmax`` of
    the output is pi_l).

    The running log-product ``sum_{m<=l} w_m log g(z_m)`` (float64) is the exit-history state, so
    the early-exit executor, batch compaction, ``forward_exits`` and the cached evaluation give PA's
    answers; thresholds fitted on this model's outputs are thresholds for PA. An inference wrapper:
    it adds no parameters, and its outputs are log-probabilities (a class ruled out is ``-inf``),
    not raw logits.

    Args:
        model: the multi-exit model wrapped.
        weights, softplus, floor, ceiling, fallback: PA's settings, as
            :func:`~timm_exits.inference.anytime.product_anytime` takes them.
    """

    predictor = "product_anytime"  # what answers at the exits (timm_exits.models.predictors)

    def __init__(self, model: nn.Module, weights: Optional[Sequence[float]] = None, softplus: bool = False,
                 floor: float = 0.0, ceiling: Optional[float] = None, fallback: bool = True):
        super().__init__(model)
        self.weights: List[float] = product_weights(weights, self.num_exits, softplus, floor, ceiling).tolist()
        self.softplus, self.floor, self.ceiling, self.fallback = softplus, floor, ceiling, fallback
        record_wrapper_args(self, model, "product_anytime", weights=self.weights, softplus=softplus, floor=floor,
                            ceiling=ceiling, fallback=fallback)
        self.train(model.training)  # a wrapper of a model in evaluation mode evaluates

    def combine(self, logits: torch.Tensor, history: List[torch.Tensor],
                index: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        z = logits.detach().double()
        term = log_terms(z, torch.tensor(self.weights[index], dtype=torch.float64), self.softplus, self.floor,
                         self.ceiling)
        log_product = history[0] + term if history else term
        return product_log_probs(log_product, z, self.fallback).to(logits.dtype), [log_product]


default_cfgs = generate_default_cfgs({
    "product_anytime": wrapper_cfg("Product anytime: a multi-exit network's exits as a product of experts."),
})


@register_model
def product_anytime(pretrained: bool = False, **kwargs) -> ProductAnytimeModel:
    """Product anytime around a multi-exit network: ``model`` (its timm name), ``model_args`` (its
    arguments), ``weights``, ``softplus``, ``floor``, ``ceiling``, ``fallback`` (see
    :class:`ProductAnytimeModel`)."""
    return create_wrapper(ProductAnytimeModel, "product_anytime", pretrained, **kwargs)
