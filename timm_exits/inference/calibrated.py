"""Calibrated exits (Meronen et al., WACV 2024): MIE with the exits' profiled costs, and the fit of the
last-layer Laplace posterior of every exit (:class:`~timm_exits.models.laplace.LaplaceExits`).

The Laplace fit follows the reference: for each exit, Kronecker factors of the Hessian of the
cross-entropy with respect to its linear classifier's weights and bias,

    U = E[diag(p) - p p^T]   (classes x classes),   V = E[a a^T],   a = [phi, 1]   (features + 1),

with p the exit's softmax and phi its ``pre_logits`` features, kept as running averages over the
training batches (batch t, 0-based, weighs in with 1 - rho, rho = min(1 - 1/(t+1), 0.95)), then scaled
by sqrt(N) (N training samples), a prior sqrt(1/var0) I added to each, and both inverted. U is the
exact expectation under the model's predictive; the reference estimates it by sampling one label per
sample (backpack's KFAC), which has this expectation. The prior variance var0 and the temperature of
each exit are chosen on a validation split by the negative log-likelihood, over the reference's grids.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..models.laplace import LaplaceExits, exit_classifier, laplace_log_probs
from ..models.mie import MIEModel, mie_weights
from ..profile import profile_exits

__all__ = ["PRIOR_VAR", "PRIOR_VARS", "TEMPERATURES", "mie_model", "kfac_factors", "laplace_posterior",
           "fit_laplace"]

PRIOR_VAR = 2.0  # the reference's var0 when it is not chosen on validation
PRIOR_VARS = (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0)  # the reference's grids
TEMPERATURES = (0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0)


def mie_model(model: nn.Module, input_size: Optional[Sequence[int]] = None, convention: str = "macs") -> MIEModel:
    """MIE around ``model``, weighted by its exits' cumulative cost from :func:`timm_exits.profile.profile_exits`.

    Args:
        model: a multi-exit model (a :class:`~timm_exits.models.laplace.LaplaceExits` gives Laplace + MIE).
        input_size: (C, H, W) to profile at; default: the model's ``pretrained_cfg``.
        convention: how operations are counted (see :mod:`timm_exits.profile`).

    Returns:
        The :class:`~timm_exits.models.mie.MIEModel`.
    """
    return MIEModel(model, [float(c.macs) for c in profile_exits(model, input_size, convention)])


def _exit_outputs(model: nn.Module, images: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(logits, pre_logits features) of every exit, computed stage by stage."""
    state, out = model.forward_stem(images), []
    for i in range(model.num_exits):
        state = model.forward_stage(state, i)
        out.append((model.forward_exit(state, i), model.forward_exit(state, i, pre_logits=True)))
    return out


def _check_linear(model: nn.Module, outputs: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse exits whose logits are not their linear classifier applied to their pre_logits features."""
    for i, (logits, features) in enumerate(outputs):
        fc = exit_classifier(model, i)
        if features.dim() != 2 or features.shape[-1] != fc.in_features or \
                not torch.allclose(fc(features), logits, rtol=1e-4, atol=1e-5):
            raise ValueError(f"last-layer Laplace needs exit {i}'s logits to be its linear classifier applied to its "
                             f"pooled pre_logits features ({fc.in_features} per sample); they are not "
                             f"(features of shape {tuple(features.shape)})")


def _device(model: nn.Module, device: Optional[torch.device]) -> torch.device:
    return device or next(model.parameters()).device


@torch.no_grad()
def kfac_factors(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None,
                 progress: bool = True) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Every exit's Kronecker factors (U, V) of its classifier's Hessian over ``loader``, as the
    module docstring states: running averages over the batches, scaled by sqrt(N). No prior added.

    Args:
        model: the multi-exit network (each exit ends with a linear layer), set to eval mode here.
        loader: batches of ``(images, labels)`` (the labels are not used: U is the expectation under
            the model's own predictive); the training split.
        device: where the images go (default: the model's device).
        progress: show a progress bar.

    Returns:
        One ``(U, V)`` per exit, float64 on the CPU: U ``(C, C)``, V ``(D + 1, D + 1)``.
    """
    model.eval()
    device = _device(model, device)
    factors: List[Tuple[torch.Tensor, torch.Tensor]] = []
    seen = 0
    for t, (images, _) in enumerate(tqdm(loader, desc="Laplace factors", disable=not progress, leave=False)):
        outputs = _exit_outputs(model, images.to(device))
        if t == 0:
            _check_linear(model, outputs)
        rho = min(1 - 1 / (t + 1), 0.95)
        for i, (logits, features) in enumerate(outputs):
            p = logits.double().softmax(-1)
            a = torch.cat([features.double(), features.new_ones(features.shape[0], 1, dtype=torch.float64)], -1)
            u = (torch.diag(p.sum(0)) - p.T @ p) / p.shape[0]
            v = a.T @ a / a.shape[0]
            if t == 0:
                factors.append((u, v))
            else:
                factors[i] = (rho * factors[i][0] + (1 - rho) * u, rho * factors[i][1] + (1 - rho) * v)
        seen += images.shape[0]
    if not seen:
        raise ValueError("the training loader gave no batches: is the dataset empty?")
    return [(math.sqrt(seen) * u.cpu(), math.sqrt(seen) * v.cpu()) for u, v in factors]


def laplace_posterior(u: torch.Tensor, v: torch.Tensor, prior_var: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The posterior's factors from the Hessian's: ``L`` with ``L L^T = (U + sqrt(1/var0) I)^-1`` and
    ``(V + sqrt(1/var0) I)^-1``.

    Args:
        u: U, ``(C, C)``.
        v: V, ``(D + 1, D + 1)``.
        prior_var: var0, positive.

    Returns:
        ``(L, V^-1)``, float64.
    """
    if not (isinstance(prior_var, (int, float)) and math.isfinite(prior_var) and prior_var > 0):
        raise ValueError(f"the prior variance var0 must be a positive number, got {prior_var!r}")
    precision = math.sqrt(1 / prior_var)
    eye = lambda n: torch.eye(n, dtype=torch.float64, device=u.device)  # noqa: E731
    u_inv = torch.linalg.inv(u.double() + precision * eye(u.shape[0]))
    v_inv = torch.linalg.inv(v.double() + precision * eye(v.shape[0]))
    return torch.linalg.cholesky((u_inv + u_inv.T) / 2), v_inv


def _grid(values: Optional[Sequence[float]], default: Sequence[float], fixed: float, chosen: bool,
          what: str) -> List[float]:
    """The candidates of one setting: given, the reference's grid (with a validation split) or its default."""
    values = list(values) if values is not None else list(default if chosen else (fixed,))
    if not values or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in values):
        raise ValueError(f"{what} must be positive numbers, got {values!r}")
    if len(values) > 1 and not chosen:
        raise ValueError(f"{len(values)} candidates for {what} need a validation loader to choose among them")
    return values


@torch.no_grad()
def fit_laplace(
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Optional[Iterable] = None,
        prior_vars: Optional[Sequence[float]] = None,
        temperatures: Optional[Sequence[float]] = None,
        mie_costs: Optional[Sequence[float]] = None,
        num_samples: int = 50,
        seed: int = 0,
        device: Optional[torch.device] = None,
        progress: bool = True,
) -> LaplaceExits:
    """The last-layer Laplace model of ``model``: the factors over ``train_loader``, then each exit's
    var0 and temperature chosen on ``val_loader`` by the negative log-likelihood (the first best in
    the grids' order, temperatures outer).

    Args:
        model: the multi-exit network.
        train_loader: batches of ``(images, labels)`` for the factors.
        val_loader: batches of ``(images, labels)`` to choose var0 and the temperature on; ``None``:
            var0 = :data:`PRIOR_VAR` and temperature 1 (or the single values given).
        prior_vars: the var0 candidates; default: :data:`PRIOR_VARS` with a validation loader.
        temperatures: the temperature candidates; default: :data:`TEMPERATURES` with a validation loader.
        mie_costs: choose for Laplace + MIE, as the reference does: exit k's setting minimises the
            NLL of MIE at exit k (with these cumulative costs) given the earlier exits' settings.
        num_samples: S, the draws of the predictive.
        seed: the seed of the draws.
        device: where the images go (default: the model's device).
        progress: show progress bars.

    Returns:
        The fitted :class:`~timm_exits.models.laplace.LaplaceExits`, in eval mode (wrap it in
        :class:`~timm_exits.models.mie.MIEModel` for Laplace + MIE).
    """
    chosen = val_loader is not None
    var_grid = _grid(prior_vars, PRIOR_VARS, PRIOR_VAR, chosen, "prior_vars")
    temp_grid = _grid(temperatures, TEMPERATURES, 1.0, chosen, "temperatures")
    laplace = LaplaceExits(model, num_samples, seed).eval()
    weights = None if mie_costs is None else mie_weights(mie_costs, model.num_exits)
    factors = kfac_factors(model, train_loader, device, progress)
    if chosen:
        device = _device(model, device)
        batches = [([(z.cpu(), f.cpu()) for z, f in _exit_outputs(model.eval(), images.to(device))], labels.cpu())
                   for images, labels in tqdm(val_loader, desc="validation", disable=not progress, leave=False)]
        if not batches:
            raise ValueError("the validation loader gave no batches: is the dataset empty?")
        labels = torch.cat([y for _, y in batches])
    running = 0.0  # MIE's weighted sum of the chosen exits' probabilities (sum_{j<k} c_j p_j)
    draws = laplace.draws.double().cpu()
    for i, (u, v) in enumerate(factors):
        best = None
        for temperature in temp_grid:
            for prior_var in var_grid:
                scale, cov = laplace_posterior(u, v, prior_var)
                nll, probs = 0.0, None
                if chosen:
                    probs = torch.cat([laplace_log_probs(outs[i][0].double(), outs[i][1].double(), scale, cov, draws,
                                                         1 / temperature) for outs, _ in batches]).exp()
                    if weights is not None:
                        probs = (running + weights[i] * probs) / sum(weights[:i + 1])
                    nll = -probs.clamp(min=1e-300).log().gather(1, labels.view(-1, 1)).mean().item()
                if best is None or nll < best[0]:
                    best = (nll, prior_var, temperature, scale, cov, probs)
        _, prior_var, temperature, scale, cov, probs = best
        if weights is not None and chosen:
            running = probs * sum(weights[:i + 1])
        posterior = laplace.posteriors[i]
        posterior.class_scale.copy_(scale)
        posterior.feature_cov.copy_(cov)
        posterior.logit_scale.fill_(1 / temperature)
        posterior.prior_var.fill_(prior_var)
    return laplace
