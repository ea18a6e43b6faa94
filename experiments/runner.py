"""Run trials on this machine, N at a time, each on its own cores (and GPU, where there are).

Slot i of N takes the i-th contiguous share of the cores this process may use
(`os.sched_setaffinity` in the child before it starts, `OMP_NUM_THREADS` and `MKL_NUM_THREADS`
set to the share) and, on a machine with GPUs, GPU i mod G (`CUDA_VISIBLE_DEVICES`). A trial's
output goes to `trials/<trial>.log` in the experiment folder and its outcome to
`trials/<trial>.json`. A finished trial (its run scored the test split) is skipped; any other
is started with `--resume auto`, so an interrupted one continues from its checkpoint. A trial
that fails is recorded with its reason and the others go on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.plan import Trial
from trainer.observer import EXIT_PRUNED
from trainer.preemption import EXIT_PREEMPTED

POLL_S = 0.5


@dataclass(frozen=True)
class Slot:
    cores: tuple[int, ...]
    gpus: tuple[str, ...]

    def environment(self, ranks: int) -> dict[str, str]:
        threads = str(max(1, len(self.cores) // ranks))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in listed.split(",") if n.strip()] if listed else []
    return (names or [str(i) for i in range(count)])[:count]


def make_slots(parallel: int, cores: list[int], gpus: list[str]) -> list[Slot]:
    """`parallel` slots with disjoint, contiguous shares of the cores; GPUs round-robin (with
    more slots than GPUs, slots share them)."""
    if parallel > len(cores):
        raise ValueError(f"--parallel {parallel}: only {len(cores)} cores available")
    share, extra = divmod(len(cores), parallel)
    slots, start = [], 0
    for i in range(parallel):
        size = share + (i < extra)
        slots.append(Slot(tuple(cores[start:start + size]),
                          (gpus[i % len(gpus)],) if gpus else ()))
        start += size
    return slots


@dataclass
class Running:
    trial: Trial
    slot: Slot
    process: subprocess.Popen
    log_file: object
    started: float


def record_path(folder: Path, trial: Trial) -> Path:
    return folder / "trials" / f"{trial.name}.json"


def read_record(folder: Path, trial: Trial) -> dict:
    try:
        return json.loads(record_path(folder, trial).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_trials(trials: list[Trial], commands: dict[str, list[str]], folder: Path,
               slots: list[Slot], ranks: int = 1, announce=print) -> dict[str, dict]:
    """Run every unfinished trial; returns trial name -> record (status, reason, ...)."""
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    records = {t.name: _skip_record(folder, t) for t in trials if t.is_finished()}
    pending = [t for t in trials if t.name not in records]
    for name in records:
        announce(f"  {name}: finished before, skipped")
    free, running = list(slots), []
    try:
        while pending or running:
            while pending and free:
                trial = pending.pop(0)
                running.append(start_trial(trial, free.pop(0), commands[trial.name], folder,
                                           ranks, announce))
            time.sleep(POLL_S)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                free.append(job.slot)
                records[job.trial.name] = finish_trial(job, folder, announce)
    except KeyboardInterrupt:
        for job in running:
            records[job.trial.name] = stop_trial(job, folder)
        raise
    return records


def _skip_record(folder: Path, trial: Trial) -> dict:
    return {**read_record(folder, trial), "status": "finished", "reason": None}


def start_trial(trial: Trial, slot: Slot, command: list[str], folder: Path, ranks: int,
                announce, env: dict[str, str] | None = None) -> Running:
    """Start the trial's command on the slot's cores (and GPU), with `env` added."""
    log_file = open(folder / "trials" / f"{trial.name}.log", "a")  # noqa: SIM115 (closed on finish)
    resumed = trial.run_dir.exists()
    announce(f"  {trial.name}: {'resuming' if resumed else 'starting'} on cores "
             f"{_ranges(slot.cores)}" + (f", GPU {','.join(slot.gpus)}" if slot.gpus else ""))
    cores = set(slot.cores)
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                               env={**slot.environment(ranks), **(env or {})},
                               start_new_session=True,
                               preexec_fn=lambda: os.sched_setaffinity(0, cores))
    _write_record(folder, trial, {"status": "running", "command": command,
                                  "cores": list(slot.cores), "gpus": list(slot.gpus)})
    return Running(trial, slot, process, log_file, time.time())


def _ranges(cores: tuple[int, ...]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])


def finish_trial(job: Running, folder: Path, announce) -> dict:
    """Record how the trial ended: finished, pruned (by a search) or failed (and why)."""
    job.log_file.close()
    code = job.process.returncode
    finished = code == 0 and job.trial.is_finished()
    status = "finished" if finished else "pruned" if code == EXIT_PRUNED else "failed"
    record = {"status": status, "exit_status": code,
              "reason": None if status != "failed" else failure_reason(folder, job.trial, code),
              "seconds": round(time.time() - job.started, 1),
              "command": job.process.args, "cores": list(job.slot.cores),
              "gpus": list(job.slot.gpus)}
    _write_record(folder, job.trial, record)
    announce(f"  {job.trial.name}: {record['status']} in {record['seconds']:.0f} s"
             + (f" ({record['reason']})" if record["reason"] else ""))
    return record


def stop_trial(job: Running, folder: Path) -> dict:
    """Interrupted: the trial checkpoints on SIGTERM and resumes on the next run."""
    os.killpg(job.process.pid, signal.SIGTERM)
    try:
        job.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()
    job.log_file.close()
    record = {"status": "interrupted", "exit_status": job.process.returncode,
              "reason": "the experiment was interrupted; run it again to resume"}
    _write_record(folder, job.trial, record)
    return record


def failure_reason(folder: Path, trial: Trial, code: int | None) -> str:
    """The trial's own one-line `error: ...` if it printed one, else its exit status."""
    log = folder / "trials" / f"{trial.name}.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [x.strip() for x in lines if x.strip().startswith("error:")]
    if errors:
        return errors[-1]
    if code == 0:
        return "exited 0 without scoring the test split"
    if code == EXIT_PREEMPTED:
        return "stopped on a signal after a checkpoint (exit 75): run the experiment again"
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}" + (f": {lines[-1].strip()[:200]}" if lines else "")


def _write_record(folder: Path, trial: Trial, record: dict) -> None:
    record_path(folder, trial).write_text(json.dumps({"trial": trial.name, **record},
                                                     indent=2) + "\n")
