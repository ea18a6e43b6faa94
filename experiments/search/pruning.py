"""The observer that reports a search trial's validations to its Optuna trial and asks the run
to stop when the pruner says so. It runs inside the trial's training process (launched by
launch/search_trial.py); only rank 0 talks to the study, the stop is agreed by all ranks."""
from __future__ import annotations

import logging
import math

from experiments.search.study import StudyAddress, load_trial
from trainer.observer import Observer, RunContext

log = logging.getLogger(__name__)


class PruningObserver(Observer):
    def __init__(self, where: StudyAddress) -> None:
        self.where, self.score = where, where.score
        self.trial = None
        self.prune = False

    def on_start(self, run: RunContext) -> None:
        if run.is_main:
            self.trial = load_trial(self.where)

    def on_validation(self, step: int, metrics: dict, evaluate_fn) -> None:
        value = metrics.get(self.score)
        if self.trial is None or step == 0 or value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step)
        self.prune = self.trial.should_prune()
        if self.prune:
            log.info("search trial %d pruned at step %d (validation %s %.4f)",
                     self.where.trial_number, step, self.score, value)

    def asks_to_stop(self) -> bool:
        return self.prune


def search_observers() -> list[Observer]:
    """The pruning observer of the trial named by the environment (none outside a search)."""
    where = StudyAddress.from_env()
    return [] if where is None or where.pruner == "none" else [PruningObserver(where)]
