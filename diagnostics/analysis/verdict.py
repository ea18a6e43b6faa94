"""The verdict a report opens with: one headline (good, not better than a naive baseline, broken,
not judged), then does the model beat the naive baselines, is it calibrated, does it rely on the
celestial inputs, does the run overfit.

Every number comes from one line, the one that scores the weights the run kept (kept.py). Runs
written before the baselines were scored have no skill keys: the verdict then says so instead of
guessing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from diagnostics.analysis.calibration import calibration
from diagnostics.analysis.findings import Finding
from diagnostics.analysis.kept import KeptLine, finite, kept_line
from diagnostics.analysis.load import RunData
from diagnostics.analysis.overfitting import Overfitting, overfitting
from diagnostics.analysis.thresholds import Thresholds

# The labels of scoring/scores.py's BASELINE_NAMES, repeated: the offline analysis reads JSON and
# does not import the trainer (nor torch) for two strings.
BASELINES = {"rw": "random walk (training spread)", "ewma": "random walk (EWMA volatility)"}
ABLATION_POINTER = "whether they help is for a retrained ablation (see README, Experiments)"


def _nats(difference: float) -> str:
    return f"{abs(difference):.4f} nats {'lower' if difference < 0 else 'higher'}"


def _interval_nats(low: float, high: float) -> str:
    """A model-minus-baseline interval in words: "0.1700 to 0.2300 nats lower"."""
    if high < 0:
        return f"{-high:.4f} to {-low:.4f} nats lower"
    if low > 0:
        return f"{low:.4f} to {high:.4f} nats higher"
    return f"{_nats(low)} to {_nats(high)}"


@dataclass
class Skill:
    baseline: str            # "rw" or "ewma"
    model_nll: float
    baseline_nll: float
    skill: float             # model NLL - baseline NLL: negative = the model is better
    low: float
    high: float
    shown: bool | None = None    # the line's own judgement, when it carries one
    reason: str | None = None    # why a difference is not shown, in words

    @property
    def label(self) -> str:
        return BASELINES.get(self.baseline, self.baseline)

    @property
    def outcome(self) -> str:
        shown = self.shown if self.shown is not None else not self.low <= 0 <= self.high
        if shown and self.skill < 0:
            return "beats"
        if shown and self.skill > 0:
            return "loses to"
        return "is not shown to beat"

    def sentence(self, where: str) -> str:
        why = f"; not shown: {self.reason}" if self.reason and self.outcome.startswith("is not") \
            else ""
        return (f"the model {self.outcome} the {self.label}: its NLL is {_nats(self.skill)} on "
                f"{where} (95% interval: {_interval_nats(self.low, self.high)}; model "
                f"{self.model_nll:.4f}, baseline {self.baseline_nll:.4f}){why}")


def _judgement(line: dict, prefix: str) -> tuple[bool | None, str | None]:
    shown = line.get(f"{prefix}_shown")
    reason = line.get(f"{prefix}_reason")
    return (shown if isinstance(shown, bool) else None,
            reason if isinstance(reason, str) else None)


def skills(line: dict) -> list[Skill]:
    """Skill against each baseline scored in `line`, the best baseline first."""
    found = [Skill(name, line["nll"], line[f"{name}_nll"], line[f"skill_{name}"],
                   line[f"skill_{name}_low"], line[f"skill_{name}_high"],
                   *_judgement(line, f"skill_{name}"))
             for name in BASELINES
             if finite(line, "nll", f"{name}_nll", f"skill_{name}", f"skill_{name}_low",
                       f"skill_{name}_high")]
    return sorted(found, key=lambda s: s.baseline != line.get("best_baseline"))


def scored_line(run: RunData) -> KeptLine | None:
    """The kept weights' line when it has baseline skill; None for runs before the baselines."""
    kept = kept_line(run)
    return kept if kept is not None and skills(kept.line) else None


@dataclass
class InputsEffect:
    source: str
    step: int
    rise: float
    low: float
    high: float
    shown: bool | None = None    # the line's own judgement, when it carries one
    reason: str | None = None

    @property
    def used(self) -> bool:
        if self.shown is not None:
            return self.shown and self.rise > 0
        return self.low > 0

    def sentence(self) -> str:
        verdict = ("the model relies on the celestial inputs" if self.used else
                   "the model is not shown to rely on the celestial inputs")
        why = f", not shown: {self.reason}" if self.reason and not self.used else ""
        return (f"{verdict}: blanking every body changes the NLL by {self.rise:+.4f} nats "
                f"[{self.low:+.4f}, {self.high:+.4f}] ({self.source}{why}); {ABLATION_POINTER}")


def inputs_effect(run: RunData) -> InputsEffect | None:
    """The all-bodies-blanked NLL rise: from the test line, else the newest attribution record."""
    kept = kept_line(run)
    if kept is not None and kept.split == "test" and finite(
            kept.line, "blank_all_rise", "blank_all_rise_low", "blank_all_rise_high"):
        t = kept.line
        return InputsEffect(kept.label, kept.weights_step, t["blank_all_rise"],
                            t["blank_all_rise_low"], t["blank_all_rise_high"],
                            *_judgement(t, "blank_all_rise"))
    for record in reversed(run.attribution):
        blank = record.get("blank_all") or {}
        if finite(blank, "rise", "low", "high"):
            return InputsEffect(f"validation, weights of step {record['step']}", record["step"],
                                blank["rise"], blank["low"], blank["high"])
    return None


def overfitting_sentence(over: Overfitting | None) -> str:
    if over is None:
        return "not seen"
    if over.early_stopping_worked:
        return (f"no: early stopping kept the weights of step {over.best_step}, the best "
                f"validation; {over.sentence()}")
    return f"yes: {over.sentence()}; " + "; ".join(over.reasons)


@dataclass
class Verdict:
    headline: str
    rows: list[tuple[str, str]] = field(default_factory=list)   # (question, answer)


def _headline(run: RunData, findings: list[Finding]) -> str:
    broken = [f.issue for f in findings if f.severity == "critical"]
    if broken:
        return (f"broken: training itself went wrong ({', '.join(dict.fromkeys(broken))}); do "
                "not use these forecasts")
    scored = scored_line(run)
    if scored is None:
        return "not judged: no baseline skill was scored for this run"
    best = skills(scored.line)[0]
    if best.outcome != "beats":
        return (f"not better than a naive baseline: on {scored.label} the model "
                f"{best.outcome} the {best.label}")
    warnings = sum(f.severity in ("error", "warning") for f in findings)
    more = f" ({warnings} warning(s) below)" if warnings else ""
    return f"good: the model beats the naive baselines on {scored.label}{more}"


def _skill_rows(run: RunData) -> list[tuple[str, str]]:
    scored = scored_line(run)
    if scored is None:
        return [("skill", "not scored: this run's validation lines have no baseline skill "
                          "(written before baselines were scored, or no validation yet)")]
    return [(f"skill vs {s.label}", s.sentence(scored.label))
            for s in skills(scored.line)]


def verdict(run: RunData, t: Thresholds, findings: list[Finding]) -> Verdict:
    """The headline, then (question, answer) rows in the order a reader asks them."""
    rows = _skill_rows(run)
    calibrated = calibration(kept_line(run), t)
    if calibrated is not None:
        rows.append((f"calibration ({calibrated.kept.label})", calibrated.sentence()))
    effect = inputs_effect(run)
    rows.append(("celestial inputs", effect.sentence() if effect else
                 "not measured (no test line with blank_all_rise, no attribution record)"))
    rows.append(("overfitting", overfitting_sentence(overfitting(run, t))))
    return Verdict(_headline(run, findings), rows)
