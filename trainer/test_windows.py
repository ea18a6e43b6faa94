"""Per-window test scores (like GluonTS's item metrics), for paired tests between runs later:
`logs/<experiment>/test_windows.csv`, one row per (window, target) and one per window with
target `all` (the mean over the targets). Columns: COLUMNS; `window` is the 0-based window index
in the split, `origin` the date of the window's last input step (the forecast origin); NLL and
CRPS (scaled target units) are means over the window's horizon steps.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from trainer.run_log import guarded_write

FILE_NAME = "test_windows.csv"
FORECASTER_COLUMNS = {"model": "model", "rw": "random_walk", "ewma": "ewma"}
COLUMNS = ("window", "origin", "target",
           *(f"{column}_{score}" for score in ("nll", "crps")
             for column in FORECASTER_COLUMNS.values()))


def window_origins(dataset, dates: np.ndarray) -> list[str]:
    """The forecast origin of each window of a WindowDataset, as an ISO date."""
    return [str(dates[int(start) + dataset.seq_len - 1]) for start in dataset.starts]


def window_rows(series: dict[str, np.ndarray], origins: list[str], targets: list[str]
                ) -> list[list]:
    """The CSV's rows from an evaluation's per-window `series` (trainer/evaluate.py)."""
    columns = []
    for score in ("nll", "crps"):
        for name in FORECASTER_COLUMNS:
            values_NT = np.asarray(series[f"{name}_{score}_T"]).reshape(len(origins), -1)
            columns.append(np.concatenate([values_NT, values_NT.mean(1, keepdims=True)], 1))
    return [[window, origin, target, *(f"{c[window, t]:.8g}" for c in columns)]
            for window, origin in enumerate(origins)
            for t, target in enumerate([*targets, "all"])]


def write_windows_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def write_test_windows(run_log, loader, prepared, series: dict[str, np.ndarray]) -> dict:
    """Write test_windows.csv into the run's log folder (rank 0: the rank whose RunLog is
    enabled); returns the keys the test line gains to describe it."""
    dataset = loader.dataset
    keys = {"pred_len": dataset.pred_len, "window_stride": dataset.stride}
    if not run_log.enabled:
        return keys
    path = run_log.log_dir / FILE_NAME
    rows = window_rows(series, window_origins(dataset, prepared.dates), prepared.spec.targets)
    with guarded_write(path):
        write_windows_csv(path, rows)
    return {**keys, "windows_file": FILE_NAME}
