"""Forecasts scored honestly: naive baselines, proper scores, skill with a block-bootstrap interval.

Every forecaster (the model and each baseline) is a Gaussian mixture per (window, horizon step,
target) in scaled target units, scored on the same windows with the same functions:
- `nll`: negative log-likelihood (log score), the training objective;
- `crps`: continuous ranked probability score, closed form for a Gaussian mixture;
- `mae`: absolute error of the median, in target units;
- `coverage_50` / `coverage_90`: how often the outcome falls in the central 50% / 90% interval.

Baselines (no parameters learned from the validation or test rows):
- `rw`: random walk, last observed value, Gaussian spread of the training split's h-step changes.
- `ewma`: random walk whose 1-step scale is a RiskMetrics EWMA volatility (lambda 0.94) of the
  window's own look-back changes, growing with the square root of the horizon step. It adapts to
  calm and turbulent periods, which a fixed training spread cannot.

Skill is the model's mean NLL minus a baseline's on the same windows (negative = the model is
better), with a 95% interval from a moving-block bootstrap over windows in time order.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from model.decoder import mixture_cdf, mixture_crps, mixture_log_likelihood, mixture_quantiles

BASELINES = ("rw", "ewma")
BASELINE_NAMES = {"rw": "random walk (training spread)", "ewma": "random walk (EWMA volatility)"}
SCORES = ("nll", "crps", "mae", "coverage_50", "coverage_90")
EWMA_LAMBDA = 0.94
NUM_RESAMPLES = 1000


def gaussian(mean_BPT: torch.Tensor, scale_BPT: torch.Tensor):
    """A one-component mixture (log_pi, mu, sigma), each (B, P, T, 1)."""
    mu = mean_BPT.unsqueeze(-1)
    return torch.zeros_like(mu), mu, scale_BPT.unsqueeze(-1).expand_as(mu)


def random_walk(target_BST: torch.Tensor, change_scale_PT: torch.Tensor, pred_len: int):
    last_BPT = target_BST[:, -1:].expand(-1, pred_len, -1)
    return gaussian(last_BPT, change_scale_PT.expand_as(last_BPT))


def ewma_scale(target_BST: torch.Tensor, lam: float = EWMA_LAMBDA) -> torch.Tensor:
    """(B, T) 1-step volatility at the window's end: sigma^2 <- lam sigma^2 + (1 - lam) r^2 over
    the look-back changes r, started from their mean square (the window's own data only)."""
    r2_BRT = torch.diff(target_BST.double(), dim=1) ** 2
    num = r2_BRT.shape[1]
    age_R = torch.arange(num - 1, -1, -1, dtype=torch.float64, device=target_BST.device)
    weights_R = (1 - lam) * lam ** age_R
    variance_BT = (weights_R[None, :, None] * r2_BRT).sum(1) + lam ** num * r2_BRT.mean(1)
    return variance_BT.sqrt().clamp_min(1e-8).float()


def ewma_random_walk(target_BST: torch.Tensor, pred_len: int, lam: float = EWMA_LAMBDA):
    last_BPT = target_BST[:, -1:].expand(-1, pred_len, -1)
    steps_P = torch.arange(1, pred_len + 1, dtype=torch.float32, device=target_BST.device)
    scale_BPT = ewma_scale(target_BST, lam)[:, None, :] * steps_P.sqrt()[None, :, None]
    return gaussian(last_BPT, scale_BPT)


def baseline_forecasts(target_BST: torch.Tensor, change_scale_PT: torch.Tensor) -> dict:
    pred_len = change_scale_PT.shape[0]
    return {"rw": random_walk(target_BST, change_scale_PT, pred_len),
            "ewma": ewma_random_walk(target_BST, pred_len)}


def scores(mixture, y_BPT: torch.Tensor, target_std_T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score per (B, P, T) for a mixture (log_pi, mu, sigma) against outcomes y, and
    `pit`, the forecast CDF at the outcome."""
    log_pi, mu, sigma = mixture
    pit_BPT = mixture_cdf(log_pi, mu, sigma, y_BPT)
    centrality_BPT = (pit_BPT - 0.5).abs()
    if mu.shape[-1] == 1:     # a Gaussian: the median is its mean, no search needed
        median_BPT = mu[..., 0]
    else:
        median_BPT = mixture_quantiles(log_pi, mu, sigma, [0.5], iterations=30)[..., 0]
    return {"nll": -mixture_log_likelihood(log_pi, mu, sigma, y_BPT),
            "crps": mixture_crps(log_pi, mu, sigma, y_BPT),
            "mae": (median_BPT - y_BPT).abs() * target_std_T,
            "coverage_50": (centrality_BPT <= 0.25).float(),
            "coverage_90": (centrality_BPT <= 0.45).float(), "pit": pit_BPT}


# --- skill and its interval ----------------------------------------------------------------------

def block_length(num_windows: int, pred_len: int, stride: int = 1) -> int:
    """Moving-block length, in windows. Windows `pred_len / stride` apart share forecast targets
    (their horizons overlap), so their score differences are correlated at least that far; twice
    that also spans the volatility clustering of daily returns over a few weeks. Never less than
    the n^(1/3) rate of the block-bootstrap literature, and at most a fifth of the series so that
    there are at least five blocks to resample."""
    length = max(math.ceil(2 * pred_len / stride), math.ceil(num_windows ** (1 / 3)))
    return max(1, min(length, num_windows // 5))


def block_bootstrap_interval(values: np.ndarray, block: int, level: float = 0.95,
                             num_resamples: int = NUM_RESAMPLES, seed: int = 0
                             ) -> tuple[float, float]:
    """Percentile interval of the mean of a time series by the moving-block bootstrap (Kunsch
    1989): resample overlapping blocks of `block` consecutive values, joined to the series
    length."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    num_blocks = math.ceil(n / block)
    starts = rng.integers(0, n - block + 1, size=(num_resamples, num_blocks))
    index = (starts[:, :, None] + np.arange(block)).reshape(num_resamples, -1)[:, :n]
    means = values[index].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mean_difference(a: np.ndarray, b: np.ndarray, block: int) -> dict:
    """mean(a - b) over paired windows, with its 95% block-bootstrap interval."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    low, high = block_bootstrap_interval(diff, block)
    return {"mean": float(diff.mean()) if len(diff) else math.nan, "low": low, "high": high}


def skill_metrics(nll_series: dict[str, np.ndarray], pred_len: int, stride: int) -> dict:
    """Flat metrics: `skill_<baseline>` (model NLL - baseline NLL) with `_low`/`_high`, and the same
    against the best baseline on these windows as `skill`, `skill_low`, `skill_high`."""
    model = nll_series["model"]
    block = block_length(len(model), pred_len, stride)
    metrics: dict = {"skill_block_length": block}
    for name in BASELINES:
        diff = mean_difference(model, nll_series[name], block)
        metrics.update({f"skill_{name}": diff["mean"], f"skill_{name}_low": diff["low"],
                        f"skill_{name}_high": diff["high"]})
    best = min(BASELINES, key=lambda name: float(np.mean(nll_series[name])))
    metrics.update({"best_baseline": best, "skill": metrics[f"skill_{best}"],
                    "skill_low": metrics[f"skill_{best}_low"],
                    "skill_high": metrics[f"skill_{best}_high"]})
    return metrics


def describe_skill(metrics: dict) -> str:
    """One phrase for a log line: skill against the best baseline with its interval."""
    best = metrics["best_baseline"]
    return (f"skill vs {best} {metrics['skill']:+.4f} [{metrics['skill_low']:+.4f}, "
            f"{metrics['skill_high']:+.4f}] (nll rw {metrics['rw_nll']:.4f}, "
            f"ewma {metrics['ewma_nll']:.4f})")
