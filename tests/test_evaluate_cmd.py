"""The evaluate command: the same scores as the trainer's own test evaluation, on one process
with no process group, as JSON per target and horizon step with skill intervals; data that
changed since training, or a missing data file, refused with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from forecasting.evaluate import REPORT_SCORES, TABLE_COLUMNS, VAL_WARNING, run, table_cell
from tests.conftest import REPO
from tests.test_forecast import model_path, read_rows, saved_with, train_tiny, write_rows
from trainer import distributed
from trainer.test_windows import COLUMNS as WINDOW_COLUMNS

PRED_LEN = 12
TARGETS = ["Asset_A", "Asset_B", "Asset_C", "Asset_D"]


@pytest.fixture(scope="module")
def trainer(short_csv, tmp_path_factory):
    return train_tiny(short_csv, tmp_path_factory.mktemp("evaluate_model"), name="ev")


@pytest.fixture(scope="module")
def test_report(trainer, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate_out") / "report.json"
    assert run(["--checkpoint", str(model_path(trainer)), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def evaluate(capsys, *args) -> tuple[int, str, str]:
    status = run([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_scores_equal_the_trainers_own_test_scores(trainer, test_report):
    assert not distributed.is_distributed()          # one process, no process group
    expected = trainer.scored("test", with_effect=True)
    model, rw = test_report["forecasters"]["model"], test_report["forecasters"]["rw"]
    assert model["nll"] == pytest.approx(expected["nll"], abs=1e-9)
    assert rw["crps"] == pytest.approx(expected["rw_crps"], abs=1e-9)
    assert test_report["num_windows"] == expected["num_windows"]
    for baseline in ("rw", "ewma"):
        skill = test_report["skill"][baseline]
        assert [skill["mean"], skill["low"], skill["high"]] == pytest.approx(
            [expected[f"skill_{baseline}"], expected[f"skill_{baseline}_low"],
             expected[f"skill_{baseline}_high"]], abs=1e-9)
        assert (skill["shown"], skill["reason"]) == (expected[f"skill_{baseline}_shown"],
                                                     expected[f"skill_{baseline}_reason"])
    effect = test_report["celestial_effect"]
    assert [effect["mean"], effect["low"], effect["high"]] == pytest.approx(
        [expected["blank_all_rise"], expected["blank_all_rise_low"],
         expected["blank_all_rise_high"]], abs=1e-9)


def test_report_has_every_forecaster_per_target_and_horizon(test_report, short_csv):
    assert test_report["split"] == "test" and test_report["targets"] == TARGETS
    assert set(test_report["forecasters"]) == {"model", "rw", "ewma"}
    for forecaster in test_report["forecasters"].values():
        assert set(forecaster["per_target"]) == set(TARGETS)
        for target in TARGETS:
            by_horizon = forecaster["by_horizon"][target]
            assert set(by_horizon) == set(REPORT_SCORES)
            assert {"pinball_q05", "wql", "msis_90", "mase", "rmse", "crps_units"} <= \
                set(by_horizon)
            assert all(len(v) == PRED_LEN for v in by_horizon.values())
            # Spread grows with the horizon: the baselines' 12-step CRPS exceeds their 1-step.
            assert by_horizon["crps"][-1] > by_horizon["crps"][0]
    for baseline in ("rw", "ewma"):
        skill = test_report["skill"][baseline]
        assert skill["low"] <= skill["mean"] <= skill["high"]
    dates = [r[0] for r in read_rows(short_csv)[1]]
    assert test_report["last_date"] == dates[-1 - PRED_LEN]     # the last window's origin


@pytest.mark.slow
def test_validation_split_and_default_output(trainer, capsys):
    status, printed, _ = evaluate(capsys, "--checkpoint", model_path(trainer), "--split", "val")
    default_out = model_path(trainer).with_name("best_model_val_evaluation.json")
    assert status == 0 and f"wrote {default_out}" in printed
    assert "skill = model NLL - baseline NLL" in printed and "all bodies blanked" in printed
    assert printed.startswith(VAL_WARNING) and printed.count(VAL_WARNING) == 2
    report = json.loads(default_out.read_text())
    assert report["split"] == "val" and report["last_date"] < "2002-10-19"


@pytest.mark.slow
def test_calibration_and_paired_tests_in_report_and_table(trainer, test_report, tmp_path, capsys):
    cal = test_report["calibration_by_horizon"]
    model = test_report["forecasters"]["model"]
    assert cal["steps"] == list(range(1, PRED_LEN + 1))
    for p in (0, PRED_LEN - 1):
        assert cal["coverage_90"][p] == pytest.approx(
            sum(model["by_horizon"][t]["coverage_90"][p] for t in TARGETS) / len(TARGETS))
    tests = test_report["paired_tests"]
    assert set(tests["per_target"]) == set(TARGETS)
    for row in tests["per_target"].values():
        for key, d in row.items():
            assert key in {"rw_nll", "ewma_nll", "rw_crps", "ewma_crps"}
            assert d["dm_pvalue"] <= d["holm_pvalue"] <= 1
    overall = tests["overall"]["rw_nll"]
    assert overall["mean"] == pytest.approx(test_report["skill"]["rw"]["mean"], abs=1e-9)
    best = test_report["skill"]["best_baseline"]
    assert test_report["crps_skill"]["baseline"] == best
    assert test_report["crps_skill"]["mean"] == pytest.approx(
        model["crps"] - test_report["forecasters"][best]["crps"], abs=1e-9)
    status, printed, _ = evaluate(capsys, "--checkpoint", model_path(trainer), "--out",
                                  tmp_path / "r.json", "--windows", tmp_path / "w" / "win.csv")
    assert status == 0 and "DM p=" in printed and "Holm p=" in printed
    assert "per horizon step" in printed and VAL_WARNING not in printed
    header, rows = read_rows(tmp_path / "w" / "win.csv")
    assert tuple(header) == WINDOW_COLUMNS
    assert len(rows) == test_report["num_windows"] * (len(TARGETS) + 1)


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{test,val}" in text and "(default: test)" in text and "(default: cpu)" in text


def test_changed_data_is_refused(trainer, short_csv, tmp_path, capsys):
    header, rows = read_rows(short_csv)
    rows[10][header.index("Asset_B")] = str(float(rows[10][header.index("Asset_B")]) + 0.5)
    changed = write_rows(tmp_path / "changed.csv", header, rows)
    out = tmp_path / "out" / "report.json"
    status, _, err = evaluate(capsys, "--checkpoint", model_path(trainer), "--data", changed,
                              "--out", out)
    assert status == 2 and err.count("\n") == 1
    assert f"{changed}: the data file changed since training" in err and "'Asset_B'" in err
    assert not out.parent.exists()


def test_missing_data_and_bad_checkpoint(trainer, tmp_path, capsys):
    moved = saved_with(model_path(trainer), tmp_path / "moved.pth", data__source="csv",
                       data__path=str(tmp_path / "gone.csv"))
    status, _, err = evaluate(capsys, "--checkpoint", moved, "--out", tmp_path / "o" / "r.json")
    assert status == 2 and f"data file not found: {tmp_path / 'gone.csv'}" in err
    junk = tmp_path / "junk.pth"
    junk.write_text("not a model")
    status, _, err = evaluate(capsys, "--checkpoint", junk, "--out", tmp_path / "o" / "r.json")
    assert status == 2 and "not a consolidated model file" in err
    assert not (tmp_path / "o").exists()


def test_missing_data_file_is_refused_not_generated(trainer, tmp_path, capsys):
    """The model's data is built-in (a cache generated where data.path says); a `--data` typo
    must not become a new dataset at that path."""
    assert trainer.config.data.source == "builtin"
    typo = tmp_path / "nope.csv"
    status, _, err = evaluate(capsys, "--checkpoint", model_path(trainer), "--data", typo,
                              "--out", tmp_path / "o" / "r.json")
    assert status == 2 and err == f"error: data file not found: {typo}\n"
    assert not typo.exists() and not (tmp_path / "o").exists()


def test_json_has_no_nan_tokens():
    from trainer.run_log import json_safe
    assert json_safe({"skill": [0.1, float("nan")], "x": {"y": float("inf")}}) == \
        {"skill": [0.1, None], "x": {"y": None}}


@pytest.mark.slow
def test_cli_prints_table_and_refuses_bad_input_without_traceback(trainer, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(*args):
        return subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), *map(str, args)],
                              check=False, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    done = launch("--checkpoint", model_path(trainer), "--out", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "random walk (EWMA volatility)" in done.stdout and (tmp_path / "r.json").is_file()
    failed = launch("--checkpoint", tmp_path / "missing.pth")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr == f"error: checkpoint not found: {tmp_path / 'missing.pth'}\n"


def test_table_cells_stay_apart_when_a_value_fills_its_column():
    """A wQL of 0.0008084 fills its 9 characters: it must not run into the next column."""
    row = "".join(table_cell(v, w, spec) for v, (_, w, _, spec)
                  in zip([-1.5, 0.2, 0.01, 0.02, 0.03, 1.916, 0.0008084, 3.0, 0.5, 0.9],
                         TABLE_COLUMNS))
    assert len(row.split()) == len(TABLE_COLUMNS), row
    assert table_cell(1.5, 9, ".4f") == f"{1.5:>9.4f}"      # the usual case is unchanged
