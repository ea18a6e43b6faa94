"""Two workers of one search on two hosts (network namespaces, tests/netns.py) sharing a study in
a real PostgreSQL server on a third: one worker is killed outright mid-trial; the other takes
its trial over once it has gone silent, and the study completes with no trial lost and none
trained twice. The trials are stand-ins (a few seconds each), not trainings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests import netns
from tests.postgres import postgres_database
from tests.processes import running, wait_until
from tests.test_search import search_data

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.extended]

STAND_IN = """
import os, pathlib, sys, time
sets = dict(a.split("=", 1) for a in sys.argv if "=" in a and not a.startswith("-"))
run = pathlib.Path(sets["train.log_root"]) / sets["train.experiment_name"]
run.mkdir(parents=True, exist_ok=True)
with open(run / "starts.txt", "a") as f:
    f.write(os.environ["WORKER"] + "\\n")
time.sleep(float(os.environ["TRIAL_S"]))
(run / "metrics.jsonl").write_text('{"kind": "val", "step": 2, "nll": 1.5}\\n'
                                   '{"kind": "test", "step": 2, "nll": 0.0}\\n')
"""
WORKER = """
import sys
from experiments import cli
from experiments.search import driver
driver.SEARCH_TRIAL_SCRIPT = sys.argv[1]
driver.STALE_S, driver.HEARTBEAT_S, driver.WAIT_S = 4.0, 0.5, 0.2
sys.exit(cli.run(["--search", sys.argv[2], "--worker"]))
"""


READ_STUDY = """
import json, sys
from experiments.search.command import search_folder
from experiments.search.spec import load_search
from experiments.search.study import address, open_study
spec = load_search(sys.argv[1])
study = open_study(spec, address(spec, search_folder(spec)))
print(json.dumps([[t.number, t.state.name, t.user_attrs["run"]] for t in study.get_trials()]))
"""


def starts(tmp_path) -> dict[str, list[str]]:
    return {p.parent.name: p.read_text().split()
            for p in (tmp_path / "logs").glob("*/starts.txt")}


def wait_for_trial(tmp_path, name: str, worker: subprocess.Popen) -> None:
    """Until the worker `name` has started a trial."""
    wait_until(lambda: any(name in s for s in starts(tmp_path).values()),
               f"a trial started by worker {name}", timeout=120, alive=running(worker),
               output=lambda: (tmp_path / f"worker_{name}.log").read_text())


def test_a_worker_killed_mid_trial_loses_no_trial_of_a_postgresql_study(tmp_path):
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    with netns.hosts(3) as (server, first, second), postgres_database("study", server) as url:
        data = search_data(tmp_path, search={"n_trials": 4, "storage": url, "pruner": "none"})
        path = tmp_path / "search.yaml"
        path.write_text(yaml.safe_dump(data))

        def worker(host, name: str, trial_s: float):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKER": name, "TRIAL_S": str(trial_s)}
            log = open(tmp_path / f"worker_{name}.log", "w")  # noqa: SIM115 - the test's end
            return host.popen([sys.executable, "-c", WORKER, str(script), str(path)], env=env,
                              stdout=log, stderr=log)

        doomed = worker(first, "a", 600.0)            # its trial never ends by itself
        wait_for_trial(tmp_path, "a", doomed)
        other = worker(second, "b", 1.0)
        wait_for_trial(tmp_path, "b", other)          # both at work
        first.kill()                                  # killed outright, mid-trial
        assert other.wait(timeout=180) == 0, (tmp_path / "worker_b.log").read_text()
        read = second.run([sys.executable, "-c", READ_STUDY, str(path)], capture_output=True,
                          text=True, timeout=120)
        assert read.returncode == 0, read.stderr
    trials = json.loads(read.stdout)       # [number, state, run]
    done = {run for _, state, run in trials if state == "COMPLETE"}
    failed = [run for _, state, run in trials if state == "FAIL"]
    assert len(done) == 4 and len(trials) == 5 and len(failed) == 1 and failed[0] in done
    runs = starts(tmp_path)
    assert runs[failed[0]] == ["a", "b"]     # taken over, the same run
    assert sorted(len(s) for s in runs.values()) == [1, 1, 1, 2], json.dumps(runs)
