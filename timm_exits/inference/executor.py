"""A real early-exit executor: confident samples stop computing.

The model runs stage by stage on the batch; after each exit the samples whose score reaches that
exit's threshold are answered and removed from the state (batch compaction), and only the others
go on to the next stage. Works with any model of the multi-exit contract: MSDNet, timm backbones
with exits, IMTA phase-II models.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..models.multi_exit import slice_state
from .budgeted import Thresholds, check_thresholds
from ..models.predictors import how_to_predict, predictor_of
from .policies import PolicyLike, resolve_policy

__all__ = ["ExitResult", "EarlyExitExecutor", "weights_sha256"]


def weights_sha256(model: nn.Module) -> Optional[str]:
    """The SHA-256 of a model's state dict (names, dtypes, shapes and values, whatever the memory
    layout): the identity of the weights that thresholds are fitted on (:class:`Thresholds`). For an
    :class:`~timm_exits.inference.export.ExportedModel`, the digest its manifest records of the model
    it was exported from (None for an export that records none)."""
    if not isinstance(model, nn.Module):
        return getattr(model, "weights_sha256", None)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class ExitResult:
    """What the executor answers for a batch, per sample.

    Args:
        logits: the logits of the exit that answered, ``(samples, classes)``.
        preds: its prediction, ``(samples,)``.
        exits: the exit (0-based), ``(samples,)``.
        costs: the cumulative cost paid, if the executor knows the per-exit costs.
    """

    logits: torch.Tensor
    preds: torch.Tensor
    exits: torch.Tensor
    costs: Optional[torch.Tensor] = None


class EarlyExitExecutor:
    """Run a multi-exit model with early exits.

    Args:
        model: a model with ``forward_stem`` / ``forward_stage`` / ``forward_exit`` and ``num_exits``.
        thresholds: one per exit (the last is ignored: the samples left go to the policy's
            fallback), or a :class:`Thresholds` (its policy is used).
        policy: an :class:`ExitPolicy` or a score name (see :mod:`.policies`).
        costs: cumulative cost of each exit, to report the cost paid per sample.

    The exits and predictions are those of the cached evaluation (:func:`assign_exits`) with the
    same thresholds and policy. With the ``most_confident`` fallback, the executor keeps the logits
    of the best exit so far of every sample still running.

    Thresholds (and costs) from a :class:`Thresholds` that records its input size are for images of
    that size only: a batch of another size is refused, since its costs would be reported wrongly
    and the confidence levels were fitted at that size. Thresholds fitted on a predictor's answers
    (product anytime, MIE, ...: :mod:`timm_exits.models.predictors`) need a model that answers with
    it, and the other way round.
    Thresholds that record the weights they were fitted on (:func:`weights_sha256`) are refused on
    other weights, the same architecture's included (a fused model's weights are other weights).
    """

    def __init__(
            self,
            model: nn.Module,
            thresholds: Union[Sequence[float], Thresholds],
            policy: PolicyLike = "maxprob",
            costs: Optional[Sequence[float]] = None,
    ):
        self.input_size: Optional[tuple] = None
        if isinstance(thresholds, Thresholds):
            predictor = predictor_of(model)
            if thresholds.predictor != predictor:
                raise ValueError(f"these thresholds were fitted on the answers of {thresholds.predictor!r}, the model "
                                 f"gives {predictor!r}: run {how_to_predict(thresholds.predictor)} for "
                                 f"{thresholds.predictor!r} thresholds, and only for those")
            identity = weights_sha256(model) if thresholds.weights is not None else None
            if identity is not None and thresholds.weights != identity:
                raise ValueError(f"these thresholds were fitted on other weights (SHA-256 {thresholds.weights[:16]}...) "
                                 f"than this model's ({identity[:16]}...), even if the architecture is "
                                 f"the same: fit thresholds on this model (timm-exits evaluate ... --target-macs ...), "
                                 f"or run the model they were fitted on (in the same form: fused or not)")
            policy, costs = thresholds.exit_policy, costs or thresholds.costs or None
            self.input_size = tuple(thresholds.input_size) if thresholds.input_size else None
            thresholds = thresholds.thresholds
        check_thresholds(thresholds, model.num_exits)
        self.model = model
        self.thresholds = [float(t) for t in thresholds]
        self.policy = resolve_policy(policy)
        self.policy.check_exits(model.num_exits)
        self.costs = None if costs is None else torch.tensor(costs, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> ExitResult:
        model, policy, n = self.model, self.policy, x.shape[0]
        if getattr(model, "training", False):  # an nn.Module in training mode
            raise ValueError("the early-exit executor needs the model in evaluation mode (call model.eval()): in "
                             "training mode batch norms use and update batch statistics, so each sample's answer "
                             "would depend on the others in its batch")
        if self.input_size is not None and tuple(x.shape[1:]) != self.input_size:
            raise ValueError(f"these thresholds and costs were measured on {self.input_size} (C, H, W) images, got a "
                             f"batch of {tuple(x.shape[1:])}: resize the images to that size, or fit thresholds at this "
                             f"size (timm-exits evaluate ... --input-size C H W --target-macs ...)")
        last = model.num_exits - 1
        state = model.forward_stem(x)
        index = torch.arange(n, device=x.device)  # original positions of the samples still running
        logits_out: Optional[torch.Tensor] = None
        exits = torch.full((n,), last, dtype=torch.long, device=x.device)
        history, best = None, None  # best: (score, logits, exit) so far of the samples still running
        for k in range(model.num_exits):
            state = model.forward_stage(state, k)
            logits = model.forward_exit(state, k)
            if logits_out is None:
                logits_out = logits.new_empty(n, logits.shape[-1])
            score, history = policy.step(logits.float().softmax(-1), history, k)
            if policy.fallback == "most_confident":
                best = (score, logits, torch.full_like(index, k)) if best is None else _better(best, score, logits, k)
            if k == last:
                if best is None:
                    logits_out[index] = logits
                else:
                    logits_out[index], exits[index] = best[1], best[2]
                break
            done = policy.accepts(score, self.thresholds[k])
            if done.any():
                logits_out[index[done]] = logits[done]
                exits[index[done]] = k
                if done.all():
                    break
                keep = ~done
                state, index = slice_state(state, keep), index[keep]
                history = None if history is None else tuple(h[keep] for h in history)
                best = None if best is None else tuple(b[keep] for b in best)
        costs = None if self.costs is None else self.costs[exits.cpu()]
        return ExitResult(logits_out, logits_out.float().softmax(-1).argmax(-1), exits, costs)


def _better(best: Tuple[torch.Tensor, ...], score: torch.Tensor, logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, ...]:
    """The best (score, logits, exit) so far after exit ``k``: a strictly higher score replaces it,
    so ties keep the earlier exit."""
    higher = score > best[0]
    return (torch.where(higher, score, best[0]), torch.where(higher.unsqueeze(-1), logits, best[1]),
            torch.where(higher, k, best[2]))
