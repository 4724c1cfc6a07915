"""Last-layer Laplace per exit (Meronen et al., WACV 2024): each exit's linear classifier gets a
Gaussian posterior over its weights, and the exit answers with the predictive averaged over samples
of it.

With phi the exit's pooled features (``forward_exit(..., pre_logits=True)``) and a = [phi, 1], the
classifier's weights W (classes x features + bias) have the matrix-normal posterior
MN(W_MAP, U^-1, V^-1) (Kronecker-factored: U over the classes, V over the features and the bias; see
:func:`timm_exits.inference.calibrated.fit_laplace`). Its logits are then Gaussian,
f ~ N(W_MAP a, (a^T V^-1 a) U^-1), and the exit answers

    p = 1/S sum_s softmax((W_MAP a + sqrt(a^T V^-1 a) L z_s) / T),    L L^T = U^-1,

with S fixed standard-normal draws z_s in R^classes, shared by every sample and every exit, as the
reference draws them, and a temperature T per exit. The draws are a buffer, so a sample's answer
depends on nothing else: the early-exit executor, batch compaction and the cached evaluation agree
sample for sample, and a saved model answers as it did.

:class:`LaplaceExits` is the registered predictor ``'laplace'``; MIE around it
(:class:`~timm_exits.models.mie.MIEModel`) is Laplace + MIE. Registered with timm as ``laplace``
(:mod:`timm_exits.models.wrappers`); unfitted (zero covariances), it answers the exits' softmax.
"""
from __future__ import annotations

from typing import List, Union

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .capabilities import is_multi_exit
from .multi_exit import MultiExitModel, State
from .predictors import register_predictor
from .wrappers import create_wrapper, record_wrapper_args, wrapper_cfg

__all__ = ["LaplaceExits", "ExitPosterior", "exit_classifier", "laplace_log_probs"]  # + the entrypoint


def exit_classifier(model: nn.Module, index: int) -> nn.Linear:
    """The linear layer exit ``index`` of ``model`` ends with (timm's ``get_classifier`` at that exit).

    Args:
        model: a multi-exit model with ``set_exit`` and ``get_classifier`` (MSDNet, a backbone with exits).
        index: the exit (0-based).

    Returns:
        The exit's ``nn.Linear`` classifier.

    Raises:
        ValueError: the model cannot name its exits' classifiers, or this one is not a linear layer.
    """
    if not (callable(getattr(model, "set_exit", None)) and callable(getattr(model, "get_classifier", None))):
        raise ValueError(f"last-layer Laplace needs each exit's linear classifier (set_exit and get_classifier); "
                         f"{type(model).__name__} has none: wrap the network itself (MSDNet, a backbone with exits)")
    active = model.exit_index
    model.set_exit(index)
    try:
        classifier = model.get_classifier()
    finally:
        model.set_exit(active)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"last-layer Laplace needs exit {index} to end with a linear layer on its pre_logits "
                         f"features; its classifier is {type(classifier).__name__}")
    return classifier


def laplace_log_probs(mean: torch.Tensor, features: torch.Tensor, class_scale: torch.Tensor,
                      feature_cov: torch.Tensor, draws: torch.Tensor,
                      logit_scale: Union[float, torch.Tensor]) -> torch.Tensor:
    """The Laplace predictive's log-probabilities: ``log 1/S sum_s softmax((mean + sqrt(a^T V^-1 a) L z_s) / T)``.

    Written with the operators exports are made of (:mod:`timm_exits.inference.export`): the square
    root as ``exp(log(.) / 2)``, the division by T as a product with ``logit_scale = 1 / T``.

    Args:
        mean: the MAP logits ``W_MAP a``, ``(B, C)``.
        features: the pooled features phi, ``(B, D)`` (a = [phi, 1]).
        class_scale: L, ``(C, C)``, with ``L L^T = U^-1``.
        feature_cov: ``V^-1``, ``(D + 1, D + 1)``.
        draws: the standard-normal z_s, ``(S, C)``.
        logit_scale: 1 / T, positive (a number or a 0-dim tensor).

    Returns:
        ``(B, C)`` log-probabilities (``-inf`` where a probability underflows), in ``mean``'s dtype.
    """
    a = F.pad(features.to(feature_cov.dtype), (0, 1), value=1.0)
    variance = (a.unsqueeze(1) @ (a @ feature_cov).unsqueeze(-1)).view(-1, 1, 1)  # a^T V^-1 a, (B, 1, 1)
    spread = (variance.clamp(min=0).log() * 0.5).exp()  # its square root (0 where it is 0)
    noise = draws @ class_scale.transpose(0, 1)  # (S, C): L z_s
    samples = mean.to(noise.dtype).unsqueeze(1) + spread * noise.unsqueeze(0)  # (B, S, C)
    return (samples * logit_scale).softmax(-1).mean(1).log().to(mean.dtype)


class ExitPosterior(nn.Module):
    """One exit's weight posterior and predictive settings, as buffers (saved with the model).

    Args:
        num_classes: C.
        num_inputs: D + 1, the classifier's input features and its bias.
        device, dtype: where and as what the buffers are created (the classifier's).
    """

    def __init__(self, num_classes: int, num_inputs: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.register_buffer("class_scale", torch.zeros(num_classes, num_classes, **dd))  # L, L L^T = U^-1
        self.register_buffer("feature_cov", torch.zeros(num_inputs, num_inputs, **dd))  # V^-1
        self.register_buffer("logit_scale", torch.ones((), **dd))  # 1 / the temperature T
        self.register_buffer("prior_var", torch.zeros((), **dd))  # var0 it was fitted with (0: not fitted)


@register_predictor
class LaplaceExits(MultiExitModel):
    """Exit k of ``model`` answers with its last-layer Laplace predictive's log-probabilities.

    Fit it with :func:`timm_exits.inference.calibrated.fit_laplace`. Inference only: its outputs are
    log-probabilities, not raw logits; ``forward_exit(..., pre_logits=True)`` gives the wrapped exit's
    features.

    Args:
        model: the multi-exit network; each exit must end with a linear layer (:func:`exit_classifier`).
        num_samples: S, the number of draws of the predictive (50 in the reference).
        seed: the seed of the draws.
    """

    predictor = "laplace"

    def __init__(self, model: nn.Module, num_samples: int = 50, seed: int = 0):
        super().__init__()
        if not is_multi_exit(model):
            raise ValueError(f"{type(self).__name__} wraps a multi-exit model (see timm_exits.add_exits), "
                             f"got {type(model).__name__}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.model = model
        self.num_exits, self.exit_index, self.num_classes = model.num_exits, model.num_exits - 1, model.num_classes
        self.num_features, self.exit_widths = getattr(model, "num_features", 0), list(getattr(model, "exit_widths", []))
        linears = [exit_classifier(model, i) for i in range(self.num_exits)]
        self.posteriors = nn.ModuleList(ExitPosterior(fc.out_features, fc.in_features + 1, fc.weight.device,
                                                      fc.weight.dtype) for fc in linears)
        generator = torch.Generator().manual_seed(seed)
        draws = torch.randn(num_samples, self.num_classes, generator=generator, dtype=torch.float64)
        self.register_buffer("draws", draws.to(linears[-1].weight.device, linears[-1].weight.dtype))
        record_wrapper_args(self, model, "laplace", num_samples=num_samples, seed=seed)
        self.train(model.training)

    def forward_stem(self, x: torch.Tensor) -> State:
        return self.model.forward_stem(x)

    def forward_stage(self, state: State, index: int) -> State:
        return self.model.forward_stage(state, index)

    def forward_exit(self, state: State, index: int, pre_logits: bool = False) -> torch.Tensor:
        """Exit ``index``'s Laplace log-probabilities; ``pre_logits``: the wrapped exit's pooled features."""
        features = self.model.forward_exit(state, index, pre_logits=True)
        if pre_logits:
            return features
        posterior = self.posteriors[index]
        return laplace_log_probs(self.model.forward_exit(state, index), features, posterior.class_scale,
                                 posterior.feature_cov, self.draws, posterior.logit_scale)

    @property
    def settings(self) -> List[dict]:
        """Each exit's fitted prior variance and temperature (``prior_var`` 0: not fitted)."""
        return [dict(prior_var=float(p.prior_var), temperature=float(1 / p.logit_scale)) for p in self.posteriors]


default_cfgs = generate_default_cfgs({
    "laplace": wrapper_cfg("Last-layer Laplace: each exit's predictive under a Laplace posterior of its classifier."),
})


@register_model
def laplace(pretrained: bool = False, **kwargs) -> LaplaceExits:
    """Last-layer Laplace around a multi-exit network: ``model`` (its timm name), ``model_args`` (its
    arguments), ``num_samples``, ``seed`` (see :class:`LaplaceExits`); its posterior comes with the
    weights (``pretrained=True`` from a model folder)."""
    return create_wrapper(LaplaceExits, "laplace", pretrained, **kwargs)
