"""Data: read and check the CSV, group columns into bodies, split by time, scale, window.

A dataset is a CSV with a `date` column (YYYY-MM-DD, strictly increasing), the target columns
(`data.targets`) and celestial columns named `<Body>_<feature>`, grouped into bodies by the
longest matching name prefix in `data.bodies`. The built-in dataset (`data.source: builtin`) is
generated on first use from `data.builtin`.

Splits are contiguous in time (train, validation, test); scaling statistics come from the
training rows only; a window (look-back S, horizon P) never crosses a split border.

`data.celestial_ablation` removes the celestial information and keeps everything else (the
architecture, the inputs' distribution), so that a run with it against one without measures
what the information is worth, not what capacity the inputs add (see `ablate_bodies`).
"""
from __future__ import annotations

import csv
import fnmatch
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model.config import InputSpec
from series.builtin import BODY_NAMES, BuiltinDataConfig, write_builtin_csv
from trainer.errors import UserError

log = logging.getLogger(__name__)

_SLOW_BODY_POSITIONS = ["Saturn_lon_*", "Uranus_lon_*", "Neptune_lon_*", "Pluto_lon_*",
                        "North_Node_lon_*", "South_Node_lon_*",
                        "Uranus_lat", "Neptune_lat", "Pluto_lat"]


@dataclass
class DataConfig:
    source: Literal["builtin", "csv"] = "builtin"
    path: str = ""                    # csv: required; builtin: cache file (default under data/)
    date_column: str = "date"
    targets: list[str] = field(default_factory=lambda: ["Asset_A", "Asset_B", "Asset_C", "Asset_D"])
    bodies: list[str] = field(default_factory=lambda: list(BODY_NAMES))
    # Slow bodies' absolute positions never repeat within decades and act as a calendar.
    drop_columns: list[str] = field(default_factory=lambda: list(_SLOW_BODY_POSITIONS))
    difference_columns: list[str] = field(default_factory=list)
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    window_stride: int = 1
    batch_size: int = 12              # per rank
    eval_batch_size: int = 256        # per rank
    num_workers: int = 0
    # none | block_shuffle | time_shift | no_bodies (see ablate_bodies)
    celestial_ablation: Literal["none", "block_shuffle", "time_shift", "no_bodies"] = "none"
    ablation_block_rows: int = 397    # block_shuffle: rows per block (about a year of days)
    ablation_seed: int = 0            # fixed: every run of an experiment sees the same ablation
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)

    def __post_init__(self) -> None:
        if self.source == "csv" and not self.path:
            raise ValueError("data.path is required when data.source is 'csv'")
        if not (0 < self.train_fraction < 1 and 0 < self.val_fraction < 1
                and self.train_fraction + self.val_fraction < 1):
            raise ValueError("data.train_fraction and data.val_fraction must be in (0, 1) and "
                             "leave rows for the test split")
        for name in ("window_stride", "batch_size", "eval_batch_size", "ablation_block_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not self.targets:
            raise ValueError("data.targets must name at least one target column")
        if not self.bodies:
            raise ValueError("data.bodies must name at least one body")
        for name in ("targets", "bodies"):
            names = getattr(self, name)
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"data.{name} names {repeated[0]!r} more than once")

    def resolved_path(self) -> Path:
        if self.path:
            return Path(self.path)
        b = self.builtin
        return Path("data") / f"builtin_{b.start_date}_{b.end_date}_{b.fingerprint()}.csv"


@dataclass
class RawTable:
    dates: np.ndarray            # (R,) datetime64[D]
    columns: dict[str, np.ndarray]
    path: Path


def ensure_dataset(config: DataConfig) -> Path:
    """The CSV to train on; the built-in one is generated if absent (where data.path says)."""
    path = config.resolved_path()
    if path.is_dir():
        raise UserError(f"data.path {str(path)!r} is a directory (expected a CSV file)")
    if config.source == "builtin" and not path.exists():
        _generate_builtin(config, path)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    return path


def given_data_file(path: Path) -> Path:
    """A data file to read as it is (`--data`, or a csv run's data.path): it must exist. Unlike
    data.path of a built-in-data run, it is never a cache to generate: a typo is refused."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory (expected a CSV file)")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return path


def _generate_builtin(config: DataConfig, path: Path) -> None:
    """With data.source builtin, data.path is a cache: a missing file is generated there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"data.path {str(path)!r}: part of the folder path is a file, so the "
                        f"built-in dataset cannot be generated there") from None
    except OSError as err:
        raise UserError(f"data.path {str(path)!r}: cannot create the folder for the built-in "
                        f"dataset ({err.strerror or err})") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"data.path {str(path)!r}: {path.parent} is not writable, so the "
                        f"built-in dataset cannot be generated there")
    log.info("data.source is builtin and %s does not exist: generating the built-in dataset "
             "(%s to %s) into that file ...",
             path, config.builtin.start_date, config.builtin.end_date)
    try:
        write_builtin_csv(config.builtin, path)
    except OSError as err:
        raise UserError(f"data.path {str(path)!r}: cannot write the built-in dataset "
                        f"({err.strerror or err})") from None


def read_table(path: Path, date_column: str) -> RawTable:
    header, body = read_csv_rows(path)
    if date_column not in header:
        raise UserError(f"{path}: no {date_column!r} column (header: {header[:6]}...)")
    by_column = dict(zip(header, zip(*body))) if body else dict.fromkeys(header, ())
    dates = _parse_dates(path, by_column.pop(date_column))
    columns = {name: _parse_numbers(path, name, values) for name, values in by_column.items()}
    return RawTable(dates, columns, path)


# What a CSV may make the process hold: each column is a model input (the memory of a training
# step grows with their number), and the text is held as Python strings (about 60 bytes a cell).
MAX_COLUMNS = 1_000
MAX_CELLS = 10_000_000
MAX_LINE_CHARS = 1 << 20


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of a CSV (training and forecast data), every row as long as the
    header, within the limits above; a binary, non-UTF-8, unreadable or oversized file is a
    UserError naming it (and the line), found before the rest of the file is read."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(_bounded_lines(path, f))
            try:
                return _header_and_rows(path, reader)
            except csv.Error as err:     # a NUL byte, a field past the size limit
                raise UserError(f"{path}: line {reader.line_num + 1} is not CSV text "
                                f"({err})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text CSV (a binary file?)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


def _header_and_rows(path: Path, reader) -> tuple[list[str], list[list[str]]]:
    header = next(reader, None)
    if not header:
        raise UserError(f"{path}: empty file (expected a header row)")
    if len(header) > MAX_COLUMNS:
        raise UserError(f"{path}: {len(header)} columns, more than the {MAX_COLUMNS} a data file "
                        f"may have (every column is a model input)")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise UserError(f"{path}: duplicate column names {duplicated}")
    body, max_rows = [], MAX_CELLS // len(header)
    for row in reader:
        if len(row) != len(header):
            raise UserError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                            f"the header has {len(header)}")
        if len(body) == max_rows:
            raise UserError(f"{path}: more than {max_rows} rows of {len(header)} columns (at most "
                            f"{MAX_CELLS:,} cells): split the file or drop columns")
        body.append(row)
    return header, body


def _bounded_lines(path: Path, f):
    number = 0
    while line := f.readline(MAX_LINE_CHARS + 1):
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise UserError(f"{path}: line {number} is over {MAX_LINE_CHARS:,} characters (not "
                            f"a data file?)")
        yield line


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_date(text: str) -> np.datetime64:
    """A full YYYY-MM-DD calendar date, else ValueError saying why. numpy alone also takes '',
    'NaT', '2020-12' (as its first day) and '2020-01-01T05:00': every date a user gives, in a
    CSV or on the command line, goes through here."""
    if not _DATE.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not a full YYYY-MM-DD date")
    try:
        return np.datetime64(text, "D")
    except ValueError:
        raise ValueError(f"{text!r} is not a calendar date") from None


def _parse_dates(path: Path, values) -> np.ndarray:
    for line, value in enumerate(values, start=2):
        try:
            parse_date(value)
        except ValueError:
            raise UserError(f"{path}: date {value[:40]!r} at line {line} is not YYYY-MM-DD") \
                from None
    dates = np.array(values, dtype="datetime64[D]")
    steps = np.diff(dates).astype(np.int64)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        kind = "duplicate" if steps[i] == 0 else "unsorted"
        raise UserError(f"{path}: {kind} dates: {dates[i]} then {dates[i + 1]} "
                        f"(lines {i + 2} and {i + 3}); dates must strictly increase")
    return dates


def _parse_numbers(path: Path, name: str, values) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64)
    except ValueError:
        for line, v in enumerate(values, start=2):
            try:
                float(v)
            except ValueError:
                raise UserError(f"{path}: column {name!r} is not numeric: {v[:40]!r} at line "
                                f"{line}") from None
        raise UserError(f"{path}: column {name!r} is not numeric") from None


def group_bodies(names: list[str], bodies: list[str]) -> dict[str, list[str]]:
    """Columns per body by the longest body-name prefix (`North_Node_speed` -> North_Node)."""
    by_length = sorted(bodies, key=len, reverse=True)
    groups: dict[str, list[str]] = {body: [] for body in bodies}
    for name in names:
        owner = next((b for b in by_length if name.startswith(b + "_")), None)
        if owner is not None:
            groups[owner].append(name)
    return groups


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_columns(table: RawTable, config: DataConfig) -> tuple[list[str], dict[str, list[str]]]:
    """Target names and the kept feature columns per body; errors name what is missing."""
    missing = [t for t in config.targets if t not in table.columns]
    if missing:
        raise UserError(f"{table.path}: missing target column(s) {missing} (data.targets)")
    candidates = [c for c in table.columns if c not in config.targets]
    groups = group_bodies(candidates, config.bodies)
    grouped = {c for cols in groups.values() for c in cols}
    ignored = [c for c in candidates if c not in grouped]
    if ignored:
        log.warning("%s: ignoring columns that belong to no body in data.bodies: %s",
                    table.path, ignored)
    groups = {b: [c for c in cols if not _matches(c, config.drop_columns)]
              for b, cols in groups.items()}
    empty = [b for b, cols in groups.items() if not cols]
    if empty:
        raise UserError(f"{table.path}: body {empty[0]!r} has no columns (expected columns named "
                        f"'{empty[0]}_<feature>'; check data.bodies and data.drop_columns)")
    return list(config.targets), groups


def _check_finite(path: Path, names: list[str], matrix_RC: np.ndarray, first_line: int) -> None:
    bad = ~np.isfinite(matrix_RC)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise UserError(f"{path}: column {names[col]!r} has a non-finite value "
                        f"({matrix_RC[row, col]}) at line {row + first_line}")


@dataclass
class PreparedData:
    """Scaled arrays for the whole date range, split borders and the model's input spec."""

    features_RF: torch.Tensor
    targets_RT: torch.Tensor
    dates: np.ndarray
    borders: dict[str, tuple[int, int]]     # split -> [start row, end row)
    spec: InputSpec
    target_mean: np.ndarray
    target_std: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray

    def scaling(self) -> dict:
        """The training split's statistics, saved with a model so that new data is scaled the
        same way (plain lists: the model file stays loadable with weights_only=True)."""
        return {"feature_mean": self.feature_mean.tolist(),
                "feature_std": self.feature_std.tolist(),
                "target_mean": self.target_mean.tolist(), "target_std": self.target_std.tolist()}


def prepare(config: DataConfig, seq_len: int, pred_len: int) -> PreparedData:
    table = read_table(ensure_dataset(config), config.date_column)
    targets, groups = select_columns(table, config)
    feature_names = [c for cols in groups.values() for c in cols]
    targets_RT = np.column_stack([table.columns[t] for t in targets])
    features_RF = np.column_stack([table.columns[c] for c in feature_names])
    _check_finite(table.path, targets, targets_RT, first_line=2)
    _check_finite(table.path, feature_names, features_RF, first_line=2)
    first_row = 0
    diff = [i for i, c in enumerate(feature_names) if _matches(c, config.difference_columns)]
    if diff:
        features_RF[1:, diff] = np.diff(features_RF[:, diff], axis=0)
        first_row = 1
    features_RF, targets_RT = features_RF[first_row:], targets_RT[first_row:]
    dates = table.dates[first_row:]
    borders = split_borders(len(dates), config, seq_len + pred_len, table.path)
    train = slice(*borders["train"])
    f_mean, f_std = _column_stats(features_RF[train], feature_names)
    t_mean, t_std = _column_stats(targets_RT[train], targets)
    features_RF = ablate_bodies((features_RF - f_mean) / f_std, borders, config)
    targets_RT = (targets_RT - t_mean) / t_std
    spec = InputSpec(
        bodies=list(groups), targets=targets, feature_names=feature_names,
        body_columns=[[feature_names.index(c) for c in cols] for cols in groups.values()],
        change_scale=change_scale(targets_RT[train], pred_len).tolist())
    return PreparedData(torch.tensor(features_RF, dtype=torch.float32),
                        torch.tensor(targets_RT, dtype=torch.float32), dates, borders, spec,
                        t_mean, t_std, f_mean, f_std)


def split_borders(num_rows: int, config: DataConfig, window: int,
                  path: Path) -> dict[str, tuple[int, int]]:
    n_train = int(num_rows * config.train_fraction)
    n_val = int(num_rows * config.val_fraction)
    borders = {"train": (0, n_train), "val": (n_train, n_train + n_val),
               "test": (n_train + n_val, num_rows)}
    for name, (start, end) in borders.items():
        if end - start < window:
            raise UserError(f"{path}: too few rows for one window in the {name} split: "
                            f"{end - start} rows, a window needs seq_len + pred_len = {window} "
                            f"({num_rows} rows in all)")
    return borders


MIN_SHIFT_ROWS = 730      # time_shift: at least two years of daily rows, where the split allows


def ablate_bodies(features_RF: np.ndarray, borders: dict[str, tuple[int, int]],
                  config: DataConfig) -> np.ndarray:
    """The celestial rows with their information about the targets removed, per split.

    - `block_shuffle`: each split's rows cut into blocks of about `ablation_block_rows` and the
      blocks permuted (one permutation for all bodies): every split keeps exactly its rows, so each
      body's distribution and the bodies' joint distribution, and the rows keep their day-to-day
      motion inside a block, but a row no longer sits next to the targets of its date.
    - `time_shift`: each split's rows rotated by its own random offset of several years (one
      discontinuity per split): the same rows, dates moved away from their targets.
    For a periodic body a given shuffle or shift leaves a chance alignment of its phase with the
    targets, different in each split: what a model learns from it on the training rows does not
    carry over, and over ablation seeds the relation averages to zero (tests/test_data.py).
    - `no_bodies`: every celestial column at its training mean (0 after scaling).
    Targets are untouched; the random choices come from `ablation_seed` alone, so every run of
    an experiment (any `train.seed`) sees the same ablated data.
    """
    kind = config.celestial_ablation
    if kind == "none":
        return features_RF
    if kind == "no_bodies":
        return np.zeros_like(features_RF)
    rng = np.random.default_rng(config.ablation_seed)
    ablated = features_RF.copy()
    for start, end in borders.values():
        rows = np.arange(start, end)
        if kind == "block_shuffle":
            order = _shuffled_blocks(rows, config.ablation_block_rows, rng)
        else:
            order = np.roll(rows, _shift_rows(len(rows), rng))
        ablated[start:end] = features_RF[order]
    log.info("data.celestial_ablation %s (ablation_seed %d): the celestial rows no longer match "
             "their dates", kind, config.ablation_seed)
    return ablated


def _shuffled_blocks(rows: np.ndarray, block_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks of random length (0.5 to 1.5 times `block_rows`) in an order where none stays in
    place. Random lengths keep the displacements from being multiples of one length, which for
    a body whose period is near that length would keep its phase. A split shorter than four
    blocks is cut into about four (a single block could not move)."""
    block_rows = max(2, min(block_rows, len(rows) // 4))
    lengths = rng.integers(block_rows // 2, block_rows + block_rows // 2 + 1, size=len(rows))
    cuts = np.cumsum(lengths)
    blocks = np.split(rows, cuts[cuts < len(rows)])
    order = rng.permutation(len(blocks))
    while len(blocks) > 1 and (order == np.arange(len(blocks))).any():
        order = rng.permutation(len(blocks))
    return np.concatenate([blocks[i] for i in order])


def _shift_rows(num_rows: int, rng: np.random.Generator) -> int:
    """An offset at least MIN_SHIFT_ROWS from zero both ways; in a split too short for that,
    between a quarter and three quarters of it."""
    margin = MIN_SHIFT_ROWS if num_rows > 4 * MIN_SHIFT_ROWS else num_rows // 4
    return int(rng.integers(margin, num_rows - margin + 1))


def _column_stats(x_RC: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_RC.mean(0), x_RC.std(0)
    constant = [n for n, s in zip(names, std) if s < 1e-12]
    if constant:
        log.warning("columns constant on the training split (left unscaled): %s", constant)
    return mean, np.where(std < 1e-12, 1.0, std)


def change_scale(targets_RT: np.ndarray, pred_len: int) -> np.ndarray:
    """(P, T) std of the h-step change, h = 1..P, on the given rows."""
    return np.stack([(targets_RT[h:] - targets_RT[:-h]).std(0) for h in range(1, pred_len + 1)])


class Batch(NamedTuple):
    wave: torch.Tensor           # (B, S, F) look-back celestial features
    target: torch.Tensor         # (B, S, T) look-back targets
    future_wave: torch.Tensor    # (B, P, F) horizon celestial features
    future_target: torch.Tensor  # (B, P, T) what is forecast

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


class WindowDataset(Dataset):
    """Windows that start and end inside rows [start, end) of one split."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, pred_len: int, stride: int):
        start, end = data.borders[split]
        self.features, self.targets = data.features_RF, data.targets_RT
        self.seq_len, self.pred_len, self.stride = seq_len, pred_len, stride
        self.starts = torch.arange(start, end - seq_len - pred_len + 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Batch:
        s = int(self.starts[i])
        mid, stop = s + self.seq_len, s + self.seq_len + self.pred_len
        return Batch(self.features[s:mid], self.targets[s:mid],
                     self.features[mid:stop], self.targets[mid:stop])


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch.

    The epoch's permutation depends only on (seed, epoch). `position` counts the samples of that
    permutation all ranks together have consumed; rank r then takes rest[r::world_size]. Since
    after k per-rank samples on W ranks exactly the first k*W entries are consumed, the position
    carries over when the number of ranks changes between save and resume.
    With shuffle=False and drop_last=False (validation) shards are not padded: no sample twice.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.position = 0

    def start_epoch(self, epoch: int, position: int = 0) -> None:
        """The next iteration gives epoch `epoch`'s samples from `position` on."""
        self.set_epoch(epoch)
        self.position = position

    def _remaining(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        rest = order[self.position:]
        if self.drop_last:
            rest = rest[:len(rest) - len(rest) % self.num_replicas]
        return rest[self.rank::self.num_replicas].tolist()

    def __iter__(self):
        return iter(self._remaining())

    def __len__(self) -> int:
        rest = len(self.dataset) - self.position
        if self.drop_last:
            return rest // self.num_replicas
        return len(range(self.rank, rest, self.num_replicas))


@dataclass
class DataBundle:
    """The prepared data and this rank's loader for each split."""

    prepared: PreparedData
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader

    @property
    def train_sampler(self) -> ResumableDistributedSampler:
        return self.train_loader.sampler


def build_loaders(prepared: PreparedData, config: DataConfig, seq_len: int, pred_len: int,
                  rank: int, world_size: int, seed: int) -> DataBundle:
    """A loader per split of `prepared`: the training one shuffles (by `seed` and the epoch)."""
    loaders = {split: build_loader(WindowDataset(prepared, split, seq_len, pred_len,
                                                 config.window_stride),
                                   config, rank, world_size, seed, train=split == "train")
               for split in ("train", "val", "test")}
    return DataBundle(prepared, loaders["train"], loaders["val"], loaders["test"])


def build_loader(dataset: WindowDataset, config: DataConfig, rank: int, world_size: int,
                 seed: int, train: bool) -> DataLoader:
    sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed,
                                          drop_last=train)
    # A private generator: worker seeding must not consume the global RNG (exact resume).
    generator = torch.Generator()
    generator.manual_seed(seed + 7919 * rank)
    return DataLoader(dataset, batch_size=config.batch_size if train else config.eval_batch_size,
                      sampler=sampler, drop_last=train, num_workers=config.num_workers,
                      generator=generator, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())
