"""Each variant against the control: paired differences of the test score on the same windows.

For variant v, target t and seed s, d_s = score_v,s - score_control,s per test window (from each
trial's `test_windows.csv`, the scores of the weights the trial ended with). The interval of the
mean difference comes from `paired_difference_over_seeds`, which counts seed-to-seed variation
and the autocorrelation of overlapping windows; Holm's correction runs over every (variant,
target) pair. Scores are losses: a negative difference means the variant is better.

Selection and reporting are kept apart: the variant one would pick is chosen on validation (the
mean over seeds of each trial's validation score at the weights it was tested with), and only
the test split gives the differences reported.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.plan import Trial, read_metrics
from stats.intervals import PairedDifference, holm, paired_difference_over_seeds
from trainer.errors import UserError

WINDOWS_FILE = "test_windows.csv"
OVERALL = "all"
UNITS = {"nll": "nats", "crps": "scaled target units"}


@dataclass
class TrialScores:
    """What one finished trial scored: per-window test scores and its validation score."""

    trial: Trial
    origins: dict[str, np.ndarray]          # target -> forecast origin of each window
    test: dict[str, dict[str, np.ndarray]]  # score -> target -> per-window test score
    val: dict[str, float]                   # score -> validation score of the tested weights
    val_step: int | None
    test_step: int | None
    pred_len: int
    stride: int

    def test_mean(self, score: str, target: str = OVERALL) -> float:
        return float(self.test[score][target].mean())


@dataclass
class Comparison:
    variant: str
    target: str
    num_seeds: int
    num_windows: int
    difference: PairedDifference | None
    holm_pvalue: float = math.nan
    problem: str | None = None               # why there is no difference to report
    weights_steps: tuple[int, int] | None = None   # lowest and highest step of tested weights

    @property
    def shown(self) -> bool:
        d = self.difference
        return d is not None and d.shown and self.holm_pvalue < 1 - d.level

    def as_dict(self) -> dict:
        return {"variant": self.variant, "target": self.target, "split": "test",
                "num_seeds": self.num_seeds, "num_windows": self.num_windows,
                "difference": self.difference.as_dict() if self.difference else None,
                "holm_pvalue": self.holm_pvalue, "shown": self.shown, "problem": self.problem,
                "weights_steps": self.weights_steps}


@dataclass
class Selection:
    """The variant with the lowest mean validation score over its seeds."""

    variant: str | None
    val_means: dict[str, float] = field(default_factory=dict)
    weights_steps: tuple[int, int] | None = None


def load_trial_scores(trial: Trial) -> TrialScores:
    """A finished trial's scores; UserError (naming the file) when they cannot be read."""
    lines = read_metrics(trial.run_dir)
    test_line = next((x for x in reversed(lines) if x.get("kind") == "test"), None)
    if test_line is None:
        raise UserError(f"{trial.run_dir}: no test line in metrics.jsonl (not finished)")
    val_line = tested_val_line(lines)
    origins, test = _read_windows(trial.run_dir / test_line.get("windows_file", WINDOWS_FILE))
    return TrialScores(
        trial=trial, origins=origins, test=test,
        val={s: float(val_line[s]) for s in ("nll", "crps") if _is_number(val_line.get(s))},
        val_step=val_line.get("weights_step", val_line.get("step")),
        test_step=test_line.get("weights_step", test_line.get("step")),
        pred_len=int(test_line.get("pred_len") or _config_value(trial, "model", "pred_len")),
        stride=int(test_line.get("window_stride")
                   or _config_value(trial, "data", "window_stride")))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def tested_val_line(lines: list[dict]) -> dict:
    """The validation of the weights the test scored: the restored best, else the last one."""
    vals = [x for x in lines if x.get("kind") == "val"]
    restored = [x for x in vals if x.get("restored_best")]
    return (restored or vals or [{}])[-1]


def _config_value(trial: Trial, section: str, key: str):
    import yaml
    config = yaml.safe_load((trial.run_dir / "config.yaml").read_text())
    return config[section][key]


def _read_windows(path: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Per target, the windows' origins and model scores, in window order."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise UserError(f"{path}: cannot read the per-window test scores "
                        f"({err.strerror or err})") from None
    by_target: dict[str, list[dict]] = {}
    for row in rows:
        by_target.setdefault(row["target"], []).append(row)
    origins, test = {}, {"nll": {}, "crps": {}}
    for target, target_rows in by_target.items():
        target_rows.sort(key=lambda r: int(r["window"]))
        origins[target] = np.array([r["origin"] for r in target_rows])
        for score in test:
            test[score][target] = np.array([float(r[f"model_{score}"]) for r in target_rows])
    if OVERALL not in origins:
        raise UserError(f"{path}: no rows for target {OVERALL!r}")
    return origins, test


def compare_variants(scores: list[TrialScores], control: str, variants: list[str],
                     score: str, level: float = 0.95) -> list[Comparison]:
    """Every (variant, target) against the control on the seeds both have, Holm-adjusted."""
    by_key = {(s.trial.variant, s.trial.seed): s for s in scores}
    targets = _targets(scores)
    comparisons = [_compare(by_key, control, v, t, score, level)
                   for v in variants if v != control for t in targets]
    tested = {f"{c.variant}/{c.target}": c.difference.dm_pvalue
              for c in comparisons if c.difference is not None}
    adjusted = holm(tested) if tested else {}
    for c in comparisons:
        c.holm_pvalue = adjusted.get(f"{c.variant}/{c.target}", math.nan)
    return comparisons


def _targets(scores: list[TrialScores]) -> list[str]:
    if not scores:
        return [OVERALL]
    names = [t for t in scores[0].origins if t != OVERALL]
    return [OVERALL, *names]


def _compare(by_key: dict, control: str, variant: str, target: str, score: str,
             level: float) -> Comparison:
    seeds = sorted(s for v, s in by_key if v == variant and (control, s) in by_key)
    if not seeds:
        return Comparison(variant, target, 0, 0, None,
                          problem="no seed with both this variant and the control finished")
    pairs = [(by_key[(variant, s)], by_key[(control, s)]) for s in seeds]
    for a, b in pairs:
        if not np.array_equal(a.origins[target], b.origins[target]):
            return Comparison(variant, target, len(seeds), 0, None,
                              problem=f"{a.trial.name} and {b.trial.name} were not scored on "
                                      f"the same test windows")
    diffs = [a.test[score][target] - b.test[score][target] for a, b in pairs]
    first = pairs[0][0]
    difference = paired_difference_over_seeds(diffs, first.pred_len, first.stride, level)
    return Comparison(variant, target, len(seeds), len(diffs[0]), difference,
                      weights_steps=steps_range([s for pair in pairs for s in pair], "test"))


def steps_range(scores: list[TrialScores], split: str) -> tuple[int, int] | None:
    """The lowest and highest step whose weights the trials' `split` scores come from."""
    steps = [s.test_step if split == "test" else s.val_step for s in scores]
    steps = [int(x) for x in steps if x is not None]
    return (min(steps), max(steps)) if steps else None


def select_on_validation(scores: list[TrialScores], score: str) -> Selection:
    """The variant with the lowest validation score (mean over its finished seeds)."""
    values: dict[str, list[float]] = {}
    for s in scores:
        if score in s.val:
            values.setdefault(s.trial.variant, []).append(s.val[score])
    means = {v: float(np.mean(x)) for v, x in values.items()}
    return Selection(min(means, key=means.get) if means else None, means,
                     steps_range(scores, "val"))
