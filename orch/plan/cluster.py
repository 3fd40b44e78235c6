"""Cluster descriptions: which nodes exist, what devices they hold, and what NICs connect them.

A cluster is written by hand (or detected later) as YAML::

    name: dgx-h100-4node
    device: h100-sxm-80gb              # default device type of every node
    device_overrides: {peak_flops: 989.4e12}
    nodes:
      - {name: "node{i}", count: 4, devices: 8,
         nics: [{name: mlx5_0, type: ib, bandwidth_gbps: 400, network: ib-a}]}

``count: N`` expands one entry into N nodes, ``{i}`` in the name becoming 0..N-1 (``count: 1``
without ``{i}``: one node of that name). A node may
name its own ``device`` and ``device_overrides``; top-level overrides belong to the top-level
device. Global ranks fill nodes in the order they are listed, ``devices`` ranks per node. A node
may list its ``gpus`` as ``orch cluster detect`` found them, one per device.

The format is declared as dataclasses and read by the config schema engine (``coerce.build``),
which reports every mistake with its dotted path, ``nodes[2].nics[0].type``; only the rules
across fields are checked here. All problems are raised together as one ``ClusterError``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, make_dataclass
from functools import cached_property
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from orch.config.coerce import Check, Rejected, build, locate
from orch.config.schema import Bytes
from orch.config.source import parse_yaml_text
from orch.errors import Problem, ProblemsError
from orch.plan.devices import (
    OVERRIDABLE,
    DeviceSpec,
    UnknownDeviceError,
    get_device,
    with_overrides,
)
from orch.plan.units import (
    FlopsPerSecond,
    Gbps,
    LinkBandwidth,
    MemoryBandwidth,
    Seconds,
    device_memory,
)

NicType = Literal["ib", "roce", "ethernet"]
NIC_TYPES: tuple[str, ...] = get_args(NicType)


def _known_device(name: str) -> str:
    try:
        get_device(name)
    except UnknownDeviceError as exc:
        raise Rejected(exc.message, exc.fix) from None
    return name


Name = Annotated[str, Check(lambda s: s.strip() != "", "a non-empty string", "write a name: node0")]
Count = Annotated[int, Check(lambda n: n >= 1, "a positive whole number",
                             "write an integer such as 8")]
Positive = Annotated[float, Check(lambda x: x > 0, "a positive number",
                                  "write a number such as 400")]
DeviceName = Annotated[str, _known_device]


class ClusterError(ProblemsError):
    """A cluster description that cannot be used as written."""

    title = "invalid cluster description"


@dataclass(frozen=True)
class NicSpec:
    name: Name
    """The device: an HCA for ib and roce (``mlx5_0``, what NCCL_IB_HCA lists), the network
    interface for ethernet (``eth0``)."""
    type: NicType
    bandwidth_gbps: Gbps
    """The port's speed in Gb/s (a number, or with its unit: ``200Gb/s``, ``25GB/s``)."""
    network: Name = ""
    """Fabric this NIC is attached to; NICs on the same network reach each other."""
    interface: str = ""
    """The network interface that carries socket traffic over this NIC (IPoIB ``ib0``, a RoCE
    port's netdev, ``eth0``): what gloo and NCCL's socket transport bind to. Empty: ``name`` for
    an ethernet NIC; an HCA without it has no known interface (one without IPoIB has none)."""
    measured_gbps: Gbps | None = None
    """What ``orch cluster probe`` measured through this NIC; the planner prefers it to
    ``bandwidth_gbps`` (the nominal link speed)."""

    @property
    def netdev(self) -> str:
        """The socket interface over this NIC, or "" where none is known (an HCA's name is not
        a network interface: ``GLOO_SOCKET_IFNAME=mlx5_0`` fails)."""
        return self.interface or (self.name if self.type == "ethernet" else "")

    @property
    def bandwidth(self) -> float:
        """Bytes/s in one direction: measured, else nominal."""
        return (self.measured_gbps or self.bandwidth_gbps) * 1e9 / 8


@dataclass(frozen=True)
class GpuSpec:
    """One GPU as NVML reported it, so a node's entry records which boards it was written for."""

    index: int
    """NVML's index (PCI bus order)."""
    name: str
    uuid: str
    memory_bytes: int = 0
    """0: unknown."""
    nvlink_peers: tuple[int, ...] = ()
    """Indices of the GPUs this one reaches over NVLink (directly or through NVSwitch)."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    devices: int
    device: DeviceSpec
    nics: tuple[NicSpec, ...] = ()
    gpus: tuple[GpuSpec, ...] = ()

    def interface_on(self, network: str) -> str:
        """This node's first socket interface on ``network``, "" where none of its NICs there
        names one (gloo and NCCL then pick their own)."""
        return next(iter(self.interfaces_on(network)), "")

    def interfaces_on(self, network: str) -> tuple[str, ...]:
        """Every socket interface of this node's NICs on ``network``, in listed order: the
        planner prices all of them (``orch.plan.topology.attachments``), so the launch lists
        all of them (``NCCL_SOCKET_IFNAME``, ``GLOO_SOCKET_IFNAME``)."""
        return tuple(dict.fromkeys(nic.netdev for nic in self.nics
                                   if nic.network == network and nic.netdev))

    def gloo_interfaces(self, network: str, group: Sequence[NodeSpec]) -> tuple[str, ...]:
        """This node's interfaces on ``network`` for a gloo group spanning the nodes ``group``:
        gloo makes one connection per listed interface and needs every process of a group to
        list as many (torch's rule for ``GLOO_SOCKET_IFNAME``), so each node takes its first
        ones, as many as the node of the group with the fewest has (a node with none counts as
        one: gloo's own default device)."""
        mine = self.interfaces_on(network)
        fewest = min(len(node.interfaces_on(network)) or 1 for node in group)
        return mine[:fewest]


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: tuple[NodeSpec, ...]
    source: str = field(default="", compare=False)
    """File the description came from, for messages."""

    @property
    def world_size(self) -> int:
        return sum(node.devices for node in self.nodes)

    @cached_property
    def node_ends(self) -> tuple[int, ...]:
        """One past the last global rank of each node (ranks fill nodes in order)."""
        return tuple(accumulate(node.devices for node in self.nodes))

    def node_of(self, rank: int) -> int:
        """Index into ``nodes`` of the node holding global ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a cluster of {self.world_size} devices")
        return bisect_right(self.node_ends, rank)


# --- the file format, read by the config schema engine ----------------------------------------

_OVERRIDE_TYPES: dict[str, Any] = {
    "memory_bytes": Annotated[Bytes, Check(lambda n: n > 0, "a positive byte size", "write 80GiB"),
                              device_memory],
    "compute_efficiency": Annotated[float, Check(lambda x: 0 < x <= 1, "a fraction in (0, 1]",
                                                 "write e.g. 0.55")],
    **dict.fromkeys(("intra_node_bw", "inter_node_bw", "host_bw"), LinkBandwidth),
    "memory_bw": MemoryBandwidth,
    **dict.fromkeys(("peak_flops", "fp32_flops"), FlopsPerSecond),
    **dict.fromkeys(("intra_latency_s", "inter_latency_s"), Seconds),
}
Overrides = make_dataclass(  # one optional field per overridable DeviceSpec number
    "Overrides", [(n, _OVERRIDE_TYPES.get(n, Positive) | None, None) for n in OVERRIDABLE])


@dataclass(kw_only=True)
class _NodeEntry:
    name: Name
    count: Count | None = None
    devices: Count
    device: DeviceName | None = None
    device_overrides: Overrides = field(default_factory=Overrides)
    nics: tuple[NicSpec, ...] = ()
    gpus: tuple[GpuSpec, ...] = ()


@dataclass(kw_only=True)
class _ClusterFile:
    name: Name | None = None
    device: DeviceName | None = None
    device_overrides: Overrides = field(default_factory=Overrides)
    nodes: tuple[_NodeEntry, ...] = ()


def _given(overrides: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(overrides).items() if v is not None}


MAX_WORLD_SIZE = 1 << 20
"""The most devices a plan is made for: ten times the largest training clusters of 2026; a plan
lists every rank, so a mistyped 10**9 (a world size, or a cluster's node count) would run for
minutes and GBs before saying anything."""


def _nodes(file: _ClusterFile, report: Callable[[str, str, str], None]) -> tuple[NodeSpec, ...]:
    """Expand ``count``, resolve each node's device, and check the rules across fields."""
    if not file.nodes:
        report("nodes", "expected a non-empty list of nodes",
               "write nodes: [{name: node0, devices: 8}]")
    top = _given(file.device_overrides)
    if top and file.device is None:
        report("device_overrides", "overrides given without a top-level device",
               "add 'device:' at the top, or move the overrides onto the nodes")
    nodes: list[NodeSpec] = []
    devices = 0
    for index, entry in enumerate(file.nodes):
        path, name, count = f"nodes[{index}]", entry.name, entry.count
        devices += (count or 1) * entry.devices
        if devices > MAX_WORLD_SIZE:
            report(f"{path}.count", f"{count or 1} node(s) of {entry.devices} devices bring the "
                   f"cluster to {devices:,} devices, over the {MAX_WORLD_SIZE:,} orch plans for",
                   "describe the nodes a job uses, at most that many devices")
            break
        own = _given(entry.device_overrides)
        device = (with_overrides(get_device(entry.device), **own) if entry.device
                  else with_overrides(get_device(file.device), **top | own) if file.device
                  else None)
        if device is None:
            report(f"{path}.device", "no device type for this node",
                   "set 'device:' at the top of the file or on this node")
        if entry.gpus and len(entry.gpus) != entry.devices:
            report(f"{path}.gpus", f"{len(entry.gpus)} listed, but devices: {entry.devices}",
                   "list one GPU per device, or correct 'devices:'")
        if count is not None and count > 1 and "{i}" not in name:  # (count 1: the one node)
            report(f"{path}.name", f"{name!r} has no '{{i}}', so count: {count} would repeat it",
                   f"write name: \"{name}{{i}}\" to get {name}0..{name}{count - 1}")
            continue
        for node_name in [name.replace("{i}", str(i)) for i in range(count)] if count else [name]:
            if device is not None:
                nodes.append(NodeSpec(node_name, entry.devices, device, entry.nics,
                                      entry.gpus))
    _infiniband_alone(file, report)
    return tuple(nodes)


def _infiniband_alone(file: _ClusterFile, report: Callable[[str, str, str], None]) -> None:
    """An InfiniBand fabric holds only InfiniBand ports: a named network listing ib NICs beside
    roce or ethernet ones is a typo (the planner priced it at the slower port and named it ib).
    NICs without a network are on the default one, which stands for "reachable somehow" across
    nodes (an ib node and an ethernet node meet at the slower one's figure); but one node's
    unnamed ib NICs beside its roce or ethernet ones were added up as one network and labelled
    by the slower type, while a group runs over InfiniBand or over sockets, never both (adding
    a 10 GbE port to two 400 Gb/s InfiniBand nodes made their plan faster): their networks must
    be named."""
    kinds: dict[str, dict[str, int]] = {}  # network -> NIC type -> the first entry with it
    for index, entry in enumerate(file.nodes):
        unnamed = sorted({nic.type for nic in entry.nics if not nic.network})
        if "ib" in unnamed and len(unnamed) > 1:
            others = " and ".join(kind for kind in unnamed if kind != "ib")
            report(f"nodes[{index}].nics", f"ib NICs and {others} ones without a 'network': "
                   "they would be priced as one network, their bandwidths added, but a group runs "
                   "over InfiniBand or over sockets, not both",
                   "name each fabric's network on every node, e.g. network: ib on the ib NICs "
                   f"and network: dc on the {others} ones (the planner then takes the faster "
                   "network a group's nodes share)")
        for nic in entry.nics:
            if nic.network:
                kinds.setdefault(nic.network, {}).setdefault(nic.type, index)
    for network, first in kinds.items():
        if "ib" in first and len(first) > 1:
            other = min(index for kind, index in first.items() if kind != "ib")
            report(f"nodes[{other}].nics", f"network {network!r} has ib NICs and "
                   f"{' and '.join(sorted(set(first) - {'ib'}))} ones: an InfiniBand fabric "
                   "carries InfiniBand ports only",
                   "give the NICs of each fabric their own network name (and their own type)")


def _names_used_twice(data: Any, report: Callable[[str, str, str], None]) -> None:
    """Node names (``count`` expanded) and a node's NIC names used twice, read off the plain
    data, so that they are said with the values that do not convert (the rules across fields
    wait for those)."""
    entries = data.get("nodes") if isinstance(data, dict) else None
    seen: set[str] = set()
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        name, count = entry.get("name"), entry.get("count")
        if isinstance(name, str) and name:
            expands = isinstance(count, int) and 0 < count <= MAX_WORLD_SIZE and "{i}" in name
            for node_name in ([name.replace("{i}", str(i)) for i in range(count)] if expands
                              else [name]):
                if node_name in seen:
                    report(f"nodes[{index}].name", f"node name {node_name!r} is used twice",
                           "give every node a distinct name")
                seen.add(node_name)
        nics = entry.get("nics")
        names = [nic.get("name") for nic in nics if isinstance(nic, dict)
                 and isinstance(nic.get("name"), str)] if isinstance(nics, list) else []
        for twice in sorted({n for n in names if names.count(n) > 1}):  # doubled its bandwidth
            report(f"nodes[{index}].nics", f"NIC name {twice!r} is listed {names.count(twice)} "
                   "times", "list each NIC once (its bandwidth_gbps is the port's)")


def cluster_from_dict(data: Any, source: str = "", locs: dict[str, str] | None = None
                      ) -> ClusterSpec:
    """Build a ClusterSpec from plain data; raise ClusterError listing every problem."""
    locs = locs or {}
    problems: list[Problem] = []

    def report(path: str, message: str, fix: str) -> None:
        problems.append(Problem(locate(path, locs, source), message, fix))

    file = build(_ClusterFile, data, "", locs, problems, source)
    converted = not problems
    _names_used_twice(data, report)
    if converted:  # rules across fields would only repeat conversion problems
        nodes = _nodes(file, report)
    if problems:
        raise ClusterError(problems)
    return ClusterSpec(file.name or Path(source).stem or "cluster", nodes, source)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a cluster description YAML file."""
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (a relative path is from the current " \
            f"directory: {path.absolute()})"
        raise ClusterError([Problem(str(path), f"cluster description not found{where}",
                                    "check the path, e.g. configs/clusters/dgx-h100-4node.yaml")])
    data, locs, problems = parse_yaml_text(path.read_text(), str(path))
    if problems:
        raise ClusterError(problems)
    return cluster_from_dict(data, str(path), locs)


__all__ = ["MAX_WORLD_SIZE", "ClusterError", "ClusterSpec", "GpuSpec", "NIC_TYPES", "NicSpec",
           "NodeSpec", "cluster_from_dict", "load_cluster"]
