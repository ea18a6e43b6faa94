"""One writer per experiment: `checkpoints/<exp>/writer.lock`, held by the running run's rank 0.

The lock is a POSIX record lock (`fcntl.lockf`) on that file, which holds a line naming the
holder (host, pid, start time). The kernel, not the file, decides who holds it:

- the lock ends with the process that holds it, however it ends (SIGKILL included), so a lock
  left by a dead process is never mistaken for a live one. Its file stays; the next run takes
  it over and logs whose it was;
- on a shared file system (NFSv4, Lustre, GPFS) the server keeps the lock for a client host as
  long as that host renews its lease; a host that dies loses its locks when the lease runs out
  (NFSv4: 90 s by default), after which a run on another host takes the lock over;
- a worker group restarted by torchrun starts after the failed one's processes have ended, so
  its rank 0 takes the lock its predecessor held;
- record locks are not inherited by forked children (DataLoader workers), so a child that
  outlives its parent for a moment does not keep the experiment locked.

The checkpoint folder holds the lock because every rank of a run must share it (a log folder
may be local to rank 0's host). A file system without locks is logged, and the run goes on
unprotected.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "writer.lock"
_HELD: dict[Path, ExperimentLock] = {}     # this process's locks: building a run twice reuses one


@dataclass
class ExperimentLock:
    path: Path
    fd: int | None
    created: list[Path] = field(default_factory=list)   # folders made to hold it, deepest last

    def release(self) -> None:
        """Remove the lock file (before unlocking, so no one locks a file about to vanish) and
        the folders made for it that are still empty."""
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
        if self.fd is not None:
            _quietly(self.path.unlink, missing_ok=True)
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.created):
            _quietly(folder.rmdir)
        self.created = []


def acquire(folder: Path) -> ExperimentLock:
    """Hold `folder`/writer.lock for this process, or raise a one-line UserError naming the run
    that holds it."""
    path = (folder / LOCK_NAME).absolute()
    if path in _HELD:
        return _HELD[path]
    created = _make_folders(folder)
    try:
        fd = _lock(path)
    except BaseException:
        for made in reversed(created):
            _quietly(made.rmdir)
        raise
    held = ExperimentLock(path, fd, created)
    _HELD[path] = held
    return held


def holder_line() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": started})


def _lock(path: Path) -> int | None:
    for _ in range(10):     # the file may be removed by a holder releasing it between our steps
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if not _try_lock(fd, path):
                os.close(fd)
                return None
            if _same_file(fd, path):
                _record_holder(fd, path)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise UserError(f"{path}: could not take the experiment's lock (its file keeps changing)")


def _try_lock(fd: int, path: Path) -> bool:
    """True when locked; False when the file system has no locks; a UserError when held."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise UserError(_held_message(path)) from None
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("%s: the file system does not support locks (%s): nothing stops a second "
                        "run from writing into this experiment", path, err.strerror)
            return False
        raise


def _held_message(path: Path) -> str:
    holder = _read_holder(path)
    who = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
           if holder else "a run that has not recorded itself yet")
    return (f"experiment folder {path.parent} is in use by another run ({who}; lock "
            f"{path}): wait for it to end, or choose another --experiment_name")


def _read_holder(path: Path) -> dict:
    try:
        with open(path, "rb") as f:    # closing another fd would drop our own lock: never ours
            data = json.loads(f.read(4096).decode("utf-8", "replace"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _record_holder(fd: int, path: Path) -> None:
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if previous:
        log.info("%s: taking over the lock left by %s, which is no longer running", path,
                 previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_line() + "\n").encode(), 0)
    os.fsync(fd)


def _make_folders(folder: Path) -> list[Path]:
    missing = []
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for made in reversed(missing):
        made.mkdir()
    return list(reversed(missing))


def _quietly(action, **kwargs) -> None:
    with contextlib.suppress(OSError):
        action(**kwargs)
