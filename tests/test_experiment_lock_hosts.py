"""One writer per experiment across hosts: two hosts (network and UTS namespaces, each with its
own host name) share one file system, as cluster nodes share a parallel file system. A run
started on the second host while the first holds the experiment stops at once naming the first
host; when the first host is lost, the second takes the lock over and says whose it was.

On one kernel the lock manager is the kernel's; on NFSv4 it is the server's, which drops a dead
client's locks when its lease runs out (90 s by default) rather than at once. That delay is the
file system's and is not exercised here."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests import netns
from tests.conftest import REPO, as_cli_args, small_overrides
from tests.processes import TRAIN_SCRIPT, running, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(netns.unavailable() is not None,
                                 reason=netns.unavailable() or "")]

HOLD = ("import sys; from tests.test_experiment_lock import _hold_and_die; "
        "_hold_and_die(sys.argv[1], sys.argv[2])")
TAKE = ("import logging, sys; from pathlib import Path; from trainer import experiment_lock; "
        "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        "experiment_lock.acquire(Path(sys.argv[1])).release()")


def named(host_name: str, argv: list[str]) -> list[str]:
    """`argv` in a UTS namespace of its own whose host name is `host_name`."""
    return ["unshare", "--uts", "sh", "-c", f'hostname {host_name} && exec "$@"', "sh", *argv]


def test_a_run_on_another_host_is_refused_and_a_lost_host_s_lock_is_taken_over(short_csv,
                                                                              tmp_path):
    folder = tmp_path / "checkpoints" / "shared"
    ready = tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = as_cli_args(small_overrides(short_csv, tmp_path, "shared") + [("train.max_steps", 2)])
    with netns.hosts(2) as (first, second):
        holder = first.popen(named("node-a", [sys.executable, "-c", HOLD, str(folder),
                                              str(ready)]), cwd=REPO, env=env)
        wait_until(ready.exists, str(ready), timeout=60, alive=running(holder), interval=0.05)

        refused = second.run(named("node-b", [sys.executable, str(TRAIN_SCRIPT), *args]),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stderr[-3000:]
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("error: experiment folder") and "on host node-a since 20" in last
        assert "Traceback" not in refused.stderr
        assert not (tmp_path / "logs" / "shared").exists()

        first.kill()                                   # the first host is lost
        holder.wait(timeout=30)
        left = json.loads((folder / "writer.lock").read_text())
        assert left["host"] == "node-a"
        taken = second.run(named("node-b", [sys.executable, "-c", TAKE, str(folder)]),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert "taking over the lock left by" in taken.stderr and '"host": "node-a"' in taken.stderr
    assert not (folder / "writer.lock").exists()
