"""Rules on the training loss: spikes and non-finite (skipped) steps."""
from __future__ import annotations

import numpy as np

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import RunData, column
from diagnostics.analysis.rules.common import evidence, stabilize
from diagnostics.analysis.thresholds import Thresholds


def rolling_robust_z(values: np.ndarray, window: int, min_window: int) -> np.ndarray:
    """Each value's z-score against the median and MAD of the `window` values before it
    (nan where fewer than min_window finite values precede it)."""
    z = np.full(len(values), np.nan)
    for i in range(len(values)):
        past = values[max(0, i - window):i]
        past = past[np.isfinite(past)]
        if len(past) < min_window or not np.isfinite(values[i]):
            continue
        median = np.median(past)
        scale = max(1.4826 * np.median(np.abs(past - median)), 1e-3 * max(1.0, abs(median)))
        z[i] = (values[i] - median) / scale
    return z


def loss_spikes(run: RunData, t: Thresholds) -> list[Finding]:
    if not run.train:
        return []
    steps, loss = column(run.train, "loss")
    z = rolling_robust_z(loss, t.spike_window, t.spike_min_window)
    spikes = np.flatnonzero(z > t.spike_z)
    if not spikes.size:
        return []
    action, change = stabilize(run)
    return [Finding(
        component="optimizer", issue="loss_spikes",
        severity="critical" if len(spikes) >= 3 else "warning",
        message=f"Training loss spiked {len(spikes)} time(s) (robust z-score above {t.spike_z:g} "
                f"against the previous {t.spike_window} log intervals), first at step "
                f"{steps[spikes[0]]}.",
        evidence=evidence("train loss", steps[spikes], loss[spikes], z_score=z[spikes]),
        suggestion=action, config_change=change)]


def _skipped(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(steps, skipped count) of the log intervals with skipped steps; from the gradient
    records (one step each) when metrics.jsonl has no training lines."""
    if run.train:
        steps, counts = column(run.train, "skipped_steps")
        return steps[counts > 0], counts[counts > 0]
    g = run.gradients
    if g is None:
        return np.array([], dtype=int), np.array([])
    return g.steps[g.skipped], np.ones(int(g.skipped.sum()))


def nonfinite_steps(run: RunData, t: Thresholds) -> list[Finding]:
    """Optimizer steps skipped for a non-finite loss or gradient."""
    steps, counts = _skipped(run)
    if not len(steps):
        return []
    total = int(counts.sum())
    last_step = run.train[-1]["step"] if run.train else int(run.gradients.steps[-1])
    if run.config_value("train.precision") == "fp16":
        action = "Train in bf16 (train.precision: bf16): fp16 overflows where bf16 does not."
        change = {"train.precision": "bf16"}
    else:
        action, change = stabilize(run)
    return [Finding(
        component="optimizer", issue="nonfinite_steps",
        severity="critical" if total > 0.01 * max(1, last_step) else "warning",
        message=f"{total} optimizer step(s) were skipped for a non-finite loss or gradient, "
                f"first in the interval ending at step {steps[0]}.",
        evidence=evidence("skipped steps per log interval", steps, counts),
        suggestion=action, config_change=change)]
