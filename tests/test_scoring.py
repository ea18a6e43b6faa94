"""Scores, baselines and skill intervals (scoring/scores.py, the mixture math in model/decoder.py)
and the evaluation that applies them on the same windows (trainer/evaluate.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import properscoring
import pytest
import torch

from model.decoder import mixture_cdf, mixture_crps, mixture_quantiles
from scoring.scores import (
    PINBALL_SCORES,
    QUANTILE_LEVELS,
    derived_scores,
    describe_skill,
    ewma_scale,
    gaussian,
    naive_scale,
    quantile_scores,
    random_walk,
    scores,
    skill_metrics,
)
from tests.dist_workers import join_group, spawn
from trainer import distributed


def random_mixture(shape=(2, 3), K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_pi = torch.log_softmax(torch.randn(*shape, K, generator=g), -1)
    mu = torch.randn(*shape, K, generator=g)
    sigma = torch.rand(*shape, K, generator=g) + 0.2
    return log_pi, mu, sigma


def sample(mixture, n, seed=1):
    log_pi, mu, sigma = mixture
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(log_pi.exp().reshape(-1, log_pi.shape[-1]), n, replacement=True,
                          generator=g).T.reshape(n, *log_pi.shape[:-1], 1)
    pick = lambda x: torch.gather(x.expand(n, *x.shape), -1, k)[..., 0]   # noqa: E731
    return pick(mu) + pick(sigma) * torch.randn(n, *mu.shape[:-1], generator=g)


def test_crps_closed_form_matches_monte_carlo():
    mixture = random_mixture()
    y = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    x, x2 = sample(mixture, 200_000, seed=1), sample(mixture, 200_000, seed=2)
    monte_carlo = (x - y).abs().mean(0) - 0.5 * (x - x2).abs().mean(0)
    assert torch.allclose(mixture_crps(*mixture, y), monte_carlo, atol=5e-3)


def test_crps_of_a_standard_normal_at_its_mean():
    log_pi, mu, sigma = gaussian(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    expected = 2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi)
    crps = mixture_crps(log_pi, mu, sigma, torch.zeros(1, 1, 1)).item()
    assert crps == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_crps_agrees_with_properscoring_where_they_overlap():
    g = torch.Generator().manual_seed(3)
    mu, sigma, y = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.1, torch.randn(5)
    one = mixture_crps(torch.zeros(5, 1), mu[:, None], sigma[:, None], y)
    np.testing.assert_allclose(one.numpy(), properscoring.crps_gaussian(y, mu, sigma), rtol=1e-5)
    mixture = random_mixture(shape=(4,), K=3)
    y = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    draws_NT = sample(mixture, 4000).numpy()      # properscoring's ensemble CRPS is O(n^2)
    closed = mixture_crps(*mixture, y).numpy()
    for t in range(4):
        ensemble = properscoring.crps_ensemble(y[t].item(), draws_NT[:, t])
        standard_error = np.abs(draws_NT[:, t] - y[t].item()).std() / math.sqrt(len(draws_NT))
        assert abs(closed[t] - ensemble) < 4 * standard_error


def test_quantile_scores_by_hand():
    """A standard normal forecast (one component) and outcomes in and outside its intervals."""
    y_BPT = torch.tensor([[[0.0], [2.0]]])                       # (B=1, P=2, T=1)
    mixture = gaussian(torch.zeros(1, 2, 1), torch.ones(1, 2, 1))
    std_T, mean_T, naive_BT = torch.tensor([2.0]), torch.tensor([10.0]), torch.tensor([[0.5]])
    found = quantile_scores(mixture, y_BPT, std_T, mean_T, naive_BT)
    z95, z75 = 1.6448536, 0.6744898
    # y = 0: the median is exact; the 95% quantile is above y by z95: loss (1 - 0.95) z95.
    assert found["pinball_q50"][0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    assert found["pinball_q95"][0, 0, 0] == pytest.approx(0.05 * z95 * 2, rel=1e-5)
    # y = 2 is above the 90% interval [-z95, z95]: width + 2 / 0.1 * (2 - z95).
    is90 = 2 * z95 + 20 * (2 - z95)
    assert found["interval_score_90"][0, 1, 0] == pytest.approx(is90 * 2, rel=1e-5)
    assert found["msis_90"][0, 1, 0] == pytest.approx(is90 / 0.5, rel=1e-5)
    assert found["interval_score_50"][0, 0, 0] == pytest.approx(2 * z75 * 2, rel=1e-5)
    assert found["abs_outcome"][0, 1, 0] == pytest.approx(2 * 2 + 10)
    base = scores(mixture, y_BPT, std_T, naive_BT)
    assert base["mase"][0, 1, 0] == pytest.approx(2 / 0.5)
    assert base["squared_error"][0, 1, 0] == pytest.approx((2 * 2) ** 2)
    assert base["crps_units"][0, 1, 0] == pytest.approx(2 * base["crps"][0, 1, 0])


def test_mixture_quantile_scores_match_its_bisection_quantiles():
    mixture = random_mixture(shape=(1, 2, 3), K=3)
    y = torch.zeros(1, 2, 3)
    q = mixture_quantiles(*mixture, QUANTILE_LEVELS, iterations=30)
    found = quantile_scores(mixture, y, torch.ones(3), torch.zeros(3), torch.ones(1, 3))
    for i, level in enumerate(QUANTILE_LEVELS):
        expected = torch.maximum(level * (y - q[..., i]), (level - 1) * (y - q[..., i]))
        torch.testing.assert_close(found[PINBALL_SCORES[i]], expected)


def test_derived_scores_are_not_means_of_elements():
    means = {"squared_error": np.array([4.0, 9.0]), "abs_outcome": np.array([10.0, 10.0]),
             **{k: np.array([1.0, 2.0]) for k in PINBALL_SCORES}}
    derived = derived_scores(means)
    np.testing.assert_allclose(derived["rmse"], [2.0, 3.0])
    np.testing.assert_allclose(derived["wql"], [0.2, 0.4])


def test_naive_scale_is_the_lookback_mean_absolute_change():
    target_BST = torch.tensor([[[0.0], [1.0], [3.0], [2.0]]])
    assert naive_scale(target_BST).tolist() == [[pytest.approx(4 / 3)]]


def test_mixture_quantiles_are_exact_and_match_sampling():
    mixture = random_mixture()
    probs = [0.05, 0.25, 0.5, 0.75, 0.95]
    q = mixture_quantiles(*mixture, probs)                       # (2, 3, 5)
    for i, p in enumerate(probs):
        cdf = mixture_cdf(*mixture, q[..., i])
        assert torch.allclose(cdf, torch.full_like(cdf, p), atol=1e-5)
    x = sample(mixture, 200_000)
    below = (x[..., None] < q).float().mean(0)
    assert torch.allclose(below, torch.tensor(probs).expand_as(below), atol=5e-3)


def test_ewma_scale_follows_the_riskmetrics_recursion():
    g = torch.Generator().manual_seed(0)
    target_BST = torch.randn(3, 40, 2, generator=g).cumsum(1)
    r = torch.diff(target_BST.double(), dim=1)
    variance = (r ** 2).mean(1)
    for t in range(r.shape[1]):
        variance = 0.94 * variance + 0.06 * r[:, t] ** 2
    assert torch.allclose(ewma_scale(target_BST).double(), variance.sqrt(), rtol=1e-5)


def test_ewma_adapts_where_the_training_spread_cannot():
    """A calm window (changes of 0.1) after a training spread of 1: the EWMA scale is near 0.1."""
    steps = torch.full((1, 60, 1), 0.1) * torch.tensor([1.0, -1.0]).repeat(30)[None, :, None]
    scale = ewma_scale(steps.cumsum(1))
    assert scale.item() == pytest.approx(0.1, rel=1e-3)
    y = torch.zeros(1, 3, 1)
    rw = random_walk(steps.cumsum(1), torch.ones(3, 1), 3)
    calm = gaussian(torch.zeros(1, 3, 1), 0.1 * torch.ones(1, 3, 1))
    naive = torch.ones(1, 1)
    assert scores(calm, y, torch.ones(1), naive)["nll"].mean() < \
        scores(rw, y, torch.ones(1), naive)["nll"].mean()


def nll_series(num_windows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-window NLLs with independent noise: the model 0.1 below ewma, 0.2 below rw."""
    rng = np.random.default_rng(seed)
    noise = lambda: rng.normal(0, 0.01, num_windows)     # noqa: E731
    return {"model": 1.0 + noise(), "rw": 1.2 + noise(), "ewma": 1.1 + noise()}


def test_skill_is_against_the_best_baseline():
    skill = skill_metrics(nll_series(500), pred_len=5, stride=1)
    assert skill["best_baseline"] == "ewma"
    assert skill["skill"] == pytest.approx(-0.1, abs=2e-3)
    assert skill["skill_rw"] == pytest.approx(-0.2, abs=2e-3)
    assert skill["skill_low"] <= skill["skill"] <= skill["skill_high"] < 0
    assert skill["skill_shown"] and skill["skill_reason"] is None
    assert skill["skill_dm_pvalue"] < 1e-6
    assert skill["skill_block_length"] == 5 + 16       # the overlap + ceil(2 * 500^(1/3))


def test_every_skill_says_whether_it_is_shown_why_not_and_its_dm_pvalue():
    skill = skill_metrics(nll_series(500), pred_len=5, stride=1)
    for name in ("skill", "skill_rw", "skill_ewma"):
        assert {f"{name}{k}" for k in ("", "_low", "_high", "_shown", "_reason", "_dm_pvalue")
                } <= set(skill)


def test_a_short_split_shows_no_skill_and_says_why():
    """120 overlapping 24-step windows hold only 3 independent blocks: even a clear difference
    is not called shown, and the log line says why."""
    skill = skill_metrics(nll_series(120), pred_len=24, stride=1)
    assert skill["skill_high"] < 0
    assert not skill["skill_shown"]
    assert skill["skill_reason"] == "only 3 independent blocks of windows (8 needed)"
    line = describe_skill({**skill, "rw_nll": 1.2, "ewma_nll": 1.1})
    assert "not shown: only 3 independent blocks of windows (8 needed)" in line


# --- evaluation on real windows, one process and two -------------------------------------------

def evaluation_setup(csv: Path):
    from model import CelestialPGAT
    from series.dataset import WindowDataset, prepare
    from tests.conftest import small_config
    config = small_config(csv, Path("/nonexistent"))
    m = config.model
    prepared = prepare(config.data, m.seq_len, m.pred_len)
    dataset = WindowDataset(prepared, "val", m.seq_len, m.pred_len, 1)
    torch.manual_seed(0)
    return CelestialPGAT(m, prepared.spec), dataset, prepared, config


def evaluate_on(csv: Path, rank: int = 0, world_size: int = 1) -> dict:
    from series.dataset import build_loader
    from trainer.evaluate import evaluate
    model, dataset, prepared, config = evaluation_setup(csv)
    loader = build_loader(dataset, config.data, rank, world_size, seed=0, train=False)
    return evaluate(model, loader, torch.device("cpu"), prepared.target_std, with_series=True,
                    per_horizon=True)


def test_evaluate_scores_model_and_baselines_on_the_same_windows(short_csv):
    metrics = evaluate_on(short_csv)
    n = metrics["num_windows"]
    series = metrics["series"]
    assert all(len(series[k]) == n for k in ("model", "rw", "ewma"))
    for prefix in ("", "rw_", "ewma_"):
        mean_nll = series[prefix[:-1] or "model"].mean()
        assert metrics[f"{prefix}nll"] == pytest.approx(mean_nll, rel=1e-6)
        assert 0 < metrics[f"{prefix}coverage_50"] < metrics[f"{prefix}coverage_90"] <= 1
        assert metrics[f"{prefix}crps"] > 0 and metrics[f"{prefix}mae"] > 0
        assert np.array(metrics[f"{prefix}nll_by_horizon"]).shape == (12, 4)
    # The random walk's spread is the training split's: on validation it covers about 90%.
    assert 0.8 < metrics["rw_coverage_90"] < 0.97


def two_rank_series(rank, world_size, port, csv, out):
    join_group(rank, world_size, port)
    metrics = evaluate_on(Path(csv), rank, world_size)
    if rank == 0:
        calibration = metrics["calibration_by_horizon"]
        np.savez(Path(out) / "series.npz", **metrics["series"], nll=metrics["nll"],
                 pit_counts=calibration["pit_counts"],
                 coverage_90_low=calibration["coverage_90_low"])
    distributed.destroy()


@pytest.mark.slow
def test_series_gathered_from_two_ranks_equal_one_process(short_csv, tmp_path):
    one = evaluate_on(short_csv)
    spawn(two_rank_series, 2, str(short_csv), str(tmp_path), timeout_s=240)
    two = np.load(tmp_path / "series.npz")
    for k, values in one["series"].items():       # per-window scores, per target and step too
        np.testing.assert_allclose(two[k], values, rtol=1e-5, atol=1e-6)
    assert float(two["nll"]) == pytest.approx(one["nll"], rel=1e-6)
    calibration = one["calibration_by_horizon"]
    assert two["pit_counts"].tolist() == calibration["pit_counts"]
    np.testing.assert_allclose(two["coverage_90_low"], calibration["coverage_90_low"], rtol=1e-9)
