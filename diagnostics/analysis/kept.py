"""The line of metrics.jsonl that scores the weights the run kept, and the step of those weights.

Every judgement of the forecasts (skill, calibration, the celestial inputs' effect) reads this one
line, so no two parts of a report disagree: the test line when there is one (scored once, with the
kept weights), else the best validation (optimistic: it chose those weights). A line's
`weights_step` names the step whose weights it scored; lines written before that key existed
fall back to the restored best validation's step, else to their own step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from diagnostics.analysis.load import RunData


def finite(line: dict, *keys: str) -> bool:
    """Whether every key holds a finite number (not a bool)."""
    return all(isinstance(line.get(k), (int, float)) and not isinstance(line.get(k), bool)
               and math.isfinite(line[k]) for k in keys)


def trained_val(run: RunData) -> list[dict]:
    """Validation lines after training started (load_run keeps restored-best lines apart)."""
    return [v for v in run.val if v["step"] > 0]


def best_validation(run: RunData) -> dict | None:
    """The trained validation line with the lowest finite NLL (the weights early stopping keeps)."""
    scored = [v for v in trained_val(run) if finite(v, "nll")]
    return min(scored, key=lambda v: v["nll"]) if scored else None


def _weights_step_of_test(run: RunData, test: dict) -> int:
    if isinstance(test.get("weights_step"), int):
        return test["weights_step"]
    if run.restored:     # the best weights were restored before the test
        restored = run.restored[-1]
        if isinstance(restored.get("weights_step"), int):
            return restored["weights_step"]
        best = best_validation(run)
        if best is not None:
            return best["step"]
    return test["step"]


@dataclass(frozen=True)
class KeptLine:
    split: str               # "test" or "best validation"
    line: dict
    weights_step: int

    @property
    def label(self) -> str:
        """Where a number comes from, e.g. "test, weights of step 300"."""
        return f"{self.split}, weights of step {self.weights_step}"


def kept_line(run: RunData) -> KeptLine | None:
    """The test line, else the best validation line; None before any validation."""
    if run.test:
        return KeptLine("test", run.test[-1], _weights_step_of_test(run, run.test[-1]))
    best = best_validation(run)
    if best is None:
        return None
    step = best["weights_step"] if isinstance(best.get("weights_step"), int) else best["step"]
    return KeptLine("best validation", best, step)
