"""``MultiExitAccuracy``: top-1 of every exit."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

__all__ = ["MultiExitAccuracy"]


@METRICS.register_module()
class MultiExitAccuracy(BaseMetric):
    """Top-1 accuracy (%) of every exit: ``exit1_top1``, ``exit2_top1``, ..."""

    default_prefix = "multi_exit"

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Keep, per sample, whether each exit's top-1 class is its label.

        Args:
            data_batch: the batch (not read).
            data_samples: ``MultiExitClassifier``'s predictions, ``dict(logits=(exits, classes),
                label=...)`` per sample.
        """
        for sample in data_samples:
            self.results.append((sample["logits"].argmax(-1) == sample["label"]).cpu())

    def compute_metrics(self, results: list) -> Dict[str, float]:
        correct = torch.stack(results).float().mean(0)
        return {f"exit{k + 1}_top1": 100 * float(c) for k, c in enumerate(correct)}
