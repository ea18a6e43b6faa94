"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd on this machine.

`slurm_cluster()` is a context manager: it installs Slurm from the Debian packages if it is
absent, writes a slurm.conf into a scratch folder, starts the daemons, waits for the node to be
idle, yields a `SlurmCluster` for submitting and watching jobs, and ALWAYS stops what it started,
also when starting fails half way. It skips the calling test (with the reason) where that cannot
be done: not root, no apt-get, install failed. See ../shared/notes/slurm-on-one-machine.md.

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

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
LOCK_FILE = Path(tempfile.gettempdir()) / "celestial-slurm-cluster.lock"
LOCK_WAIT_S = 600
MUNGE_PID_FILE = Path("/run/munge/munged.pid")


class SlurmUnavailable(Exception):
    """This machine cannot run the test cluster (the message says why)."""


# ------------------------------------------------------------------ installing
def slurm_installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def check_can_run() -> None:
    """Raise SlurmUnavailable if this machine cannot start the cluster (cheap checks only)."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmd and munged must be started as root (and installed by it)")
    if not slurm_installed() and shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and apt-get is not available")


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


def write_conf(folder: Path, hostname: str) -> Path:
    """slurm.conf for one node running as root; ports are free ones, so a Slurm already
    installed on the machine is left alone."""
    for sub in ("state", "spool", "run", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=celestialci
SlurmctldHost={hostname}
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
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/run/slurmctld.pid
SlurmdPidFile={folder}/run/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
NodeName={hostname} CPUs={os.cpu_count()} RealMemory={max(512, total_memory_mib() - 1024)} \
State=UNKNOWN
PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


# ------------------------------------------------------------------ the cluster
@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    hostname: str
    env: dict = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        env = {**self.env, **kwargs.pop("env", {})}
        result = subprocess.run(list(args), check=False, env=env, capture_output=True,
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

    def node_state(self) -> str:
        """The node's state in sinfo ("idle", "allocated", ...); "" while slurmctld is not up."""
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()

    def wait_until(self, condition, timeout: float, what: str, interval: float = 0.5):
        """Poll `condition()` until it returns something true; fail with `what` on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        def reached():
            info = self.job(job_id)
            return info if info.get("JobState") in states else None
        return self.wait_until(reached, timeout, f"job {job_id} to reach {sorted(states)}")

    def logs(self, lines: int = 15) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
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
    deadline = time.monotonic() + 10
    while not munge_works():
        if time.monotonic() > deadline:
            raise AssertionError("munged started but `munge -n | unmunge` still fails")
        time.sleep(0.1)
    return int(MUNGE_PID_FILE.read_text().split()[0])


def start_daemon(name: str, conf: Path, folder: Path) -> subprocess.Popen:
    """`name -D -f conf` in its own session; its console output goes to log/<name>.console."""
    with open(folder / "log" / f"{name}.console", "w") as console:
        return subprocess.Popen([name, "-D", "-f", str(conf)], stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_daemons(cluster: SlurmCluster | None, daemons: list[subprocess.Popen],
                 munge_pid: int | None) -> None:
    """Stop everything we started: `scontrol shutdown`, then SIGTERM/SIGKILL stragglers."""
    if cluster is not None and any(d.poll() is None for d in daemons):
        with contextlib.suppress(Exception):
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
def slurm_cluster():
    """Start the cluster, yield it, always stop it. Skips the test where it cannot run."""
    with contextlib.ExitStack() as stack:
        try:
            check_can_run()
            stack.enter_context(exclusive_lock())
            install_if_missing()
        except SlurmUnavailable as why:
            pytest.skip(f"no Slurm test cluster: {why}")
        folder = Path(tempfile.mkdtemp(prefix="celestial-slurm-"))
        with running_daemons(folder) as cluster:
            yield cluster
        shutil.rmtree(folder, ignore_errors=True)   # left behind when the cluster failed: its logs


@contextlib.contextmanager
def running_daemons(folder: Path):
    """munged (unless one already works), slurmctld and slurmd; stopped on the way out."""
    cluster, daemons, munge_pid = None, [], None
    try:
        hostname = socket.gethostname().split(".")[0]
        conf = write_conf(folder, hostname)
        cluster = SlurmCluster(folder, conf, hostname, {**os.environ, "SLURM_CONF": str(conf)})
        munge_pid = start_munge()
        daemons.append(start_daemon("slurmctld", conf, folder))
        daemons.append(start_daemon("slurmd", conf, folder))
        cluster.wait_until(lambda: cluster.node_state() == "idle", 30, "the node to be idle")
        yield cluster
    finally:
        stop_daemons(cluster, daemons, munge_pid)
