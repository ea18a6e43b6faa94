"""The forecast command (its exact mixture quantiles are tested against sampling in
tests/test_scoring.py): forecast.csv in target units, future rows from
the CSV or the built-in ephemeris, --origins backtests, and every kind of bad input refused
with one line, exit status 2 and nothing written."""
from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from forecasting.forecast import COLUMNS, run
from tests.conftest import REPO, small_config
from trainer import distributed
from trainer.build import build_trainer
from trainer.observer import StepContext

PRED_LEN, SEQ_LEN = 12, 48     # tests/conftest.py small_overrides


def train_tiny(data_csv: Path, root: Path, name: str = "fc", steps: int = 15):
    """A small trainer after a few steps (seconds), its model saved as `best_model.pth`."""
    trainer = build_trainer(small_config(data_csv, root, name), distributed.init_distributed("cpu"))
    for step, batch in zip(range(1, steps + 1), trainer.data.train_loader):
        ctx = StepContext(step=step, epoch=0, clip_norm=trainer.config.optim.grad_clip_norm)
        trainer.train_step([batch], ctx)
    trainer.save_model_file("best_model.pth", {})
    return trainer


def model_path(trainer) -> Path:
    return trainer.checkpoints.folder / "best_model.pth"


@pytest.fixture(scope="module")
def model_file(short_csv, tmp_path_factory) -> Path:
    return model_path(train_tiny(short_csv, tmp_path_factory.mktemp("forecast_model")))


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def with_future_rows(short_csv: Path, path: Path, num_future: int = PRED_LEN, every_days: int = 1):
    """short_csv with its last `num_future` rows' targets blanked (and re-dated `every_days`
    apart after the last observed row, to show where target_date comes from)."""
    header, rows = read_rows(short_csv)
    rows = [list(r) for r in rows]
    last_observed = np.datetime64(rows[-num_future - 1][0])
    for k, row in enumerate(rows[-num_future:], start=1):
        row[1:5] = [""] * 4
        row[0] = str(last_observed + k * every_days)
    return write_rows(path, header, rows)


def saved_with(model_file: Path, out: Path, **config_changes) -> Path:
    """A copy of the model file as if trained with other `data`/`model` settings."""
    saved = torch.load(model_file, weights_only=True)
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        saved["config"][section][key] = value
    if config_changes.get("model__use_future_celestial") is False:
        saved["model"] = {k: v for k, v in saved["model"].items() if ".future_" not in k}
    torch.save(saved, out)
    return out


def forecast(capsys, *args) -> tuple[int, str, str]:
    status = run([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- forecasts ---------------------------------------------------------------------------------

def test_forecast_csv_columns_units_and_builtin_future_rows(model_file, short_csv, tmp_path,
                                                            capsys):
    out = tmp_path / "out"
    status, printed, _ = forecast(capsys, "--checkpoint", model_file, "--data", short_csv,
                                  "--out", out)
    assert status == 0 and "computed with the built-in ephemeris" in printed
    header, rows = read_rows(out / "forecast.csv")
    assert tuple(header) == COLUMNS and len(rows) == 4 * PRED_LEN
    assert (out / "forecast.png").stat().st_size > 10_000
    _, data_rows = read_rows(short_csv)
    last_date, last_values = data_rows[-1][0], [float(v) for v in data_rows[-1][1:5]]
    assert {r[0] for r in rows} == {last_date}
    assert [r[3] for r in rows[:PRED_LEN]] == \
        [str(np.datetime64(last_date) + h) for h in range(1, PRED_LEN + 1)]
    for r in rows:
        q = [float(v) for v in r[5:10]]
        assert q == sorted(q) and q[0] <= float(r[4]) <= q[4] and r[10] == ""
        if r[2] == "1":    # one day ahead, in log-price units: near the last value (daily vol 1.2%)
            level = last_values[["Asset_A", "Asset_B", "Asset_C", "Asset_D"].index(r[1])]
            assert abs(q[2] - level) < 0.05 and 0.005 < q[4] - q[0] < 0.2


@pytest.mark.slow
def test_baseline_quantiles_beside_the_models(model_file, short_csv, tmp_path, capsys):
    """Both baselines are random walks: their median is the origin's value, in target units,
    and their bands widen with the horizon."""
    status, _, _ = forecast(capsys, "--checkpoint", model_file, "--data", short_csv,
                            "--out", tmp_path / "out")
    header, rows = read_rows(tmp_path / "out" / "forecast.csv")
    _, data_rows = read_rows(short_csv)
    last = dict(zip(["Asset_A", "Asset_B", "Asset_C", "Asset_D"], map(float, data_rows[-1][1:5])))
    for baseline in ("rw", "ewma"):
        columns = [header.index(f"{baseline}_{q}") for q in ("q05", "q25", "q50", "q75", "q95")]
        for r in rows:
            q = [float(r[c]) for c in columns]
            assert q == sorted(q) and q[2] == pytest.approx(last[r[1]], rel=1e-6)
        width = {int(r[2]): float(r[columns[4]]) - float(r[columns[0]])
                 for r in rows if r[1] == "Asset_A"}
        assert width[PRED_LEN] > width[1] > 0


def test_builtin_future_rows_equal_the_datasets_own(model_file, short_csv, tmp_path):
    from forecasting.inputs import builtin_future_rows
    from forecasting.model_file import load_model_file
    loaded = load_model_file(model_file)
    header, rows = read_rows(short_csv)
    cut = len(rows) - 20
    dates, computed = builtin_future_rows(loaded, np.datetime64(rows[cut - 1][0]), PRED_LEN)
    assert [str(d) for d in dates] == [r[0] for r in rows[cut:cut + PRED_LEN]]
    index = [header.index(c) for c in loaded.spec.feature_names]
    stored = np.array([[float(r[i]) for i in index] for r in rows[cut:cut + PRED_LEN]])
    assert np.allclose(computed, stored, rtol=1e-6, atol=1e-6)    # the CSV keeps 8 digits


def test_data_defaults_to_the_training_file(model_file, short_csv, tmp_path, capsys):
    status, printed, _ = forecast(capsys, "--checkpoint", model_file, "--out", tmp_path / "o")
    last_date = read_rows(short_csv)[1][-1][0]
    assert status == 0 and f"forecast from {last_date} (origin)" in printed


def test_console_scripts_are_declared():
    import tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["celestial-forecast"] == "forecasting.forecast:main"
    assert scripts["celestial-evaluate"] == "forecasting.evaluate:main"


@pytest.mark.slow
def test_future_rows_give_target_dates_and_inputs(model_file, short_csv, tmp_path, capsys):
    future_csv = with_future_rows(short_csv, tmp_path / "future.csv", every_days=2)
    status, printed, _ = forecast(capsys, "--checkpoint", model_file, "--data", future_csv,
                                  "--out", tmp_path / "a")
    assert status == 0 and f"from the {PRED_LEN} future rows" in printed
    rows = read_rows(tmp_path / "a" / "forecast.csv")[1]
    _, data_rows = read_rows(future_csv)
    assert rows[0][0] == data_rows[-PRED_LEN - 1][0]                 # the last row with targets
    assert [r[3] for r in rows[:PRED_LEN]] == [r[0] for r in data_rows[-PRED_LEN:]]
    # The same celestial rows computed by the ephemeris give the same forecast.
    header, original = read_rows(short_csv)
    truncated = write_rows(tmp_path / "cut.csv", header, original[:-PRED_LEN])
    assert forecast(capsys, "--checkpoint", model_file, "--data", truncated,
                    "--out", tmp_path / "b")[0] == 0
    a = np.array([[float(v) for v in r[4:10]] for r in rows])
    b_rows = read_rows(tmp_path / "b" / "forecast.csv")[1]
    b = np.array([[float(v) for v in r[4:10]] for r in b_rows])
    assert np.allclose(a, b, atol=2e-3)   # the file's last row has a one-sided speed


@pytest.mark.parametrize("difference", [[], ["*_dist", "Moon_speed"]])
def test_forecast_inputs_equal_training_inputs(model_file, short_csv, tmp_path, difference):
    """Same file, same columns, differencing and scaling: the rows the model saw in training."""
    from forecasting.inputs import prepare_forecast_input
    from forecasting.model_file import load_model_file
    from series.dataset import prepare
    saved = torch.load(model_file, weights_only=True)
    saved["config"]["data"]["difference_columns"] = difference
    data_config = load_model_file(model_file).config.data
    data_config.difference_columns = difference
    prepared = prepare(data_config, SEQ_LEN, PRED_LEN)
    saved["scaling"] = prepared.scaling()
    torch.save(saved, tmp_path / "diff.pth")
    inputs = prepare_forecast_input(load_model_file(tmp_path / "diff.pth"), short_csv,
                                    allow_builtin=True)
    n = inputs.num_observed
    assert n == len(prepared.dates) and (inputs.dates[:n] == prepared.dates).all()
    assert len(inputs.dates) == n + PRED_LEN
    assert np.allclose(inputs.features_RF[:n], prepared.features_RF.numpy(), atol=1e-5)
    assert np.allclose(inputs.targets_OT, prepared.targets_RT.numpy(), atol=1e-5)


@pytest.mark.slow
def test_user_csv_model_needs_future_rows(model_file, short_csv, tmp_path, capsys):
    user_model = saved_with(model_file, tmp_path / "user.pth", data__source="csv")
    status, _, err = forecast(capsys, "--checkpoint", user_model, "--data", short_csv,
                              "--out", tmp_path / "out")
    assert status == 2 and f"has 0 such future row(s): add {PRED_LEN} row(s)" in err
    assert not (tmp_path / "out").exists()
    future_csv = with_future_rows(short_csv, tmp_path / "future.csv", num_future=5)
    status, _, err = forecast(capsys, "--checkpoint", user_model, "--data", future_csv,
                              "--out", tmp_path / "out")
    assert status == 2 and "has 5 such future row(s): add 7 row(s)" in err
    # A backtest needs no future rows: its origins stop where the file's rows do.
    status, printed, _ = forecast(capsys, "--checkpoint", user_model, "--data", short_csv,
                                  "--out", tmp_path / "bt", "--origins", "2")
    assert status == 0 and "backtest on 2 origin(s)" in printed
    rows = read_rows(tmp_path / "bt" / "forecast.csv")[1]
    dates = [r[0] for r in read_rows(short_csv)[1]]
    assert sorted({r[0] for r in rows}) == [dates[-1 - 2 * PRED_LEN], dates[-1 - PRED_LEN]]
    assert all(r[10] != "" for r in rows) and rows[-1][3] == dates[-1]
    status, _, err = forecast(capsys, "--checkpoint", user_model, "--data", short_csv,
                              "--out", tmp_path / "late", "--origins", dates[-3])
    assert status == 2 and "or backtest on earlier origins" in err


@pytest.mark.slow
def test_model_without_future_inputs_dates_by_typical_step(model_file, short_csv, tmp_path, capsys):
    no_future = saved_with(model_file, tmp_path / "nf.pth", data__source="csv",
                           model__use_future_celestial=False)
    header, rows = read_rows(short_csv)
    weekly = write_rows(tmp_path / "weekly.csv", header, rows[::7])
    status, printed, _ = forecast(capsys, "--checkpoint", no_future, "--data", weekly,
                                  "--out", tmp_path / "out")
    assert status == 0 and "typical date step, 7 day(s)" in printed
    out_rows = read_rows(tmp_path / "out" / "forecast.csv")[1]
    last = np.datetime64(rows[::7][-1][0])
    assert [r[3] for r in out_rows[:PRED_LEN]] == \
        [str(last + 7 * h) for h in range(1, PRED_LEN + 1)]


@pytest.mark.slow
def test_origins_backtest(model_file, short_csv, tmp_path, capsys):
    status, printed, _ = forecast(capsys, "--checkpoint", model_file, "--data", short_csv,
                                  "--out", tmp_path / "n", "--origins", "3")
    assert status == 0 and "backtest on 2 origin(s) with outcomes" in printed
    rows = read_rows(tmp_path / "n" / "forecast.csv")[1]
    _, data_rows = read_rows(short_csv)
    dates = [r[0] for r in data_rows]
    origins = sorted({r[0] for r in rows})
    assert origins == [dates[-1 - 2 * PRED_LEN], dates[-1 - PRED_LEN], dates[-1]]
    first = [r for r in rows if r[0] == origins[0] and r[1] == "Asset_B"]
    assert [float(r[10]) for r in first] == \
        [float(d[2]) for d in data_rows[-2 * PRED_LEN:-PRED_LEN]]     # outcomes, target units
    assert all(r[10] == "" for r in rows if r[0] == origins[-1])
    status, _, _ = forecast(capsys, "--checkpoint", model_file, "--data", short_csv,
                            "--out", tmp_path / "d", "--origins", f"{dates[500]},{dates[900]}")
    assert status == 0
    assert sorted({r[0] for r in read_rows(tmp_path / "d" / "forecast.csv")[1]}) == \
        [dates[500], dates[900]]


@pytest.mark.parametrize("origins, message", [
    ("1000", "history for at most"), ("0", "at least 1 origin"),
    ("1996-01-10", "the model looks back"),
    ("2099-01-01", "is not a row with targets"),
    ("soon", "--origins: 'soon' is not a full YYYY-MM-DD date (give a count or full dates)"),
    ("2003-06", "--origins: '2003-06' is not a full YYYY-MM-DD date"),
    ("2003-06-30T12:00", "is not a full YYYY-MM-DD date")])
def test_bad_origins(model_file, short_csv, tmp_path, capsys, origins, message):
    status, _, err = forecast(capsys, "--checkpoint", model_file, "--data", short_csv,
                              "--out", tmp_path / "out", "--origins", origins)
    assert status == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --- bad input ---------------------------------------------------------------------------------

def _edit_columns(short_csv: Path, path: Path, edit) -> Path:
    header, rows = read_rows(short_csv)
    header, rows = edit(list(header), [list(r) for r in rows])
    return write_rows(path, header, rows)


def _drop(name):
    def edit(header, rows):
        i = header.index(name)
        return header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in rows]
    return edit


def _rename(old, new):
    def edit(header, rows):
        header[header.index(old)] = new
        return header, rows
    return edit


def _add(name):
    return lambda header, rows: (header + [name], [r + ["0.5"] for r in rows])


def _set_cell(line, name, value):
    def edit(header, rows):
        rows[line - 2][header.index(name)] = value
        return header, rows
    return edit


BAD_CSVS = {
    "missing feature": (_drop("Mars_speed"), "body 'Mars'", "missing column(s) ['Mars_speed']"),
    "missing target": (_drop("Asset_C"), "missing target column(s) ['Asset_C']", ""),
    "extra column": (_add("Venus_phase"), "body 'Venus'", "unexpected column(s) ['Venus_phase']"),
    "renamed column": (_rename("Moon_lon_sin", "Moon_longitude_sin"), "body 'Moon'",
                       "['Moon_lon_sin']"),
    "other body grouping": (_rename("Moon_speed", "Sun_moon_speed"), "body 'Sun'",
                            "unexpected column(s) ['Sun_moon_speed']"),
    "renamed date column": (_rename("date", "Date"), "no 'date' column", ""),
    "too short": (lambda h, rows: (h, rows[:SEQ_LEN - 1]), "too short: 47 row(s)", "seq_len = 48"),
    "header only": (lambda h, rows: (h, []), "too short: 0 row(s)", ""),
    "nan feature": (_set_cell(100, "Venus_lat", "nan"), "column 'Venus_lat'", "at line 100"),
    "inf target": (_set_cell(200, "Asset_A", "inf"), "column 'Asset_A'", "at line 200"),
    "text value": (_set_cell(300, "Sun_speed", "n/a"), "column 'Sun_speed'", "line 300"),
    "empty target mid-file": (_set_cell(400, "Asset_D", ""), "column 'Asset_D' is empty",
                              "line 400"),
}


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_bad_csv_is_one_line_exit_2_nothing_written(model_file, short_csv, tmp_path, capsys, case):
    edit, *messages = BAD_CSVS[case]
    bad = _edit_columns(short_csv, tmp_path / "bad.csv", edit)
    status, printed, err = forecast(capsys, "--checkpoint", model_file, "--data", bad,
                                    "--out", tmp_path / "out")
    assert status == 2 and printed == ""
    assert err.startswith(f"error: {bad}") and err.count("\n") == 1, err
    assert all(m in err for m in messages), err
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this would create a file (the attack a weights-only load refuses)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(tmp_path: Path, model_file: Path) -> dict[str, tuple[Path, str]]:
    import torch.distributed.checkpoint as dcp
    dcp_folder = tmp_path / "checkpoint_step_000010"
    dcp.save({"w": torch.zeros(3)}, checkpoint_id=str(dcp_folder))
    random_file = tmp_path / "random.pth"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    crafted = tmp_path / "crafted.pth"
    with open(crafted, "wb") as f:
        pickle.dump({"model": _RunsCode(tmp_path / "pwned")}, f)
    crafted_zip = tmp_path / "crafted_zip.pth"
    torch.save({"model": _RunsCode(tmp_path / "pwned")}, crafted_zip)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(model_file.read_bytes()[:20_000])
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(2)}, plain)
    return {"dcp folder": (dcp_folder, "is a folder"),
            "model folder": (model_file.parent, "this folder holds best_model.pth"),
            "random bytes": (random_file, "not a consolidated model file"),
            "truncated model file": (truncated, "not a consolidated model file"),
            "crafted pickle": (crafted, "refused"),
            "crafted torch.save": (crafted_zip, "refused"),
            "other torch file": (plain, "no model, config, spec, scaling"),
            "missing file": (tmp_path / "nope.pth", "checkpoint not found")}


def test_bad_checkpoints_are_refused(model_file, short_csv, tmp_path, capsys):
    for case, (path, message) in _bad_checkpoints(tmp_path, model_file).items():
        status, _, err = forecast(capsys, "--checkpoint", path, "--data", short_csv,
                                  "--out", tmp_path / "out")
        assert status == 2 and message in err and str(path) in err, (case, err)
        assert err.count("\n") == 1, (case, err)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


# --- the command line --------------------------------------------------------------------------

def _launch(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "launch/forecast.py"), *map(str, args)],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_writes_forecast_and_refuses_bad_input_without_traceback(model_file, short_csv,
                                                                     tmp_path):
    done = _launch("--checkpoint", model_file, "--data", short_csv, "--out", tmp_path / "ok")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote" in done.stdout and (tmp_path / "ok" / "forecast.csv").is_file()
    bad = _edit_columns(short_csv, tmp_path / "bad.csv", _drop("Mars_speed"))
    failed = _launch("--checkpoint", model_file, "--data", bad, "--out", tmp_path / "no")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1
    assert not (tmp_path / "no").exists()
