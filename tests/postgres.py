"""A throw-away PostgreSQL server for one test (root only: it runs as the `postgres` user), on
127.0.0.1 or on a network-namespace host's address (tests/netns.py) at a free port, its socket
and data in a temporary folder removed at the end."""
from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest


def server_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], capture_output=True,
                       timeout=600, check=False)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_database(name: str, host=None):
    """Yields the SQLAlchemy URL of a new database `name` on a fresh server, on `host` (a
    tests.netns.Host) if given."""
    import os
    if os.geteuid() != 0:
        pytest.skip("a PostgreSQL server for the test needs root (it runs as user postgres)")
    binaries = server_bin()
    if binaries is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL is not installed and could not be installed with apt-get")
    folder = Path(tempfile.mkdtemp(prefix="celestial-pg-"))
    shutil.chown(folder, "postgres")
    port, address = free_port(), host.address if host else "127.0.0.1"

    def as_postgres(*command: str) -> None:
        argv = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(host.command(argv) if host else argv, check=True, capture_output=True,
                       timeout=120)

    data = folder / "data"
    as_postgres(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    if host:     # clients on the other hosts of the test's own network
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {host.address}/24 trust\n")
    as_postgres(str(binaries / "pg_ctl"), "-D", str(data), "-o",
                f"-p {port} -k {folder} -c listen_addresses={address}", "-l",
                str(folder / "log"), "-w", "start")
    try:
        as_postgres(str(binaries / "createdb"), "-h", address, "-p", str(port), "-U",
                    "postgres", name)
        yield f"postgresql+psycopg2://postgres@{address}:{port}/{name}"
    finally:
        as_postgres(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(folder, ignore_errors=True)
