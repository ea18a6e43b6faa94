"""Real daily OHLC (shipped by the `arch` wheel) in the trainer's CSV schema, with the project's
own ephemeris features; and, slow, that path end to end: CSV -> training -> analysis."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from series.builtin import BuiltinDataConfig, write_builtin_csv
from series.dataset import DataConfig, prepare, read_table
from series.market import (
    TARGETS,
    PriceTable,
    drop_bad_rows,
    load_series,
    run,
    write_market_csv,
)
from tests.conftest import REPO, as_cli_args, run_cli, small_overrides
from trainer.errors import UserError


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def trading_days(start: str, num_weeks: int) -> np.ndarray:
    """Monday to Friday of `num_weeks` weeks from a Monday: gaps as on an exchange."""
    days = np.arange(np.datetime64(start), np.datetime64(start) + 7 * num_weeks)
    return days[(days.astype(np.int64) + 3) % 7 < 5]        # 1970-01-01 was a Thursday


def price_table(dates: np.ndarray, seed: int = 0) -> PriceTable:
    close = 100 * np.exp(np.cumsum(np.random.default_rng(seed).normal(0, 0.01, len(dates))))
    return PriceTable(dates, {"Open": close * 0.999, "High": close * 1.01, "Low": close * 0.99,
                              "Close": close})


def test_csv_has_the_trainers_schema_and_log_prices(tmp_path):
    table = price_table(trading_days("2010-01-04", 6))
    path = write_market_csv(table, tmp_path / "m.csv", "test")
    header = read_rows(path)[0]
    assert header[:5] == ["date", *TARGETS]
    read = read_table(path, "date")                          # the trainer's own reader accepts it
    assert (read.dates == table.dates).all() and (np.diff(read.dates).astype(int) > 0).all()
    for name in ("Open", "High", "Low", "Close"):
        np.testing.assert_allclose(read.columns[f"log_{name}"], np.log(table.prices[name]),
                                   rtol=1e-7)
    assert {"Moon_speed", "Ascendant_lon_sin", "North_Node_elong_cos"} <= set(read.columns)


def test_ephemeris_columns_equal_the_builtin_generators_for_the_same_dates(tmp_path):
    """Trading days skip weekends; speeds must still be per calendar day, as in the built-in
    dataset, and every value must be the built-in generator's for that date."""
    dates = trading_days("2012-03-05", 4)
    market = read_rows(write_market_csv(price_table(dates), tmp_path / "m.csv", "test"))
    builtin = read_rows(write_builtin_csv(
        BuiltinDataConfig(start_date=str(dates[0]), end_date=str(dates[-1])), tmp_path / "b.csv"))
    builtin_by_date = {row[0]: dict(zip(builtin[0], row)) for row in builtin[1:]}
    celestial = market[0][5:]
    assert celestial == builtin[0][5:]                       # same columns, same order
    for row in market[1:]:
        expected = builtin_by_date[row[0]]
        assert row[5:] == [expected[c] for c in celestial], row[0]


def test_rows_with_missing_or_non_positive_prices_are_dropped():
    table = price_table(trading_days("2010-01-04", 2))
    table.prices["Open"][1] = np.nan
    table.prices["Low"][3] = 0.0
    table.prices["Close"][4] = -5.0
    kept, num_dropped = drop_bad_rows(table)
    assert num_dropped == 3 and len(kept.dates) == len(table.dates) - 3
    assert not np.isin(table.dates[[1, 3, 4]], kept.dates).any()


def test_unsorted_dates_are_refused(tmp_path):
    table = price_table(trading_days("2010-01-04", 2))
    table.dates[[2, 3]] = table.dates[[3, 2]]
    with pytest.raises(UserError, match=r"test: dates do not strictly increase"):
        write_market_csv(table, tmp_path / "m.csv", "test")


def test_real_sp500_span_converts_and_prepares(tmp_path, capsys):
    """The S&P 500 series from the arch wheel: the CSV holds the logs of its prices, for its
    trading days, and the trainer prepares windows from it."""
    out = tmp_path / "sp500.csv"
    assert run(["--series", "sp500", "--out", str(out), "--start", "2017-01-01",
                "--end", "2018-12-31"]) == 0
    assert "dropped 0 row(s)" in capsys.readouterr().out
    source = load_series("sp500")
    span = ((source.dates >= np.datetime64("2017-01-01"))
            & (source.dates <= np.datetime64("2018-12-31")))
    read = read_table(out, "date")
    assert (read.dates == source.dates[span]).all() and len(read.dates) == 502
    np.testing.assert_allclose(read.columns["log_Close"], np.log(source.prices["Close"][span]),
                               rtol=1e-7)
    data = prepare(DataConfig(source="csv", path=str(out), targets=list(TARGETS)), 48, 12)
    assert data.spec.targets == TARGETS and len(data.spec.bodies) == 13


@pytest.mark.parametrize("argv, message", [
    (["--series", "ftse"], "--series: unknown series 'ftse'"),
    (["--start", "2020-01-01"], "--start/--end: no trading day from 2020-01-01"),
    (["--end", "1999-13-01"], "--end: '1999-13-01' is not a calendar date"),
    (["--end", "1999-12"], "--end: '1999-12' is not a full YYYY-MM-DD date"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "m.csv"
    assert run(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_missing_arch_package_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "arch.data.sp500", None)   # import now raises ImportError
    assert run(["--series", "sp500", "--out", str(tmp_path / "m.csv")]) == 2
    assert "needs the optional package 'arch'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_data_end_to_end(tmp_path):
    """Script -> CSV (2015-2018) -> a short training run through the CLI with
    configs/sp500_daily.yaml and a tiny model -> the analysis command."""
    csv_path = tmp_path / "sp500.csv"
    made = subprocess.run([sys.executable, "-m", "series.market", "--series", "sp500",
                           "--out", str(csv_path), "--start", "2015-01-01", "--end", "2018-12-31"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    overrides = small_overrides(csv_path, tmp_path, "sp500_e2e") + [
        ("data.source", "csv"), ("data.targets", list(TARGETS)), ("model.pred_len", 5),
        ("train.max_steps", 20), ("train.eval_interval", 10), ("train.log_interval", 10),
        ("checkpoint.interval", 20)]
    trained = run_cli(["--config", "configs/sp500_daily.yaml", *as_cli_args(overrides)],
                      timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    log_dir = tmp_path / "logs" / "sp500_e2e"
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    test = next(r for r in rows if r["kind"] == "test")
    assert {"skill", "skill_low", "skill_high", "ewma_nll", "blank_all_rise"} <= set(test)
    analyzed = subprocess.run([sys.executable, "launch/analyze.py", "--log_dir", str(log_dir)],
                              cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    findings = json.loads((log_dir / "analysis" / "recommendations.json").read_text())
    assert all({"issue", "severity", "evidence"} <= set(f) for f in findings)
