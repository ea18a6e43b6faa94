"""Helpers shared by the rules: evidence in plain JSON, runs of records, numbers for suggestions."""
from __future__ import annotations

import math

import numpy as np

from diagnostics.analysis.load import RunData
from diagnostics.analysis.thresholds import Thresholds

MAX_EVIDENCE_POINTS = 20


def jsonable(value):
    """Plain JSON values: numpy scalars unwrapped, floats to 4 significant digits, nan -> null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    return value


def evidence(metric: str, steps, values, **context) -> dict:
    """Evidence with at most MAX_EVIDENCE_POINTS points (the first and last halves)."""
    steps, values = list(steps), list(values)
    if len(steps) > MAX_EVIDENCE_POINTS:
        half = MAX_EVIDENCE_POINTS // 2
        context["num_points"] = len(steps)
        steps, values = steps[:half] + steps[-half:], values[:half] + values[-half:]
    return jsonable({"metric": metric, "steps": steps, "values": values, **context})


def longest_run(mask: np.ndarray) -> np.ndarray:
    """Indices of the longest run of consecutive True entries (empty if none)."""
    best_start, best_len, start = 0, 0, None
    for i, flag in enumerate([*mask, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    return np.arange(best_start, best_start + best_len)


def sustained_records(num_records: int, t: Thresholds) -> int:
    """Consecutive records that make a trend: sustained_records, fewer on a short run, >= 2."""
    return max(2, min(t.sustained_records, num_records))


def late_slice(num_records: int, t: Thresholds) -> slice:
    """The last late_fraction of the records (at least one)."""
    return slice(min(num_records - 1, int(num_records * (1 - t.late_fraction))), num_records)


def nice(x: float) -> float:
    """A value to type into a config: two significant digits."""
    return float(f"{x:.2g}")


def power_of_two(x: float) -> int:
    return int(2 ** round(math.log2(max(1.0, x))))


def fmt3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def span(steps) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def number(run: RunData, dotted: str):
    return run.config_number(dotted)


def learning_rate(run: RunData) -> float | None:
    return number(run, "optim.lr")


def clipping_off(run: RunData) -> bool:
    return run.config_value("optim.grad_clip_norm") == 0


def stabilize(run: RunData) -> tuple[str, dict]:
    """The usual cure for an unstable run: clipping on if it is off, else half the LR."""
    if clipping_off(run):
        return ("Turn gradient clipping on (optim.grad_clip_norm is 0).",
                {"optim.grad_clip_norm": 1.0})
    lr = learning_rate(run)
    if lr is None:
        return "Lower the learning rate (optim.lr) or lengthen optim.warmup_steps.", {}
    action = (f"Halve the learning rate (optim.lr: {nice(lr / 2)}), or lengthen the warmup "
              "(optim.warmup_steps).")
    return action, {"optim.lr": nice(lr / 2)}


def after_training_started(records: list[dict]) -> list[dict]:
    """Records of a trained model: a validation at step 0 judges the initialisation."""
    return [r for r in records if r["step"] > 0]

