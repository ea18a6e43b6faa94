"""Rules on the Gaussian mixture head: collapsed components or spreads, and miscalibrated
intervals of the weights the run kept."""
from __future__ import annotations

import math

import numpy as np

from diagnostics.analysis.calibration import Calibration, calibration
from diagnostics.analysis.findings import Finding
from diagnostics.analysis.kept import kept_line
from diagnostics.analysis.load import RunData, column
from diagnostics.analysis.overfitting import overfitting
from diagnostics.analysis.rules.common import after_training_started, evidence, nice, number
from diagnostics.analysis.thresholds import Thresholds


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


def _calibration_evidence(run: RunData, c: Calibration, t: Thresholds) -> dict:
    """Per horizon step when the line has it, else the validation series; the judged source."""
    context = {"source": c.kept.split, "weights_step": c.kept.weights_step,
               "coverage_90_pooled": c.coverage_90,
               "wanted": [t.coverage_90_low, t.coverage_90_high]}
    if c.steps:
        return evidence("coverage_90 per horizon step (steps: horizon steps)",
                        [s.step for s in c.steps], [s.coverage_90 for s in c.steps],
                        interval_95=[[s.low, s.high] for s in c.steps], **context)
    steps, values, _ = _latest(run, "coverage_90")
    return evidence("coverage_90 (validation)", steps, values,
                    per_target=c.kept.line.get("coverage_90_per_target"), **context)


def miscalibration(run: RunData, t: Thresholds) -> list[Finding]:
    """The kept weights' 90% intervals covering outside [coverage_90_low, coverage_90_high], per
    horizon step where the run records it (calibration.py)."""
    c = calibration(kept_line(run), t)
    if c is None or not c.states():
        return []
    over = c.overconfident
    dropout = number(run, "model.dropout")
    found = overfitting(run, t)
    overfits = found is not None and not found.early_stopping_worked
    if overfits and not over:
        change = {}     # the overfitting finding's remedy comes first
    elif dropout is not None:
        new = min(0.5, dropout + 0.1) if over else max(0.0, dropout - 0.1)
        change = {"model.dropout": nice(new)}
    else:
        change = {}
    return [Finding(
        component="decoder", issue="miscalibration", severity="warning",
        message=f"On {c.kept.label} the model is {c.sentence()} (wanted "
                f"{t.coverage_90_low:.0%}-{t.coverage_90_high:.0%}).",
        evidence=_calibration_evidence(run, c, t),
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
