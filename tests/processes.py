"""Training processes in tests: the command that starts launch/train.py (on one process or under
torchrun) and waiting, with a deadline, for what a process writes."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
Found = TypeVar("Found")


def torchrun_command(*options: str) -> list[str]:
    """torchrun, run by this interpreter, with `options` (the script and its arguments last)."""
    return [sys.executable, "-m", "torch.distributed.run", *options]


def train_command(args: Sequence[str], ranks: int = 0,
                  torchrun_options: Sequence[str] = ()) -> list[str]:
    """launch/train.py with `args`: one process, or `ranks` local ranks under a standalone
    torchrun (`torchrun_options`, e.g. --max-restarts=2, go to torchrun)."""
    if not ranks:
        return [sys.executable, str(TRAIN_SCRIPT), *args]
    return [*torchrun_command("--standalone", f"--nproc_per_node={ranks}", *torchrun_options),
            str(TRAIN_SCRIPT), *args]


def running(*processes: subprocess.Popen) -> Callable[[], bool]:
    return lambda: all(p.poll() is None for p in processes)


def printed(process: subprocess.Popen) -> str:
    """What an exited process printed to its pipe (nothing if its output went elsewhere)."""
    return process.communicate()[0] or ""


def wait_until(found: Callable[[], Found], what: str, *, timeout: float,
               alive: Callable[[], bool] = lambda: True, output: Callable[[], str] = str,
               interval: float = 0.1) -> Found:
    """`found()`'s first true value, asked every `interval` s. Fails after `timeout` s, or as
    soon as `alive()` is false (the process that was to write it has exited), with the end of
    `output()`."""
    deadline = time.monotonic() + timeout
    while not (value := found()):
        assert alive(), f"exited before {what}: {output()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(interval)
    return value


def wait_for_text(path: Path, text: str, process: subprocess.Popen,
                  timeout: float = 120) -> None:
    """Until `text` is in the file `path`, which `process` (its output piped) writes."""
    wait_until(lambda: path.is_file() and text in path.read_text(errors="replace"),
               f"{text!r} in {path}", timeout=timeout, alive=running(process),
               output=lambda: printed(process))


def wait_for_path(path: Path, process: subprocess.Popen, timeout: float = 90) -> None:
    """Until `path` (a file or folder that `process`, its output piped, makes) exists."""
    wait_until(path.exists, str(path), timeout=timeout, alive=running(process),
               output=lambda: printed(process))
