"""Which link each parallel group communicates over, and how fast it is.

A collective is as fast as the slowest device pair it involves: a group inside one node uses that
node's device interconnect (NVLink, PCIe); a group spanning nodes runs over a network every node
it touches is attached to (a cluster description's ``network`` of each NIC; NICs that name none
share one default network), the fastest such, limited by the smallest per-device share of that
network's NICs among those nodes (and, for its ring collectives, by as many such shares as the
group has ranks on a node: :attr:`Link.ring_bandwidth`). A group whose nodes share no network
cannot communicate: its link is ``unreachable`` and the plan refuses it. The search asks this
for every candidate plan at up to thousands of ranks, so no Python loop here runs per rank: ranks
fill nodes in order, so a group sorted by rank (as ``orch.plan.layout`` produces) is on one node
when its ends are, an arithmetic progression of ranks crosses nodes predictably, and any other
group leaves a node when it passes the node's last rank, found by bisection.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import accumulate
from typing import Literal

from orch.plan.cluster import ClusterSpec, NicSpec, NodeSpec
from orch.plan.devices import DeviceSpec

LinkKind = Literal["none", "intra", "inter", "unreachable"]


@dataclass(frozen=True)
class Link:
    """The link a group's collectives run over."""

    kind: LinkKind
    bandwidth: float
    """Bytes/s per device in one direction, of the slowest link in the group (0 for none)."""
    latency_s: float
    """Per ring step, of the slowest link in the group."""
    nodes: int
    """Distinct nodes the group spans."""
    network: str = ""
    """The network an inter-node group runs over ("" for the default network)."""
    nic: str = ""
    """That network's NIC type (ib, roce, ethernet; "" when the description names none)."""
    ring_bandwidth: float | None = None
    """Bytes/s per device of a ring collective over the group (all-gather, reduce-scatter,
    all-reduce; left out, ``bandwidth``). Inside a node, ``bandwidth``. Across nodes NCCL runs one
    ring per NIC: each of the group's ranks on a node drives one through its own share of the
    node's NICs, and the bytes each ring carries between nodes are the same as between two
    ranks inside one, so the group moves data at its per-device share times the fewest of its
    ranks on one node, up to the node's device interconnect (which the same bytes cross). One
    rank a node (HSDP's replicas, a pipeline) gets its share alone, as ``bandwidth`` says; a
    whole node's ranks in one group (FSDP across nodes) get all of the node's NICs."""

    def __post_init__(self) -> None:
        if self.ring_bandwidth is None:  # one rank a node's rings, or none: the share
            object.__setattr__(self, "ring_bandwidth", self.bandwidth)


NO_LINK = Link("none", 0.0, 0.0, 1)
"""A group of one rank: nothing crosses any wire (so no bandwidth to speak of)."""


@dataclass(frozen=True)
class Attachment:
    """One node's share of one network: bytes/s per device, and the NIC type."""

    network: str
    bandwidth: float
    nic: str = ""


Attachments = tuple[Attachment, ...]


class Topology:
    """Nodes in rank order, each with its device and the networks it is attached to."""

    def __init__(self, devices: Sequence[DeviceSpec], sizes: Sequence[int],
                 networks: Sequence[Attachments]) -> None:
        if not len(devices) == len(sizes) == len(networks) >= 1:
            raise ValueError("a topology needs one device, size and network list per node")
        self.devices = list(devices)
        self.node_ends = list(accumulate(sizes))
        """One past the last global rank of each node."""
        self.world_size = self.node_ends[-1]
        # Equal node sizes let node_of divide instead of bisect.
        self._per_node = sizes[0] if len(set(sizes)) == 1 else 0
        self._intra = [Link("intra", d.intra_node_bw, d.intra_latency_s, 1) for d in devices]
        self._networks = [{a.network: a for a in attached} for attached in networks]
        self._inter_lat = [d.inter_latency_s for d in devices]
        self._same_inter = len({(tuple(sorted(n.items())), lat) for n, lat in
                                zip(self._networks, self._inter_lat, strict=True)}) == 1
        self.memory_bytes = min(d.memory_bytes for d in devices)
        """The least memory of any device: every rank holds its share of the model, so the
        smallest device bounds a plan (the fastest need not be the largest)."""
        self.sizes = list(sizes)
        self._network_links: dict[tuple[int, ...], Link] = {}
        self._total_peak: dict[str, float] = {}
        self.homogeneous = bool(self._per_node) and self._same_inter and len(set(self._intra)) == 1
        """Every node alike: one group of a dimension then stands for all of them."""

    @classmethod
    def uniform(cls, world_size: int, gpus_per_node: int, device: DeviceSpec) -> Topology:
        """Identical nodes of ``gpus_per_node`` devices; the last may be partly filled."""
        full, rest = divmod(world_size, gpus_per_node)
        sizes = [gpus_per_node] * full + ([rest] if rest else [])
        default = (Attachment("", device.inter_node_bw),)
        return cls([device] * len(sizes), sizes, [default] * len(sizes))

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, order: Sequence[int] = ()) -> Topology:
        """The cluster's nodes in ``order`` (indices into ``cluster.nodes``; default: as
        listed): ranks fill them in that order."""
        nodes = [cluster.nodes[i] for i in order] if order else list(cluster.nodes)
        return cls([n.device for n in nodes], [n.devices for n in nodes],
                   [attachments(n) for n in nodes])

    def slowest(self, precision: str) -> DeviceSpec:
        """The slowest device at ``precision`` (synchronous training runs at its pace): the
        order can differ by precision (an RTX 4090 is slower than an H100 in bf16, faster in
        fp32)."""
        return min(self.devices, key=lambda d: pace(d, precision))

    def total_peak(self, precision: str) -> float:
        """FLOP/s of every device together at ``precision``: what MFU is the share of (the
        slowest device's peak times the ranks undercounts the faster ones, so a well-balanced
        pipeline over mixed nodes showed more than 100%)."""
        if precision not in self._total_peak:  # asked by every plan a search prices
            self._total_peak[precision] = sum(
                size * device.peak(precision)
                for device, size in zip(self.devices, self.sizes, strict=True))
        return self._total_peak[precision]

    @cached_property
    def description(self) -> str:
        """The devices in rank order, alike ones counted together: ``16 x h100-sxm-80gb``, or
        ``8 x h200 + 8 x h100-sxm-80gb`` on a mixed cluster (one name would hide the others);
        made once (every plan a search prices carries it)."""
        counts: dict[str, int] = {}
        for device, size in zip(self.devices, self.sizes, strict=True):
            counts[device.name] = counts.get(device.name, 0) + size
        return " + ".join(f"{count} x {name}" for name, count in counts.items())

    def node_of(self, rank: int) -> int:
        if self._per_node:
            return rank // self._per_node
        return bisect_right(self.node_ends, rank)

    def nodes_of(self, group: Sequence[int]) -> Sequence[int]:
        """Nodes holding the ranks of ``group`` (sorted by rank), ascending."""
        return self._spread(group)[0] if len(group) > 1 else [self.node_of(group[0])]

    def _spread(self, group: Sequence[int]) -> tuple[Sequence[int], int]:
        """Nodes holding the ranks of ``group`` (sorted ascending), and the fewest of its ranks
        any of them holds, without visiting every rank.

        Layout groups are arithmetic progressions; on equal nodes a step below the node size
        visits every node between the ends and a larger step gives each rank its own node.
        The nodes between the ends hold ``per // step`` ranks or one more, repeating every
        ``step`` nodes at most, so the end nodes and ``step`` nodes after the first are counted
        (on 16-device nodes ranks 0, 9, ..., 63 are two a node; ``16 // 9`` said one).
        (The equality check runs over the ranks, but in C.)
        Anything else is walked one bisection per node.
        """
        lo, hi, per = group[0], group[-1], self._per_node
        step = group[1] - lo
        if per and hi - lo == step * (len(group) - 1) and group == list(range(lo, hi + 1, step)):
            if step >= per:  # one rank per node
                nodes = (range(lo // per, hi // per + 1, step // per) if step % per == 0
                         else [rank // per for rank in group])
                return nodes, 1
            first, last = lo // per, hi // per
            fewest = min(  # ranks up to the node's last, less those before its first
                (min(hi, (node + 1) * per - 1) - lo) // step
                - (max(lo, node * per) - 1 - lo) // step
                for node in {*range(first, min(last, first + step) + 1), last})
            return range(first, last + 1), fewest
        nodes, index, fewest = [], 0, len(group)
        while index < len(group):
            node = self.node_of(group[index])
            nodes.append(node)
            start, index = index, bisect_left(group, self.node_ends[node], index)
            fewest = min(fewest, index - start)
        return nodes, fewest

    def link(self, group: Sequence[int]) -> Link:
        """The link of one group of global ranks, sorted ascending."""
        if len(group) == 1:
            return NO_LINK
        if group[-1] >= self.world_size:
            raise ValueError(f"rank {group[-1]} is outside a topology of {self.world_size}")
        first = self.node_of(group[0])
        if first == self.node_of(group[-1]):
            return self._intra[first]
        nodes, fewest = self._spread(group)
        if self._same_inter:
            best = max(self._networks[first].values(), key=lambda a: a.bandwidth)
            found = Link("inter", best.bandwidth, self._inter_lat[first], len(nodes),
                         best.network, best.nic)
        else:
            key = tuple(nodes)  # groups of a dimension often span the same nodes
            if key not in self._network_links:
                self._network_links[key] = self.network_link(nodes)
            found = self._network_links[key]
        if found.kind == "unreachable" or fewest == 1:
            return found
        inside = (self._intra[first] if self.homogeneous
                  else min((self._intra[n] for n in nodes), key=lambda k: k.bandwidth))
        return replace(found, ring_bandwidth=min(found.bandwidth * fewest, inside.bandwidth))

    def network_link(self, nodes: Sequence[int]) -> Link:
        """The fastest network all of ``nodes`` are attached to, at the slowest node's share."""
        common = set(self._networks[nodes[0]])
        for node in nodes[1:]:
            common &= self._networks[node].keys()
        latency = max(self._inter_lat[n] for n in nodes)
        if not common:
            return Link("unreachable", 0.0, latency, len(nodes))
        shares = {net: min((self._networks[n][net] for n in nodes), key=lambda a: a.bandwidth)
                  for net in sorted(common)}
        best = max(shares.values(), key=lambda a: a.bandwidth)
        return Link("inter", best.bandwidth, latency, len(nodes), best.network, best.nic)

    def node_networks(self, node: int) -> Attachments:
        """What node ``node`` (in rank order) is attached to, fastest first."""
        return tuple(sorted(self._networks[node].values(), key=lambda a: -a.bandwidth))

    def links(self, groups: Mapping[str, Sequence[int]]) -> dict[str, Link]:
        """The link of each dimension's group, e.g. of ``layout.first_groups(degrees)``.

        One group stands for all groups of its dimension, which holds when every node looks
        the same; for a mixed cluster use ``worst_links`` with every group.
        """
        return {dim: self.link(group) for dim, group in groups.items()}

    def worst_links(self, groups: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, Link]:
        """Per dimension, the slowest link among all its groups (``layout.plan_groups``)."""
        return {dim: self.worst_link(gs) for dim, gs in groups.items()}

    def worst_link(self, groups: Sequence[Sequence[int]]) -> Link:
        """The slowest link among ``groups``, with the slowest rings among them, which need not
        be its own: on a mixed cluster a group over RoCE nodes of 8 devices (a 25 GB/s share
        each) rings at 200 GB/s, 8 ranks a node, and one over IB nodes of 2 (50 GB/s) at 100;
        the rings were priced at 200."""
        links = [self.link(g) for g in groups]
        worst = min(links, key=lambda k: (k.bandwidth, -k.latency_s))
        return replace(worst, ring_bandwidth=min(k.ring_bandwidth for k in links))


def pace(device: DeviceSpec, precision: str) -> float:
    """FLOP/s ``device`` sustains on compute at ``precision``: what ranks devices by pace."""
    return device.peak(precision) * device.compute_efficiency


def attachments(node: NodeSpec) -> Attachments:
    """A node's networks: per network its NICs' total bandwidth shared by the node's devices
    and their type (the slowest type, should one network mix them); a node that lists no NICs
    is on the default network at its device's catalog figure."""
    if not node.nics:
        return (Attachment("", node.device.inter_node_bw),)
    by_network: dict[str, list[NicSpec]] = {}
    for nic in node.nics:
        by_network.setdefault(nic.network, []).append(nic)
    return tuple(
        Attachment(net, sum(n.bandwidth for n in nics) / node.devices,
                   min(nics, key=lambda n: n.bandwidth).type)
        for net, nics in by_network.items())


__all__ = ["Attachment", "Link", "LinkKind", "NO_LINK", "Topology", "attachments", "pace"]
