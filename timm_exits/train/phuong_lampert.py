"""Distillation-based training of multi-exit networks (Phuong & Lampert, ICCV 2019).

Every exit but the last learns from the labels and from the network's own last exit (the teacher,
detached), at a temperature T that grows during training until the teacher's softened predictions
are no longer over-confident:

    L = g [ (1 - C) CE(z_N, y) + sum_{i<N} ( (1 - C) CE(z_i, y) + C T^2 H(softmax(sg(z_N) / T), softmax(z_i / T)) ) ]

H(q, p) = -sum_c q_c log p_c is the soft-target cross-entropy: KL's gradient, plus the teacher's
entropy in its value (as in the reference code). g is the reference's ``2 * 5 / N`` for N exits.

The temperature (:class:`AdaptiveTemperature`): after an optimizer update, if the mean over the
update's samples of max_c softmax(z_N / T)_c exceeds a target (0.5), T is multiplied by a factor
(1.05); it never shrinks. With gradient accumulation the mean runs over every batch of the update,
and in a distributed run over every process's batches, so the rule sees the same samples as it
would in one large batch and every process keeps the same T.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["distillation_based_loss", "teacher_max_prob", "AdaptiveTemperature"]


def distillation_based_loss(
        logits: Sequence[torch.Tensor],
        target: torch.Tensor,
        temperature: float,
        distillation_weight: float = 0.5,
        gain: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss's two parts: g (1 - C) sum_i CE(z_i, y) and g C T^2 sum_{i<N} H(softmax(sg(z_N) / T), softmax(z_i / T)).

    Args:
        logits: the N >= 2 exits' logits, each (B, classes); the last is the teacher.
        target: class indices (B,), or class probabilities (B, classes) as mixup produces.
        temperature: T, > 0.
        distillation_weight: C, in [0, 1].
        gain: g; None: ``10 / N`` (the reference's ``2 * 5 / N``).

    Returns:
        The cross-entropy part and the distillation part, scalars; their sum is the loss.
    """
    if len(logits) < 2:
        raise ValueError(f"distillation from the last exit needs at least 2 exits, got {len(logits)}")
    if not temperature > 0:
        raise ValueError(f"the temperature must be > 0, got {temperature}")
    gain = 10.0 / len(logits) if gain is None else gain
    teacher = F.softmax(logits[-1].detach() / temperature, -1)
    ce = sum(F.cross_entropy(z, target) for z in logits)
    soft = sum(-(teacher * F.log_softmax(z / temperature, -1)).sum(-1).mean() for z in logits[:-1])
    return gain * (1 - distillation_weight) * ce, gain * distillation_weight * temperature ** 2 * soft


def teacher_max_prob(teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per sample, max_c softmax(z / T)_c of the teacher's logits, in float32 at least (no gradient).

    Args:
        teacher: the last exit's logits, (B, classes).
        temperature: T.

    Returns:
        (B,) probabilities.
    """
    dtype = torch.promote_types(teacher.dtype, torch.float32)  # half-precision logits: float32; float64 stays
    return F.softmax(teacher.detach().to(dtype) / temperature, -1).amax(-1)


class AdaptiveTemperature:
    """The distillation temperature: T grows by ``growth`` after each update whose teacher is too confident.

    :meth:`observe` adds a batch's teacher logits to the current update's statistic;
    :meth:`step`, at the update's end, takes the mean max-probability over the update's samples
    (over every process, in a distributed run), multiplies T by ``growth`` if it exceeds ``target``
    and starts the next update's statistic.

    Args:
        temperature: T's start, > 0.
        target: the mean max-probability above which T grows.
        growth: T's factor, > 1.
    """

    def __init__(self, temperature: float = 1.0, target: float = 0.5, growth: float = 1.05):
        if not (temperature > 0 and growth > 1):
            raise ValueError(f"the temperature must be > 0 and its growth > 1, got {temperature} and {growth}")
        self.value, self.target, self.growth = float(temperature), target, growth
        self._pending: Optional[torch.Tensor] = None  # this update's (sum of max-probabilities, samples)

    def observe(self, teacher: torch.Tensor) -> None:
        """Add a batch of the current update.

        Args:
            teacher: the last exit's logits of the batch, (B, classes).
        """
        probs = teacher_max_prob(teacher, self.value)
        batch = torch.stack([probs.sum().double(), probs.new_tensor(probs.numel(), dtype=torch.float64)])
        self._pending = batch if self._pending is None else batch + self._pending.to(batch.device)

    def step(self) -> bool:
        """End the update: grow T if the update's mean max-probability exceeds the target.

        Every process of a distributed run must call it at the same update (it all-reduces).

        Returns:
            Whether T grew.
        """
        pending = self._pending if self._pending is not None else torch.zeros(2, dtype=torch.float64)
        self._pending = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(pending)
        total, samples = pending.tolist()
        grew = samples > 0 and total / samples > self.target
        if grew:
            self.value *= self.growth
        return grew

    def state_dict(self) -> Dict[str, Any]:
        """T and the current update's statistic (plain Python numbers)."""
        return {"temperature": self.value,
                "pending": [0.0, 0.0] if self._pending is None else self._pending.tolist()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.
        """
        self.value = float(state["temperature"])
        self._pending = torch.tensor(state["pending"], dtype=torch.float64) if state["pending"][1] else None
