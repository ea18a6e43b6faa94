"""Forecasts scored honestly: naive baselines, proper scores, skill with an interval.

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
better), with a 95% studentised interval whose HAC variance allows for the overlap of the windows
and a Diebold-Mariano p-value (stats/intervals.py). A skill is `shown` only when its interval
excludes 0 and rests on enough independent blocks of windows; `_reason` says why not otherwise.
"""
from __future__ import annotations

import numpy as np
import torch

from model.decoder import mixture_cdf, mixture_crps, mixture_log_likelihood, mixture_quantiles
from stats.intervals import PairedDifference, paired_difference

BASELINES = ("rw", "ewma")
BASELINE_NAMES = {"rw": "random walk (training spread)", "ewma": "random walk (EWMA volatility)"}
SCORES = ("nll", "crps", "mae", "coverage_50", "coverage_90")
EWMA_LAMBDA = 0.94


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
    """Every score per (B, P, T) for a mixture (log_pi, mu, sigma) against outcomes y."""
    log_pi, mu, sigma = mixture
    centrality_BPT = (mixture_cdf(log_pi, mu, sigma, y_BPT) - 0.5).abs()
    if mu.shape[-1] == 1:     # a Gaussian: the median is its mean, no search needed
        median_BPT = mu[..., 0]
    else:
        median_BPT = mixture_quantiles(log_pi, mu, sigma, [0.5], iterations=30)[..., 0]
    return {"nll": -mixture_log_likelihood(log_pi, mu, sigma, y_BPT),
            "crps": mixture_crps(log_pi, mu, sigma, y_BPT),
            "mae": (median_BPT - y_BPT).abs() * target_std_T,
            "coverage_50": (centrality_BPT <= 0.25).float(),
            "coverage_90": (centrality_BPT <= 0.45).float()}


# --- skill and its interval ----------------------------------------------------------------------

def difference_metrics(name: str, difference: PairedDifference) -> dict:
    """Flat metrics of one paired difference: `<name>` (the mean), `<name>_low`, `<name>_high`,
    `<name>_shown`, `<name>_reason` (None when shown) and `<name>_dm_pvalue`."""
    return {name: difference.mean, f"{name}_low": difference.low,
            f"{name}_high": difference.high, f"{name}_shown": difference.shown,
            f"{name}_reason": difference.reason, f"{name}_dm_pvalue": difference.dm_pvalue}


def skill_metrics(nll_series: dict[str, np.ndarray], pred_len: int, stride: int) -> dict:
    """Flat metrics: `skill_<baseline>` (model NLL - baseline NLL) with `difference_metrics`'s
    keys, the same against the best baseline on these windows as `skill*`, and the windows per
    independent block (`skill_block_length`)."""
    model = nll_series["model"]
    differences = {name: paired_difference(model, nll_series[name], pred_len, stride)
                   for name in BASELINES}
    best = min(BASELINES, key=lambda name: float(np.mean(nll_series[name])))
    metrics: dict = {"skill_block_length": differences[best].block_length, "best_baseline": best}
    for name, difference in differences.items():
        metrics.update(difference_metrics(f"skill_{name}", difference))
    metrics.update(difference_metrics("skill", differences[best]))
    return metrics


def describe_skill(metrics: dict) -> str:
    """One phrase for a log line: skill against the best baseline with its interval, and why it is
    not shown when it is not."""
    best = metrics["best_baseline"]
    why_not = "" if metrics["skill_shown"] else f", not shown: {metrics['skill_reason']}"
    return (f"skill vs {best} {metrics['skill']:+.4f} [{metrics['skill_low']:+.4f}, "
            f"{metrics['skill_high']:+.4f}]{why_not} (nll rw {metrics['rw_nll']:.4f}, "
            f"ewma {metrics['ewma_nll']:.4f})")
