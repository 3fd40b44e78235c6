"""How ``orch launch`` nodes meet, and what each says when they cannot: several launchers on
this machine stand for the nodes, each with its own ``ORCH_NODE`` (its lock's name), and
rendezvous timeouts of a few seconds keep the failures short."""

from __future__ import annotations

import socket

import pytest
from launch_harness import launch, overrides

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_node_whose_node_0_never_comes_says_so_in_one_line(tmp_path):
    """A static rendezvous's node 1 times out connecting to node 0's store: torch raises
    DistNetworkError, which is not a DistStoreError, and the launch ended in a 90-line
    traceback."""
    port = free_port()
    done = launch("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "1",
                  "--master-addr", "127.0.0.1", "--master-port", str(port),
                  "--rdzv-conf", "timeout=3", "configs/tiny.yaml", *overrides(tmp_path / "run"),
                  timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert "Traceback" not in said
    assert (f"orch launch: the nodes could not meet at 127.0.0.1:{port} (DistNetworkError: The "
            "client socket has timed out after 3000ms") in said
