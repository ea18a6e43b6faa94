"""celestial-experiment --search --slurm on a real two-node Slurm cluster (tests/slurm_cluster.py):
two array tasks are workers of one study in a journal file on the shared file system; together
they complete the study, each trial trained once, on both nodes."""
from __future__ import annotations

import optuna
import pytest
import yaml

from experiments.search.study import make_storage
from tests.conftest import REPO, small_overrides
from tests.slurm_cluster import slurm_cluster
from tests.test_experiments_slurm import experiment

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.extended]
TIMEOUT_S = 600


def test_array_tasks_are_workers_of_one_study_on_both_nodes(short_csv, tmp_path):
    overrides = dict(small_overrides(short_csv, tmp_path))
    for key in ("train.experiment_name", "train.progress_bar"):
        overrides.pop(key)
    overrides.update({"train.max_steps": 6, "train.eval_interval": 3, "checkpoint.interval": 3})
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({
        "name": "sw", "base_config": str(REPO / "configs/quickstart_cpu.yaml"),
        "overrides": overrides, "seeds": [1],
        "search": {"parameters": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2,
                                               "log": True}},
                   "n_trials": 4, "sampler": "random", "pruner": "none"}}))
    with slurm_cluster(num_nodes=2) as cluster:
        out = experiment(cluster, "--search", str(search), "--slurm", "--parallel", "2",
                         "--sbatch", "--gpus-per-node=0 --cpus-per-task=2", cwd=REPO,
                         timeout_s=TIMEOUT_S)
        job_id = out.split("Slurm job array ")[1].split(",")[0]
        cluster.wait_until(lambda: not cluster.run("squeue", "-h", "-j", job_id, check=False)
                           .stdout.strip(), TIMEOUT_S, f"array {job_id} to finish")
    folder = tmp_path / "logs" / "experiments" / "sw"
    study = optuna.load_study(study_name="sw", storage=make_storage(str(folder / "study.journal")))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({t.user_attrs["run"] for t in trials}) == 4
    outputs = [(folder / "trials" / f"slurm-{job_id}_{i}.out").read_text() for i in (0, 1)]
    nodes = {node.name for node in cluster.nodes if any(f"(node {node.name})" in text
                                                        for text in outputs)}
    assert nodes == {node.name for node in cluster.nodes}, outputs
