"""Calibration per exit and of the exited prediction: ECE (15 equal-width bins), NLL and Brier,
checked on hand-computed cases."""
import math

import pytest
import torch

from timm_exits.inference import (ECE_BINS, ExitOutputs, ExitPolicy, calibration_metrics, curve_calibration,
                                  exit_calibration)
from timm_exits.inference.calibration import expected_calibration_error

# two classes, label 0: confidence of the prediction and whether it is right
CONF = [0.90, 0.92, 0.58, 0.55, 0.70]
RIGHT = [1, 0, 1, 0, 1]


def _probs(conf, right):
    conf, right = torch.tensor(conf, dtype=torch.float64), torch.tensor(right).bool()
    p0 = torch.where(right, conf, 1 - conf)
    return torch.stack([p0, 1 - p0], -1)


def test_ece_by_hand():
    probs, labels = _probs(CONF, RIGHT), torch.zeros(5, dtype=torch.long)
    # 15 bins of width 1/15: 0.90 and 0.92 share (13/15, 14/15], 0.58 and 0.55 share (8/15, 9/15], 0.70 is alone
    expected = 2 / 5 * abs(0.5 - 0.91) + 2 / 5 * abs(0.5 - 0.565) + 1 / 5 * abs(1 - 0.70)
    assert ECE_BINS == 15
    assert expected_calibration_error(probs, labels) == pytest.approx(expected) == pytest.approx(0.25)
    # with 10 bins 0.90 (in (0.8, 0.9]) and 0.92 (in (0.9, 1.0]) are apart
    ten = 1 / 5 * abs(1 - 0.90) + 1 / 5 * abs(0 - 0.92) + 2 / 5 * abs(0.5 - 0.565) + 1 / 5 * abs(1 - 0.70)
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(ten)
    # a bin is (lo, hi]: a confidence of exactly 1 is in the last bin, a perfect prediction costs nothing
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.zeros(1, dtype=torch.long)) == 0.0
    with pytest.raises(ValueError, match="bins must be >= 1"):
        expected_calibration_error(probs, labels, bins=0)


def test_nll_and_brier_by_hand():
    probs, labels = _probs(CONF, RIGHT), torch.zeros(5, dtype=torch.long)
    p_label = [c if r else 1 - c for c, r in zip(CONF, RIGHT)]
    metrics = calibration_metrics(probs.log(), labels)
    assert metrics["nll"] == pytest.approx(sum(-math.log(p) for p in p_label) / 5, rel=1e-6)
    # two classes: (p_label - 1)^2 + (1 - p_label)^2
    assert metrics["brier"] == pytest.approx(sum(2 * (1 - p) ** 2 for p in p_label) / 5, rel=1e-6)
    assert metrics["ece"] == pytest.approx(0.25, abs=1e-6)


def test_per_exit_and_at_operating_points():
    # 3 exits x 4 samples (the sweep's hand example): with a strict 0.75, the samples leave at exits 0, 1, 2, 2
    conf = [[0.90, 0.60, 0.55, 0.70], [0.95, 0.80, 0.60, 0.65], [0.99, 0.90, 0.85, 0.60]]
    right = [[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    probs = torch.stack([_probs(c, r) for c, r in zip(conf, right)]).float()
    out = ExitOutputs.from_probs(probs, torch.zeros(4, dtype=torch.long))
    per_exit = exit_calibration(out)
    assert len(per_exit) == 3
    assert per_exit[2]["nll"] == pytest.approx(-sum(math.log(c) for c in conf[2]) / 4, rel=1e-5)
    taken = probs[[0, 1, 2, 2], torch.arange(4)]
    (at_075, at_0) = curve_calibration(out, [[0.75] * 3, [0.0] * 3], ExitPolicy(strict=True))
    assert at_075 == pytest.approx(calibration_metrics(taken.log(), out.labels), rel=1e-5)
    assert at_0 == pytest.approx(per_exit[0], rel=1e-5)  # everyone leaves at exit 0
    assert at_075["nll"] == pytest.approx(-(math.log(0.90) + math.log(0.80) + math.log(0.85) + math.log(0.60)) / 4,
                                          rel=1e-5)
    with pytest.raises(ValueError, match="2 thresholds for 3 exits"):
        curve_calibration(out, [[0.5, 0.5]])
