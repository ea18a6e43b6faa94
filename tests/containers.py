"""Real containers for tests: rootful podman, and base images made from Debian packages.

`podman_engine()` is a context manager: it installs podman, buildah, runc, debootstrap and
podman-compose from the Debian packages if they are missing, writes the containers.conf this
kind of machine needs, yields a `Podman` for building and running images, and ALWAYS removes
the images and containers it made (nothing else). It skips the calling test (with the reason)
where that cannot be done: not root, no apt-get, install failed, podman cannot start,
debootstrap failed.
See ../shared/notes/several-hosts-and-containers-on-one-machine.md for the facts behind it.

No registry is reachable, so no `FROM` image can be pulled: `debian_python_base()` makes one
with debootstrap (Debian's Python, pip), cached as a tarball under BASE_CACHE keyed by a hash of
its inputs. pip inside a build gets the host's pip settings (CA bundle, local wheels and
indexes) through read-only mounts: `pip_build_mounts()`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["podman", "buildah", "runc", "debootstrap", "podman-compose"]
BASE_PACKAGES = ["python3", "python3-venv", "python3-pip", "python-is-python3"]
BASE_ENV = ["PIP_BREAK_SYSTEM_PACKAGES=1",    # Debian's Python is "externally managed"
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
BASE_CACHE = Path("/var/tmp/celestial-pgat-container-base")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Names of what a test session makes: its own, so cleaning up touches nothing else.
NAME_PREFIX = f"celestial-pgat-test-{os.getpid()}"


class ContainersUnavailable(Exception):
    """This machine cannot build or run the test containers (the message says why)."""


# ------------------------------------------------------------------ installing
def check_can_run() -> None:
    """Raise ContainersUnavailable if this machine cannot run podman (cheap checks only)."""
    if os.geteuid() != 0:
        raise ContainersUnavailable("rootful podman and debootstrap need root")
    if not tools_installed() and shutil.which("apt-get") is None:
        raise ContainersUnavailable(f"{', '.join(PACKAGES)} missing and apt-get not available")


def tools_installed() -> bool:
    return all(shutil.which(tool) for tool in PACKAGES)


def run_or_raise(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run `command`; a failure raises ContainersUnavailable with the output's tail."""
    result = subprocess.run(command, check=False, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ContainersUnavailable(f"`{' '.join(command)[:200]}` failed: {' | '.join(tail)}")
    return result


def install_if_missing() -> None:
    """`apt-get update`, then install the container tools, unless they are there."""
    if tools_installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_or_raise(["apt-get", "update"], 600, env=env)
    run_or_raise(["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=300", *PACKAGES], 900,
                 env=env)


def write_containers_conf(folder: Path) -> Path:
    """containers.conf for this kind of machine: crun refuses its cgroup v1/v2 hybrid (runc does
    not), there is no systemd (cgroupfs, file events), and root may not raise its limits, so
    the containers' ulimits are capped at this process's hard limits."""
    nofile = hard_limit("-Hn")
    nproc = min(hard_limit("-Hu"), int(Path("/proc/sys/kernel/pid_max").read_text()))
    conf = folder / "containers.conf"
    conf.write_text(f"""\
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
""")
    return conf


def hard_limit(flag: str) -> int:
    value = subprocess.run(["bash", "-c", f"ulimit {flag}"], check=True, capture_output=True,
                           text=True).stdout.strip()
    return 1 << 20 if value == "unlimited" else int(value)


# ------------------------------------------------------------------ the engine
@dataclass
class Podman:
    env: dict
    images: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)

    def run(self, *args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """A podman command; with `check`, a failure is an AssertionError with its output."""
        result = subprocess.run(["podman", *args], check=False, env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)[:300]} failed ({result.returncode}):\n"
                                 f"{(result.stdout + result.stderr)[-4000:]}")
        return result

    def new_name(self, what: str, image: bool) -> str:
        """A name for an image or container of this session, removed by `cleanup()`."""
        if image:
            name = f"localhost/{NAME_PREFIX}:{what}"
            self.images.append(name)
        else:
            name = f"{NAME_PREFIX}-{what}"
            self.containers.append(name)
        return name

    def build(self, dockerfile: Path, context: Path, tag: str, build_args: dict[str, str],
              mounts: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
        """`podman build` without intermediate images (--layers=false): only `tag` is left."""
        args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        args += [f"--volume={mount}" for mount in mounts]
        return self.run("build", "--layers=false", "--force-rm", "-f", str(dockerfile), *args,
                        "-t", tag, str(context), timeout=timeout)

    def cleanup(self) -> None:
        """Remove the containers and images this session made, and nothing else."""
        if self.containers:
            self.run("rm", "--force", "--ignore", *self.containers, check=False, timeout=120)
        for image in reversed(self.images):   # an image built on another goes first
            self.run("rmi", "--force", "--ignore", image, check=False, timeout=120)


@contextlib.contextmanager
def podman_engine():
    """Install and configure podman, yield a Podman, always remove what it made."""
    try:
        check_can_run()
        install_if_missing()
    except ContainersUnavailable as why:
        pytest.skip(f"no test containers: {why}")
    folder = Path(tempfile.mkdtemp(prefix="celestial-podman-"))
    conf = write_containers_conf(folder)
    podman = Podman({**os.environ, "CONTAINERS_CONF": str(conf)})
    try:
        info = podman.run("info", check=False, timeout=120)
        if info.returncode != 0:
            pytest.skip(f"no test containers: `podman info` failed: {info.stderr.strip()[-300:]}")
        yield podman
    finally:
        podman.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------- the base image
def debian_source() -> tuple[str, str]:
    """(mirror, suite) of this Debian machine's main archive, from apt's sources."""
    suite = re.search(r"^VERSION_CODENAME=(\w+)", Path("/etc/os-release").read_text(), re.MULTILINE)
    if suite is None:
        raise ContainersUnavailable("/etc/os-release names no VERSION_CODENAME (not Debian?)")
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    text = "\n".join(p.read_text() for p in sources if p.is_file())
    uris = re.findall(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.MULTILINE)
    one_line = r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+" + suite.group(1) + r"\s"
    uris += re.findall(one_line, text, re.MULTILINE)
    return (uris[0] if uris else DEFAULT_MIRROR), suite.group(1)


def debian_python_rootfs_tarball() -> Path:
    """A tarball of a minimal Debian with Python and pip, made once per set of inputs."""
    mirror, suite = debian_source()
    key = hashlib.sha256(f"{mirror} {suite} {BASE_PACKAGES}".encode()).hexdigest()[:16]
    tarball = BASE_CACHE / f"debian-{suite}-python-{key}.tar"
    if tarball.is_file():
        return tarball
    BASE_CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=BASE_CACHE))
    try:
        run_or_raise(["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], 900)
        run_or_raise(["chroot", str(rootfs), "apt-get", "install", "-y", "--no-install-recommends",
                      *BASE_PACKAGES], 600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        run_or_raise(["chroot", str(rootfs), "apt-get", "clean"], 60)
        partial = tarball.with_suffix(".partial")
        run_or_raise(["tar", "-C", str(rootfs), "-cf", str(partial), "."], 300)
        partial.replace(tarball)     # atomic: a concurrent or interrupted run sees none or all
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tarball


def debian_python_base(podman: Podman) -> str:
    """The base image (made from Debian packages) as a podman image of this session."""
    try:
        tarball = debian_python_rootfs_tarball()
    except ContainersUnavailable as why:
        pytest.skip(f"no base image: {why}")
    tag = podman.new_name("base", image=True)
    changes = [f"--change=ENV={env}" for env in BASE_ENV]
    podman.run("import", *changes, str(tarball), tag, timeout=300)
    return tag


# ------------------------------------------------------------- pip in a build
def host_pip_settings() -> dict[str, str]:
    """pip's settings on this machine (`pip config list`: files and PIP_* variables)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    settings = {}
    for key, value in re.findall(r"^\S*?\.([\w-]+)='(.*)'$", listed, re.MULTILINE):
        settings[key] = value
    return settings


def pip_build_mounts(folder: Path) -> list[str]:
    """`podman build --volume` arguments that give pip inside the build this machine's pip
    settings: a pip.conf with them at /etc/pip.conf, and every file or folder they name (CA
    bundle, constraints, local wheels and indexes) read-only at the same path."""
    settings = host_pip_settings()
    conf = folder / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
    mounts = [f"{conf}:/etc/pip.conf:ro"]
    for value in settings.values():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.name == "simple":    # a local index: its pages link to files beside it
                path = path.parent
            if path.is_absolute() and path.exists():
                mounts.append(f"{path}:{path}:ro")
    return list(dict.fromkeys(mounts))


def pip_index_url() -> str:
    """The index pip uses on this machine (where TORCH_CPU_INDEX must point here)."""
    return host_pip_settings().get("index-url", "https://pypi.org/simple")
