"""Calibration of the kept weights: pooled coverage, and coverage per horizon step.

Pooled over the horizon, good steps hide bad ones (90% pooled while step 1 covers 85%), so the
verdict judges each step of `calibration_by_horizon` (written into val and test lines): a step is
off when its 90% coverage lies outside [coverage_90_low, coverage_90_high] and its 95% interval
excludes 0.9. Runs written before that key are judged on the pooled coverage, with a note.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diagnostics.analysis.kept import KeptLine, finite
from diagnostics.analysis.thresholds import Thresholds

NOMINAL_90 = 0.9
MAX_STEPS_NAMED = 3
OVER, UNDER = "overconfident (intervals too narrow)", "underconfident (intervals too wide)"


@dataclass(frozen=True)
class StepCoverage:
    step: int                # horizon step, 1-based
    coverage_90: float
    low: float | None        # 95% interval of coverage_90 (None: not recorded)
    high: float | None
    coverage_50: float | None

    def excludes_nominal(self) -> bool:
        if self.low is None or self.high is None:
            return True
        return self.high < NOMINAL_90 or self.low > NOMINAL_90

    def words(self) -> str:
        interval = f" [{self.low:.1%}, {self.high:.1%}]" if self.low is not None else ""
        return f"step {self.step} (90% interval covers {self.coverage_90:.1%}{interval})"


def _number(values: list | None, i: int) -> float | None:
    value = values[i] if values and i < len(values) else None
    return float(value) if isinstance(value, (int, float)) else None


def by_horizon(line: dict) -> list[StepCoverage]:
    """The per-step coverages of a val or test line ([] for runs written before they were)."""
    table = line.get("calibration_by_horizon")
    if not isinstance(table, dict) or not table.get("steps"):
        return []
    return [StepCoverage(int(step), float(table["coverage_90"][i]),
                         _number(table.get("coverage_90_low"), i),
                         _number(table.get("coverage_90_high"), i),
                         _number(table.get("coverage_50"), i))
            for i, step in enumerate(table["steps"])
            if _number(table.get("coverage_90"), i) is not None]


def pit_counts(line: dict) -> np.ndarray | None:
    """(P, 10) PIT histogram counts per horizon step, or None."""
    table = line.get("calibration_by_horizon")
    counts = table.get("pit_counts") if isinstance(table, dict) else None
    return np.asarray(counts, dtype=float) if counts else None


@dataclass
class Calibration:
    kept: KeptLine
    coverage_90: float       # pooled over targets and horizon steps
    coverage_50: float
    steps: list[StepCoverage]
    low: float               # the wanted band of 90% coverage
    high: float

    def state(self, coverage: float) -> str | None:
        return OVER if coverage < self.low else UNDER if coverage > self.high else None

    def off_steps(self) -> list[StepCoverage]:
        """Steps outside the band whose interval excludes 0.9, the farthest from 0.9 first."""
        off = [s for s in self.steps if self.state(s.coverage_90) and s.excludes_nominal()]
        return sorted(off, key=lambda s: -abs(s.coverage_90 - NOMINAL_90))

    def states(self) -> dict[str, list[StepCoverage]]:
        """OVER and/or UNDER -> the steps that are so (or [] when judged pooled); {} if fine."""
        if not self.steps:
            pooled = self.state(self.coverage_90)
            return {pooled: []} if pooled else {}
        found: dict[str, list[StepCoverage]] = {}
        for s in self.off_steps():
            found.setdefault(self.state(s.coverage_90), []).append(s)
        return found

    @property
    def overconfident(self) -> bool:
        return OVER in self.states()

    def _pooled(self) -> str:
        where = (f"pooled over the {len(self.steps)} horizon steps" if self.steps else
                 "pooled over the horizon (this run has no per-step coverage)")
        return (f"the 90% interval covers {self.coverage_90:.1%} and the 50% interval "
                f"{self.coverage_50:.1%} of outcomes, {where}")

    def sentence(self) -> str:
        states = self.states()
        if not states:
            worst = max(self.steps, key=lambda s: abs(s.coverage_90 - NOMINAL_90), default=None)
            extra = f"; farthest from 90%: {worst.words()}" if worst else ""
            return f"calibrated: {self._pooled()}{extra}"
        parts = []
        for state, steps in states.items():
            named = ", ".join(s.words() for s in steps[:MAX_STEPS_NAMED])
            more = f" and {len(steps) - MAX_STEPS_NAMED} more" if len(steps) > MAX_STEPS_NAMED \
                else ""
            parts.append(f"{state} at horizon {named}{more}" if steps else state)
        return "; ".join(parts) + f": {self._pooled()}"


def calibration(kept: KeptLine | None, t: Thresholds) -> Calibration | None:
    if kept is None or not finite(kept.line, "coverage_90", "coverage_50"):
        return None
    return Calibration(kept, kept.line["coverage_90"], kept.line["coverage_50"],
                       by_horizon(kept.line), t.coverage_90_low, t.coverage_90_high)
