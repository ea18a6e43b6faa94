"""Temporary stand-in for `stats.intervals` (same names and signatures) until `stats/` lands."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

MIN_BLOCKS = 8


def block_length(num_windows: int, pred_len: int, stride: int = 1) -> int:
    overlap = math.ceil(pred_len / stride)
    return max(1, min(num_windows, max(overlap, math.ceil(num_windows ** (1 / 3)))))


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float
    high: float
    block_length: int
    num_blocks: int
    shown: bool
    reason: str | None
    dm_statistic: float
    dm_pvalue: float
    level: float

    def as_dict(self) -> dict:
        return asdict(self)


def _long_run_variance(x: np.ndarray, bandwidth: int) -> float:
    x = x - x.mean()
    n = len(x)
    total = float(x @ x) / n
    for lag in range(1, min(bandwidth, n)):
        total += 2 * (1 - lag / bandwidth) * float(x[lag:] @ x[:-lag]) / n
    return max(total, 0.0)


def paired_difference_over_seeds(diffs: list[np.ndarray], pred_len: int, stride: int = 1,
                                 level: float = 0.95) -> PairedDifference:
    d_SN = np.asarray(np.stack(diffs), dtype=np.float64)
    num_seeds, n = d_SN.shape
    length = block_length(n, pred_len, stride)
    num_blocks = n // length
    window_var = _long_run_variance(d_SN.mean(0), length) / n
    seed_var = d_SN.mean(1).var(ddof=1) / num_seeds if num_seeds > 1 else 0.0
    se = math.sqrt(window_var + seed_var)
    # Welch-Satterthwaite: few seeds estimate their share of the variance poorly.
    parts = [(window_var, max(1, num_blocks - 1)), (seed_var, max(1, num_seeds - 1))]
    denominator = sum(v * v / d for v, d in parts if v > 0)
    df = (window_var + seed_var) ** 2 / denominator if denominator > 0 else 1.0
    mean = float(d_SN.mean())
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * se
    stat = mean / se if se > 0 else math.inf * np.sign(mean) if mean else 0.0
    pvalue = float(2 * scipy_stats.t.sf(abs(stat), df)) if se > 0 else float(mean == 0)
    low, high = mean - half, mean + half
    reason = None
    if num_blocks < MIN_BLOCKS:
        reason = f"only {num_blocks} independent blocks of windows ({MIN_BLOCKS} needed)"
    elif low <= 0 <= high:
        reason = "the interval includes 0"
    return PairedDifference(mean, low, high, length, num_blocks, reason is None, reason,
                            float(stat), pvalue, level)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted
