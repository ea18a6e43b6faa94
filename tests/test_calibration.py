"""Per-horizon calibration: PIT histograms per step and the 90% coverage with its interval."""
from __future__ import annotations

import numpy as np
import torch

from scoring.calibration import NUM_PIT_BINS, calibration_by_horizon, pit_counts


def test_pit_counts_are_a_histogram_per_step():
    cdf_BPT = torch.rand(50, 3, 2, generator=torch.Generator().manual_seed(0))
    cdf_BPT[0, 0, 0] = 1.0                      # the top edge belongs to the last bin
    counts = pit_counts(cdf_BPT)
    assert counts.shape == (3, NUM_PIT_BINS)
    for p in range(3):
        expected, _ = np.histogram(cdf_BPT[:, p].numpy(), bins=NUM_PIT_BINS, range=(0, 1))
        assert counts[p].tolist() == expected.tolist()


def test_overconfident_step_shows_low_coverage_and_a_u_shaped_pit():
    rng = np.random.default_rng(1)
    num_windows, num_steps = 2000, 3
    scale_P = np.array([0.6, 1.0, 1.0])          # step 1 forecasts too narrow a spread
    outcome_NP = rng.standard_normal((num_windows, num_steps))
    from scipy.stats import norm
    cdf_NP = norm.cdf(outcome_NP / scale_P)
    inside_90 = (np.abs(cdf_NP - 0.5) <= 0.45).astype(float)
    inside_50 = (np.abs(cdf_NP - 0.5) <= 0.25).mean(0)
    counts = pit_counts(torch.tensor(cdf_NP)[:, :, None]).tolist()
    cal = calibration_by_horizon(inside_50, inside_90, counts, stride=num_steps)
    assert cal["steps"] == [1, 2, 3]
    assert cal["coverage_90_high"][0] < 0.9 < cal["coverage_90_high"][1]
    assert cal["coverage_90_low"][1] < 0.9
    tails, middle = counts[0][0] + counts[0][-1], counts[0][4] + counts[0][5]
    assert tails > 2 * middle                     # U-shaped: outcomes fall in the tails
