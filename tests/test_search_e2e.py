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
import yaml

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


def test_a_search_with_two_workers_chooses_on_validation_and_compares_on_test(short_csv,
                                                                               tmp_path):
    overrides = dict(tiny_overrides(short_csv, tmp_path, "unused"))
    for key in ("train.experiment_name", "train.progress_bar"):
        overrides.pop(key)
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({
        "name": "tiny", "base_config": str(REPO / "configs/quickstart_cpu.yaml"),
        "overrides": overrides, "seeds": [1, 2],
        "search": {"parameters": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2,
                                               "log": True},
                                  "model.dropout": {"type": "categorical",
                                                    "choices": [0.0, 0.2]}},
                   "n_trials": 3, "sampler": "random", "sampler_seed": 0}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "launch/experiment.py"), "--search",
                           str(search), "--parallel", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert "search tiny: 3 trials, sampler random" in out, out + done.stderr[-3000:]
    folder = tmp_path / "logs" / "experiments" / "tiny"
    study = optuna.load_study(study_name="tiny",
                              storage=make_storage(str(folder / "study.journal")))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    best = min(trials, key=lambda t: t.value)
    for t in trials:     # each value: the validation NLL of the weights the run kept
        lines = [json.loads(x) for x in (tmp_path / "logs" / t.user_attrs["run"] /
                                         "metrics.jsonl").read_text().splitlines()]
        assert t.value == pytest.approx([x for x in lines if x["kind"] == "val"][-1]["nll"])
    assert f"won (lowest validation nll of the kept weights, step 6): trial {best.number}" in out
    assert "retrained with seeds [1, 2]: best " in out and "not used for choosing" in out
    chosen = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert chosen["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
    assert chosen["model"]["dropout"] == best.params["model.dropout"]
    final_name = f"tiny-best-t{best.number:03d}"
    final = tmp_path / "logs" / "experiments" / final_name
    assert yaml.safe_load((final / "experiment.yaml").read_text())["variants"] == {
        "start": {}, "best": best.params}
    for variant in ("start", "best"):
        for seed in (1, 2):
            config = yaml.safe_load((tmp_path / "logs" / f"{final_name}__{variant}__s{seed}" /
                                     "config.yaml").read_text())
            assert config["train"]["seed"] == seed
    summary = json.loads((folder / "search.json").read_text())
    assert summary["test_used_for_choosing"] is False and summary["best"]["trial"] == best.number
    line = summary["final_comparison"]["line"]     # paired on the test windows of 2 seeds
    assert line.startswith(("best is better than start", "best is worse than start",
                            "best vs start: no difference shown on test")), line
    assert "2 seed(s) x " in line, line
    assert (folder / "report.html").read_text().count("data:image/png") >= 2

    again = subprocess.run([sys.executable, str(REPO / "launch/experiment.py"), "--search",
                            str(search)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert "3 of 3 trials started before" in again.stdout, again.stdout + again.stderr[-2000:]
    assert "  trial " not in again.stdout and len(optuna.load_study(
        study_name="tiny", storage=make_storage(str(folder / "study.journal"))).trials) == 3
