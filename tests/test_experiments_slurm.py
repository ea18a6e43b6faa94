"""celestial-experiment --slurm on a real two-node Slurm cluster (tests/slurm_cluster.py): the
trials run as one job array spread over both nodes; one task stopped with USR1 (what Slurm sends
ahead of the time limit) after its first checkpoint requeues itself and resumes, and the
experiment completes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, small_overrides
from tests.slurm_cluster import SlurmCluster, slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.extended]
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster(num_nodes=2) as running:
        yield running


def experiment(cluster: SlurmCluster, *args: str, cwd, timeout_s: float = TIMEOUT_S) -> str:
    """celestial-experiment where the Slurm client commands reach the cluster."""
    argv = [sys.executable, str(REPO / "launch/experiment.py"), *args]
    if cluster.client_host:
        argv = cluster.client_host.command(argv)
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **cluster.env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_trials_run_as_an_array_over_both_nodes_and_a_requeued_task_resumes(
        cluster, short_csv, tmp_path):
    overrides = dict(small_overrides(short_csv, tmp_path))
    for key in ("train.experiment_name", "train.progress_bar"):
        overrides.pop(key)
    overrides.update({"train.max_steps": 40, "train.eval_interval": 20,
                      "checkpoint.interval": 10, "train.epochs": 200})
    spec = tmp_path / "e.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "arr", "base_config": str(REPO / "configs/quickstart_cpu.yaml"),
        "overrides": overrides, "control": "real",
        "variants": {"real": {}, "shuffled": {"data.celestial_ablation": "block_shuffle"}},
        "seeds": [1, 2]}))
    out = experiment(cluster, str(spec), "--slurm", "--sbatch",
                     "--gpus-per-node=0 --cpus-per-task=2", cwd=REPO)
    job_id = out.split("Slurm job array ")[1].split()[0]
    folder = tmp_path / "logs" / "experiments" / "arr"
    task = f"{job_id}_0"
    checkpoints = tmp_path / "checkpoints" / "arr__real__s1"
    cluster.wait_until(lambda: any(checkpoints.glob("checkpoint_step_*")), TIMEOUT_S,
                       "the first checkpoint of task 0")
    cluster.run("scancel", "--signal=USR1", "--batch", task)

    def requeued():
        info = cluster.job(task)
        return info if info.get("Restarts") == "1" else None

    if cluster.wait_until(requeued, 90, f"task {task} to requeue")["JobState"] == "PENDING":
        cluster.run("scontrol", "update", f"JobId={task}", "StartTime=now", check=False)
    cluster.wait_until(lambda: not cluster.run("squeue", "-h", "-j", job_id, check=False)
                       .stdout.strip(), TIMEOUT_S, f"array {job_id} to finish")

    logs = {name: (folder / "trials" / f"{name}.log").read_text()
            for name in json.loads((folder / "slurm_job.json").read_text())["tasks"].values()}
    nodes = {node.name for node in cluster.nodes if any(f"(node {node.name}," in log
                                                        for log in logs.values())}
    assert nodes == {node.name for node in cluster.nodes}, logs
    requeued_log = logs["arr__real__s1"]
    assert "restart 1" in requeued_log and "resumed from" in requeued_log, requeued_log
    report = experiment(cluster, "--report", str(folder), cwd=tmp_path)
    assert "missing trials" not in report and "shuffled" in report.splitlines()[0]
