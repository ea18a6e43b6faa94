"""Every number the analysis judges a run by, in one dataclass.

Defaults follow the reference card (gradient norms: healthy 1e-3..1, vanishing below 1e-5,
exploding above 100); the others are explained beside each. The run's own
`diagnostics.vanishing_threshold` and `diagnostics.exploding_threshold` are taken over, and
`--threshold name=value` overrides any.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from diagnostics.analysis.errors import AnalysisError


@dataclass(frozen=True)
class Thresholds:
    # gradient norms (per component, L2)
    vanishing: float = 1e-5
    exploding: float = 100.0
    healthy_low: float = 1e-3              # the card's healthy band, shaded in gradient_flow.png
    healthy_high: float = 1.0
    sustained_records: int = 3             # consecutive gradient records that make a trend
    # update-to-weight ratio ||dw|| / ||w|| of one optimizer step
    dead_update_ratio: float = 1e-9        # at or below: the component does not move at all
    small_update_ratio: float = 1e-5       # median over components below: the LR is too small
    target_update_ratio: float = 1e-3      # the usual healthy ratio, to size a new LR
    # optimizer and loss
    clip_fraction: float = 0.1             # clipping on more steps than this is too often
    spike_window: int = 20                 # train lines in the rolling window of the loss
    spike_min_window: int = 5
    spike_z: float = 6.0                   # robust z-score (median / MAD) of a spike
    # fusion attention entropy (normalised: 1 = uniform over tokens)
    entropy_min_records: int = 3
    entropy_flat_range: float = 0.01       # max - min over training below: flat
    entropy_collapse: float = 0.2          # below (overall or any head): collapsed
    # C->T attention and its faithfulness
    c2t_uniform: float = 0.99              # normalised entropy over bodies at or above: uniform
    #                                        (one body at 1.8x the uniform share gives ~0.99)
    min_spearman: float = 0.3              # C->T ranking vs occlusion ranking
    # the mixture decoder and calibration (validation)
    effective_components: float = 1.5
    sigma_at_floor: float = 0.2            # pi-weighted share of sigmas at model.sigma_min
    coverage_90_low: float = 0.85
    coverage_90_high: float = 0.95
    # overfitting: validations after the best one, all worse, NLL rising while train loss falls
    overfit_validations: int = 3
    # ... which is early stopping working when the run kept the best weights, unless the best is
    # one of the first overfit_early_best validations or the test is worse than the best
    # validation by more than overfit_test_gap nats (skill, else NLL)
    overfit_early_best: int = 2
    overfit_test_gap: float = 0.1
    # ranks (world size > 1)
    min_agreement: float = 0.05            # mean pairwise cosine of ranks' local gradients
    noise_scale_ratio: float = 10.0        # global batch vs noise scale, either way
    # throughput and memory
    data_time_fraction: float = 0.3        # of the step time spent waiting for data
    memory_fraction: float = 0.9           # of the device (or host) memory
    late_fraction: float = 0.5             # "late in training": the last half of the records

    def __post_init__(self) -> None:
        if not 0 < self.vanishing < self.healthy_low < self.healthy_high < self.exploding:
            raise ValueError("thresholds must satisfy 0 < vanishing < healthy_low < healthy_high "
                             f"< exploding, got {self.vanishing}, {self.healthy_low}, "
                             f"{self.healthy_high}, {self.exploding}")
        if not self.coverage_90_low < self.coverage_90_high:
            raise ValueError("threshold coverage_90_low must be below coverage_90_high")
        for name in ("sustained_records", "spike_window", "spike_min_window",
                     "entropy_min_records", "overfit_validations", "overfit_early_best"):
            if getattr(self, name) < 1:
                raise ValueError(f"threshold {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.late_fraction <= 1:
            raise ValueError(f"threshold late_fraction must lie in (0, 1], "
                             f"got {self.late_fraction}")


def threshold_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Thresholds)]


def parse_threshold(text: str) -> tuple[str, float]:
    """`vanishing=1e-6` -> ("vanishing", 1e-06); a AnalysisError names what is wrong."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep:
        raise AnalysisError(f"--threshold {text!r}: expected name=value, e.g. vanishing=1e-6")
    if name not in threshold_names():
        known = ", ".join(threshold_names())
        raise AnalysisError(f"--threshold: unknown name {name!r} (known: {known})")
    try:
        value = float(raw)
    except ValueError:
        raise AnalysisError(f"--threshold {name}: {raw!r} is not a number") from None
    return name, value


def build_thresholds(run_config: dict, overrides: list[tuple[str, float]]) -> Thresholds:
    """Defaults, then the run's own gradient thresholds, then the command line's overrides."""
    values: dict[str, float] = {}
    diagnostics = run_config.get("diagnostics") or {}
    for key, name in (("vanishing_threshold", "vanishing"), ("exploding_threshold", "exploding")):
        if isinstance(diagnostics.get(key), (int, float)):
            values[name] = float(diagnostics[key])
    values.update(overrides)
    types = {f.name: f.type for f in dataclasses.fields(Thresholds)}
    for name, value in values.items():
        if types[name] in (int, "int"):
            if value != int(value):
                raise AnalysisError(f"threshold {name} must be a whole number, got {value}")
            values[name] = int(value)
    try:
        return Thresholds(**values)
    except ValueError as err:
        raise AnalysisError(str(err)) from None
