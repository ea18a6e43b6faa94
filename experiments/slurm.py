"""Trials as one Slurm job array: one task per unfinished trial, each run by
launch/slurm/experiment_array.sbatch with the project's batch-script logic (signals, checkpoint,
requeue). `--wait` polls the queue until the array has left it."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from experiments.plan import REPO, Trial
from experiments.spec import ExperimentSpec
from trainer.errors import UserError

ARRAY_SCRIPT = REPO / "launch" / "slurm" / "experiment_array.sbatch"
SEARCH_ARRAY_SCRIPT = REPO / "launch" / "slurm" / "search_array.sbatch"
TASKS_FILE = "slurm_tasks.tsv"
POLL_S = 5.0


def task_line(spec: ExperimentSpec, trial: Trial) -> str:
    """name, config, arguments: the batch script splits the arguments at spaces."""
    config = spec.trial_config(trial.variant, trial.seed)
    roots = [("train.log_root", str(Path(config.train.log_root).resolve())),
             ("checkpoint.root", str(Path(config.checkpoint.root).resolve()))]
    sets = [f"{key}={_compact(value)}" for key, value in [*trial.overrides, *roots]
            if key != "train.experiment_name"]
    for text in sets:
        if any(c.isspace() for c in text):
            raise UserError(f"--slurm: the override {text!r} holds white space, which the batch "
                            f"script cannot pass on")
    return "\t".join([trial.name, str(Path(spec.base_config).resolve()),
                      " ".join(["--set", "train.progress_bar=false", *sets])])


def _compact(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def submit_array(spec: ExperimentSpec, trials: list[Trial], folder: Path,
                 sbatch_args: str) -> str:
    """Write the task list and submit the array; returns the job id."""
    check_no_array_running(folder)
    tasks = folder / TASKS_FILE
    tasks.write_text("".join(task_line(spec, t) + "\n" for t in trials))
    (folder / "trials").mkdir(exist_ok=True)
    job_id = sbatch(ARRAY_SCRIPT, len(trials), folder, f"EXPERIMENT_TASKS={tasks}", sbatch_args)
    (folder / "slurm_job.json").write_text(json.dumps(
        {"job_id": job_id, "tasks": {str(i): t.name for i, t in enumerate(trials)}}, indent=2))
    return job_id


def submit_search_workers(search_file: Path, workers: int, folder: Path,
                          sbatch_args: str) -> str:
    """`workers` array tasks, each a worker of the search's study (`--search FILE --worker`);
    returns the job id."""
    check_no_array_running(folder)
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    job_id = sbatch(SEARCH_ARRAY_SCRIPT, workers, folder,
                    f"SEARCH_FILE={search_file.resolve()}", sbatch_args)
    (folder / "slurm_job.json").write_text(json.dumps({"job_id": job_id, "workers": workers}))
    return job_id


def sbatch(script: Path, num_tasks: int, folder: Path, export: str, sbatch_args: str) -> str:
    """Submit `script` as an array of `num_tasks` tasks; returns the job id."""
    exports = f"ALL,{export},PROJECT_DIR={REPO},VENV={sys.prefix}"
    command = ["sbatch", "--parsable", f"--array=0-{num_tasks - 1}",
               f"--output={folder}/trials/slurm-%A_%a.out", f"--export={exports}",
               *shlex.split(sbatch_args), str(script)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError("--slurm: sbatch not found (is this a Slurm login node?)") from None
    if done.returncode != 0:
        raise UserError(f"--slurm: sbatch failed: {' '.join(done.stderr.split())}")
    return done.stdout.strip().split(";")[0]


def in_queue(job_id: str) -> bool:
    """Whether a task of the array is pending or running (a requeued task is pending)."""
    queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], capture_output=True,
                           text=True, timeout=60)
    return queue.returncode == 0 and bool(queue.stdout.strip())


def check_no_array_running(folder: Path) -> None:
    """A second submission while the first array runs would start its trials twice."""
    path = folder / "slurm_job.json"
    if not path.is_file():
        return
    job_id = json.loads(path.read_text())["job_id"]
    if in_queue(job_id):
        raise UserError(f"{folder}: Slurm job array {job_id} of this experiment is still in the "
                        f"queue: wait for it (or scancel it) before submitting again")


def wait_for_array(job_id: str, announce=print) -> None:
    announce(f"waiting for Slurm job array {job_id} ...")
    while in_queue(job_id):
        time.sleep(POLL_S)
