"""The verdict a report opens with: does the model beat the naive baselines, is it calibrated,
do the celestial inputs matter, does the run overfit.

Sources, most honest first: the test line (scored once, with the weights the run kept), else the
best validation line (optimistic: it chose those weights). Runs written before the baselines
were scored have no skill keys: the verdict then says so instead of guessing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diagnostics.analysis.load import RunData, column
from diagnostics.analysis.thresholds import Thresholds

# The labels of trainer/scoring.py's BASELINE_NAMES, repeated: the offline analysis reads JSON and
# does not import the trainer (nor torch) for two strings.
BASELINES = {"rw": "random walk (training spread)", "ewma": "random walk (EWMA volatility)"}


@dataclass
class Skill:
    baseline: str            # "rw" or "ewma"
    model_nll: float
    baseline_nll: float
    skill: float             # model NLL - baseline NLL: negative = the model is better
    low: float
    high: float

    @property
    def label(self) -> str:
        return BASELINES.get(self.baseline, self.baseline)

    @property
    def outcome(self) -> str:
        if self.high < 0:
            return "beats"
        if self.low > 0:
            return "loses to"
        return "is not shown to beat"

    def sentence(self) -> str:
        return (f"the model {self.outcome} the {self.label}: skill {self.skill:+.4f} nats "
                f"[{self.low:+.4f}, {self.high:+.4f}] (model {self.model_nll:.4f}, baseline "
                f"{self.baseline_nll:.4f})")


def _finite(line: dict, *keys: str) -> bool:
    return all(isinstance(line.get(k), (int, float)) and math.isfinite(line[k]) for k in keys)


def trained_val(run: RunData) -> list[dict]:
    """Validation lines after training started (load_run keeps restored-best lines apart)."""
    return [v for v in run.val if v["step"] > 0]


def scored_line(run: RunData) -> tuple[str, dict] | None:
    """("test", line) or ("best validation", line): the line the verdict is read from."""
    if run.test and _finite(run.test[-1], "skill", "skill_low", "skill_high"):
        return "test", run.test[-1]
    scored = [v for v in trained_val(run) if _finite(v, "nll", "skill", "skill_low", "skill_high")]
    if not scored:
        return None
    return "best validation", min(scored, key=lambda v: v["nll"])


def skills(line: dict) -> list[Skill]:
    """Skill against each baseline scored in `line`, the best baseline first."""
    found = [Skill(name, line["nll"], line[f"{name}_nll"], line[f"skill_{name}"],
                   line[f"skill_{name}_low"], line[f"skill_{name}_high"])
             for name in BASELINES
             if _finite(line, f"{name}_nll", f"skill_{name}", f"skill_{name}_low",
                        f"skill_{name}_high")]
    return sorted(found, key=lambda s: s.baseline != line.get("best_baseline"))


@dataclass
class InputsEffect:
    source: str
    step: int
    rise: float
    low: float
    high: float

    @property
    def used(self) -> bool:
        return self.low > 0

    def sentence(self) -> str:
        verdict = "the celestial inputs help" if self.used else \
            "the celestial inputs are not shown to help"
        return (f"{verdict}: blanking every body changes the NLL by {self.rise:+.4f} nats "
                f"[{self.low:+.4f}, {self.high:+.4f}] ({self.source})")


def inputs_effect(run: RunData) -> InputsEffect | None:
    """The all-bodies-blanked NLL rise: from the test line, else the newest attribution record."""
    if run.test and _finite(run.test[-1], "blank_all_rise", "blank_all_rise_low",
                            "blank_all_rise_high"):
        t = run.test[-1]
        return InputsEffect("test", t["step"], t["blank_all_rise"], t["blank_all_rise_low"],
                            t["blank_all_rise_high"])
    for record in reversed(run.attribution):
        blank = record.get("blank_all") or {}
        if _finite(blank, "rise", "low", "high"):
            return InputsEffect(f"validation, step {record['step']}", record["step"], blank["rise"],
                                blank["low"], blank["high"])
    return None


@dataclass
class Overfitting:
    best_step: int
    val_steps: list[int]
    val_nll: list[float]
    train_steps: list[int]
    train_loss: list[float]

    def sentence(self) -> str:
        return (f"validation NLL rose over the {len(self.val_steps) - 1} validations after its "
                f"best ({self.val_nll[0]:.4f} at step {self.best_step}, {self.val_nll[-1]:.4f} "
                f"at step {self.val_steps[-1]}) while the training loss fell "
                f"({self.train_loss[0]:.4f} -> {self.train_loss[-1]:.4f})")


def _slope(x, y) -> float:
    if len(x) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0])


def overfitting(run: RunData, t: Thresholds) -> Overfitting | None:
    """At least `overfit_validations` validations after the best one, all worse than it, with a
    rising trend, while the training loss trends down over the same steps."""
    val = [v for v in trained_val(run) if _finite(v, "nll")]
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
    return Overfitting(steps[0], steps, nll, train_steps[keep].tolist(), loss[keep].tolist())


def calibration_sentence(line: dict, t: Thresholds) -> str | None:
    if not _finite(line, "coverage_90", "coverage_50"):
        return None
    c90 = line["coverage_90"]
    if c90 < t.coverage_90_low:
        state = "overconfident (intervals too narrow)"
    elif c90 > t.coverage_90_high:
        state = "underconfident (intervals too wide)"
    else:
        state = "calibrated"
    return (f"{state}: the 90% interval covers {c90:.1%} and the 50% interval "
            f"{line['coverage_50']:.1%} of outcomes")


def verdict_rows(run: RunData, t: Thresholds) -> list[tuple[str, str]]:
    """(question, answer) rows, in the order a reader asks them."""
    rows = []
    scored = scored_line(run)
    if scored is None:
        rows.append(("skill", ("not scored: this run's validation lines have no baseline "
                               "skill (written before baselines were scored, or no validation "
                               "yet)")))
    else:
        source, line = scored
        for s in skills(line):
            rows.append((f"skill vs {s.label} ({source})", s.sentence()))
        calibration = calibration_sentence(line, t)
        if calibration:
            rows.append((f"calibration ({source})", calibration))
    effect = inputs_effect(run)
    rows.append(("celestial inputs", effect.sentence() if effect else
                 "not measured (no test line with blank_all_rise, no attribution record)"))
    over = overfitting(run, t)
    rows.append(("overfitting", over.sentence() if over else "not seen"))
    return rows
