"""tests/netns.py: hosts made of network namespaces reach each other and leave nothing behind."""
from __future__ import annotations

import sys

import pytest

from tests import netns

pytestmark = pytest.mark.skipif(netns.unavailable() is not None,
                                reason=netns.unavailable() or "")

SERVER = """
import socket, sys
listener = socket.create_server((sys.argv[1], 29400))
print("listening", flush=True)
connection, _ = listener.accept()
connection.sendall(b"from " + sys.argv[1].encode())
"""
CLIENT = ("import socket, sys; "
          "print(socket.create_connection((sys.argv[1], 29400)).recv(64).decode())")


def test_three_hosts_talk_over_tcp_and_are_removed_afterwards():
    with netns.hosts(3) as machines:
        assert len({machine.address for machine in machines}) == 3
        server = machines[1].popen([sys.executable, "-c", SERVER, machines[1].address],
                                   stdout=-1, text=True)
        assert server.stdout.readline().strip() == "listening"
        reply = machines[2].run([sys.executable, "-c", CLIENT, machines[1].address],
                                capture_output=True, text=True, timeout=30)
        assert reply.stdout.strip() == f"from {machines[1].address}"
        made = [machine.name for machine in machines]
    left = netns.namespaces()
    assert not [name for name in made if name in left]

