"""Run a function in a forked child with a time limit and a memory limit.

For tests of hostile input: a case that would hang (a named pipe) or exhaust memory (a 3 GB
read) fails the test within seconds instead of taking the machine or the test run with it.
"""
from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import sys
import time


def _virtual_memory_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run_bounded(fn, *args, seconds: float = 20, memory_mb: int = 400):
    """`fn(*args)` in a forked child that may map at most `memory_mb` MiB beyond this process
    and run at most `seconds`. Returns what it returned; re-raises (as AssertionError) what it
    raised, with the exception's type and message; fails if it ran out of time or memory."""
    limit = _virtual_memory_bytes() + memory_mb * 2**20
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(fn, args, limit, write_end)
    os.close(write_end)
    try:
        payload = _read_until(read_end, time.monotonic() + seconds)
    finally:
        os.close(read_end)
        if payload is None:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert payload is not None, f"{fn.__name__} did not finish within {seconds} s"
    assert payload, f"{fn.__name__} ended without a result (killed, or out of memory)"
    ok, value = pickle.loads(payload)
    if not ok:
        raise AssertionError(value)
    return value


def _child(fn, args, limit: int, write_end: int) -> None:
    try:
        _one_thread()
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            result = (True, fn(*args))
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which fails
            result = (False, f"{type(err).__name__}: {err}"[:4000])
        payload = pickle.dumps(result)
        with os.fdopen(write_end, "wb") as f:
            f.write(payload)
    finally:
        os._exit(0)


def _one_thread() -> None:
    """OpenMP's thread pool does not survive a fork: a child that enters a parallel region the
    parent's pool served hangs. Torch ops in the child run on its own thread only."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _read_until(fd: int, deadline: float) -> bytes | None:
    """All the child wrote, or None if it has not closed the pipe by `deadline`."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
