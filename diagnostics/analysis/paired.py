"""The paired interval of two runs' per-window test scores: stats.intervals.paired_difference.

TEMPORARY: until the stats package is merged, a minimal stand-in with the same interval (HAC
Bartlett long-run variance, block length = window overlap + 2 n^(1/3), t quantile with the
number of blocks as degrees of freedom). Delete the fallback once `stats` is on main.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

try:
    from stats.intervals import paired_difference
except ImportError:
    MIN_BLOCKS = 8

    @dataclass(frozen=True)
    class _PairedDifference:
        mean: float
        low: float
        high: float
        block_length: int
        num_blocks: int
        shown: bool
        reason: str | None

    def paired_difference(a, b, pred_len: int, stride: int = 1, level: float = 0.95):
        diff = np.asarray(a, float) - np.asarray(b, float)
        n = len(diff)
        block = max(1, min(math.ceil(pred_len / stride) + math.ceil(2 * n ** (1 / 3)), n))
        centred = diff - diff.mean()
        variance = centred @ centred / n
        for lag in range(1, min(block, n - 1) + 1):
            variance += 2 * (1 - lag / (block + 1)) * (centred[lag:] @ centred[:-lag]) / n
        half = scipy_stats.t.ppf(0.5 + level / 2, max(n / block - 1, 1.0)) * math.sqrt(
            max(variance, 0.0) / max(n, 1))
        low, high, blocks = diff.mean() - half, diff.mean() + half, n // block
        reason = (f"only {blocks} independent blocks of windows ({MIN_BLOCKS} needed)"
                  if blocks < MIN_BLOCKS else "the interval includes 0" if low <= 0 <= high
                  else None)
        return _PairedDifference(float(diff.mean()), float(low), float(high), block, blocks,
                                 reason is None, reason)

__all__ = ["paired_difference"]
