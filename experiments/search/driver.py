"""Run a search's trials on this machine, N at a time, each an ordinary training run on its own
cores (and GPU), as experiments' runner runs the trials of an experiment.

The loop asks the study for a trial whenever a slot is free and budget is left, starts it
(`launch/search_trial.py`, which reports each validation to the trial and exits 76 when pruned),
and tells the study how it ended: its validation score (of the weights it kept), PRUNED or FAIL.
Every worker of a study (other processes, Slurm tasks) does the same against the same storage;
the budget is `n_trials` distinct training runs in the study, so running the search again
continues it and runs only the trials that are left. A trial interrupted here (Ctrl-C, SIGTERM)
is marked failed and queued again with the same parameters and run folder: the next run resumes
it from its checkpoint. Each worker marks its running trials alive every HEARTBEAT_S; a RUNNING
trial silent for STALE_S (its worker killed outright, its node lost) is queued again likewise by
whichever worker notices first; a worker with nothing left to ask for waits until the other
workers' trials have ended, so that it can take such a trial over.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from experiments.compare import tested_val_line
from experiments.plan import REPO, Trial, read_metrics, train_command, trial_name
from experiments.runner import (
    POLL_S,
    Running,
    Slot,
    finish_trial,
    start_trial,
    stop_trial,
)
from experiments.search.spec import SearchSpec
from experiments.search.study import TRIAL_ENV, StudyAddress, suggest

SEARCH_TRIAL_SCRIPT = REPO / "launch" / "search_trial.py"
RUN_ATTR = "run"                 # user attribute: the trial's run name (kept by a retry)
ALIVE_ATTR = "alive_at"          # user attribute: when its worker last said it runs it
HEARTBEAT_S = 60.0
STALE_S = 600.0                  # silent this long: the worker is gone, the trial is re-queued
WAIT_S = 5.0                     # between looks at the study while waiting for other workers
ASK_GRACE_S = 30                 # a lock on asking held this long was left by a killed worker


@dataclass
class Job:
    running: Running
    optuna_trial: optuna.trial.Trial
    last_beat: float = 0.0


def search_trial(spec: SearchSpec, log_root: Path, number: int, params: dict,
                 run: str | None = None) -> Trial:
    """The training run of study trial `number` (a retry keeps the run of the trial it repeats)."""
    name = run or trial_name(spec.name, f"t{number:03d}", spec.search_seed)
    return Trial(name, f"t{number:03d}", spec.search_seed, log_root / name,
                 (*spec.overrides.items(), *params.items(), ("train.seed", spec.search_seed),
                  ("train.experiment_name", name)))


def runs_counted(study: optuna.Study) -> tuple[int, bool]:
    """(distinct training runs the study has started, whether a trial waits to be retried)."""
    trials = study.get_trials(deepcopy=False)
    runs = {t.user_attrs.get(RUN_ATTR, f"#{t.number}") for t in trials
            if t.state != TrialState.WAITING}
    return len(runs), any(t.state == TrialState.WAITING for t in trials)


def may_ask(study: optuna.Study, n_trials: int) -> bool:
    started, waiting = runs_counted(study)
    return waiting or started < n_trials


@contextmanager
def asking_alone(where: StudyAddress):
    """With the journal file, workers count the study's runs and ask for a trial one at a time
    (Optuna's own lock file beside the journal), so that together they start exactly n_trials.
    With a database, two workers asking at the same moment may start one trial too many."""
    if "://" in where.storage:
        yield
        return
    lock = optuna.storages.journal.JournalFileOpenLock(where.storage + ".ask",
                                                       grace_period=ASK_GRACE_S)
    lock.acquire()     # blocks until it holds the lock
    try:
        yield
    finally:
        lock.release()


def run_search(spec: SearchSpec, study: optuna.Study, where: StudyAddress, folder: Path,
               log_root: Path, slots: list[Slot], ranks: int = 1, announce=print) -> None:
    """Run trials until the study holds `n_trials` runs (or Ctrl-C, re-raised after the running
    trials were stopped and queued again)."""
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    free, jobs = list(slots), []
    try:
        while True:
            requeue_abandoned(study, announce)
            while free:
                with asking_alone(where):
                    if not may_ask(study, spec.n_trials):
                        break
                    jobs.append(start_next(spec, study, where, folder, log_root, free.pop(0),
                                           ranks, announce))
            if not jobs and not others_running(study):
                return
            beat(jobs)
            time.sleep(POLL_S if jobs else WAIT_S)
            for job in [j for j in jobs if j.running.process.poll() is not None]:
                jobs.remove(job)
                free.append(job.running.slot)
                tell(study, job, finish_trial(job.running, folder, announce), spec.val_score,
                     announce)
    except KeyboardInterrupt:
        for job in jobs:
            stop_trial(job.running, folder)
            requeue(study, job.optuna_trial.number)
        raise


def start_next(spec: SearchSpec, study: optuna.Study, where: StudyAddress, folder: Path,
               log_root: Path, slot: Slot, ranks: int, announce) -> Job:
    optuna_trial = study.ask()
    params = {p.key: suggest(optuna_trial, p) for p in spec.parameters}
    trial = search_trial(spec, log_root, optuna_trial.number, params,
                         optuna_trial.user_attrs.get(RUN_ATTR))
    optuna_trial.set_user_attr(RUN_ATTR, trial.name)
    announce(f"  trial {optuna_trial.number}: "
             + ", ".join(f"{k}={_short(v)}" for k, v in params.items()))
    command = train_command(spec, trial, ranks, script=SEARCH_TRIAL_SCRIPT)
    env = {TRIAL_ENV: where.for_trial(optuna_trial.number).to_env()}
    return Job(start_trial(trial, slot, command, folder, ranks, announce, env), optuna_trial)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def tell(study: optuna.Study, job: Job, record: dict, score: str, announce=print) -> None:
    """The study learns how the trial ended, unless another worker took it over meanwhile (this
    worker went silent for too long): the study keeps only the first end of a trial."""
    try:
        tell_outcome(study, job, record, score)
    except (ValueError, RuntimeError):
        announce(f"  trial {job.optuna_trial.number}: ended here after another worker had "
                 f"taken it over; the study keeps that worker's result")


def tell_outcome(study: optuna.Study, job: Job, record: dict, score: str) -> None:
    """Its validation score, PRUNED, or FAIL (with the reason)."""
    trial = job.optuna_trial
    if record["status"] == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return
    value, step = validation_score(job.running.trial, score)
    if record["status"] != "finished" or value is None:
        trial.set_user_attr("reason", record.get("reason") or "no validation score")
        study.tell(trial, state=TrialState.FAIL)
        return
    trial.set_user_attr("val_step", step)
    study.tell(trial, value)


def validation_score(trial: Trial, score: str) -> tuple[float | None, int | None]:
    """The validation score of the weights the run kept (restored best, else last), and the
    step of those weights; the test line of the run is never read here."""
    line = tested_val_line([x for x in read_metrics(trial.run_dir) if x.get("kind") == "val"])
    value = line.get(score)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, None
    return float(value), line.get("weights_step", line.get("step"))


def requeue(study: optuna.Study, number: int) -> bool:
    """An interrupted or abandoned trial: failed, and queued again with its parameters and run
    folder. False when another worker finished or re-queued it first (the study's storage
    refuses a second end of a trial, so only one worker queues it again)."""
    try:
        study.tell(number, state=TrialState.FAIL)
    except (ValueError, RuntimeError):
        return False
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    study.enqueue_trial(frozen.params, user_attrs={RUN_ATTR: frozen.user_attrs[RUN_ATTR]})
    return True


def others_running(study: optuna.Study) -> bool:
    """Trials other workers run: a worker with nothing left to ask for waits for them, to take
    over any whose worker goes silent, so that none is lost."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def requeue_abandoned(study: optuna.Study, announce=print) -> None:
    """RUNNING trials whose worker has not been heard of for STALE_S (killed outright, its node
    lost) are queued again."""
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        heard = trial.user_attrs.get(ALIVE_ATTR, trial.datetime_start.timestamp())
        if now - heard > STALE_S and RUN_ATTR in trial.user_attrs and requeue(study,
                                                                             trial.number):
            announce(f"  trial {trial.number}: its worker has been silent for "
                     f"{now - heard:.0f} s; queued again")


def beat(jobs: list[Job]) -> None:
    """Tell the study that this worker still runs these trials (every HEARTBEAT_S)."""
    now = time.time()
    for job in jobs:
        if now - job.last_beat >= HEARTBEAT_S:
            job.optuna_trial.set_user_attr(ALIVE_ATTR, now)
            job.last_beat = now
