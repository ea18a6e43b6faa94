"""Forecasts scored honestly: naive baselines, proper scores, skill with an interval.

Every forecaster (the model and each baseline) is a Gaussian mixture per (window, horizon step,
target) in scaled target units, scored on the same windows with the same functions:
- `nll`: negative log-likelihood (log score), the training objective;
- `crps`: continuous ranked probability score, closed form for a Gaussian mixture;
- `crps_units`: the same CRPS in target units (CRPS times the training std);
- `mae`: absolute error of the median, in target units;
- `rmse`: root mean squared error of the mixture mean, in target units (from `squared_error`);
- `mase`: absolute error of the median over the naive one-step MAE of the window's own
  look-back (GluonTS's MASE with season 1: below 1 beats an in-sample random walk);
- `coverage_50` / `coverage_90`: how often the outcome falls in the central 50% / 90% interval.

With `with_quantiles` (the evaluate command), from the mixture's quantiles at QUANTILE_LEVELS:
- `pinball_q05` ... `pinball_q95`: quantile (pinball) loss per level, target units;
- `wql`: weighted quantile loss, 2 sum(pinball) / sum|y| averaged over the levels (GluonTS's
  mean_wQuantileLoss; y in target units, so it depends on the target's origin);
- `interval_score_50` / `_90`: Gneiting-Raftery interval score of the central interval, target
  units; `msis_50` / `msis_90`: the same over the look-back naive one-step MAE (scale-free).

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

from model.decoder import (
    mixture_cdf,
    mixture_crps,
    mixture_log_likelihood,
    mixture_mean,
    mixture_quantiles,
)
from stats.intervals import PairedDifference, paired_difference

BASELINES = ("rw", "ewma")
BASELINE_NAMES = {"rw": "random walk (training spread)", "ewma": "random walk (EWMA volatility)"}
SCORES = ("nll", "crps", "crps_units", "mae", "squared_error", "mase", "coverage_50",
          "coverage_90")
QUANTILE_LEVELS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
PINBALL_SCORES = tuple(f"pinball_q{round(100 * q):02d}" for q in QUANTILE_LEVELS)
QUANTILE_SCORES = (*PINBALL_SCORES, "abs_outcome", "interval_score_50", "interval_score_90",
                   "msis_50", "msis_90")
DERIVED_SCORES = ("rmse", "wql")
PART_SCORES = ("squared_error", "abs_outcome")     # summed only to derive DERIVED_SCORES
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


def naive_scale(target_BST: torch.Tensor) -> torch.Tensor:
    """(B, T) mean absolute one-step change over each window's look-back (the in-sample naive
    error of MASE and MSIS), scaled target units."""
    return torch.diff(target_BST.float(), dim=1).abs().mean(1).clamp_min(1e-8)


def _quantiles(log_pi, mu, sigma, levels) -> torch.Tensor:
    """(B, P, T, Q): closed form for a Gaussian, bisection on the mixture CDF otherwise."""
    if mu.shape[-1] == 1:
        z_Q = torch.special.ndtri(torch.tensor(levels, dtype=mu.dtype, device=mu.device))
        return mu + sigma * z_Q
    return mixture_quantiles(log_pi, mu, sigma, levels, iterations=30)


def scores(mixture, y_BPT: torch.Tensor, target_std_T: torch.Tensor, naive_BT: torch.Tensor
           ) -> dict[str, torch.Tensor]:
    """Every score in SCORES per (B, P, T) for a mixture (log_pi, mu, sigma) against outcomes y,
    and `pit`, the forecast CDF at the outcome."""
    log_pi, mu, sigma = mixture
    pit_BPT = mixture_cdf(log_pi, mu, sigma, y_BPT)
    centrality_BPT = (pit_BPT - 0.5).abs()
    median_BPT = _quantiles(log_pi, mu, sigma, [0.5])[..., 0]
    crps_BPT = mixture_crps(log_pi, mu, sigma, y_BPT)
    mean_error_BPT = (mixture_mean(log_pi, mu) - y_BPT) * target_std_T
    return {"nll": -mixture_log_likelihood(log_pi, mu, sigma, y_BPT),
            "crps": crps_BPT, "crps_units": crps_BPT * target_std_T,
            "mae": (median_BPT - y_BPT).abs() * target_std_T,
            "squared_error": mean_error_BPT ** 2,
            "mase": (median_BPT - y_BPT).abs() / naive_BT[:, None, :],
            "coverage_50": (centrality_BPT <= 0.25).float(),
            "coverage_90": (centrality_BPT <= 0.45).float(), "pit": pit_BPT}


def _interval_score(low, high, y, alpha: float):
    """Gneiting & Raftery (2007): width plus 2/alpha times the distance outside the interval."""
    return (high - low) + 2 / alpha * ((low - y).clamp_min(0) + (y - high).clamp_min(0))


def quantile_scores(mixture, y_BPT: torch.Tensor, target_std_T: torch.Tensor,
                    target_mean_T: torch.Tensor, naive_BT: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """QUANTILE_SCORES per (B, P, T), from the mixture's quantiles at QUANTILE_LEVELS."""
    q_BPTQ = _quantiles(*mixture, QUANTILE_LEVELS)
    error_BPTQ = y_BPT.unsqueeze(-1) - q_BPTQ
    levels_Q = torch.tensor(QUANTILE_LEVELS, dtype=q_BPTQ.dtype, device=q_BPTQ.device)
    pinball_BPTQ = torch.maximum(levels_Q * error_BPTQ, (levels_Q - 1) * error_BPTQ)
    out = {name: pinball_BPTQ[..., i] * target_std_T for i, name in enumerate(PINBALL_SCORES)}
    out["abs_outcome"] = (y_BPT * target_std_T + target_mean_T).abs()
    at = {q: q_BPTQ[..., QUANTILE_LEVELS.index(q)] for q in (0.05, 0.25, 0.75, 0.95)}
    for width, (low, high) in {50: (0.25, 0.75), 90: (0.05, 0.95)}.items():
        score_BPT = _interval_score(at[low], at[high], y_BPT, 1 - width / 100)
        out[f"interval_score_{width}"] = score_BPT * target_std_T
        out[f"msis_{width}"] = score_BPT / naive_BT[:, None, :]
    return out


def derived_scores(means: dict) -> dict:
    """Scores that are not means over the elements, from the means of their parts (plain means,
    or arrays of them per target or per step): `rmse`, and `wql` with the quantile scores."""
    derived = {"rmse": np.sqrt(means["squared_error"])}
    if "abs_outcome" in means:
        pinball_mean = np.mean([means[k] for k in PINBALL_SCORES], axis=0)
        derived["wql"] = 2 * pinball_mean / means["abs_outcome"]
    return derived


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
