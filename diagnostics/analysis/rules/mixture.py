"""Rules on the Gaussian mixture head: collapsed components or spreads, miscalibrated intervals."""
from __future__ import annotations

import math

import numpy as np

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import RunData, column
from diagnostics.analysis.rules.common import after_training_started, evidence, nice, number
from diagnostics.analysis.thresholds import Thresholds
from diagnostics.analysis.verdict import overfitting


def _latest(run: RunData, key: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(steps, values, latest finite value) of a validation metric after step 0."""
    steps, values = column(after_training_started(run.val), key)
    finite = values[np.isfinite(values)]
    return steps, values, float(finite[-1]) if finite.size else math.nan


def mixture_collapse(run: RunData, t: Thresholds) -> list[Finding]:
    num_mixtures = number(run, "model.num_mixtures")
    if not run.val or num_mixtures == 1:
        return []
    steps, values, latest = _latest(run, "effective_components")
    if not latest < t.effective_components:
        return []
    low = values < t.effective_components
    change = {"model.num_mixtures": 2} if num_mixtures and num_mixtures > 2 else {}
    return [Finding(
        component="decoder", issue="mixture_collapse", severity="warning",
        message=f"The mixture decoder uses {latest:.2f} effective components of "
                f"{num_mixtures or '?'} (below {t.effective_components:g}) on validation: it has "
                "collapsed to about one Gaussian.",
        evidence=evidence("effective_components", steps[low], values[low],
                           threshold=t.effective_components),
        suggestion="The extra components add nothing: use fewer (model.num_mixtures: 2), or if "
                   "the errors are heavy-tailed lower optim.lr so components are not abandoned "
                   "early.", config_change=change)]


def sigma_collapse(run: RunData, t: Thresholds) -> list[Finding]:
    if not run.val:
        return []
    steps, values, latest = _latest(run, "sigma_at_floor")
    if not latest > t.sigma_at_floor:
        return []
    sigma_min = number(run, "model.sigma_min")
    change = {"model.sigma_min": nice(sigma_min * 10)} if sigma_min else {}
    high = values > t.sigma_at_floor
    return [Finding(
        component="decoder", issue="sigma_collapse", severity="warning",
        message=f"{latest:.0%} of the mixture weight sits on scales at the floor model.sigma_min "
                f"({sigma_min}) on validation: the decoder is collapsing its sigmas "
                "(overconfident).",
        evidence=evidence("sigma_at_floor", steps[high], values[high], threshold=t.sigma_at_floor),
        suggestion="Raise the floor of the mixture scales" +
                   (f": model.sigma_min: {change['model.sigma_min']}" if change else
                    " (model.sigma_min)") + "; more model.dropout also helps.",
        config_change=change)]


def miscalibration(run: RunData, t: Thresholds) -> list[Finding]:
    """90% intervals covering outside [coverage_90_low, coverage_90_high] on validation."""
    if not run.val:
        return []
    steps, values, latest = _latest(run, "coverage_90")
    if not math.isfinite(latest) or t.coverage_90_low <= latest <= t.coverage_90_high:
        return []
    over = latest < t.coverage_90_low
    dropout = number(run, "model.dropout")
    overfits = overfitting(run, t) is not None
    if overfits and not over:
        change = {}     # the overfitting finding's remedy comes first
    elif dropout is not None:
        new = min(0.5, dropout + 0.1) if over else max(0.0, dropout - 0.1)
        change = {"model.dropout": nice(new)}
    else:
        change = {}
    per_target = run.val[-1].get("coverage_90_per_target")
    return [Finding(
        component="decoder", issue="miscalibration", severity="warning",
        message=f"90% prediction intervals cover {latest:.1%} of validation outcomes (wanted "
                f"{t.coverage_90_low:.0%}-{t.coverage_90_high:.0%}): the model is "
                + ("overconfident (intervals too narrow)." if over else
                   "underconfident (intervals too wide)."),
        evidence=evidence("coverage_90", steps, values, latest_per_target=per_target,
                           wanted=[t.coverage_90_low, t.coverage_90_high]),
        suggestion=_calibration_advice(over, overfits),
        config_change=change)]


def _calibration_advice(overconfident: bool, overfits: bool) -> str:
    if overconfident:
        return ("Usually overfitting: raise model.dropout, stop earlier "
                "(train.early_stopping_patience), or raise model.sigma_min if sigma_at_floor "
                "is high.")
    if overfits:
        return ("This run also overfits (see overfitting): remedy that first, and do not train "
                "longer; recheck the coverage of the best-validation model afterwards.")
    return "Train longer (train.epochs) or regularise less (lower model.dropout)."
