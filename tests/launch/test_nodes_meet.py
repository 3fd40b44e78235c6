"""How ``orch launch`` nodes meet, and what each says when they cannot: several launchers on
this machine stand for the nodes, each with its own ``ORCH_NODE`` (its lock's name), and
rendezvous timeouts of a few seconds keep the failures short."""

from __future__ import annotations

import os
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


def test_a_signal_taken_by_the_handler_and_the_watcher_both_is_said_once(monkeypatch, capsys):
    """Under c10d the main thread runs Python while it waits, so Python's handler and the
    watcher thread can both take one SIGTERM: both wrote the line before either ended the
    process."""
    import threading

    from orch.launch import waiting

    exits: list[int] = []
    monkeypatch.setattr(waiting, "_stopping", threading.Lock())
    monkeypatch.setattr(waiting.os, "_exit", exits.append)
    waiting._stop(signal.SIGTERM)
    second = threading.Thread(target=waiting._stop, args=(signal.SIGTERM,), daemon=True)
    second.start()
    second.join(timeout=1)
    assert second.is_alive() and exits == [128 + signal.SIGTERM]  # it waits for the first's exit
    assert capsys.readouterr().err.count("stopped by SIGTERM") == 1


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


def _own_address_torch_does_not_know() -> str | None:
    """An IPv4 address of this machine (not loopback) that its host name does not resolve to:
    one torch's c10d backend does not take for this machine."""
    import json

    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

    try:
        links = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True,
                                          text=True, check=True).stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    addresses = [a["local"] for link in links for a in link.get("addr_info", [])
                 if not a["local"].startswith("127.")]
    return next((a for a in addresses if not _matches_machine_hostname(a)), None)


def _listening(host: str, port: int, launcher: subprocess.Popen, within: float) -> bool:
    """Whether ``launcher`` listens on ``host:port`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and launcher.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.2)
    return False


def test_a_c10d_endpoint_given_as_the_heads_own_address_is_hosted_there(tmp_path):
    """torch hosts a c10d store where the endpoint matches the host name or the addresses it
    resolves to: given another of the head's addresses, no node hosted it and every node failed
    after ~100 s saying "could not meet ... its own --node-rank". The machine that has the
    address now hosts it. Two launchers on this machine, the second once the first listens
    (the second then joins as a client, its port being taken)."""
    if (address := _own_address_torch_does_not_know()) is None:
        pytest.skip("this machine has no address its host name does not resolve to")
    port = free_port()
    command = [str(ORCH), "launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
               "c10d", "--rdzv-endpoint", f"{address}:{port}", "--rdzv-id", "own-address",
               "--rdzv-conf", "read_timeout=20,timeout=60", "configs/tiny.yaml",
               *overrides(tmp_path / "run", "train.steps=1", "train.warmup_steps=0")]
    nodes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "ORCH_NODE": "head"})]
    try:
        if not _listening(address, port, nodes[0], 60):
            nodes[0].kill()
            pytest.fail(f"the head does not host the store: {nodes[0].communicate()[0]}")
        nodes.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "ORCH_NODE": "other"}))
        said = [node.communicate(timeout=240)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], said
        assert sum("step 1/1" in text for text in said) == 1
    finally:
        for node in nodes:
            node.kill()
            node.wait()


@pytest.mark.parametrize("backend, check", [
    ("static", "every node has the same --nnodes and its own --node-rank"),
    ("c10d", "the address is one of the nodes' (the one that hosts the store), reachable from "
             "this node, that its launcher runs, and that every node has the same --nnodes and "
             "--rdzv-id")])
def test_a_rendezvous_failure_names_what_to_check_under_its_backend(backend, check):
    """A c10d rendezvous numbers the nodes as they join: its failure told the user to give
    each node its own --node-rank, which it ignores."""
    from types import SimpleNamespace

    from orch.launch.launcher import _rendezvous_failure

    args = SimpleNamespace(rdzv_backend=backend, rdzv_endpoint="10.0.0.1:29400",
                           master_addr="127.0.0.1", master_port=29500)
    said = _rendezvous_failure(args, TimeoutError("timed out\nmore"))
    assert said.startswith("the nodes could not meet at 10.0.0.1:29400 (TimeoutError: timed "
                           "out); fix: check that ")
    assert said.endswith(check)
    assert (backend == "static") == ("--node-rank" in said)


def test_two_nodes_given_one_node_rank_stop_the_second_with_one_message(tmp_path):
    """Without a cluster description nothing checked node ranks: torchrun gave both nodes'
    workers RANK=1, and one trained with node 0 while the other said "a peer is gone" (or waited
    gloo's 30 minutes). The workers of the launcher that claims node rank 1 second stop, saying
    why (exit 2); node 0 and the first node 1 are a whole job. Two workers a node: claims on
    single ranks interleaved, and each node 1 lost one worker."""
    from orch.cluster.netbed import run_together

    port = free_port()
    commands = {name: ["env", f"ORCH_NODE={name}", str(ORCH), "launch", "--nnodes", "2",
                       "--nproc-per-node", "2", "--node-rank", rank, "--master-addr",
                       "127.0.0.1", "--master-port", str(port), "configs/tiny.yaml",
                       *overrides(tmp_path / "run", "train.steps=1", "train.warmup_steps=0")]
                for name, rank in (("d0", "0"), ("d1", "1"), ("d2", "1"))}
    done = run_together(commands, REPO, timeout=240)
    refused = [text for code, text in done.values() if code == 2]
    assert len(refused) == 1 and sorted(code for code, _ in done.values()) == [0, 0, 2], done
    assert ("orch worker: node rank 1 started twice: two nodes were given --node-rank 1, and "
            "the other (") in refused[0] and "fix: give each node its own --node-rank" in refused[0]
    assert "not restarted" in refused[0] or "bad input" in refused[0], refused[0]
    assert "step 1/1" in done["d0"][1]


def test_a_worker_that_cannot_reach_torchruns_store_says_why_within_a_minute(monkeypatch):
    """Under c10d torch gives the workers the head's host name, which resolved to loopback
    there (Debian's 127.0.1.1): the other nodes' workers waited 30 minutes in silence."""
    from orch.runtime import agent_store

    monkeypatch.setattr(agent_store, "CONNECT_S", 1)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens there
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    start = time.monotonic()
    with pytest.raises(agent_store.StoreUnreachable) as caught:
        agent_store.connect(2)
    assert time.monotonic() - start < 30
    said = str(caught.value)
    assert said.startswith(f"cannot reach torchrun's store at localhost:{os.environ['MASTER_PORT']}"
                           " (MASTER_ADDR:MASTER_PORT) within 1 s (")
    assert ": localhost is 127.0.0.1 here, a loopback address, but the job spans nodes" in said
    assert said.endswith("fix: pass --local-addr THIS_NODE_IP on every node (each its own "
                         "address on the network the nodes share)")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one node: loopback is right, the fix general
    with pytest.raises(agent_store.StoreUnreachable) as caught:
        agent_store.connect(2)
    assert "loopback" not in str(caught.value) and "--local-addr" in str(caught.value)


def test_a_node_rank_is_claimed_once_per_torchrun_attempt():
    """By a launcher (all its workers), not by each rank: two nodes' claims on single ranks
    interleaved with several workers a node, and each lost one worker."""
    import torch.distributed as dist

    from orch.runtime.agent_store import NodeTaken, claim_node

    store = dist.HashStore()
    claim_node(store, "0", "1", "host-a:10")
    claim_node(store, "0", "1", "host-a:10")  # its second worker
    claim_node(store, "0", "0", "host-b:20")
    claim_node(store, "1", "1", "host-c:30")  # a restart claims again
    with pytest.raises(NodeTaken, match=r"node rank 1 started twice: two nodes were given "
                                        r"--node-rank 1, and the other \(host-a\) took it"):
        claim_node(store, "0", "1", "host-c:30")
