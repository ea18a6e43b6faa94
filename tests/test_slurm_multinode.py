"""launch/slurm/train_multi_node.sbatch on a real two-node Slurm cluster: slurmctld and two
slurmd on hosts of their own (network namespaces, tests/slurm_cluster.py), one torchrun per node.

The nodes share this machine's host name, which resolves to 127.0.0.1, and know each other
only by their Slurm NodeAddr: the rendezvous works only if the script takes the head's address,
this node's `--local_addr`, `is_host` and the socket interface from the allocation, as on a
cluster whose host names point at another network.
"""
from __future__ import annotations

import os
import re

import pytest

from tests.slurm_cluster import SlurmCluster, slurm_cluster
from tests.test_slurm import (
    MULTI_NODE,
    assert_stopped_and_resumed,
    assert_trained_to_the_end,
    job_output,
    signal_after_first_checkpoint,
    submit,
    wait_finished,
)

NUM_NODES = 2


def test_two_nodes_skip_cleanly_where_hosts_cannot_be_made(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("tests.slurm_cluster.slurm_installed", lambda: True)
    monkeypatch.setattr("tests.netns.unavailable", lambda: "`ip netns add` failed: denied")
    with pytest.raises(pytest.skip.Exception, match="2 nodes need a host each: `ip netns add`"), \
            slurm_cluster(num_nodes=2):
        pass


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster(num_nodes=NUM_NODES) as running:
        yield running


def node_addresses(cluster: SlurmCluster) -> dict[str, str]:
    return {node.name: node.address for node in cluster.nodes}


def assert_each_node_ran_its_torchrun(output: str, cluster: SlurmCluster, job_id: str) -> None:
    """Node i ran on cn<i+1> at its own address, advertised it, and met the others at cn1."""
    port, addresses = 29500 + int(job_id) % 1000, node_addresses(cluster)
    for node_id, (name, address) in enumerate(addresses.items()):
        assert f"node {node_id} is {name} at {address}; sockets on GLOO_SOCKET_IFNAME=eth0 " \
               "NCCL_SOCKET_IFNAME=eth0" in output, output
        launches = [line for line in output.splitlines() if f"node {node_id}: torchrun --" in line]
        assert launches and all(f"--local_addr={address}" in line and
                                f"--rdzv_conf=is_host={int(node_id == 0)}" in line and
                                f"--rdzv_endpoint={addresses['cn1']}:{port}" in line and
                                f"--nnodes={NUM_NODES}" in line for line in launches), launches


def assert_every_rank_wrote_its_shards(checkpoints, world_size: int) -> None:
    for folder in sorted(checkpoints.glob("checkpoint_step_*")):
        ranks = {int(re.search(r"rng_rank(\d+)", p.name).group(1))
                 for p in folder.glob("rng_rank*")}
        shards = {int(p.name.split("_")[2]) for p in folder.glob("__*_*.distcp")}
        assert ranks == shards == set(range(world_size)), (folder, sorted(folder.iterdir()))


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_trains_requeues_on_usr1_and_resumes_on_two_nodes(cluster, tmp_path):
    job_id = submit(cluster, MULTI_NODE, tmp_path, "two-nodes", 60, f"--nodes={NUM_NODES}",
                    ranks_per_node=1)
    signal_after_first_checkpoint(cluster, tmp_path, "two-nodes", job_id)
    info = wait_finished(cluster, tmp_path, job_id)
    output = job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output
    assert info["NodeList"] == "cn[1-2]" and info["NumNodes"] == str(NUM_NODES)
    runs = output.split("(restart 1)")
    assert len(runs) == 2, "one run before the requeue, one after"
    for run in runs:
        assert_each_node_ran_its_torchrun(run, cluster, job_id)
    assert output.count("received SIGUSR1") >= 1 + NUM_NODES, "batch shell and node launchers"
    assert_stopped_and_resumed(tmp_path, "two-nodes", job_id, output)
    assert_trained_to_the_end(tmp_path, "two-nodes", max_steps=60)
    assert_every_rank_wrote_its_shards(tmp_path / "checkpoints" / "two-nodes", NUM_NODES)
