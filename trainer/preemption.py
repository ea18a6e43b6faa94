"""Stop and save requests from signals, acted on at a step boundary by all ranks together.

SIGTERM and SIGUSR1 ask the run to checkpoint and stop. Only SIGUSR1 (what a job asks Slurm to
send ahead of its time limit, `--signal=B:USR1@<s>`) also requeues the Slurm job: SIGTERM is
what `scancel` sends, and a cancelled job must stay cancelled (under preemption with
PreemptMode=REQUEUE, Slurm requeues the job itself). SIGUSR2 asks for a checkpoint now and
training goes on. The handlers only set flags: saving inside a handler can deadlock.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

log = logging.getLogger(__name__)

# Exit status after a requested stop with a complete checkpoint (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75


class StopRequests:
    def __init__(self) -> None:
        self.stop_signal: int | None = None
        self.requeue = False
        self.save_now = False
        self._previous = {}

    def install(self) -> "StopRequests":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._on_stop)
        self._previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, self._on_save)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_stop(self, signum, frame) -> None:
        self.stop_signal = signum
        self.requeue = self.requeue or signum == signal.SIGUSR1

    def _on_save(self, signum, frame) -> None:
        self.save_now = True


def requeue_slurm_job() -> None:
    """Ask Slurm to requeue this job, if it is one; say clearly when that cannot be done."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        log.info("not a Slurm job: resume later with --resume auto")
        return
    if shutil.which("scontrol") is None:
        log.warning("Slurm job %s: scontrol is not available here (e.g. inside a container), so "
                    "the job cannot requeue itself: resubmit it with --resume auto", job_id)
        return
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("Slurm job %s requeued: it will resume from the newest checkpoint", job_id)
    else:
        log.warning("scontrol requeue %s failed (%s): resubmit with --resume auto", job_id,
                    result.stderr.strip() or result.returncode)
