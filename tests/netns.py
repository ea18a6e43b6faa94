"""Hosts made of Linux network namespaces, so that tests can run several machines on one.

Each host is a network namespace with its own address on `eth0`, a veth plugged into a bridge
that lives in a namespace of its own (the "switch"). Hosts share the file system, like cluster
nodes on a shared file system. Traffic stays on the test's own addresses. Everything is removed
on exit, also when the test fails: processes started through `Host.popen` first (their whole
process group), then the namespaces, which takes their links with them.

Needs root and `ip` (iproute2); `unavailable()` says why hosts cannot be made here.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import wait_until

PREFIX = "celhost"
IFNAME = "eth0"


@dataclass
class Host:
    name: str           # the namespace
    address: str        # IPv4 address of eth0
    ifname: str = IFNAME
    processes: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: list[str], machine_sys: bool = False) -> list[str]:
        """`argv` run on this host. `ip netns exec` mounts a /sys of the namespace, which hides
        the machine's cgroup mounts under /sys/fs/cgroup; machine_sys=True enters only the
        network namespace (nsenter) and keeps them, for daemons that need them (slurmd)."""
        if machine_sys:
            return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), check=kwargs.pop("check", False), **kwargs)

    def popen(self, argv: list[str], machine_sys: bool = False, **kwargs) -> subprocess.Popen:
        """Start a process on this host in a process group of its own."""
        process = subprocess.Popen(self.command(argv, machine_sys), start_new_session=True,
                                   **kwargs)
        self.processes.append(process)
        return process

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Lose this host: signal every process started on it, with their children, and every
        other process in its namespace (torchrun starts its workers in sessions of their own,
        out of reach of the agent's group). Afterwards the host can start processes again."""
        for process in self.processes:
            signal_group(process, sig)
        for pid in self.pids():
            signal_pid(pid, sig)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait(timeout=30)
        self.processes.clear()
        deadline = time.monotonic() + 10
        while sig == signal.SIGKILL and self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """Every process running in this host's network namespace."""
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                                text=True, check=False).stdout
        return [int(pid) for pid in listed.split()]


def signal_pid(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def signal_group(process: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def remove_stale() -> None:
    """Remove namespaces left by a test process that died before its clean-up."""
    for name in namespaces():
        parts = name.split("-")
        if parts[0] != PREFIX or len(parts) < 3 or not parts[1].isdigit():
            continue
        if not Path(f"/proc/{parts[1]}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def free_subnet() -> str:
    """A 10.213.N.0/24 no interface on this machine uses, so parallel tests do not collide."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True,
                          check=False).stdout
    for name in namespaces():
        used += subprocess.run(["ip", "-n", name, "-o", "-4", "addr"], capture_output=True,
                               text=True, check=False).stdout
    start = os.getpid() % 250
    for offset in range(250):
        subnet = f"10.213.{(start + offset) % 250 + 1}"
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.213.N.0/24 subnet for test hosts")


def add_host(switch: str, name: str, address: str, index: int) -> Host:
    outer, inner = f"{PREFIX[:2]}{os.getpid()}h{index}", f"{PREFIX[:2]}{os.getpid()}s{index}"
    ip("netns", "add", name)
    ip("link", "add", outer, "type", "veth", "peer", "name", inner)
    ip("link", "set", outer, "netns", name)
    ip("link", "set", inner, "netns", switch)
    ip("-n", switch, "link", "set", inner, "master", "br0")
    ip("-n", switch, "link", "set", inner, "up")
    ip("-n", name, "link", "set", outer, "name", IFNAME)
    ip("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
    ip("-n", name, "link", "set", IFNAME, "up")
    ip("-n", name, "link", "set", "lo", "up")
    return Host(name=name, address=address)


@contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """`count` hosts on one switch, named celhost-<pid>-h<i>, addresses 10.213.N.<i+1>."""
    remove_stale()
    tag = f"{PREFIX}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    switch, made = f"{tag}-sw", []
    try:
        ip("netns", "add", switch)
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        subnet, machines = free_subnet(), []
        for index in range(count):
            made.append(f"{tag}-h{index}")
            machines.append(add_host(switch, made[-1], f"{subnet}.{index + 1}", index))
        wait_reachable(machines)
        yield machines
    finally:
        for machine in locals().get("machines", []):
            machine.kill()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


# Exit 0 when the address answers at all: a refused connection (RST) proves the path works.
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=1).close()
except ConnectionRefusedError:
    pass
"""


def wait_reachable(machines: list[Host], timeout: float = 10) -> None:
    """The bridge forwards only after its ports leave the learning state: ping until it does."""
    first, others = machines[0], machines[1:]
    for other in others:
        probe = [sys.executable, "-c", PROBE, other.address]
        wait_until(lambda probe=probe: first.run(probe, capture_output=True).returncode == 0,
                   f"{other.name} ({other.address}) reachable from {first.name}",
                   timeout=timeout, interval=0.2)
