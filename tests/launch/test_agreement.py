"""Two nodes started with different configs stop at once with one message, instead of hanging.

Two ``orch launch`` processes on this machine form a 2-node job (one rank each) through a c10d
rendezvous on localhost. Each validates its own config and plans a world of 2 happily, but the
second was given another learning rate: the workers compare plan fingerprints before building
any mesh, and every rank stops; only rank 0 explains, naming which ranks hold which plan.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from launch_harness import ORCH, REPO, overrides

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nodes_with_different_configs_stop_with_one_message(tmp_path):
    port = free_port()
    nodes = []
    for node, lr in ((0, "0.001"), (1, "0.002")):
        args = [str(ORCH), "launch", "--nnodes", "2", "--node-rank", str(node),
                "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "agreement",
                "configs/tiny.yaml", *overrides(tmp_path / "run", f"train.lr={lr}")]
        nodes.append(subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode == 1 for node in nodes), outputs  # the run failed, not the input
    said = [out + err for out, err in outputs]
    assert all("step 1/" not in text for text in said)
    assert sum(text.count("ranks disagree") for text in said) == 1  # rank 0 only
    message = said[0]
    assert "ranks 0 have fsdp2, config " in message and "ranks 1 have fsdp2, config " in message
    assert "fix: start every node with the same config file, --set overrides" in message
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing recorded for a bad start
