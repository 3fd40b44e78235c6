"""Which node each block of ranks runs on, when a cluster mixes networks (Holmes, SC'24).

Ranks are laid out in Megatron order (tensor parallel fastest, pipeline slowest: see
``orch.plan.layout``) and fill nodes in the order the nodes are taken. So the placement of a plan
is an order of the cluster's nodes: it keeps tensor parallel inside a node as before, and decides
which nodes share a pipeline stage, and with it every data-parallel and expert group. Ordering
the nodes by the network they are fastest on (InfiniBand nodes together, then RoCE, then
Ethernet) makes each stage's block of ranks one NIC type whenever the stage sizes line up with
the groups, so gradient all-reduces, the heavy traffic, stay on one fabric and only the
pipeline's activations cross between fabrics.

:func:`candidate_orders` gives the orders worth pricing (the listed order and the grouped ones);
the plan prices each and keeps the fastest. :func:`nic_notes` says, for the order chosen, which
rule could not be kept (a data-parallel or expert group spanning NIC types) and what it costs.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from orch.plan.cluster import ClusterSpec
from orch.plan.degrees import Degrees
from orch.plan.layout import dim_groups
from orch.plan.topology import Link, Topology, attachments, pace

KEPT_INSIDE_NIC_TYPE = {"dp_shard-cp": "data-parallel (FSDP)", "dp_replicate": "data-parallel "
                        "(replicas)", "ep": "expert-parallel", "edp": "expert data-parallel"}
"""Groups whose traffic is heavy enough that they should stay inside one NIC type."""


@dataclass(frozen=True)
class NodePlace:
    """A node in rank order: its name, its ranks, and its fastest NIC type ("" if none)."""

    name: str
    first_rank: int
    ranks: int
    nic: str


def fastest_nic(cluster: ClusterSpec, node: int) -> tuple[str, str]:
    """``(network, NIC type)`` of the network node ``node`` reaches fastest."""
    best = max(attachments(cluster.nodes[node]), key=lambda a: a.bandwidth)
    return best.network, best.nic


def candidate_orders(cluster: ClusterSpec) -> list[tuple[int, ...]]:
    """Node orders to price: as listed, then grouped by fastest network with the fastest group
    first, and with the slowest first (which stage holds the embedding or the head can matter
    when stages differ); duplicates dropped, the listed order first."""
    listed = tuple(range(len(cluster.nodes)))
    groups: dict[tuple[str, str], list[int]] = {}
    speed: dict[tuple[str, str], float] = {}
    for node in listed:
        key = fastest_nic(cluster, node)
        groups.setdefault(key, []).append(node)
        best = max(a.bandwidth for a in attachments(cluster.nodes[node]))
        speed[key] = min(speed.get(key, best), best)
    ranked = sorted(groups, key=lambda key: -speed[key])
    orders = [listed]
    for keys in (ranked, ranked[::-1]):
        order = tuple(node for key in keys for node in groups[key])
        if order not in orders:
            orders.append(order)
    return orders


def placement_of(cluster: ClusterSpec, order: Sequence[int]) -> tuple[NodePlace, ...]:
    """The nodes in rank order ``order`` (indices into ``cluster.nodes``)."""
    places, first = [], 0
    for index in order or range(len(cluster.nodes)):
        node = cluster.nodes[index]
        places.append(NodePlace(node.name, first, node.devices, fastest_nic(cluster, index)[1]))
        first += node.devices
    return tuple(places)


def unreachable(deg: Degrees, links: dict[str, Link]) -> list[str]:
    """Group dimensions of ``deg`` whose nodes share no network."""
    return [dim for dim, link in links.items() if link.kind == "unreachable"
            and _size(deg, dim) > 1]


Spans = tuple[tuple[tuple[str, ...], int], ...]
"""Each distinct set of NIC types that groups span (sorted, ``""`` for a node with no NIC
listed) with how many groups span it, the most spanned first."""


def mixed_groups(deg: Degrees, topology: Topology, places: Sequence[NodePlace],
                 dims: Iterable[str] = KEPT_INSIDE_NIC_TYPE
                 ) -> dict[str, tuple[int, int, Spans]]:
    """Per heavy group dimension of size above one: how many of its groups span NIC types
    under this placement, of how many, and each set of types they span with its count
    (dimensions with none left out). Only the first group's types were kept: a note said
    'ib + roce (32 of 32)' where half the groups were ethernet + ib."""
    return dict(_mixed_groups(deg, topology, tuple(places), tuple(dims)))


@lru_cache(maxsize=1024)
def _mixed_groups(deg: Degrees, topology: Topology, places: tuple[NodePlace, ...],
                  dims: tuple[str, ...]) -> tuple[tuple[str, tuple[int, int, Spans]], ...]:
    """:func:`mixed_groups`, kept per (degrees, node order): the search asks it for every
    micro-batch and recompute setting it prices, and at a thousand ranks its groups are many."""
    nic_of_node = [place.nic for place in places]
    mixed = []
    for dim in dims:
        if _size(deg, dim) == 1:
            continue
        groups = dim_groups(deg, dim)
        spans = Counter(types for group in groups if len(
            types := tuple(sorted({nic_of_node[node] for node in topology.nodes_of(group)}))) > 1)
        if spans:
            combos = tuple(sorted(spans.items(), key=lambda item: (-item[1], item[0])))
            mixed.append((dim, (spans.total(), len(groups), combos)))
    return tuple(mixed)


NO_NIC = "no NIC listed"
"""How a node without NICs in the cluster description is named (as the plan's nodes line
names it): it reaches the others over the default network."""


def nic_types(types: Iterable[str]) -> str:
    """``ethernet + ib``, a node with no NIC listed named so (last), not an empty name."""
    named = [nic for nic in types if nic]
    return " + ".join(named + [NO_NIC] * (len(named) < len(list(types))))


def _spans_text(combos: Spans) -> str:
    """``ib + roce``, or where groups span different sets, each with its count:
    ``ib + roce in 16, ethernet + ib in 16``."""
    if len(combos) == 1:
        return nic_types(combos[0][0])
    return ", ".join(f"{nic_types(types)} in {count}" for types, count in combos)


def nic_notes(deg: Degrees, topology: Topology, places: Sequence[NodePlace],
              comm_s: dict[str, float], links: dict[str, Link],
              only_listed: bool = False) -> tuple[str, ...]:
    """For each heavy group dimension (:data:`KEPT_INSIDE_NIC_TYPE`) that communicates and has
    a group spanning NIC types under this placement: which rule was relaxed, over which link
    it runs, and its estimated seconds per step (``only_listed``: only the description's node
    order was tried)."""
    notes = []
    heavy = [dim for dim in KEPT_INSIDE_NIC_TYPE if dim in comm_s]
    for dim, (count, total, types) in mixed_groups(deg, topology, places, heavy).items():
        link = links[dim]
        notes.append(
            f"{KEPT_INSIDE_NIC_TYPE[dim]} groups span NIC types {_spans_text(types)} ({count} "
            f"of {total}; rule relaxed: "
            + ("the listed node order (parallel.node_order: listed) does not keep them inside one"
               if only_listed else
               "no node order tried keeps them inside one with these degrees")
            + "); the slowest runs over "
            f"{link.nic or 'the default network'} at {link.bandwidth / 1e9:.1f} GB/s per device, "
            f"estimated {comm_s[dim]:.3f} s per step; a pipeline degree whose stages match the "
            "NIC groups keeps them apart")
    return tuple(notes)


def mixing(deg: Degrees, topology: Topology, places: Sequence[NodePlace],
           comm_s: dict[str, float]) -> int:
    """Heavy groups that communicate (``comm_s``) and span NIC types: what breaks a tie in
    step time between two node orders (the step-time model prices each dimension by its
    slowest group, so an order that keeps more groups on one fabric can tie with one that
    keeps fewer)."""
    heavy = [dim for dim in KEPT_INSIDE_NIC_TYPE if dim in comm_s]
    return sum(count for count, _, _ in mixed_groups(deg, topology, places, heavy).values())


def stage_speeds(topology: Topology, deg: Degrees, precision: str) -> list[float]:
    """Each pipeline stage's speed at ``precision``: the slowest device among the nodes of its
    ranks (ranks of a stage are a contiguous block: pipeline is the slowest-varying
    coordinate)."""
    per_stage = topology.world_size // deg.pp
    speeds = []
    for stage in range(deg.pp):
        nodes = range(topology.node_of(stage * per_stage),
                      topology.node_of((stage + 1) * per_stage - 1) + 1)
        speeds.append(min(pace(topology.devices[n], precision) for n in nodes))
    return speeds


@lru_cache(maxsize=4096)
def balanced_split(work: tuple[float, ...], speeds: tuple[float, ...],
                   caps: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Layers per stage: consecutive runs of ``work`` (each layer's, in order) over stages of
    ``speeds``, at least one each and at most ``caps[s]`` on stage ``s`` (the most it has
    memory for; default no limit), making the slowest stage's time (its work over its speed)
    the least possible; of the splits that reach it, the one with the most even stage times
    (least sum of squares: the rest of the pipeline waits less on any stage the estimate got
    wrong), ties going to fewer layers on earlier stages, which hold more micro-batches in
    flight under 1F1B."""
    n, k = len(work), len(speeds)
    caps = caps or (n,) * k
    if n < k:
        raise ValueError(f"{n} layers cannot fill {k} stages")
    if sum(caps) < n or min(caps) < 1:
        raise ValueError(f"{n} layers cannot fill {k} stages of at most {caps} layers")
    low, high = 0.0, sum(work) / min(speeds)  # high always fits, low never does
    while high - low > high * 1e-10:  # to well inside the limit's slack below (not 60 halvings)
        middle = (low + high) / 2
        low, high = (middle, high) if not _fits(work, speeds, caps, middle) else (low, middle)
    limit = high * (1 + 1e-9)
    prefix = list(itertools.accumulate(work, initial=0.0))
    # best[s][j]: the least sum of squared times with layers [0, j) on stages 0..s, each
    # within limit and its cap; start[s][j]: where stage s begins in it. Each stage's ends
    # go from one past the previous stage's first reachable end to its cap past the last (and
    # the last stage's is the end); its starts from the first within limit (found by
    # bisection, loosened against rounding: each is still checked).
    best = [[math.inf] * (n + 1) for _ in range(k)]
    start = [[0] * (n + 1) for _ in range(k)]
    for j in range(1, min(n - k + 1, caps[0]) + 1):
        if (t := prefix[j] / speeds[0]) <= limit:
            best[0][j] = t * t
    for s in range(1, k):
        before, row, starts, speed, cap = best[s - 1], best[s], start[s], speeds[s], caps[s]
        reached = [i for i in range(s, n - k + s + 1) if before[i] < math.inf]
        lowest, highest = reached[0], reached[-1]
        ends = range(n, n + 1) if s == k - 1 else range(
            lowest + 1, min(highest + cap, n - k + s + 1) + 1)
        slack = limit * speed * (1 + 1e-9)
        for j in ends:
            here, least, at = prefix[j], math.inf, 0
            for i in range(max(lowest, j - cap, bisect_left(prefix, here - slack)),
                           min(j, highest + 1)):
                t = (here - prefix[i]) / speed
                if t <= limit and (v := before[i] + t * t) < least * (1 - 1e-12):
                    least, at = v, i
            row[j], starts[j] = least, at
    split, end = [], n
    for s in range(k - 1, 0, -1):
        split.append(end - start[s][end])
        end = start[s][end]
    return (end, *reversed(split))


def _fits(work: Sequence[float], speeds: Sequence[float], caps: Sequence[int],
          limit: float) -> bool:
    """Whether every stage can finish its layers within ``limit`` and its cap, one layer at
    least each. On stages of one speed each stage taking the most it can decides it (a stage
    ending earlier only leaves the next more to cover, and every layer fits a stage where any
    split does); on stages of different speeds that can hand a slow stage a heavy layer that an
    earlier end would have kept from it, so every reachable end is followed."""
    if len(set(speeds)) == 1:
        return _fits_greedily(work, speeds[0], caps, limit)
    n, k = len(work), len(speeds)
    prefix = list(itertools.accumulate(work, initial=0.0))
    reached = [True] + [False] * n  # layer counts the stages so far can have covered
    for stage, speed in enumerate(speeds):
        budget, last = limit * speed, n - (k - 1 - stage)  # leave a layer for each later stage
        ends = [False] * (n + 1)
        furthest = end = 0
        for begin in range(n):
            if not reached[begin]:
                continue
            end = max(end, begin)  # the furthest end from ``begin`` only grows with it
            while (end < min(last, begin + caps[stage])
                   and (prefix[end + 1] - prefix[begin]) <= budget):
                end += 1
            for j in range(max(begin + 1, furthest + 1), end + 1):
                ends[j] = True
            furthest = max(furthest, end)
        reached = ends
    return reached[n]


def _fits_greedily(work: Sequence[float], speed: float, caps: Sequence[int],
                   limit: float) -> bool:
    """:func:`_fits` on stages of one ``speed``: each takes the most layers it can, leaving one
    for each later stage."""
    begin, k = 0, len(caps)
    for stage, cap in enumerate(caps):
        end, load = begin, 0.0
        last = min(len(work) - (k - 1 - stage), begin + cap)
        while end < last and (load + work[end]) / speed <= limit:
            load += work[end]
            end += 1
        if end == begin:
            return False
        begin = end
    return begin == len(work)


def _size(deg: Degrees, dim: str) -> int:
    size = 1
    for part in dim.split("-"):
        size *= getattr(deg, part)
    return size


__all__ = ["KEPT_INSIDE_NIC_TYPE", "NO_NIC", "NodePlace", "balanced_split", "candidate_orders",
           "fastest_nic", "mixed_groups", "mixing", "nic_notes", "nic_types", "placement_of",
           "stage_speeds", "unreachable"]
