"""Search (experiments/search): the search file's checks, the study's workers with stand-in
trial processes (parallel, pinned, pruned, failed, resumed, re-queued), the report. The runs
with real trainings are in tests/test_search_e2e.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from experiments import cli
from experiments.plan import build_trials
from experiments.runner import make_slots
from experiments.search import driver
from experiments.search.command import best_trial, claim_search_folder, search_folder
from experiments.search.spec import load_search
from experiments.search.study import address, open_study
from tests.postgres import postgres_database
from tests.processes import running, wait_until
from tests.test_experiments import (
    TARGETS,
    assert_opens_in_a_browser,
    fabricate_trial,
    fake_slurm,
    ma_noise,
    write_base_config,
)
from trainer.errors import UserError


def search_data(tmp_path: Path, **changes) -> dict:
    search = {"parameters": {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "model.d_model": {"type": "int", "low": 16, "high": 64, "step": 16},
        "optim.weight_decay": {"type": "categorical", "choices": [0.0, 0.01]}},
        "n_trials": 4, "sampler": "random", "sampler_seed": 0}
    search.update(changes.pop("search", {}))
    data = {"name": "s", "base_config": str(write_base_config(tmp_path)),
            "overrides": {"train.log_root": str(tmp_path / "logs"),
                          "checkpoint.root": str(tmp_path / "checkpoints")},
            "search": search, "seeds": [1, 2]}
    data.update(changes)
    return data


def write_search(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_data(tmp_path, **changes)))
    return path


def parameters(**entries) -> dict:
    return {"search": {"parameters": entries}}


FLOAT = {"type": "float", "low": 0.0, "high": 0.3}
BAD = [
    ({"variants": {}}, "unknown search file key variants"),
    ({"search": {"budget": 3}}, "unknown search key search.budget"),
    ({"search": {"n_trials": 0}}, "search.n_trials: expected at least 1"),
    ({"search": {"n_trials": "many"}}, "search.n_trials: expected int"),
    ({"search": {"sampler": "grid"}}, "search.sampler: 'grid' is not one of"),
    ({"search": {"pruner": "hyperband"}}, "search.pruner: 'hyperband' is not one of"),
    ({"search": {"score": "mse"}}, "search.score: 'mse' is not one of"),
    ({"search": {"storage": "study.db"}}, "search.storage: 'study.db' is not a database URL"),
    (parameters(), "search.parameters: name at least one config key"),
    (parameters(**{"optim.nope": FLOAT}), "search.parameters.optim.nope: unknown config key"),
    (parameters(**{"train.seed": FLOAT}), "search.parameters.train.seed: not searchable, set "
                                          "by the search"),
    (parameters(**{"model.seq_len": {"type": "int", "low": 8, "high": 64}}),
     "search.parameters.model.seq_len: not searchable, it would change the validation and test"),
    (parameters(**{"data.batch_size": {"type": "int", "low": 8.5, "high": 64}}),
     "search.parameters.data.batch_size.low: expected an integer, got 8.5"),
    (parameters(**{"model.dropout": {"type": "float", "low": 0.3, "high": 0.1}}),
     "search.parameters.model.dropout: low (0.3) must be below high (0.1)"),
    (parameters(**{"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}),
     "search.parameters.optim.lr: a log range needs low > 0"),
    (parameters(**{"model.dropout": {"type": "float", "low": 0.0, "high": 3.0}}),
     "search.parameters.model.dropout: 3.0 is refused by the config"),
    (parameters(**{"model.dropout": {"type": "uniform", "low": 0.0, "high": 0.3}}),
     "search.parameters.model.dropout.type: 'uniform' is not one of"),
    (parameters(**{"model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "q": 1}}),
     "search.parameters.model.dropout: unknown key q for type float"),
    (parameters(**{"model.d_model": FLOAT}),
     "search.parameters.model.d_model: not searchable as float: model.d_model is a int"),
    (parameters(**{"train.precision": FLOAT}), "not searchable as float: train.precision is a "
                                               "str setting (use type: categorical)"),
    (parameters(**{"train.precision": {"type": "categorical", "choices": ["fp32", "fp99"]}}),
     "search.parameters.train.precision: 'fp99' is refused by the config"),
    (parameters(**{"model.dropout": {"type": "categorical", "choices": []}}),
     "search.parameters.model.dropout.choices: expected a non-empty list"),
    ({"overrides": {"model.dropout": 0.1}, **parameters(**{"model.dropout": FLOAT})},
     "search.parameters.model.dropout: also set in overrides"),
    ({"seeds": [1, 1]}, "seeds: a seed is listed twice"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m[:40] for _, m in BAD])
def test_a_bad_search_file_is_one_line_naming_the_key(tmp_path, changes, message):
    data = search_data(tmp_path, **changes)
    if "search" in changes and "parameters" in changes["search"]:
        data["search"]["parameters"] = changes["search"]["parameters"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_search(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_command_refuses_a_bad_search_with_exit_2_and_starts_nothing(tmp_path, capsys):
    path = write_search(tmp_path, **parameters(**{"model.seq_len": FLOAT}))
    assert cli.run(["--search", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: search.parameters.model.seq_len")
    assert not (tmp_path / "logs").exists()


def test_dry_run_describes_the_search_and_writes_nothing(tmp_path, capsys):
    assert cli.run(["--search", str(write_search(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "search s: 4 trials, sampler random, pruner median, minimising validation nll" in out
    assert "optim.lr float in [0.0001, 0.1] (log)" in out
    assert "model.d_model int in [16, 64] (linear, step 16)" in out
    assert "the test split is not used for choosing" in out
    assert not (tmp_path / "logs").exists()


def test_a_folder_with_another_search_is_refused_a_larger_budget_continues(tmp_path):
    spec = load_search(write_search(tmp_path))
    claim_search_folder(spec, search_folder(spec))
    more = load_search(write_search(tmp_path, search={"n_trials": 8}))
    claim_search_folder(more, search_folder(more))
    other = load_search(write_search(tmp_path, search={"sampler": "tpe"}))
    with pytest.raises(UserError, match="holds another search named 's'"):
        claim_search_folder(other, search_folder(other))


# --- the workers, with stand-in trial processes ------------------------------------------------

FAKE_TRIAL = """
import json, math, os, sys, pathlib
from experiments.search.study import StudyAddress, load_trial
sets = dict(a.split("=", 1) for a in sys.argv if "=" in a and not a.startswith("-"))
run = pathlib.Path(sets["train.log_root"]) / sets["train.experiment_name"]
run.mkdir(parents=True, exist_ok=True)
where = StudyAddress.from_env()
lr = float(sets["optim.lr"])
(run / "where.json").write_text(json.dumps({"cores": sorted(os.sched_getaffinity(0)),
                                            "trial": where.trial_number, "lr": lr}))
trial = load_trial(where)
nll = (math.log10(lr) + 2.5) ** 2
trial.report(nll + 1.0, 3)
if lr > 0.05:
    sys.exit(76)
if lr < 2e-4:
    print("error: this stand-in refuses tiny learning rates"); sys.exit(2)
lines = [{"kind": "val", "step": 3, "nll": nll + 1.0}, {"kind": "val", "step": 6, "nll": nll},
         {"kind": "test", "step": 6, "nll": 0.0}]
(run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\\n" for x in lines))
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch) -> Path:
    script = tmp_path / "fake_search_trial.py"
    script.write_text(FAKE_TRIAL)
    monkeypatch.setattr(driver, "SEARCH_TRIAL_SCRIPT", script)
    return script


def run_study(path: Path, parallel: int = 2):
    spec = load_search(path)
    folder = search_folder(spec)
    claim_search_folder(spec, folder)
    where = address(spec, folder)
    study = open_study(spec, where)
    cores = sorted(os.sched_getaffinity(0))
    slots = make_slots(min(parallel, len(cores)), cores, [])
    seen: list[str] = []
    driver.run_search(spec, study, where, folder, Path(spec.overrides["train.log_root"]),
                      slots, announce=seen.append)
    return spec, study, seen


def test_workers_share_one_study_pinned_and_record_pruned_and_failed_trials(tmp_path, stand_in):
    path = write_search(tmp_path, search={"n_trials": 6})
    spec, study, seen = run_study(path)
    trials = study.get_trials()
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    states = {t.number: t.state for t in trials}
    for t in trials:
        lr = t.params["optim.lr"]
        expected = (optuna.trial.TrialState.PRUNED if lr > 0.05 else
                    optuna.trial.TrialState.FAIL if lr < 2e-4 else
                    optuna.trial.TrialState.COMPLETE)
        assert states[t.number] == expected, (t.number, lr)
        assert t.intermediate_values == {3: pytest.approx((_log10(lr) + 2.5) ** 2 + 1.0)}
        run = tmp_path / "logs" / f"s__t{t.number:03d}__s1"
        assert t.user_attrs["run"] == run.name
        where = json.loads((run / "where.json").read_text())
        assert where["trial"] == t.number and where["lr"] == pytest.approx(lr)
        record = json.loads((search_folder(spec) / "trials" / f"{run.name}.json").read_text())
        assert record["status"] == {"PRUNED": "pruned", "FAIL": "failed",
                                    "COMPLETE": "finished"}[states[t.number].name]
        if states[t.number] == optuna.trial.TrialState.COMPLETE:
            assert t.value == pytest.approx((_log10(lr) + 2.5) ** 2)   # the kept weights' val
            assert t.user_attrs["val_step"] == 6
    assert (search_folder(spec) / "study.journal").is_file()


def _log10(x: float) -> float:
    import math
    return math.log10(x)


@pytest.mark.slow
def test_running_the_search_again_runs_only_the_trials_left(tmp_path, stand_in):
    path = write_search(tmp_path, search={"n_trials": 2})
    _, study, _ = run_study(path, parallel=1)
    assert len(study.get_trials()) == 2
    _, study, seen = run_study(path, parallel=1)
    assert len(study.get_trials()) == 2 and not any("trial" in s for s in seen)
    _, study, seen = run_study(write_search(tmp_path, search={"n_trials": 3}), parallel=1)
    assert [t.number for t in study.get_trials()] == [0, 1, 2]
    assert sum(s.startswith("  trial 2:") for s in seen) == 1


def test_an_interrupted_trial_is_queued_again_with_its_parameters_and_run(tmp_path):
    spec = load_search(write_search(tmp_path, search={"n_trials": 2}))
    folder = search_folder(spec)
    claim_search_folder(spec, folder)
    study = open_study(spec, address(spec, folder))
    first = study.ask()
    params = {p.key: driver.suggest(first, p) for p in spec.parameters}
    first.set_user_attr(driver.RUN_ATTR, "s__t000__s1")
    assert driver.requeue(study, first.number)
    assert not driver.requeue(study, first.number)      # ended already: not queued twice
    assert driver.runs_counted(study) == (1, True)
    again = study.ask()
    assert {p.key: driver.suggest(again, p) for p in spec.parameters} == params
    assert again.user_attrs[driver.RUN_ATTR] == "s__t000__s1"
    trial = driver.search_trial(spec, tmp_path / "logs", again.number, params,
                                again.user_attrs[driver.RUN_ATTR])
    assert trial.name == "s__t000__s1"
    assert driver.may_ask(study, spec.n_trials)      # one run of two started


def test_the_trial_process_gets_the_standard_training_command(tmp_path):
    spec = load_search(write_search(tmp_path))
    trial = driver.search_trial(spec, tmp_path / "logs", 7, {"optim.lr": 0.01,
                                                            "model.d_model": 32})
    command = driver.train_command(spec, trial, script=driver.SEARCH_TRIAL_SCRIPT)
    assert command[:2] == [sys.executable, str(driver.SEARCH_TRIAL_SCRIPT)]
    assert "optim.lr=0.01" in command and "model.d_model=32" in command
    assert "train.seed=1" in command and "train.experiment_name=s__t007__s1" in command


# --- the end: the final comparison on test and the report ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("effect, outcome", [(-0.08, "best is better than start by 0.0"),
                                             (0.0, "best vs start: no difference shown on test")])
def test_the_best_is_compared_with_the_start_on_test_and_the_report_opens(tmp_path, stand_in,
                                                                          capsys, effect, outcome):
    spec, study, _ = run_study(write_search(tmp_path, seeds=[1, 2, 3, 4, 5],
                                            search={"n_trials": 6}))
    best = best_trial(study)
    final = spec.final_experiment(best.params, best.number)
    rng = np.random.default_rng(0)
    difficulty_N = ma_noise(rng, 300, 1.0)
    for trial in build_trials(final):        # the retrained runs, finished
        shift = effect if trial.variant == "best" else 0.0
        noise_NT = np.stack([ma_noise(rng, 300, 0.05) for _ in TARGETS], 1)
        fabricate_trial(trial, difficulty_N[:, None] + noise_NT + shift, val_nll=-2 + shift)
    slots = make_slots(1, sorted(os.sched_getaffinity(0)), [])
    assert cli.finish_search(spec, study, slots, 1) == 0
    out = capsys.readouterr().out.splitlines()
    summary = out[out.index(next(x for x in out if x.startswith("searched "))):]
    assert summary[0].startswith("searched model.d_model, optim.lr, optim.weight_decay over 6 "
                                 "trials")
    assert summary[1].startswith(f"won (lowest validation nll of the kept weights, step 6): "
                                 f"trial {best.number}, {best.value:.4f}")
    assert summary[2].startswith(f"retrained with seeds [1, 2, 3, 4, 5]: {outcome}")
    assert summary[2].count("best vs start") <= 1
    assert "test nll, 5 seed(s) x 300 windows" in summary[2]
    assert summary[3].startswith("The test split was not used for choosing")
    folder = search_folder(spec)
    chosen = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert chosen["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
    assert chosen["model"]["d_model"] == best.params["model.d_model"]
    data = json.loads((folder / "search.json").read_text())
    assert data["test_used_for_choosing"] is False and data["splits"]["trials"] == "validation"
    assert set(data["importances"]) == {p.key for p in spec.parameters}
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png") == 3 and "https://" not in html
    assert_opens_in_a_browser(folder / "report.html", tmp_path, "The test split was not used")


@pytest.mark.slow
def test_workers_share_a_study_in_a_postgresql_database(tmp_path, stand_in):
    with postgres_database("search") as url:
        path = write_search(tmp_path, search={"n_trials": 4, "storage": url})
        spec, study, _ = run_study(path, parallel=2)
        trials = study.get_trials()
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]
        runs = [t.user_attrs["run"] for t in trials]
        assert len(set(runs)) == 4           # no trial run twice
        seen = [json.loads((tmp_path / "logs" / run / "where.json").read_text())["trial"]
                for run in runs]
        assert sorted(seen) == [0, 1, 2, 3]
        assert not (search_folder(spec) / "study.journal").exists()


# --- workers on Slurm, and a worker stopped mid-trial --------------------------------------------

def test_slurm_submits_workers_of_the_study_as_one_array(tmp_path, monkeypatch, capsys):
    calls, queued = fake_slurm(tmp_path, monkeypatch)
    path = write_search(tmp_path)
    assert cli.run(["--search", str(path), "--slurm", "--parallel", "3",
                    "--sbatch=--partition=cpu"]) == 0
    assert "3 worker(s) submitted as Slurm job array 77" in capsys.readouterr().out
    sbatch = calls.read_text().splitlines()[-1]
    assert "--array=0-2" in sbatch and "--partition=cpu" in sbatch
    assert f"SEARCH_FILE={path.resolve()}" in sbatch
    assert sbatch.endswith("launch/slurm/search_array.sbatch")
    queued.touch()
    assert cli.run(["--search", str(path), "--slurm"]) == 2
    assert "still in the queue" in capsys.readouterr().err


SLOW_STAND_IN = """
import pathlib, sys, time
sets = dict(a.split("=", 1) for a in sys.argv if "=" in a and not a.startswith("-"))
run = pathlib.Path(sets["train.log_root"]) / sets["train.experiment_name"]
run.mkdir(parents=True, exist_ok=True)
with open(run / "starts.txt", "a") as f:
    f.write("start\\n")
if len((run / "starts.txt").read_text().split()) == 1:
    time.sleep(60)
(run / "metrics.jsonl").write_text('{"kind": "val", "step": 2, "nll": 1.5}\\n'
                                   '{"kind": "test", "step": 2, "nll": 0.0}\\n')
"""
WORKER = """
import sys
from experiments import cli
from experiments.search import driver
driver.SEARCH_TRIAL_SCRIPT = sys.argv[1]
sys.exit(cli.run(["--search", sys.argv[2], "--worker"]))
"""


@pytest.mark.slow
def test_a_worker_stopped_mid_trial_queues_it_again_and_the_next_worker_finishes_it(tmp_path):
    script = tmp_path / "slow_trial.py"
    script.write_text(SLOW_STAND_IN)
    path = write_search(tmp_path, search={"n_trials": 1})
    command = [sys.executable, "-c", WORKER, str(script), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    run = tmp_path / "logs" / "s__t000__s1"
    wait_until((run / "starts.txt").exists, "the trial's start", timeout=120,
               alive=running(worker), output=lambda: "".join(worker.communicate()), interval=0.2)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 130 and "queued again" in err, out + err
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    spec = load_search(path)
    study = open_study(spec, address(spec, search_folder(spec)))
    states = [(t.number, t.state.name, t.user_attrs["run"]) for t in study.get_trials()]
    assert states == [(0, "FAIL", run.name), (1, "COMPLETE", run.name)]
    assert (run / "starts.txt").read_text().split() == ["start", "start"]
    assert driver.runs_counted(study) == (1, False)


@pytest.mark.slow
def test_a_trial_whose_worker_went_silent_is_queued_again_one_still_heard_of_later(
        tmp_path, stand_in, monkeypatch):
    monkeypatch.setattr(driver, "STALE_S", 4.0)
    monkeypatch.setattr(driver, "WAIT_S", 0.2)
    path = write_search(tmp_path, search={"n_trials": 2,
                                          "parameters": {"optim.lr": {"type": "float",
                                                                      "low": 1e-3,
                                                                      "high": 1e-2}}})
    spec = load_search(path)
    folder = search_folder(spec)
    claim_search_folder(spec, folder)
    study = open_study(spec, address(spec, folder))
    for number, silent_s in ((0, 60.0), (1, 0.0)):     # killed long ago; heard of just now
        trial = study.ask()
        driver.suggest(trial, spec.parameters[0])
        trial.set_user_attr(driver.RUN_ATTR, f"s__t{number:03d}__s1")
        trial.set_user_attr(driver.ALIVE_ATTR, time.time() - silent_s)
    _, study, seen = run_study(path)
    states = [(t.number, t.state.name, t.user_attrs[driver.RUN_ATTR]) for t in study.get_trials()]
    assert states == [(0, "FAIL", "s__t000__s1"), (1, "FAIL", "s__t001__s1"),
                      (2, "COMPLETE", "s__t000__s1"), (3, "COMPLETE", "s__t001__s1")]
    trials = study.get_trials()
    assert trials[2].params == trials[0].params and trials[3].params == trials[1].params
    silent = [s.split(":")[0].strip() for s in seen if "its worker has been silent" in s]
    assert silent == ["trial 0", "trial 1"]       # trial 1 only once silent for STALE_S
    assert seen.index(next(s for s in seen if s.startswith("  trial 2:"))) < seen.index(
        next(s for s in seen if "trial 1: its worker" in s))
    assert driver.runs_counted(study) == (2, False)


def test_a_search_file_given_as_an_experiment_says_to_use_search(tmp_path, capsys):
    path = write_search(tmp_path)
    assert cli.run([str(path)]) == 2
    assert f"run it with celestial-experiment --search {path}" in capsys.readouterr().err


@pytest.mark.slow
def test_workers_asking_at_the_same_moment_start_exactly_n_trials(tmp_path, stand_in,
                                                                  monkeypatch):
    counted = driver.may_ask

    def slow_to_ask(study, n_trials):     # widen the moment between counting and asking
        answer = counted(study, n_trials)
        time.sleep(0.5)
        return answer

    monkeypatch.setattr(driver, "may_ask", slow_to_ask)
    path = write_search(tmp_path, search={"n_trials": 2})
    spec = load_search(path)
    claim_search_folder(spec, search_folder(spec))
    study = open_study(spec, address(spec, search_folder(spec)))
    failures = []

    def worker():
        try:
            run_study(path, 1)
        except Exception as err:     # reported by the assertion below
            failures.append(repr(err))

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    assert not failures and len(study.get_trials()) == 2


def test_a_worker_whose_trial_was_taken_over_does_not_overwrite_the_outcome(tmp_path):
    spec = load_search(write_search(tmp_path, search={"n_trials": 1}))
    folder = search_folder(spec)
    claim_search_folder(spec, folder)
    study = open_study(spec, address(spec, folder))
    trial = study.ask()
    trial.set_user_attr(driver.RUN_ATTR, "s__t000__s1")
    assert driver.requeue(study, trial.number)          # another worker took it over
    job = driver.Job(running=None, optuna_trial=trial)
    seen = []
    driver.tell(study, job, {"status": "pruned"}, "nll", announce=seen.append)
    assert study.get_trials()[0].state.name == "FAIL" and "taken it over" in seen[0]
