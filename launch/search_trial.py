"""One trial of a search (`celestial-experiment --search`): `launch/train.py` with one more
observer, which reports each validation to the trial's Optuna study and stops the run when the
pruner says so (exit status 76, no checkpoint). The study and trial come from the environment
(experiments/search/study.py, TRIAL_ENV)."""
from experiments.search.pruning import search_observers
from trainer.cli import main
from trainer.plugins import installed_observers


def observers(config):
    return [*installed_observers(config), *search_observers()]


if __name__ == "__main__":
    main(observers=observers)
