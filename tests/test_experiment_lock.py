"""One writer per experiment: a second start of a running experiment stops
at once with one line naming the holder, exit 2, nothing touched; a lock left by a dead process
is taken over."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, as_cli_args, small_overrides
from tests.processes import (
    running,
    train_command,
    wait_for_path,
    wait_for_text,
    wait_until,
)
from tests.test_distributed import finish, launch, train_args
from tests.test_refused_start import snapshot
from trainer import experiment_lock
from trainer.errors import UserError


def _start(args: list[str], fault: str = "") -> subprocess.Popen:
    return subprocess.Popen(train_command(args), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CELESTIAL_FAULT": fault})


@pytest.mark.slow
def test_second_start_of_a_running_experiment_stops_at_once_naming_the_holder(short_csv,
                                                                              tmp_path):
    args = as_cli_args(small_overrides(short_csv, tmp_path, "busy") + [
        ("train.max_steps", 6), ("checkpoint.interval", 2), ("train.eval_interval", 4),
        ("train.validate_at_start", False)])
    first = _start(args, "delay:validation:30")
    try:
        wait_for_text(tmp_path / "logs" / "busy" / "training_full.log",
                      "fault injection: delaying validation", first)
        before = {name: snapshot(tmp_path / name) for name in ("logs", "checkpoints")}
        assert "busy/checkpoint_step_000002" in before["checkpoints"]
        # Zero-second delays announce the data preparation and the model build if they begin.
        phases = "delay:data_preparation:0,delay:model_build:0"
        for extra in ([], ["--resume", "auto"]):
            second = subprocess.run(train_command([*args, *extra]), cwd=REPO,
                                    capture_output=True, text=True, timeout=120,
                                    env={**os.environ, "OMP_NUM_THREADS": "1",
                                         "CELESTIAL_FAULT": phases})
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2, second.stderr[-3000:]
            assert lines[-1].startswith("error: experiment folder"), lines[-3:]
            assert f"pid {first.pid} on host {socket.gethostname()} since 20" in lines[-1]
            assert "Traceback" not in second.stderr
            assert "fault injection: delaying" not in second.stderr   # stopped before both
            assert {name: snapshot(tmp_path / name) for name in ("logs", "checkpoints")} \
                == before, extra
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 75, out[-3000:]
    assert not (tmp_path / "checkpoints" / "busy" / "writer.lock").exists()


def _hold_and_die(folder: str, ready: str) -> None:
    experiment_lock.acquire(Path(folder))
    Path(ready).write_text("held")
    time.sleep(600)


@pytest.mark.slow
def test_lock_of_a_killed_process_is_taken_over_and_a_live_one_is_not(tmp_path, caplog):
    folder = tmp_path / "checkpoints" / "exp"
    ready = tmp_path / "ready"
    code = (f"from tests.test_experiment_lock import _hold_and_die; "
            f"_hold_and_die({str(folder)!r}, {str(ready)!r})")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        wait_until(ready.exists, str(ready), timeout=60, alive=running(holder), interval=0.05)
        with pytest.raises(UserError, match=f"pid {holder.pid} on host "):
            experiment_lock.acquire(folder)
    finally:
        holder.kill()
        holder.wait()
    left = json.loads((folder / "writer.lock").read_text())
    assert left["pid"] == holder.pid                      # SIGKILL left the file behind
    with caplog.at_level(logging.INFO, logger="trainer.experiment_lock"):
        lock = experiment_lock.acquire(folder)
    assert f'"pid": {holder.pid}' in caplog.text and "no longer running" in caplog.text
    assert json.loads((folder / "writer.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / "writer.lock").exists()


def test_a_lock_taken_for_a_refused_start_leaves_no_folder_behind(tmp_path):
    lock = experiment_lock.acquire(tmp_path / "checkpoints" / "new")
    assert (tmp_path / "checkpoints" / "new" / "writer.lock").is_file()
    lock.release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_worker_group_restarted_by_torchrun_takes_over_its_own_lock(short_csv, tmp_path):
    """Rank 0 (the lock's holder) is SIGKILLed: torchrun restarts the group, whose rank 0 takes
    the lock over (logged, naming the dead holder) and finishes the run, which releases it."""
    args = train_args(short_csv, tmp_path, "elastic", train__max_steps=30,
                      checkpoint__interval=10, train__log_interval=5)
    proc = launch(args, ranks=2, max_restarts=1)
    lock = tmp_path / "checkpoints" / "elastic" / "writer.lock"
    wait_for_path(tmp_path / "checkpoints" / "elastic" / "checkpoint_step_000010", proc)
    holder = json.loads(lock.read_text())["pid"]
    psutil.Process(holder).send_signal(signal.SIGKILL)
    code, out = finish(proc, timeout=300)
    assert code == 0, out[-4000:]
    log = (tmp_path / "logs" / "elastic" / "training_full.log").read_text()
    assert f'taking over the lock left by {{"host": "{socket.gethostname()}", "pid": {holder}' \
        in log and "finished at step 30" in log, log[-3000:]
    assert not lock.exists()
