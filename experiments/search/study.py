"""The Optuna study of a search: its storage, sampler and pruner, opened the same way by every
worker (`--parallel`, Slurm tasks) and by each trial's training process.

Storage: by default Optuna's journal storage with a file backend, `study.journal` in the search
folder (no server; safe for workers of one machine and for workers that share only a file
system); or the database URL of `search.storage` (PostgreSQL for clusters). A trial's training
process learns where the study is and which trial it runs from `TRIAL_ENV`, a JSON object.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:     # a trial's process imports this module: it stays light (no torch)
    from experiments.search.spec import Parameter, SearchSpec

JOURNAL = "study.journal"
TRIAL_ENV = "CELESTIAL_SEARCH_TRIAL"
MEDIAN_STARTUP_TRIALS = 5     # trials finished before the median pruner prunes anything


@dataclass(frozen=True)
class StudyAddress:
    """Where a study is and how trials are pruned: all a trial's process needs to report."""

    study: str
    storage: str               # a database URL, or the journal file's path
    pruner: str
    score: str                 # the validation score the trials report and minimise
    trial_number: int | None = None

    def for_trial(self, number: int) -> StudyAddress:
        return replace(self, trial_number=number)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> StudyAddress | None:
        text = os.environ.get(TRIAL_ENV)
        return cls(**json.loads(text)) if text else None


def address(spec: SearchSpec, folder: Path) -> StudyAddress:
    return StudyAddress(spec.name, spec.storage or str((folder / JOURNAL).resolve()),
                        spec.pruner, spec.val_score)


def make_storage(where: str) -> optuna.storages.BaseStorage:
    if "://" in where:
        return optuna.storages.RDBStorage(where)
    backend = optuna.storages.journal.JournalFileBackend(where)
    return optuna.storages.JournalStorage(backend)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS)
    return optuna.pruners.NopPruner()


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    seed = spec.sampler_seed
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(spec: SearchSpec, where: StudyAddress) -> optuna.Study:
    """The search's study, created on first use, else continued (the same name and storage)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=where.study, storage=make_storage(where.storage),
                               sampler=make_sampler(spec), pruner=make_pruner(where.pruner),
                               direction="minimize", load_if_exists=True)


def load_trial(where: StudyAddress) -> optuna.trial.Trial:
    """In a trial's process: the running trial `where.trial_number`, to report to."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(where.storage)
    study = optuna.load_study(study_name=where.study, storage=storage,
                              pruner=make_pruner(where.pruner))
    study_id = storage.get_study_id_from_name(where.study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, where.trial_number)
    return optuna.trial.Trial(study, trial_id)


def suggest(trial: optuna.trial.Trial, parameter: Parameter):
    """The trial's value for one parameter (Optuna's suggest API)."""
    if parameter.kind == "categorical":
        return trial.suggest_categorical(parameter.key, list(parameter.choices))
    if parameter.kind == "int":
        return trial.suggest_int(parameter.key, parameter.low, parameter.high,
                                 step=parameter.step or 1, log=parameter.log)
    return trial.suggest_float(parameter.key, parameter.low, parameter.high,
                               step=parameter.step, log=parameter.log)
