"""`celestial-experiment` (launch/experiment.py): run an experiment, or report on one.

    celestial-experiment experiment.yaml [--parallel N] [--ranks-per-trial K] [--dry-run]
    celestial-experiment --from-analysis logs/<run> [--seeds 1 2 3 4 5] [--name NAME] ...
    celestial-experiment experiment.yaml --slurm [--sbatch "OPTIONS"] [--wait]
    celestial-experiment --report logs/experiments/<name>
    celestial-experiment --search search.yaml [--parallel N] [--dry-run]

Writes `<log root>/experiments/<name>/` (experiment.yaml, experiment.json, results.csv,
report.html, trials/) and prints the verdict first. Exit status: 0 every trial finished, 1 some
trial failed or is missing (the report says which), 2 bad input (one line, nothing started).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from experiments.compare import compare_variants, load_trial_scores, select_on_validation
from experiments.from_analysis import spec_from_analysis
from experiments.plan import Trial, build_trials, experiment_dir, train_command
from experiments.report import ExperimentResult, per_target_lines, verdict_lines, write_outputs
from experiments.runner import (
    failure_reason,
    make_slots,
    read_record,
    run_trials,
    visible_gpus,
)
from experiments.search.command import (
    best_trial,
    claim_search_folder,
    run_trials_of_search,
    search_folder,
    write_best_config,
)
from experiments.search.command import (
    print_plan as print_search_plan,
)
from experiments.search.report import search_summary_lines, write_search_report
from experiments.search.spec import SearchSpec, load_search
from experiments.slurm import submit_array, submit_search_workers, wait_for_array
from experiments.spec import ExperimentSpec, load_spec
from trainer.errors import UserError
from trainer.run_log import replace_text

SPEC_FILE = "experiment.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="celestial-experiment", description=(
        "Answer a question with many training runs compared on the same test windows."))
    parser.add_argument("experiment", nargs="?", type=Path, help="experiment YAML file")
    parser.add_argument("--from-analysis", type=Path, metavar="RUN",
                        help="test the advice of this run's analysis (logs/<run>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="seeds for --from-analysis (default 1 2 3 4 5: with fewer the "
                             "interval can be too narrow, see docs/experiments.md)")
    parser.add_argument("--name", help="experiment name for --from-analysis")
    parser.add_argument("--report", type=Path, metavar="FOLDER",
                        help="re-render the report of an experiment folder from its trials")
    parser.add_argument("--search", type=Path, metavar="FILE",
                        help="run (or continue) the hyperparameter search of this file")
    parser.add_argument("--worker", action="store_true",
                        help="with --search: only run trials, as one worker of the study (a "
                             "Slurm task does this); no final comparison")
    parser.add_argument("--parallel", type=int, default=1,
                        help="trials at a time (default 1); with --search --slurm: the number "
                             "of worker tasks")
    parser.add_argument("--ranks-per-trial", type=int, default=1,
                        help="run each trial as a torchrun of K ranks (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--slurm", action="store_true",
                        help="submit the unfinished trials as one Slurm job array")
    parser.add_argument("--sbatch", default="", metavar="ARGS",
                        help="more sbatch options for --slurm, e.g. \"--partition=gpu "
                             "--cpus-per-task=4 --time=2:00:00\"")
    parser.add_argument("--wait", action="store_true",
                        help="with --slurm: wait for the array, then report")
    args = parser.parse_args(argv)
    requests = (args.experiment, args.from_analysis, args.report, args.search)
    if sum(x is not None for x in requests) != 1:
        parser.error("give one of: an experiment file, --from-analysis logs/<run>, "
                     "--report logs/experiments/<name>, --search FILE")
    return args


def load_request(args: argparse.Namespace) -> ExperimentSpec:
    if args.report is not None:
        if not (args.report / SPEC_FILE).is_file():
            raise UserError(f"--report {args.report}: not an experiment folder (no {SPEC_FILE})")
        return load_spec(args.report / SPEC_FILE)
    if args.from_analysis is not None:
        spec, notes = spec_from_analysis(args.from_analysis, args.seeds, args.name)
        for note in notes:
            print(f"note: {note}")
        return spec
    return load_spec(args.experiment)


def check_resources(args: argparse.Namespace) -> list:
    cores = sorted(os.sched_getaffinity(0))
    if args.parallel < 1 or args.ranks_per_trial < 1:
        raise UserError("--parallel and --ranks-per-trial must be >= 1")
    if args.parallel * args.ranks_per_trial > len(cores):
        raise UserError(f"--parallel {args.parallel} x --ranks-per-trial {args.ranks_per_trial}"
                        f" needs {args.parallel * args.ranks_per_trial} cores, this process may "
                        f"use {len(cores)}")
    return make_slots(args.parallel, cores, visible_gpus())


def claim_folder(spec: ExperimentSpec, folder: Path) -> None:
    """Write experiment.yaml; an existing folder must hold the same experiment (then it
    continues), never another one under the same name."""
    path = folder / SPEC_FILE
    if path.is_file():
        existing = load_spec(path)
        if existing.to_dict() != spec.to_dict():
            raise UserError(f"{folder} holds another experiment named {spec.name!r} (its "
                            f"{SPEC_FILE} differs): choose another name")
        return
    folder.mkdir(parents=True, exist_ok=True)
    replace_text(path, spec.to_yaml())


def collect(spec: ExperimentSpec, trials: list[Trial], folder: Path,
            records: dict[str, dict] | None = None) -> ExperimentResult:
    records = {t.name: (records or {}).get(t.name) or read_record(folder, t) for t in trials}
    for trial in trials:
        if not trial.is_finished() and not records[trial.name].get("reason"):
            records[trial.name] = {**records[trial.name], "status": "not finished",
                                   "reason": unfinished_reason(folder, trial)}
    scores = []
    for trial in trials:
        if not trial.is_finished():
            continue
        try:
            scores.append(load_trial_scores(trial))
        except UserError as err:
            records[trial.name] = {"status": "unreadable", "reason": str(err)}
    comparisons = compare_variants(scores, spec.control, list(spec.variants), spec.score)
    return ExperimentResult(spec, trials, records, scores, comparisons,
                            select_on_validation(scores, spec.score))


def unfinished_reason(folder: Path, trial: Trial) -> str:
    if (folder / "trials" / f"{trial.name}.log").is_file():
        reason = failure_reason(folder, trial, None)
        return reason if reason.startswith("error:") else "not finished"
    return "not run"


def print_plan(spec: ExperimentSpec, trials: list[Trial], folder: Path, commands: dict) -> None:
    print(f"experiment {spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = "
          f"{len(trials)} trials, control {spec.control}, score test {spec.score}")
    print(f"folder: {folder}")
    for trial in trials:
        state = "finished" if trial.is_finished() else (
            "resume" if trial.run_dir.exists() else "new")
        print(f"  {trial.name} [{state}]: {' '.join(commands[trial.name])}")


def report(result: ExperimentResult, folder: Path) -> int:
    for line in verdict_lines(result):
        print(line)
    details = per_target_lines(result)
    if details:
        print("per target (test):")
        for line in details:
            print(f"  {line}")
    paths = write_outputs(result, folder)
    print(f"wrote {folder}/: {', '.join(p.name for p in paths)}")
    return 1 if result.missing() else 0


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.search is not None:
        return run_search_request(args)
    try:
        spec = load_request(args)
        slots = check_resources(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trials = build_trials(spec)
    folder = args.report or experiment_dir(spec)
    if args.report is not None:
        return report(collect(spec, trials, folder), folder)
    commands = {t.name: train_command(spec, t, args.ranks_per_trial) for t in trials}
    if args.dry_run:
        print_plan(spec, trials, folder, commands)
        return 0
    try:
        claim_folder(spec, folder)
        if args.slurm:
            return run_on_slurm(spec, trials, folder, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_locally(spec, trials, folder, commands, slots, args.ranks_per_trial)


def run_locally(spec: ExperimentSpec, trials: list[Trial], folder: Path, commands: dict,
                slots: list, ranks: int) -> int:
    print(f"experiment {spec.name}: {len(trials)} trials, {len(slots)} at a time, in {folder}")
    try:
        records = run_trials(trials, commands, folder, slots, ranks)
    except KeyboardInterrupt:
        print("interrupted: the running trials saved checkpoints; run the same command again "
              "to resume", file=sys.stderr)
        report(collect(spec, trials, folder), folder)
        return 130
    return report(collect(spec, trials, folder, records), folder)


def run_on_slurm(spec: ExperimentSpec, trials: list[Trial], folder: Path,
                 args: argparse.Namespace) -> int:
    """Submit the unfinished trials as one array; with --wait, report when it has finished."""
    pending = [t for t in trials if not t.is_finished()]
    if pending:
        job_id = submit_array(spec, pending, folder, args.sbatch)
        print(f"experiment {spec.name}: {len(pending)} trial(s) submitted as Slurm job array "
              f"{job_id} ({len(trials) - len(pending)} finished before), in {folder}")
        if not args.wait:
            print(f"collect with: celestial-experiment --report {folder}")
            return 0
        wait_for_array(job_id)
    return report(collect(spec, trials, folder), folder)


def run_search_request(args: argparse.Namespace) -> int:
    """Check the search file, run its trials, then the final test comparison and the report."""
    try:
        spec = load_search(args.search)
        if args.slurm:
            return search_on_slurm(spec, args)
        slots = check_resources(args)
        if args.dry_run:
            print_search_plan(spec, search_folder(spec))
            return 0
        with sigterm_as_interrupt():
            study = run_trials_of_search(spec, slots, args.ranks_per_trial)
        if args.worker:
            return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trials were stopped and queued again; run the same "
              "command to continue the search", file=sys.stderr)
        return 130
    try:
        return finish_search(spec, study, slots, args.ranks_per_trial)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (scancel, a time limit) stops a search worker as Ctrl-C does: its running trials
    checkpoint and are queued again for the next worker."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def search_on_slurm(spec: SearchSpec, args: argparse.Namespace) -> int:
    """Submit `--parallel` workers of the study as one array; with --wait, then the final
    comparison and the report here."""
    if args.parallel < 1:
        raise UserError("--parallel must be >= 1")
    folder = search_folder(spec)
    claim_search_folder(spec, folder)
    job_id = submit_search_workers(args.search, args.parallel, folder, args.sbatch)
    print(f"search {spec.name}: {args.parallel} worker(s) submitted as Slurm job array {job_id}"
          f", in {folder}")
    if not args.wait:
        print(f"when it has finished: celestial-experiment --search {args.search}")
        return 0
    wait_for_array(job_id)
    args.slurm, args.parallel = False, 1       # the final comparison, here
    return run_search_request(args)


def finish_search(spec: SearchSpec, study, slots: list, ranks: int) -> int:
    """The best trial (on validation) and the start, retrained with every seed and compared on
    test as an experiment; the search report."""
    folder, best = search_folder(spec), best_trial(study)
    result = None
    if best is not None:
        write_best_config(spec, best, folder)
        final = spec.final_experiment(best.params, best.number)
        final_folder = experiment_dir(final)
        claim_folder(final, final_folder)
        trials = build_trials(final)
        commands = {t.name: train_command(final, t, ranks) for t in trials}
        run_locally(final, trials, final_folder, commands, slots, ranks)
        result = collect(final, trials, final_folder)
    paths = write_search_report(spec, study, best, result, folder)
    for line in search_summary_lines(spec, study, best, result):
        print(line)
    print(f"wrote {folder}/: {', '.join(p.name for p in paths)}")
    return 0 if result is not None and not result.missing() else 1


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
