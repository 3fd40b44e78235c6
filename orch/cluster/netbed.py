"""A multi-node cluster on one Linux machine: network namespaces joined by rate-limited links.

Each *node* is a network namespace; each *network* a bridge in a namespace of its own (so the
host's namespace is left alone), with one veth pair per attached node: ``<network>`` inside the
node, carrying the address ``10.<network index>.0.<node index + 1>/24``, the other end on the
bridge. A network's ``rate_mbit`` caps every node's link to it in both directions (``tc tbf`` on
both ends of the pair: this kernel has no ``netem``, so there is no added delay), which is how a
fast pair of nodes stands in for InfiniBand or RoCE and a slow shared network for Ethernet.
veth reports a fixed 10 Gb/s in sysfs whatever the limit, so the bed writes its own cluster
description (:meth:`NetBed.cluster`) with the rates it set.

Building takes well under a second (a few dozen ``ip``/``tc`` calls); the cost of using it is
starting torch inside every namespace. Needs root (or CAP_NET_ADMIN) and iproute2;
:func:`unavailable` says why not, for tests to skip with. Everything is torn down on exit, also
after a failure, and names carry the creating process's id so concurrent beds do not collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP_GRACE_S = 45
"""How long a command still running at its deadline has, after SIGTERM, to stop its own children
(torchrun's agent stops its workers, which sit in sessions of their own) before SIGKILL."""

TBF_BURST = "64kb"
TBF_LATENCY = "100ms"
"""tbf's bucket and queue bound: a burst of a few dozen packets, and a queue long enough that
gloo's bursts are delayed, not dropped (drops would stall TCP and measure recovery instead)."""


@dataclass(frozen=True)
class Network:
    """A network of the bed: its name (also the interface name inside nodes, at most 15
    characters), what kind of NIC it stands for, and its per-link rate."""

    name: str
    nic: str
    rate_mbit: int


@dataclass(frozen=True)
class Attached:
    """A node's interface on one network."""

    network: Network
    interface: str
    address: str


def unavailable() -> str | None:
    """Why a bed cannot be built here, or None when it can."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"orch-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetBed:
    """Nodes (network namespaces) on networks (bridges); use as a context manager."""

    def __init__(self, networks: Sequence[Network], nodes: Mapping[str, Sequence[str]]) -> None:
        """``nodes`` maps each node's name to the names of the networks it is attached to."""
        self.networks = {net.name: net for net in networks}
        self.nodes = dict(nodes)
        self.tag = f"o{os.getpid() % 100000}"
        self.attached: dict[str, list[Attached]] = {}
        self._made: list[list[str]] = []
        """Commands that undo what was made, newest last."""

    def namespace(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def __enter__(self) -> NetBed:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, *args: str, undo: Sequence[str] = ()) -> None:
        _run("ip", *args)
        if undo:
            self._made.append(["ip", *undo])

    def _build(self) -> None:
        switch = f"{self.tag}-switch"
        self._ip("netns", "add", switch, undo=("netns", "del", switch))
        for index in range(len(self.networks)):
            bridge = f"br{index}"
            self._ip("-n", switch, "link", "add", bridge, "type", "bridge")
            self._ip("-n", switch, "link", "set", bridge, "up")
        for number, (node, names) in enumerate(self.nodes.items()):
            ns = self.namespace(node)
            self._ip("netns", "add", ns, undo=("netns", "del", ns))
            self._ip("-n", ns, "link", "set", "lo", "up")
            for name in names:
                net = self.networks[name]
                index = list(self.networks).index(name)
                outer = f"v{index}n{number}"
                self._ip("-n", switch, "link", "add", outer, "type", "veth", "peer", "name",
                         net.name, "netns", ns)
                self._ip("-n", switch, "link", "set", outer, "master", f"br{index}", "up")
                address = f"10.{index + 1}.0.{number + 1}"
                self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", net.name)
                self._ip("-n", ns, "link", "set", net.name, "up")
                for where, dev in ((switch, outer), (ns, net.name)):
                    _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root",
                         "tbf", "rate", f"{net.rate_mbit}mbit", "burst", TBF_BURST, "latency",
                         TBF_LATENCY)
                self.attached.setdefault(node, []).append(Attached(net, net.name, address))

    def address(self, node: str, network: str) -> str:
        return next(a.address for a in self.attached[node] if a.network.name == network)

    def cluster(self, name: str = "netbed", device: str = "cpu", devices: int = 1
                ) -> dict[str, Any]:
        """A cluster description of the bed (as ``orch.plan.cluster`` reads it), with the
        rates the bed set, in the order the nodes were given; each veth is its NIC's
        ``interface`` too (a NIC of type ib or roce names an HCA, which a veth stands in for)."""
        return {"name": name, "device": device, "nodes": [
            {"name": node, "devices": devices, "nics": [
                {"name": a.interface, "type": a.network.nic, "interface": a.interface,
                 "bandwidth_gbps": a.network.rate_mbit / 1000, "network": a.network.name}
                for a in self.attached[node]]}
            for node in self.nodes]}

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    def orch_launch(self, orch: str, args: Sequence[str], master: tuple[str, str], port: int,
                    cwd: Path, timeout: float = 600) -> dict[str, tuple[int | None, str]]:
        """``orch launch ... args`` in every node at once, one process per node (torchrun's
        node ranks in the listed order, its store at node ``master[0]``'s address on network
        ``master[1]``; ``args`` are CONFIG and what follows it, ``--node-name`` is added);
        each node's exit code and output (see :func:`run_together`)."""
        address = self.address(*master)
        order = [master[0], *(node for node in self.nodes if node != master[0])]
        commands = {}
        for rank, node in enumerate(order):  # the store's node has node rank 0
            argv = [orch, "launch", "--nnodes", str(len(order)), "--nproc-per-node", "1",
                    "--node-rank", str(rank), "--master-addr", address, "--master-port",
                    str(port), *args, "--node-name", node]
            commands[node] = self.command(node, argv)
        done = run_together(commands, cwd, timeout)
        return {node: done[node] for node in self.nodes}

    def tx_bytes(self, node: str, interface: str) -> int:
        """Bytes ``node`` has sent on ``interface`` so far."""
        out = _run("ip", "netns", "exec", self.namespace(node), "cat",
                   f"/sys/class/net/{interface}/statistics/tx_bytes")
        return int(out)

    def close(self) -> None:
        """Undo everything (namespaces take their veths and bridges with them)."""
        while self._made:
            subprocess.run(self._made.pop(), capture_output=True)


def run_together(commands: Mapping[str, Sequence[str]], cwd: Path, timeout: float
                 ) -> dict[str, tuple[int | None, str]]:
    """Run every command at once (the nodes of one job) and return each one's exit code and
    output (stdout and stderr together). A command still running at ``timeout`` seconds is
    stopped (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`) and gets exit code None, so a
    hung node fails a test with what every node said rather than with a bare timeout. Output
    goes to files, not pipes: a node blocked on a full pipe could hold up the others."""
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        logs = {name: stack.enter_context(tempfile.TemporaryFile("w+")) for name in commands}
        procs = {name: subprocess.Popen(list(argv), cwd=cwd, text=True, stdout=logs[name],
                                        stderr=subprocess.STDOUT)
                 for name, argv in commands.items()}
        codes: dict[str, int | None] = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        for name, proc in procs.items():
            if codes[name] is None:
                _stop(proc)
        outputs = {}
        for name, log in logs.items():
            log.seek(0)
            outputs[name] = log.read()
    return {name: (codes[name], outputs[name]) for name in commands}


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM ``proc``, then SIGKILL if it has not ended within :data:`STOP_GRACE_S`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


__all__ = ["Attached", "NetBed", "Network", "unavailable"]
