"""Validation NLL rising after its best while the training loss falls, and whether that matters.

Rising validation after the best is what early stopping watches for: when the run kept the best
validation's weights and the best came well into the run, the rise is the stop working. It
matters when the best came at one of the first validations (the model overfits almost at once),
when the kept weights are past the best, or when the test is far worse than the best validation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diagnostics.analysis.kept import best_validation, finite, kept_line, trained_val
from diagnostics.analysis.load import RunData, column
from diagnostics.analysis.thresholds import Thresholds


@dataclass
class Overfitting:
    best_step: int
    best_index: int          # 0-based among the trained validations
    val_steps: list[int]     # from the best validation on
    val_nll: list[float]
    train_loss: list[float]  # from the best validation's step on
    kept_step: int | None    # the step of the weights the run kept (None: not tested yet)
    reasons: list[str] = field(default_factory=list)   # why it matters; none: the stop worked

    @property
    def early_stopping_worked(self) -> bool:
        return not self.reasons

    def sentence(self) -> str:
        return (f"validation NLL rose over the {len(self.val_steps) - 1} validations after its "
                f"best ({self.val_nll[0]:.4f} at step {self.best_step}, {self.val_nll[-1]:.4f} "
                f"at step {self.val_steps[-1]}) while the training loss fell "
                f"({self.train_loss[0]:.4f} -> {self.train_loss[-1]:.4f})")


def _slope(x, y) -> float:
    if len(x) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0])


def _rise_after_best(run: RunData, t: Thresholds) -> Overfitting | None:
    """At least `overfit_validations` validations after the best one, with a rising trend, while
    the training loss trends down over the same steps."""
    val = [v for v in trained_val(run) if finite(v, "nll")]
    if not val:
        return None
    best = min(range(len(val)), key=lambda i: val[i]["nll"])
    after = val[best:]
    if len(after) - 1 < t.overfit_validations:
        return None
    steps, nll = [v["step"] for v in after], [v["nll"] for v in after]
    train_steps, loss = column(run.train, "loss")
    keep = (train_steps >= steps[0]) & np.isfinite(loss)
    if keep.sum() < 2 or _slope(steps, nll) <= 0 or _slope(train_steps[keep], loss[keep]) >= 0:
        return None
    return Overfitting(steps[0], best, steps, nll, loss[keep].tolist(), None)


def _test_gap(run: RunData) -> tuple[str, float] | None:
    """(what, nats) by which the test is worse than the best validation: skill when both lines
    have it (it removes the splits' different difficulty), else NLL."""
    best = best_validation(run)
    if not run.test or best is None:
        return None
    test = run.test[-1]
    for key, what in (("skill", "skill over the best baseline"), ("nll", "NLL")):
        if finite(test, key) and finite(best, key):
            return what, test[key] - best[key]
    return None


def _reasons(over: Overfitting, run: RunData, t: Thresholds) -> list[str]:
    reasons = []
    if over.best_index < t.overfit_early_best:
        reasons.append(f"the best validation is validation {over.best_index + 1} (step "
                       f"{over.best_step}): the model overfits almost at once")
    kept = kept_line(run)
    if kept is None or kept.split != "test":
        reasons.append("the run has no test line yet: which weights it keeps is not known")
    elif kept.weights_step != over.best_step:
        reasons.append(f"the kept weights (step {kept.weights_step}) are past the best "
                       f"(step {over.best_step})")
    gap = _test_gap(run)
    if gap is not None and gap[1] > t.overfit_test_gap:
        reasons.append(f"the test {gap[0]} is {gap[1]:.4f} nats worse than the best "
                       f"validation's (more than {t.overfit_test_gap:g})")
    return reasons


def overfitting(run: RunData, t: Thresholds) -> Overfitting | None:
    """The rise after the best validation, with the reasons it matters (none: early stopping
    kept the best weights and worked); None when validation does not rise."""
    over = _rise_after_best(run, t)
    if over is None:
        return None
    kept = kept_line(run)
    over.kept_step = kept.weights_step if kept is not None and kept.split == "test" else None
    over.reasons = _reasons(over, run, t)
    return over
