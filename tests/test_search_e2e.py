"""Search with real trainings of a tiny config: a trial pruned by the median pruner at its first
validation (a clean exit 76, no checkpoint, no test), and a whole search with two workers, its
final test comparison and its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest

from experiments.search.study import TRIAL_ENV, StudyAddress, make_pruner, make_storage
from tests.conftest import REPO, as_cli_args, small_overrides
from trainer.observer import EXIT_PRUNED

pytestmark = pytest.mark.slow


def tiny_overrides(short_csv, tmp_path, name: str) -> list[tuple[str, object]]:
    return [*small_overrides(short_csv, tmp_path, name), ("train.max_steps", 6),
            ("train.eval_interval", 2), ("checkpoint.interval", 2),
            ("train.validate_at_start", False)]


def test_a_pruned_trial_stops_at_its_validation_without_checkpoint_or_test(short_csv, tmp_path):
    where = StudyAddress("prune", str(tmp_path / "study.journal"), "median", "nll")
    study = optuna.create_study(study_name=where.study, storage=make_storage(where.storage),
                                pruner=make_pruner(where.pruner))
    distribution = optuna.distributions.FloatDistribution(0.0, 1.0)
    for _ in range(5):      # finished trials far better at every step: the median prunes
        study.add_trial(optuna.trial.create_trial(
            params={"x": 0.5}, distributions={"x": distribution}, value=-1e9,
            intermediate_values=dict.fromkeys(range(1, 7), -1e9)))
    trial = study.ask()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           TRIAL_ENV: where.for_trial(trial.number).to_env()}
    done = subprocess.run([sys.executable, str(REPO / "launch/search_trial.py"),
                           *as_cli_args(tiny_overrides(short_csv, tmp_path, "pruned"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_PRUNED, done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "logs" / "pruned" / "metrics.jsonl")
             .read_text().splitlines()]
    kinds = [x["kind"] for x in lines]
    assert "test" not in kinds and "checkpoint" not in kinds and kinds[-1] == "pruned"
    assert lines[-1]["step"] == 2
    val = next(x for x in lines if x["kind"] == "val")
    reported = study.get_trials()[-1]
    assert reported.intermediate_values == {2: pytest.approx(val["nll"])}
    checkpoints = tmp_path / "checkpoints" / "pruned"
    assert not list(checkpoints.glob("checkpoint_step_*"))
    assert not (checkpoints / "final_model.pth").exists()
