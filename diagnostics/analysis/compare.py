"""What `--compare` says beyond the overlays: which run is better on test (with the paired interval
from both runs' test_windows.csv when they share windows) and how their configs differ."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np

from diagnostics.analysis.errors import AnalysisError
from diagnostics.analysis.kept import KeptLine, finite, kept_line
from diagnostics.analysis.load import RunData
from stats.intervals import PairedDifference, paired_difference

WINDOWS_FILE = "test_windows.csv"


def read_window_nll(run: RunData) -> dict[tuple[str, str], float] | None:
    """(window, origin) -> the model's NLL over all targets, from test_windows.csv; None if the
    run has no such file."""
    name = run.test[-1].get("windows_file", WINDOWS_FILE) if run.test else WINDOWS_FILE
    path = run.log_dir / name
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {(row["window"], row["origin"]): float(row["model_nll"])
                    for row in csv.DictReader(f) if row["target"] == "all"}
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path}: cannot read the per-window scores ({err})") from None


def _window_geometry(run: RunData) -> tuple[int, int]:
    """(pred_len, window_stride) from the test line, else the config (default stride 1)."""
    line = run.test[-1] if run.test else {}
    pred_len = line.get("pred_len") or run.config_number("model.pred_len") or 1
    stride = line.get("window_stride") or run.config_number("data.window_stride") or 1
    return int(pred_len), int(stride)


@dataclass
class Comparison:
    """One run against the reference (the first run) on test."""
    name: str
    reference: str
    kept: KeptLine
    reference_kept: KeptLine
    difference: float        # test NLL of the run - the reference's: negative = the run is better
    interval: PairedDifference | None   # on the shared windows
    why_unpaired: str | None

    def sentence(self) -> str:
        """Which run is better, in words: shown only by a paired interval that excludes 0."""
        better = self.name if self.difference < 0 else self.reference
        numbers = (f"{self.name}'s NLL ({self.kept.label}) is {abs(self.difference):.4f} nats "
                   f"{'lower' if self.difference < 0 else 'higher'} than {self.reference}'s "
                   f"({self.reference_kept.label})")
        i = self.interval
        if i is None:
            return (f"{better} has the lower test NLL, not shown to be better: {numbers}; no "
                    f"paired interval: {self.why_unpaired}")
        interval = (f"paired 95% interval of {self.name} - {self.reference} on the shared "
                    f"windows [{i.low:+.4f}, {i.high:+.4f}] ({i.num_blocks} blocks of "
                    f"{i.block_length} windows)")
        if i.shown:
            return f"{better} is better on test: {numbers}; {interval}, shown"
        return (f"neither {self.name} nor {self.reference} is shown to be better on test: "
                f"{numbers}; {interval}, not shown: {i.reason}")


def _paired(run: RunData, reference: RunData) -> tuple[PairedDifference | None, str | None]:
    mine, theirs = read_window_nll(run), read_window_nll(reference)
    if mine is None or theirs is None:
        missing = run.name if mine is None else reference.name
        return None, f"{missing} has no {WINDOWS_FILE}"
    if mine.keys() != theirs.keys():
        shared = len(mine.keys() & theirs.keys())
        return None, (f"the runs' test windows differ ({len(mine)} and {len(theirs)} windows, "
                      f"{shared} shared)")
    keys = sorted(mine, key=lambda k: (int(k[0]), k[1]))
    a = np.array([mine[k] for k in keys])
    b = np.array([theirs[k] for k in keys])
    pred_len, stride = _window_geometry(run)
    return paired_difference(a, b, pred_len, stride), None


def compare_on_test(runs: list[RunData]) -> list[Comparison]:
    """Every run after the first against the first, where both have a scored test line."""
    reference = runs[0]
    reference_kept = kept_line(reference)
    if reference_kept is None or reference_kept.split != "test" or \
            not finite(reference_kept.line, "nll"):
        return []
    found = []
    for run in runs[1:]:
        kept = kept_line(run)
        if kept is None or kept.split != "test" or not finite(kept.line, "nll"):
            continue
        interval, why = _paired(run, reference)
        found.append(Comparison(run.name, reference.name, kept, reference_kept,
                                kept.line["nll"] - reference_kept.line["nll"], interval, why))
    return found


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_differences(runs: list[RunData]) -> list[list[str]]:
    """[dotted key, value in each run...] for every key whose value differs between the runs."""
    flats = [_flatten(run.config) for run in runs]
    keys = sorted(set().union(*flats))
    rows = []
    for key in keys:
        values = [flat.get(key, "(unset)") for flat in flats]
        if any(v != values[0] for v in values[1:]):
            rows.append([key, *(_show(v) for v in values)])
    return rows


def _show(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)


def unique_names(runs: list[RunData]) -> list[str]:
    """Folder names, numbered where two runs share one (logs/a/x and logs/b/x)."""
    names = [run.name for run in runs]
    return [f"{i + 1}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]
