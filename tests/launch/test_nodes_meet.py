"""How ``orch launch`` nodes meet, and what each says when they cannot: several launchers on
this machine stand for the nodes, each with its own ``ORCH_NODE`` (its lock's name), and
rendezvous timeouts of a few seconds keep the failures short."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest
from launch_harness import ORCH, REPO, launch, overrides

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


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_waiting_for_the_other_nodes_ends_the_launch_at_once(tmp_path, number):
    """Waiting in a static rendezvous, the launcher's main thread sits in torch's C++ store,
    where Python's handler waited 15 minutes (the rendezvous timeout) to run; the default
    action ended it at once but silently (Slurm's SIGTERM: exit 143, no line)."""
    proc = subprocess.Popen(
        [str(ORCH), "launch", "--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "configs/tiny.yaml",
         *overrides(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until it waits for node 1, which never comes
            if "waits at" in line:
                break
        time.sleep(3)  # inside the rendezvous
        proc.send_signal(number)
        assert proc.wait(timeout=60) == 128 + number
        name = signal.Signals(number).name
        assert proc.stdout.read() == (f"orch launch: stopped by {name} while waiting for the "
                                      "other nodes: no worker had started\n")
    finally:
        proc.kill()
        proc.wait()
