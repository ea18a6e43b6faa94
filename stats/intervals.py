"""Intervals for the mean of a per-window score difference, honest for overlapping windows.

Forecast windows `stride` apart whose horizons of `pred_len` steps overlap share targets, so
per-window score differences are autocorrelated up to lag ceil(pred_len / stride), and daily
volatility clustering adds a slowly decaying tail. The interval is studentised:

    mean +- t_{df} * sqrt(LRV / n)

- LRV: the long-run variance by a Bartlett-kernel HAC estimator (Newey-West 1987) whose lag
  truncation is `block_length` = the overlap plus 2 n^(1/3), corrected for its shrinkage from
  centring on the sample mean (see `long_run_variance`);
- df = n / block_length - 1 (at least 1): the number of roughly independent blocks of windows,
  minus one. This is the Harvey-Leybourne-Newbold (1997) small-sample correction of the
  Diebold-Mariano test (refer the statistic to Student's t, not the normal) with the degrees of
  freedom counted in blocks rather than windows, because overlapping windows are not independent.
  HLN's variance factor (n + 1 - 2h + h(h-1)/n) / n is not applied: it corrects the bias of a
  rectangular-kernel variance truncated at lag h - 1, not of the Bartlett estimator used here.

The Diebold-Mariano statistic is mean / sqrt(LRV / n) with the same reference t, so its two-sided
p-value is below 1 - level exactly when the interval excludes 0. A difference is `shown` only when
the interval excludes 0 and there are at least MIN_BLOCKS independent blocks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

MIN_BLOCKS = 8


@dataclass(frozen=True)
class PairedDifference:
    """Mean difference with its interval; `shown` when the interval excludes 0 and rests on at
    least MIN_BLOCKS independent blocks of windows, else `reason` says why not, in words."""
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
        return dataclasses.asdict(self)


def block_length(num_windows: int, pred_len: int, stride: int = 1) -> int:
    """Windows within ceil(pred_len / stride) of each other share targets, so a block is never
    shorter than that overlap; 2 n^(1/3) more covers the slower decay of volatility clustering at
    the HAC bandwidth rate. At most num_windows (at least 1)."""
    overlap = math.ceil(pred_len / stride)
    length = overlap + math.ceil(2 * max(num_windows, 1) ** (1 / 3))
    return max(1, min(length, num_windows))


def long_run_variance(values_RN: np.ndarray, max_lag: int) -> np.ndarray:
    """Bartlett-kernel (Newey-West) long-run variance of each row: sum over |j| <= max_lag of
    (1 - |j| / (max_lag + 1)) times the lag-j autocovariance, divided by the estimator's expected
    shrinkage from centring on the sample mean, 1 - b + b^2 / 3 with b = (max_lag + 1) / n (its
    fixed-b mean, Kiefer and Vogelsang 2005), which is large when few blocks fit. Never
    negative."""
    centred = values_RN - values_RN.mean(-1, keepdims=True)
    n = centred.shape[-1]
    variance = (centred * centred).sum(-1) / n
    for lag in range(1, min(max_lag, n - 1) + 1):
        autocovariance = (centred[..., lag:] * centred[..., :-lag]).sum(-1) / n
        variance = variance + 2 * (1 - lag / (max_lag + 1)) * autocovariance
    b = min((max_lag + 1) / n, 1.0)
    return variance / (1 - b + b * b / 3)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")


def _not_shown(mean: float, block: int, num_blocks: int, reason: str, level: float,
               low: float = math.nan, high: float = math.nan) -> PairedDifference:
    return PairedDifference(mean, low, high, block, num_blocks, False, reason, math.nan,
                            math.nan, level)


def _reason(num_blocks: int, low: float, high: float) -> str | None:
    if num_blocks < MIN_BLOCKS:
        blocks = "block" if num_blocks == 1 else "blocks"
        return f"only {num_blocks} independent {blocks} of windows ({MIN_BLOCKS} needed)"
    if low <= 0 <= high:
        return "the interval includes 0"
    return None


def studentised(mean: float, standard_error: float, df: float, block: int, num_blocks: int,
                level: float) -> PairedDifference:
    """Interval mean +- t_df * standard_error and the matching two-sided t-test of mean = 0."""
    if not standard_error > 0:
        return _not_shown(mean, block, num_blocks, "the differences have no variance", level,
                          mean, mean)
    half_width = scipy_stats.t.ppf(0.5 + level / 2, df) * standard_error
    low, high = mean - half_width, mean + half_width
    statistic = mean / standard_error
    pvalue = float(2 * scipy_stats.t.sf(abs(statistic), df))
    reason = _reason(num_blocks, low, high)
    return PairedDifference(mean, float(low), float(high), block, num_blocks, reason is None,
                            reason, float(statistic), pvalue, level)


def _degenerate(values: np.ndarray, block: int, level: float) -> PairedDifference | None:
    n = len(values)
    if not np.isfinite(values).all():
        return _not_shown(math.nan, block, 0, "the scores contain NaN or infinity", level)
    if n < 2:
        mean = float(values[0]) if n else math.nan
        return _not_shown(mean, block, 0, f"only {n} window(s) (at least 2 needed)", level)
    return None


def mean_interval(values, pred_len: int, stride: int = 1, level: float = 0.95
                  ) -> PairedDifference:
    """Interval of the mean of one per-window series (in window order) against 0."""
    _check_level(level)
    values = np.asarray(values, dtype=np.float64).ravel()
    n = len(values)
    block = block_length(n, pred_len, stride)
    degenerate = _degenerate(values, block, level)
    if degenerate is not None:
        return degenerate
    num_blocks = n // block
    standard_error = math.sqrt(long_run_variance(values, block) / n)
    return studentised(float(values.mean()), standard_error, max(n / block - 1, 1.0), block,
                       num_blocks, level)


def paired_difference(a, b, pred_len: int, stride: int = 1, level: float = 0.95
                      ) -> PairedDifference:
    """Interval of mean(a - b) for per-window scores a and b on the same windows (in window
    order). Positive: a scores higher (is worse, for a loss)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    return mean_interval(a - b, pred_len, stride, level)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm (1979) step-down adjusted p-values, same keys. NaN p-values stay NaN and do not count
    among the hypotheses."""
    finite = sorted((p, key) for key, p in pvalues.items() if not math.isnan(p))
    adjusted = dict.fromkeys(pvalues, math.nan)
    running = 0.0
    for rank, (p, key) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[key] = running
    return adjusted


def _shared_window_variance(diffs_SN: np.ndarray, average_N: np.ndarray, block: int) -> float:
    """Long-run variance of the window noise all seeds share. The seed-average series holds it
    plus 1/S of each seed's own window noise, which the seed means' variance already counts; that
    part is estimated from the residuals around the average (whose long-run variance is (S - 1) / S
    of it) and taken off, at least 0."""
    num_seeds = diffs_SN.shape[0]
    own = float(long_run_variance(diffs_SN - average_N, block).mean()) / (num_seeds - 1)
    return max(float(long_run_variance(average_N, block)) - own, 0.0)


def paired_difference_over_seeds(diffs, pred_len: int, stride: int = 1, level: float = 0.95
                                 ) -> PairedDifference:
    """Interval of the mean difference over seeds and windows, from one per-window difference
    series per seed (variant minus control, same windows, window order).

    Model: d[s, t] = mu + u[s] + c[t] + e[s, t]: u a seed effect (training randomness), c window
    noise all seeds share (the same windows are hard for every seed), e each seed's own window
    noise; c and e are correlated across overlapping windows. The mean over seeds and windows has
    variance (Var(u) + Var(mean_t e)) / S + Var(mean_t c):
    - the first term is the plain between-seed variance of the seed means over S (S - 1 degrees
      of freedom), which needs no subtraction of one noisy estimate from another;
    - the second is the HAC variance of the shared window noise (`_shared_window_variance`, df
      n / L - 1).
    The t degrees of freedom combine the two by Welch-Satterthwaite, so the seed count governs
    when seed-to-seed variation dominates. One seed reduces to `mean_interval`. Null coverage:
    benchmarks/RESULTS.md section 6."""
    _check_level(level)
    series = [np.asarray(d, dtype=np.float64).ravel() for d in diffs]
    if not series or len({len(d) for d in series}) > 1:
        raise ValueError("paired_difference_over_seeds needs one series per seed, all of equal "
                         f"length, got lengths {[len(d) for d in series]}")
    diffs_SN = np.stack(series)
    num_seeds, n = diffs_SN.shape
    if num_seeds == 1 or n < 2 or not np.isfinite(diffs_SN).all():
        return mean_interval(diffs_SN.mean(0), pred_len, stride, level)
    block = block_length(n, pred_len, stride)
    average_N = diffs_SN.mean(0)
    seed_variance = float(diffs_SN.mean(1).var(ddof=1)) / num_seeds
    window_variance = _shared_window_variance(diffs_SN, average_N, block) / n
    window_df, seed_df = max(n / block - 1, 1.0), num_seeds - 1
    total = window_variance + seed_variance
    df = total ** 2 / (window_variance ** 2 / window_df + seed_variance ** 2 / seed_df) \
        if total > 0 else window_df
    return studentised(float(average_N.mean()), math.sqrt(total), df, block, n // block, level)
