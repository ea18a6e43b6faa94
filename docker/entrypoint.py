"""The images' main process: torchrun, with the stop signals of `docker stop` passed to its
workers, and the status the workers exit with (75: stopped after a checkpoint) kept as the
container's exit status.
Takes torchrun's arguments:  python docker/entrypoint.py --standalone --nproc_per_node=2 ...

Why not torchrun itself as the main process: on SIGTERM torchrun kills its workers after a
30 s grace period (too short for a large checkpoint), and it exits 1 whatever the workers
returned, so `docker wait` could not tell a preempted run from a crash. SIGUSR1 would kill it
(or, as PID 1 without a handler, be dropped). Here torchrun runs in a thread of this process
(its agent then installs no signal handlers), the main thread passes TERM, USR1 and USR2 to the
workers (this process's children) and leaves the agent alone, which watches them save, stop and
exit; SIGINT (Ctrl-C) is passed on as TERM. Each signal is passed on once: a worker that has
returned from the trainer has restored the default handlers, so a repeat would kill it.

As PID 1 (`docker run` without `--init`) this works too: the kernel delivers to PID 1 only the
signals it has handlers for, and the handlers are installed first thing. With `--init` (compose's
`init: true`) the init process forwards the signal here and also reaps orphans.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from trainer.preemption import EXIT_PREEMPTED  # installed in the image (pip install -e)

FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1,
             signal.SIGUSR2: signal.SIGUSR2, signal.SIGINT: signal.SIGTERM}


def child_pids() -> list[int]:
    """This process's children: torchrun's workers (the agent runs in this process)."""
    me, pids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue    # the process ended while we looked
        if ppid == me:
            pids.append(int(stat.parent.name))
    return pids


def signal_workers(sig: signal.Signals) -> None:
    for pid in child_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def forward_to_workers(signum: int, frame) -> None:
    """Signal handler (main thread): pass a stop or save request on to the workers."""
    forwarded = FORWARDED[signal.Signals(signum)]
    print(f"entrypoint: {signal.Signals(signum).name}: passing {forwarded.name} to the workers",
          flush=True)
    signal_workers(forwarded)


def workers_status(err) -> int:
    """The status the failed workers exited with (75 after a stop, 2 for bad input, ...); 1
    where they differ or none exited by itself. Workers killed by a signal are left out: once
    one worker has exited, torchrun sends SIGTERM to the others, and one still on its way out
    (its checkpoint saved, the trainer's handlers removed) dies of it."""
    statuses = {failure.exitcode for failure in err.failures.values() if failure.exitcode > 0}
    return statuses.pop() if len(statuses) == 1 else 1


def run_torchrun(argv: list[str], outcome: dict) -> None:
    """torchrun's main, in a thread: the exit status goes into `outcome` (0 when all workers
    finished, else `workers_status`), an unexpected error too."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    try:
        run(parse_args(argv))
        outcome["status"] = 0
    except ChildFailedError as err:
        outcome["status"] = workers_status(err)
        if outcome["status"] == EXIT_PREEMPTED:
            print(f"entrypoint: every worker saved a checkpoint and stopped (exit "
                  f"{EXIT_PREEMPTED}): run the container again to resume", flush=True)
        else:
            print(err.format_msg(), file=sys.stderr, flush=True)
    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread; SystemExit too
        code = err.code if isinstance(err, SystemExit) else None
        outcome["status"] = code if isinstance(code, int) else 1
        if not isinstance(err, SystemExit):
            outcome["error"] = err


def quiet_thread_warning(record: logging.LogRecord) -> bool:
    """Drop torchrun's warning that it runs in a thread without signal handlers: on purpose."""
    return "child thread" not in record.getMessage()


def main(argv: list[str]) -> int:
    for received in FORWARDED:
        signal.signal(received, forward_to_workers)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        quiet_thread_warning)
    outcome: dict = {}
    launcher = threading.Thread(target=run_torchrun, args=(argv, outcome), name="torchrun")
    launcher.start()
    while launcher.is_alive():
        launcher.join(1.0)   # a timed wait: this thread must wake up to run signal handlers
    if "error" in outcome:
        raise outcome["error"]
    return outcome["status"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
