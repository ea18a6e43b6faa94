"""Intervals for mean score differences over overlapping windows (stats/intervals.py): coverage
on simulated null series, the Diebold-Mariano test, Holm's correction and degenerate inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stats.intervals import (
    MIN_BLOCKS,
    block_length,
    holm,
    mean_interval,
    paired_difference,
    paired_difference_over_seeds,
)

PRED_LEN = 24


def overlapping_null(shape: tuple, num_windows: int, rng, pred_len: int = PRED_LEN) -> np.ndarray:
    """Per-window differences of overlapping `pred_len`-step windows at stride 1 with mean 0: each
    is the sum of the window's heavy-tailed Student-t(3) innovations, so neighbours share all but
    one of them."""
    innovations = rng.standard_t(3, size=(*shape, num_windows + pred_len - 1))
    cumulative = np.concatenate([np.zeros((*shape, 1)), innovations.cumsum(-1)], -1)
    return cumulative[..., pred_len:] - cumulative[..., :-pred_len]


def coverage(intervals) -> float:
    return float(np.mean([r.low <= 0 <= r.high for r in intervals]))


@pytest.mark.parametrize("num_windows,replications", [(120, 400), (400, 400), (4000, 200)])
def test_the_95_interval_covers_the_null_mean_on_overlapping_heavy_tailed_windows(
        num_windows, replications):
    series = overlapping_null((replications,), num_windows, np.random.default_rng(num_windows))
    assert 0.90 <= coverage(mean_interval(x, PRED_LEN) for x in series) <= 0.98


@pytest.mark.parametrize("num_seeds", [3, 10])
def test_the_interval_over_seeds_covers_the_null_mean(num_seeds):
    """Shared window noise, each seed's own window noise and a seed effect of every size from
    none to dominant: the mean over seeds and windows is 0."""
    rng = np.random.default_rng(num_seeds)
    num_windows, replications = 400, 300
    seed_sd_R11 = np.repeat([0.0, 1.0, 3.0, 20.0], replications // 4)[:, None, None]
    diffs_RSN = (overlapping_null((replications, 1), num_windows, rng)
                 + overlapping_null((replications, num_seeds), num_windows, rng)
                 + seed_sd_R11 * rng.normal(size=(replications, num_seeds, 1)))
    assert 0.90 <= coverage(paired_difference_over_seeds(list(d), PRED_LEN)
                            for d in diffs_RSN) <= 0.98


def test_one_seed_is_the_single_series_interval():
    x = overlapping_null((), 300, np.random.default_rng(0)) + 1.0
    assert paired_difference_over_seeds([x], PRED_LEN) == mean_interval(x, PRED_LEN)


def test_block_length_never_drops_below_the_window_overlap():
    assert block_length(10, pred_len=24) == 10                    # at most the windows
    assert block_length(120, pred_len=24) == 24 + 10              # overlap + ceil(2 n^(1/3))
    assert block_length(4000, pred_len=24) == 24 + 32
    assert block_length(4000, pred_len=24, stride=24) == 1 + 32
    assert all(block_length(n, 24) >= min(24, n) for n in range(1, 5000, 37))


def test_dm_statistic_and_pvalue_of_a_hand_computed_case():
    """x = 2, 0, 2, 0, ... (n = 16): mean 1, block 7 (1 + ceil(2 * 16^(1/3))); the Bartlett
    sum is 1 + 2 * sum_{j<=7} (1 - j/8) (-1)^j (16 - j)/16 = 1 - 120/128 = 1/16, over the
    centring shrinkage 1 - b + b^2/3 = 7/12 at b = 8/16: a long-run variance of 3/28. The standard
    error is sqrt(3/28 / 16), the statistic its inverse, and df = 16/7 - 1 = 9/7."""
    from scipy import stats
    result = mean_interval([2.0, 0.0] * 8, pred_len=1)
    assert result.block_length == 7 and result.num_blocks == 2
    standard_error = math.sqrt(3 / 28 / 16)
    assert result.dm_statistic == pytest.approx(1 / standard_error)
    assert result.dm_pvalue == pytest.approx(2 * stats.t.sf(1 / standard_error, 9 / 7))
    assert result.high - result.mean == pytest.approx(stats.t.ppf(0.975, 9 / 7) * standard_error)


def test_the_dm_test_rejects_exactly_when_the_interval_excludes_zero():
    rng = np.random.default_rng(3)
    for shift in np.linspace(0, 3, 25):
        r = mean_interval(overlapping_null((), 600, rng) + shift, PRED_LEN, level=0.9)
        assert (r.dm_pvalue < 0.1) == (not r.low <= 0 <= r.high)


def test_a_clear_difference_on_enough_blocks_is_shown():
    rng = np.random.default_rng(4)
    a = overlapping_null((), 2000, rng) + 30.0
    b = overlapping_null((), 2000, rng)
    r = paired_difference(a, b, PRED_LEN)
    assert r.num_blocks >= MIN_BLOCKS and r.low > 0
    assert r.shown and r.reason is None and r.dm_pvalue < 0.05
    assert set(r.as_dict()) == {"mean", "low", "high", "block_length", "num_blocks", "shown",
                                "reason", "dm_statistic", "dm_pvalue", "level"}


def test_too_few_blocks_is_not_shown_and_says_why():
    """120 overlapping 24-step windows are 3 independent blocks: even a difference whose interval
    excludes 0 is not called shown."""
    x = overlapping_null((), 120, np.random.default_rng(5)) + 100.0
    r = mean_interval(x, PRED_LEN)
    assert r.low > 0 and r.num_blocks == 3
    assert not r.shown
    assert r.reason == f"only 3 independent blocks of windows ({MIN_BLOCKS} needed)"


def test_an_interval_including_zero_is_not_shown():
    r = mean_interval(overlapping_null((), 2000, np.random.default_rng(6)), PRED_LEN)
    assert r.low <= 0 <= r.high and not r.shown and r.reason == "the interval includes 0"


@pytest.mark.parametrize("values,reason", [
    ([], "only 0 window(s) (at least 2 needed)"),
    ([0.3], "only 1 window(s) (at least 2 needed)"),
    ([0.5] * 50, "the differences have no variance"),
    ([0.1, math.nan, 0.2], "the scores contain NaN"),
])
def test_degenerate_inputs_give_a_not_shown_result(values, reason):
    r = mean_interval(values, PRED_LEN)
    assert not r.shown and r.reason == reason
    assert math.isnan(r.dm_pvalue)
    assert not paired_difference_over_seeds([values, values], PRED_LEN).shown


def test_user_errors_are_value_errors():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0], PRED_LEN)
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], PRED_LEN, level=95)


def test_holm_matches_a_hand_example():
    """Sorted 0.01, 0.03, 0.04 times 3, 2, 1 gives 0.03, 0.06, 0.04; step-down keeps it monotone:
    0.03, 0.06, 0.06. A NaN stays NaN and is not counted."""
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    assert adjusted["a"] == pytest.approx(0.03)
    assert adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06)
    assert math.isnan(adjusted["d"])
    assert holm({"x": 0.2, "y": 0.9}) == pytest.approx({"x": 0.4, "y": 0.9})
