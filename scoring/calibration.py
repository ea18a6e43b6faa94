"""Calibration per horizon step: pooled over horizons, a well-covered 90% interval can hide an
overconfident first step. Per step: coverage of the central 50% and 90% intervals, a 95%
interval for the 90% coverage (HAC over the windows in time order, stats.mean_interval), and the
histogram of the probability integral transform (PIT, the forecast CDF at the outcome: flat when
calibrated, U-shaped when overconfident).
"""
from __future__ import annotations

import numpy as np
import torch

from stats.intervals import mean_interval

NUM_PIT_BINS = 10


def pit_counts(cdf_BPT: torch.Tensor) -> torch.Tensor:
    """(P, NUM_PIT_BINS) PIT histogram counts per horizon step, pooled over windows and targets."""
    bins_BPT = (cdf_BPT.float() * NUM_PIT_BINS).long().clamp(0, NUM_PIT_BINS - 1)
    return torch.nn.functional.one_hot(bins_BPT, NUM_PIT_BINS).sum((0, 2))


def calibration_by_horizon(coverage_50_P, coverage_90_NP: np.ndarray, pit_counts_PB,
                           stride: int) -> dict:
    """The `calibration_by_horizon` record of a val or test line. `coverage_90_NP`: per window
    (time order) and step, the share of targets inside the 90% interval."""
    coverage_90_NP = np.asarray(coverage_90_NP, dtype=np.float64).reshape(-1, len(pit_counts_PB))
    num_steps = coverage_90_NP.shape[1]
    intervals = [mean_interval(coverage_90_NP[:, p], num_steps, stride) for p in range(num_steps)]
    return {"steps": list(range(1, num_steps + 1)),
            "coverage_50": [float(c) for c in coverage_50_P],
            "coverage_90": [float(c) for c in coverage_90_NP.mean(0)],
            "coverage_90_low": [i.low for i in intervals],
            "coverage_90_high": [i.high for i in intervals],
            "pit_counts": [[int(c) for c in row] for row in pit_counts_PB]}
