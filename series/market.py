"""Real daily OHLC in the project's CSV schema, with the project's own ephemeris features.

The `arch` package (an optional dependency: `pip install 'celestial-pgat[real-data]'`) ships
daily Open/High/Low/Close series inside its wheel, so nothing is downloaded: `sp500` (S&P 500)
and `nasdaq` (NASDAQ Composite), trading days 1999-01-04 to 2018-12-31. This module writes one
of them as the CSV that `data.source: csv` reads:
- `date`: the trading days, YYYY-MM-DD, strictly increasing;
- `log_Open, log_High, log_Low, log_Close`: natural logs of the prices (rows with a missing or
  non-positive price are dropped, and counted);
- `<Body>_<feature>` for the 13 bodies, computed by series/builtin.py for exactly those
  days, for the same observer as the built-in dataset (New York, 21:00 UTC: the NYSE close).

Usage: `python -m series.market --series sp500 --out data/sp500.csv [--start --end]`
(also the `celestial-market-data` console script).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from series.builtin import BuiltinDataConfig, celestial_features, write_columns_csv
from series.dataset import parse_date
from trainer.errors import UserError

SERIES = {"sp500": "arch.data.sp500", "nasdaq": "arch.data.nasdaq"}
PRICE_COLUMNS = ("Open", "High", "Low", "Close")
TARGETS = [f"log_{name}" for name in PRICE_COLUMNS]


@dataclass
class PriceTable:
    """Daily prices: `dates` (R,) datetime64[D] and one (R,) array per name in PRICE_COLUMNS."""

    dates: np.ndarray
    prices: dict[str, np.ndarray]


def load_series(series: str) -> PriceTable:
    """The OHLC series that the `arch` package ships (read from its wheel, no download)."""
    if series not in SERIES:
        raise UserError(f"--series: unknown series {series!r}; choose one of {sorted(SERIES)}")
    try:
        module = importlib.import_module(SERIES[series])
    except ImportError:
        install = "pip install 'celestial-pgat[real-data]' or pip install arch"
        raise UserError(f"--series {series}: needs the optional package 'arch', which ships the "
                        f"data ({install})") from None
    frame = module.load()
    missing = [name for name in PRICE_COLUMNS if name not in frame.columns]
    if missing:
        raise UserError(f"{SERIES[series]}: the series has no column(s) {missing}")
    dates = np.asarray(frame.index.values, dtype="datetime64[D]")
    return PriceTable(dates, {name: frame[name].to_numpy(dtype=np.float64)
                              for name in PRICE_COLUMNS})


def select_span(table: PriceTable, start: str | None, end: str | None) -> PriceTable:
    """The rows with start <= date <= end (either bound may be None)."""
    keep = np.ones(len(table.dates), dtype=bool)
    bounds = ((start, "--start", np.greater_equal), (end, "--end", np.less_equal))
    for bound, name, inside in bounds:
        if bound is not None:
            keep &= inside(table.dates, _parse_day(bound, name))
    if not keep.any():
        raise UserError(f"--start/--end: no trading day from {start or 'the start'} to "
                        f"{end or 'the end'} (the series covers {table.dates[0]} to "
                        f"{table.dates[-1]})")
    return PriceTable(table.dates[keep], {k: v[keep] for k, v in table.prices.items()})


def _parse_day(text: str, flag: str) -> np.datetime64:
    try:
        return parse_date(text)
    except ValueError as err:
        raise UserError(f"{flag}: {err}") from None


def drop_bad_rows(table: PriceTable) -> tuple[PriceTable, int]:
    """Rows whose four prices are all finite and > 0 (a log needs them), and how many were not."""
    matrix_RC = np.column_stack([table.prices[name] for name in PRICE_COLUMNS])
    good = (np.isfinite(matrix_RC) & (matrix_RC > 0)).all(1)
    kept = PriceTable(table.dates[good], {k: v[good] for k, v in table.prices.items()})
    return kept, int((~good).sum())


def check_dates(table: PriceTable, source: str) -> None:
    """The trainer needs strictly increasing dates; a series that is not is refused, not fixed."""
    steps = np.diff(table.dates).astype(np.int64)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        raise UserError(f"{source}: dates do not strictly increase: {table.dates[i]} then "
                        f"{table.dates[i + 1]}")


def market_columns(table: PriceTable, observer: BuiltinDataConfig) -> dict[str, np.ndarray]:
    """Log prices (TARGETS) then the 13 bodies' ephemeris columns for the table's dates."""
    columns = {f"log_{name}": np.log(table.prices[name]) for name in PRICE_COLUMNS}
    columns.update(celestial_features(observer, table.dates))
    return columns


def write_market_csv(table: PriceTable, path: Path, source: str,
                     observer: BuiltinDataConfig | None = None) -> Path:
    """Write clean rows (see drop_bad_rows) in the trainer's CSV schema."""
    if len(table.dates) < 2:
        raise UserError(f"{source}: {len(table.dates)} usable rows in the chosen span "
                        f"(check --start and --end)")
    check_dates(table, source)
    columns = market_columns(table, observer or BuiltinDataConfig())
    return write_columns_csv(path, table.dates, columns)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m series.market",
        description="Write a real daily OHLC series (shipped by the 'arch' package) as a CSV "
                    "the trainer reads: log prices and the 13 bodies' ephemeris features.")
    parser.add_argument("--series", default="sp500", help=f"one of {sorted(SERIES)}")
    parser.add_argument("--out", required=True, type=Path, help="CSV file to write")
    parser.add_argument("--start", help="first date kept, YYYY-MM-DD (default: the first)")
    parser.add_argument("--end", help="last date kept, YYYY-MM-DD (default: the last)")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    """Write the CSV; returns the exit status (0 done, 2 bad input)."""
    args = parse_args(argv)
    try:
        span = select_span(load_series(args.series), args.start, args.end)
        table, num_dropped = drop_bad_rows(span)
        path = write_market_csv(table, args.out, SERIES[args.series])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"dropped {num_dropped} row(s) with a missing or non-positive price")
    print(f"wrote {path}: {len(table.dates)} trading days, {table.dates[0]} to {table.dates[-1]}")
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
