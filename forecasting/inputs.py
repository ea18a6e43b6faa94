"""New data for a trained model: read a CSV, check it has the model's layout, add the future
celestial rows, and scale it with the statistics saved in the model file.

A forecast CSV has the training layout (the same date column, the targets and every feature
column that survived `data.drop_columns`; columns of no body in `data.bodies` are ignored, as in
training). It may end with *future rows*: celestial columns filled, every target cell empty.
`data.difference_columns` are differenced over the whole file (future rows included) and the
first row dropped, exactly as in training.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forecasting.model_file import LoadedModel
from series.builtin import celestial_features
from series.dataset import (
    _check_finite,
    _parse_dates,
    _parse_numbers,
    group_bodies,
    read_csv_rows,
)
from trainer.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class CsvRows:
    """A forecast CSV as read: every row's dates and feature columns, targets of observed rows."""

    path: Path
    dates: np.ndarray                 # (R,) datetime64[D]
    columns: dict[str, tuple]         # non-target columns as read (text), (R,) each
    targets_OT: np.ndarray            # (O, T) the rows with targets (the first O rows)


@dataclass
class ForecastInput:
    """Scaled model inputs over every usable row, and where the future rows came from."""

    path: Path
    dates: np.ndarray                 # (R,) observed rows first, then future rows
    features_RF: np.ndarray           # (R, F) scaled
    targets_OT: np.ndarray            # (O, T) scaled
    raw_targets_OT: np.ndarray        # (O, T) in target units
    future_note: str                  # how the horizon's celestial inputs were obtained
    last_origin: int                  # the last row whose horizon has its celestial inputs
    missing_future: str = ""          # why rows after last_origin cannot be origins

    @property
    def num_observed(self) -> int:
        return len(self.targets_OT)

    def check_horizon(self, row: int) -> None:
        """UserError if the model would lack the celestial inputs of `row`'s horizon."""
        if row > self.last_origin:
            raise UserError(self.missing_future)


def read_forecast_csv(path: Path, date_column: str, targets: list[str]) -> CsvRows:
    """Read a CSV whose trailing rows may leave every target cell empty (future rows)."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    header, body = read_csv_rows(path)
    _check_header(path, header, date_column, targets)
    by_column = dict(zip(header, zip(*body))) if body else dict.fromkeys(header, ())
    num_observed = _count_observed(path, [by_column[t] for t in targets], targets)
    dates = _parse_dates(path, by_column.pop(date_column))
    target_values = [_parse_numbers(path, t, by_column.pop(t)[:num_observed]) for t in targets]
    targets_OT = np.column_stack(target_values) if targets else np.empty((num_observed, 0))
    _check_finite(path, targets, targets_OT, first_line=2)
    return CsvRows(path, dates, by_column, targets_OT)


def _check_header(path: Path, header: list[str], date_column: str, targets: list[str]) -> None:
    if date_column not in header:
        raise UserError(f"{path}: no {date_column!r} column (the model was trained with "
                        f"data.date_column {date_column!r}; header: {header[:6]}...)")
    missing = [t for t in targets if t not in header]
    if missing:
        raise UserError(f"{path}: missing target column(s) {missing}: the model forecasts "
                        f"{targets}")


def _count_observed(path: Path, target_cells: list[tuple], targets: list[str]) -> int:
    """Rows before the trailing future rows (all target cells empty); a gap elsewhere is an
    error."""
    empty_RT = np.array([[cell.strip() == "" for cell in cells] for cells in target_cells]).T
    if empty_RT.size == 0:
        return 0
    all_empty_R = empty_RT.all(1)
    num_observed = len(all_empty_R)
    while num_observed and all_empty_R[num_observed - 1]:
        num_observed -= 1
    gaps = np.argwhere(empty_RT[:num_observed])
    if len(gaps):
        row, col = map(int, gaps[0])
        raise UserError(f"{path}: column {targets[col]!r} is empty at line {row + 2}: only the "
                        f"trailing future rows may leave target cells empty (all of them)")
    return num_observed


def layout_features(rows: CsvRows, loaded: LoadedModel) -> np.ndarray:
    """(R, F) raw feature matrix in the model's column order, after checking that the CSV's
    columns group into the same bodies with the same columns as in training."""
    data, spec = loaded.config.data, loaded.spec
    candidates = [c for c in rows.columns if not _dropped(c, data.drop_columns)]
    groups = group_bodies(candidates, data.bodies)
    for body, indices in zip(spec.bodies, spec.body_columns):
        expected = [spec.feature_names[i] for i in indices]
        missing = [c for c in expected if c not in groups.get(body, [])]
        extra = [c for c in groups.get(body, []) if c not in expected]
        if missing or extra:
            raise UserError(f"{rows.path}: body {body!r} does not have the model's columns: "
                            + _describe_difference(missing, extra))
    ignored = [c for c in candidates if c not in spec.feature_names]
    if ignored:
        log.warning("%s: ignoring columns that belong to no body (as in training): %s",
                    rows.path, ignored)
    # Only the model's columns are parsed: ignored ones may hold anything.
    return np.column_stack([_parse_numbers(rows.path, c, rows.columns[c])
                            for c in spec.feature_names])


def _dropped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _describe_difference(missing: list[str], extra: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing column(s) {missing}")
    if extra:
        parts.append(f"unexpected column(s) {extra} (the model was trained without them)")
    return "; ".join(parts)


def builtin_future_rows(loaded: LoadedModel, last_date: np.datetime64, count: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """`count` daily rows after `last_date`, features computed with the project's ephemeris code
    and the run's observer settings: (dates, (count, F) raw features in model order)."""
    # A few days of margin on each side: speeds are central differences of the daily series.
    span = np.arange(last_date - 3, last_date + count + 4)
    columns = celestial_features(loaded.config.data.builtin, span)
    keep = slice(4, 4 + count)
    return span[keep], np.column_stack([columns[c][keep] for c in loaded.spec.feature_names])


def prepare_forecast_input(loaded: LoadedModel, path: Path, allow_builtin: bool) -> ForecastInput:
    """Read `path`, check it, add future celestial rows where needed and scale it."""
    data = loaded.config.data
    rows = read_forecast_csv(path, data.date_column, loaded.spec.targets)
    features_RF = layout_features(rows, loaded)
    _check_finite(path, loaded.spec.feature_names, features_RF, first_line=2)
    dates, targets_OT = rows.dates, rows.targets_OT
    diff = [i for i, c in enumerate(loaded.spec.feature_names)
            if _dropped(c, data.difference_columns)]
    _check_length(loaded, path, len(targets_OT) - bool(diff), bool(diff))
    num_future = len(dates) - len(targets_OT)
    dates, features_RF, note = _with_future_rows(loaded, path, dates, features_RF, num_future,
                                                 allow_builtin)
    if diff:   # as in training: change from the previous row, first row dropped
        features_RF = features_RF.copy()
        features_RF[1:, diff] = np.diff(features_RF[:, diff], axis=0)
        dates, features_RF, targets_OT = dates[1:], features_RF[1:], targets_OT[1:]
    scaled_RF = (features_RF - loaded.feature_mean) / loaded.feature_std
    scaled_OT = (targets_OT - loaded.target_mean) / loaded.target_std
    needs_future = loaded.config.model.use_future_celestial
    covered = len(dates) - loaded.pred_len if needs_future else len(dates)
    last_origin = min(len(targets_OT), covered) - 1
    return ForecastInput(path, dates, scaled_RF, scaled_OT, targets_OT, note, last_origin,
                         _missing_future_message(path, loaded.pred_len, num_future))


def _with_future_rows(loaded, path, dates, features_RF, num_future, allow_builtin):
    """Rows for the horizon after the last observed row: the CSV's own future rows, else
    computed ones (built-in data), else none: then only earlier rows can be origins (or any, for
    a model that does not use them)."""
    pred_len = loaded.pred_len
    if num_future >= pred_len:
        return dates, features_RF, f"from the {num_future} future rows of {path}"
    if not loaded.config.model.use_future_celestial:
        return dates, features_RF, _no_future_note(dates, num_future)
    if allow_builtin:
        extra_dates, extra_RF = builtin_future_rows(loaded, dates[-1], pred_len - num_future)
        after_csv = f" (after the CSV's {num_future} future rows)" if num_future else ""
        note = (f"computed with the built-in ephemeris for {len(extra_dates)} day(s) after "
                f"{dates[-1]}{after_csv}")
        return (np.concatenate([dates, extra_dates]), np.concatenate([features_RF, extra_RF]), note)
    return dates, features_RF, f"from the rows of {path} after each origin"


def _missing_future_message(path: Path, pred_len: int, num_future: int) -> str:
    return (f"{path}: the model needs the celestial columns of the {pred_len} rows after the "
            f"last row with targets (model.pred_len = {pred_len}); the file has {num_future} such "
            f"future row(s): add {pred_len - num_future} row(s) at the end with the celestial "
            f"columns filled and the target cells empty (or backtest on earlier origins with "
            f"--origins)")


def _no_future_note(dates: np.ndarray, num_future: int) -> str:
    step = typical_step(dates)
    return (f"not used by this model (model.use_future_celestial is false); target dates past "
            f"the file's {num_future} future row(s) follow its typical date step, {step} day(s)")


def typical_step(dates: np.ndarray) -> int:
    """The median gap between consecutive dates, in days (1 for a single row)."""
    if len(dates) < 2:
        return 1
    return max(1, int(np.median(np.diff(dates).astype(np.int64))))


def _check_length(loaded: LoadedModel, path: Path, num_observed: int, differenced: bool) -> None:
    if num_observed < loaded.seq_len:
        after = (" after differencing (data.difference_columns drops the first row)"
                 if differenced else "")
        raise UserError(f"{path}: too short: {num_observed} row(s) with targets{after}, the model "
                        f"looks back model.seq_len = {loaded.seq_len} rows before a forecast")
