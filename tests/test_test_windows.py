"""Per-window test scores from a real tiny training run: test_windows.csv beside metrics.jsonl,
consistent with the test line, and per-horizon calibration in every val and test line."""
from __future__ import annotations

import csv
import json

import jsonschema
import numpy as np
import pytest

from diagnostics.schemas import EVAL_LINE
from tests.conftest import as_cli_args, small_overrides
from trainer.cli import run
from trainer.test_windows import COLUMNS

PRED_LEN, NUM_TARGETS = 12, 4


@pytest.fixture(scope="module")
def run_folder(short_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("windows_run")
    argv = as_cli_args(small_overrides(short_csv, root, "w") +
                       [("train.max_steps", 12), ("train.eval_interval", 6),
                        ("data.window_stride", 2)])
    assert run(argv) == 0
    return root / "logs" / "w"


def lines(folder, kind):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_windows_file_matches_the_test_line(run_folder):
    test = lines(run_folder, "test")[-1]
    assert (test["pred_len"], test["window_stride"], test["windows_file"]) == \
        (PRED_LEN, 2, "test_windows.csv")
    with open(run_folder / test["windows_file"], newline="") as f:
        header, *rows = list(csv.reader(f))
    assert tuple(header) == COLUMNS
    assert len(rows) == test["num_windows"] * (NUM_TARGETS + 1)
    per_target = [r for r in rows if r[2] != "all"]
    every = [r for r in rows if r[2] == "all"]
    assert [int(r[0]) for r in every] == list(range(test["num_windows"]))
    assert [r[1] for r in every] == sorted(r[1] for r in every)     # origins in time order
    for column, key in [("model_nll", "nll"), ("random_walk_nll", "rw_nll"),
                        ("ewma_crps", "ewma_crps"), ("model_crps", "crps")]:
        i = COLUMNS.index(column)
        assert np.mean([float(r[i]) for r in per_target]) == pytest.approx(test[key], rel=1e-6)
        targets_mean = np.reshape([float(r[i]) for r in per_target], (-1, NUM_TARGETS)).mean(1)
        np.testing.assert_allclose([float(r[i]) for r in every], targets_mean, rtol=1e-6)


def test_every_val_and_test_line_has_calibration_by_horizon(run_folder):
    scored = lines(run_folder, "val") + lines(run_folder, "test")
    assert len(scored) >= 3
    for row in scored:
        jsonschema.validate(row, EVAL_LINE)
        assert {"rmse", "mase", "crps_units", "ewma_rmse"} <= set(row)
        assert not [k for k in row if k.endswith("squared_error")]     # only its root, rmse
        cal = row["calibration_by_horizon"]
        assert cal["steps"] == list(range(1, PRED_LEN + 1))
        assert all(len(cal[k]) == PRED_LEN for k in cal)
        assert all(sum(c) == row["num_windows"] * NUM_TARGETS for c in cal["pit_counts"])
        assert np.mean(cal["coverage_90"]) == pytest.approx(row["coverage_90"], rel=1e-9)
        assert np.mean(cal["coverage_50"]) == pytest.approx(row["coverage_50"], rel=1e-9)
        assert all(lo <= c <= hi for lo, c, hi in zip(cal["coverage_90_low"], cal["coverage_90"],
                                                      cal["coverage_90_high"]))


def test_per_horizon_lists_stay_out_of_tensorboard(run_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_folder / "tensorboard"))
    events.Reload()
    assert not [tag for tag in events.Tags()["scalars"] if "horizon" in tag or "pit" in tag]


def test_experiments_read_the_real_windows_file(run_folder):
    """The reader of tests/test_experiments.py's fabricated files reads a real run's file."""
    from experiments.compare import load_trial_scores
    from experiments.plan import Trial
    test = lines(run_folder, "test")[-1]
    scores = load_trial_scores(Trial("w", "control", 0, run_folder, ()))
    assert (scores.pred_len, scores.stride) == (PRED_LEN, 2)
    assert len(scores.origins["all"]) == test["num_windows"]
    assert scores.test_mean("nll") == pytest.approx(test["nll"], rel=1e-6)
    assert scores.test_mean("crps", "Asset_A") == pytest.approx(test["crps_per_target"][0],
                                                                rel=1e-6)
