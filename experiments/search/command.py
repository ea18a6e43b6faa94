"""`celestial-experiment --search FILE`: check the file, run (or continue) the study with
`--parallel` local workers, then retrain the best configuration and the start with every seed
and compare them on test (an ordinary experiment, `<name>-best-t<trial>`), and write the
report.

The folder `<log root>/experiments/<name>/` holds `search.yaml` (the search as run),
`study.journal` (the default storage), `trials/` (each trial's log and outcome), and at the end
`best_config.yaml`, `search.json` and `report.html`.
"""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from experiments.plan import experiment_dir
from experiments.runner import Slot
from experiments.search.driver import RUN_ATTR, run_search, runs_counted
from experiments.search.spec import START, SearchSpec, load_search
from experiments.search.study import address, open_study
from trainer.config import load_config
from trainer.errors import UserError
from trainer.run_log import replace_text

SPEC_FILE = "search.yaml"


def search_folder(spec: SearchSpec) -> Path:
    return experiment_dir(spec.final_experiment({})).parent / spec.name


def log_root(spec: SearchSpec) -> Path:
    return Path(spec.final_experiment({}).trial_config(START, spec.search_seed).train.log_root)


def claim_search_folder(spec: SearchSpec, folder: Path) -> None:
    """Write search.yaml; an existing folder must hold the same search (then it continues)."""
    path = folder / SPEC_FILE
    if path.is_file():
        if _without_budget(load_search(path)) != _without_budget(spec):
            raise UserError(f"{folder} holds another search named {spec.name!r} (its "
                            f"{SPEC_FILE} differs in more than search.n_trials): choose "
                            f"another name")
        replace_text(path, spec.to_yaml())     # a new budget continues the same study
        return
    if (folder / "experiment.yaml").is_file():
        raise UserError(f"{folder} holds an experiment named {spec.name!r}: choose another name")
    folder.mkdir(parents=True, exist_ok=True)
    replace_text(path, spec.to_yaml())


def _without_budget(spec: SearchSpec) -> dict:
    data = spec.to_dict()
    data["search"].pop("n_trials")
    return data


def describe(spec: SearchSpec, folder: Path) -> list[str]:
    storage = spec.storage or f"journal file {folder / 'study.journal'}"
    return [f"search {spec.name}: {spec.n_trials} trials, sampler {spec.sampler}, pruner "
            f"{spec.pruner}, minimising validation {spec.val_score} of the kept weights "
            f"(seed {spec.search_seed}); storage: {storage}",
            *(f"  {p.describe()}" for p in spec.parameters),
            f"then: the best and the start retrained with seeds {spec.seeds}, compared on test "
            f"{spec.test_score} (the test split is not used for choosing)"]


def print_plan(spec: SearchSpec, folder: Path) -> None:
    for line in describe(spec, folder):
        print(line)
    print(f"folder: {folder}")


def run_trials_of_search(spec: SearchSpec, slots: list[Slot], ranks: int) -> optuna.Study:
    """Run (or continue) the study until it holds n_trials runs."""
    folder = search_folder(spec)
    claim_search_folder(spec, folder)
    where = address(spec, folder)
    study = open_study(spec, where)
    started, _ = runs_counted(study)
    for line in describe(spec, folder):
        print(line)
    print(f"{started} of {spec.n_trials} trials started before; {len(slots)} worker(s)")
    run_search(spec, study, where, folder, log_root(spec), slots, ranks)
    return study


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return min(done, key=lambda t: t.value) if done else None


def write_best_config(spec: SearchSpec, best: optuna.trial.FrozenTrial, folder: Path) -> Path:
    """The base config with the overrides and the best trial's parameters, ready to train."""
    config = load_config(spec.base_config, [*spec.overrides.items(), *best.params.items()])
    path = folder / "best_config.yaml"
    path.write_text(f"# search {spec.name}: trial {best.number} (run "
                    f"{best.user_attrs.get(RUN_ATTR)}), validation {spec.val_score} "
                    f"{best.value:.6g}, chosen on the validation split only\n"
                    + config.to_yaml())
    return path
