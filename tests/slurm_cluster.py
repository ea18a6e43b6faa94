"""A real Slurm cluster for tests: munged, slurmctld and slurmd daemons on this machine.

`slurm_cluster()` is a context manager: it installs Slurm from the Debian packages if it is
absent, writes a slurm.conf into a scratch folder, starts the daemons, waits for the nodes to be
idle, yields a `SlurmCluster` for submitting and watching jobs, and ALWAYS stops what it started,
also when starting fails half way. It skips the calling test (with the reason) where that cannot
be done: not root, no apt-get, install failed. See ../shared/notes/slurm-on-one-machine.md.

`slurm_cluster(num_nodes=1)` runs slurmctld and one slurmd on this host. With num_nodes >= 2
every daemon gets a host of its own (tests/netns.py): slurmctld on the first, one `slurmd -N cnI`
per compute node, each with `NodeAddr` its host's address. The hosts share the file system
(munge's socket, the spool and state folders, the checkpoints) and the host name, like nodes
whose `hostname` says nothing about the network Slurm uses. Client commands run on the
controller's host.

Two sessions on one machine would fight over the daemons, so a lock file serialises them.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import netns
from tests.processes import wait_until

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
LOCK_FILE = Path(tempfile.gettempdir()) / "celestial-slurm-cluster.lock"
LOCK_WAIT_S = 600
MUNGE_PID_FILE = Path("/run/munge/munged.pid")


class SlurmUnavailable(Exception):
    """This machine cannot run the test cluster (the message says why)."""


# ------------------------------------------------------------------ installing
def slurm_installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def check_can_run(num_nodes: int) -> None:
    """Raise SlurmUnavailable if this machine cannot start the cluster (cheap checks only)."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmd and munged must be started as root (and installed by it)")
    if not slurm_installed() and shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and apt-get is not available")
    if num_nodes > 1 and (why := netns.unavailable()):
        raise SlurmUnavailable(f"{num_nodes} nodes need a host each: {why}")


def install_if_missing() -> None:
    """`apt-get update`, then install the Slurm and munge packages, unless they are there."""
    if slurm_installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(command, check=False, env=env, capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"`{' '.join(command)}` failed: {' | '.join(tail)}")


# ------------------------------------------------------------------- the conf
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def total_memory_mib() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1)) // 1024


@dataclass(frozen=True)
class Node:
    name: str                   # NodeName, and `slurmd -N` where it differs from the host name
    address: str | None = None  # NodeAddr; None: the name resolves to the node


def write_conf(folder: Path, hostname: str, nodes: list[Node],
               controller_address: str | None = None) -> Path:
    """slurm.conf running as root; the ports are free ones, so a Slurm already installed on the
    machine is left alone. Each node's spool, pid and log files carry its name (%n)."""
    for sub in ("state", "run", "log", *(f"spool-{node.name}" for node in nodes)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    controller = f"{hostname}({controller_address})" if controller_address else hostname
    memory_mib = max(512, total_memory_mib() - 1024)
    node_lines = "".join(
        f"NodeName={node.name}" + (f" NodeAddr={node.address}" if node.address else "")
        + f" CPUs={os.cpu_count()} RealMemory={memory_mib} State=UNKNOWN\n" for node in nodes)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=celestialci
SlurmctldHost={controller}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
MinJobAge=300
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/run/slurmctld.pid
SlurmdPidFile={folder}/run/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
{node_lines}\
PartitionName=debug Nodes={",".join(node.name for node in nodes)} Default=YES \
MaxTime=INFINITE State=UP
""")
    return conf


# ------------------------------------------------------------------ the cluster
@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    hostname: str
    nodes: list[Node]
    env: dict = field(default_factory=dict)
    client_host: netns.Host | None = None   # where client commands reach slurmctld

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        env = {**self.env, **kwargs.pop("env", {})}
        argv = self.client_host.command(list(args)) if self.client_host else list(args)
        result = subprocess.run(argv, check=False, env=env, capture_output=True,
                                text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def sbatch(self, script: Path, *options: str, cwd: Path, env: dict | None = None) -> str:
        """Submit `script` from `cwd` (the job's SLURM_SUBMIT_DIR); returns the job id."""
        out = self.run("sbatch", "--parsable", *options, str(script), cwd=cwd, env=env or {})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once purged."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def node_states(self) -> dict[str, str]:
        """Each node's state in sinfo ("idle", "allocated", ...); {} while slurmctld is not up."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def all_idle(self) -> bool:
        return self.node_states() == {node.name: "idle" for node in self.nodes}

    def wait_until(self, condition, timeout: float, what: str, interval: float = 0.5):
        """`condition()`'s first true value; on timeout, fail with `what` and the daemons' logs."""
        try:
            return wait_until(condition, what, timeout=timeout, interval=interval)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        def reached():
            info = self.job(job_id)
            return info if info.get("JobState") in states else None
        return self.wait_until(reached, timeout, f"job {job_id} to reach {sorted(states)}")

    def logs(self, lines: int = 15) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


# ------------------------------------------------------------------- daemons
def munge_works() -> bool:
    if shutil.which("munge") is None:
        return False
    cred = subprocess.run(["munge", "-n"], check=False, capture_output=True, timeout=10)
    if cred.returncode != 0:
        return False
    return subprocess.run(["unmunge"], check=False, input=cred.stdout, capture_output=True,
                          timeout=10).returncode == 0


def start_munge() -> int | None:
    """Start munged unless one already works; returns the pid we started (None: reused)."""
    if munge_works():
        return None
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"],
                   check=True)
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)
    wait_until(munge_works, "`munge -n | unmunge` working after munged started", timeout=10)
    return int(MUNGE_PID_FILE.read_text().split()[0])


def start_daemon(argv: list[str], folder: Path, console_name: str,
                 host: netns.Host | None = None) -> subprocess.Popen:
    """`argv` in its own session (on `host` if given); its console output goes to
    log/<console_name>.console."""
    with open(folder / "log" / f"{console_name}.console", "w") as console:
        if host is not None:
            return host.popen(argv, machine_sys=True, stdout=console, stderr=subprocess.STDOUT)
        return subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_daemons(cluster: SlurmCluster | None, daemons: list[subprocess.Popen],
                 munge_pid: int | None) -> None:
    """Stop everything we started: jobs a failed test left running (slurmd does not stop
    them), `scontrol shutdown`, then SIGTERM/SIGKILL stragglers."""
    if cluster is not None and any(d.poll() is None for d in daemons):
        with contextlib.suppress(Exception):
            cancel_all_jobs(cluster)
            cluster.run("scontrol", "shutdown", check=False, timeout=20)
    for daemon in daemons:
        for sig, wait_s in ((None, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if sig is not None and daemon.poll() is None:
                daemon.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(wait_s)
                break
    if munge_pid is not None:
        stop_pid(munge_pid)


def cancel_all_jobs(cluster: SlurmCluster, timeout: float = 60) -> None:
    """scancel every job and wait until their processes are gone (KillWait=30 allows for a
    checkpoint on SIGTERM)."""
    if not cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
        return
    cluster.run("scancel", "--partition=debug", check=False)
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
        if time.monotonic() > deadline:
            return
        time.sleep(1)


def stop_pid(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)


@contextlib.contextmanager
def exclusive_lock():
    LOCK_FILE.touch(exist_ok=True)
    with open(LOCK_FILE, "r+") as handle:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SlurmUnavailable(f"another test cluster held {LOCK_FILE} for "
                                           f"{LOCK_WAIT_S} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def slurm_cluster(num_nodes: int = 1):
    """Start the cluster, yield it, always stop it. Skips the test where it cannot run."""
    with contextlib.ExitStack() as stack:
        try:
            check_can_run(num_nodes)
            stack.enter_context(exclusive_lock())
            install_if_missing()
        except SlurmUnavailable as why:
            pytest.skip(f"no Slurm test cluster: {why}")
        folder = Path(tempfile.mkdtemp(prefix="celestial-slurm-"))
        with running_daemons(folder, num_nodes) as cluster:
            yield cluster
        shutil.rmtree(folder, ignore_errors=True)   # left behind when the cluster failed: its logs


@contextlib.contextmanager
def running_daemons(folder: Path, num_nodes: int):
    """munged (unless one already works), slurmctld and each node's slurmd; stopped on the way
    out. One node is this host, named by its host name. Several nodes are cn1, cn2, ..., each
    on a host of its own, with slurmctld on one more host."""
    hosts = netns.hosts(num_nodes + 1) if num_nodes > 1 else contextlib.nullcontext([None, None])
    cluster, daemons, munge_pid = None, [], None
    with hosts as (controller, *computes):
        try:
            hostname = socket.gethostname().split(".")[0]
            nodes = [Node(hostname)] if controller is None else \
                [Node(f"cn{i + 1}", host.address) for i, host in enumerate(computes)]
            conf = write_conf(folder, hostname, nodes, controller and controller.address)
            cluster = SlurmCluster(folder, conf, hostname, nodes,
                                   {**os.environ, "SLURM_CONF": str(conf)}, controller)
            munge_pid = start_munge()
            daemons.append(start_daemon(["slurmctld", "-D", "-f", str(conf)], folder,
                                        "slurmctld", controller))
            for node, host in zip(nodes, computes):
                name = ["-N", node.name] if host else []     # its host's name says nothing
                daemons.append(start_daemon(["slurmd", "-D", *name, "-f", str(conf)], folder,
                                            f"slurmd-{node.name}", host))
            cluster.wait_until(cluster.all_idle, 30, f"{num_nodes} node(s) to be idle")
            yield cluster
        finally:
            stop_daemons(cluster, daemons, munge_pid)
