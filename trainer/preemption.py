"""Stop and save requests from signals, acted on at a step boundary by all ranks together.

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ask the run to checkpoint and stop; a second Ctrl-C stops
at once, without a checkpoint (under torchrun the agent forwards the terminal's Ctrl-C, so each
worker gets it twice: there the agent's shutdown timeout is what stops at once). Only SIGUSR1
(what a job asks Slurm to send ahead of its time limit, `--signal=B:USR1@<s>`) also requeues
the Slurm job: SIGTERM is what `scancel` sends, and a cancelled job must stay cancelled (under
preemption with PreemptMode=REQUEUE, Slurm requeues the job itself); SIGINT is a person's stop,
not requeued either. The last stop signal decides: USR1 then TERM is a cancel. SIGUSR2 asks
for a checkpoint now and training goes on. The handlers only set flags: saving inside a
handler can deadlock, and a rank that stops alone would leave the others waiting in a
collective.

The CLI installs the handlers when the process starts (`listen()`), so a signal during data
preparation, model build or resume is remembered, not fatal; the trainer acts on it at its
first safe point, agreed by all ranks.
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
    """What the signals received so far ask for (flags, read at safe points)."""

    def __init__(self) -> None:
        self.stop_signal: int | None = None
        self.requeue = False
        self.save_now = False
        self._previous = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def cancel(self) -> bool:
        """The last stop signal was SIGTERM or SIGINT: the job must not be requeued."""
        return self.stop_signal in (signal.SIGTERM, signal.SIGINT)

    def install(self) -> StopRequests:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._on_stop)
        self._previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, self._on_save)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers and forget the requests."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.stop_signal, self.requeue, self.save_now = None, False, False

    def _on_stop(self, signum, frame) -> None:
        if (signum == signal.SIGINT and self.stop_signal == signal.SIGINT
                and "TORCHELASTIC_RUN_ID" not in os.environ):
            raise KeyboardInterrupt         # the second Ctrl-C: stop now
        self.stop_signal = signum
        # The last signal wins: SIGTERM after SIGUSR1 is scancel overriding a requeue.
        self.requeue = signum == signal.SIGUSR1

    def _on_save(self, signum, frame) -> None:
        self.save_now = True


_process_requests = StopRequests()


def process_requests() -> StopRequests:
    """The one StopRequests of this process (signal handlers are per process)."""
    return _process_requests


def listen() -> StopRequests:
    """Install the stop handlers now (at process start), with no request pending."""
    _process_requests.uninstall()
    return _process_requests.install()


# As a requeue takes effect Slurm sends SIGTERM to every process of the job, scontrol too, at
# times before it has read slurmctld's answer (seen on a 2-node job): it then died (-15) and a
# done requeue was logged as failed. Ignoring SIGTERM lets it report what happened.
_IGNORING_SIGTERM = ["/bin/sh", "-c", "trap '' TERM; exec \"$@\"", "sh"]


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
    result = subprocess.run([*_IGNORING_SIGTERM, "scontrol", "requeue", job_id],
                            check=False, capture_output=True, text=True)
    if result.returncode == 0:
        log.info("Slurm job %s requeued: it will resume from the newest checkpoint", job_id)
    else:
        log.warning("scontrol requeue %s failed (%s): resubmit with --resume auto", job_id,
                    result.stderr.strip() or result.returncode)
