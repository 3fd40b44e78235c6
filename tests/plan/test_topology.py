"""Topology links for uniform machines and cluster descriptions, and cluster loading rules."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest

from orch.plan.cluster import ClusterError, cluster_from_dict, load_cluster
from orch.plan.degrees import Degrees
from orch.plan.devices import get_device
from orch.plan.layout import first_groups, plan_groups
from orch.plan.topology import NO_LINK, Attachment, Topology, attachments

REPO = Path(__file__).resolve().parents[2]
H100 = get_device("h100")


# --- uniform machines --------------------------------------------------------------------------

def test_groups_straddling_nodes_are_priced_across_them() -> None:
    """On 6-device nodes a context-parallel group of 4 ranks (4-7) spans two nodes though the
    first (0-3) does not; it was priced at NVLink's 450 GB/s. One group stands for all only
    where the groups tile the nodes: checked against every group for many shapes."""
    from orch.config import load_config
    from orch.plan import build_plan
    from orch.plan.machine import Machine

    cfg = load_config(REPO / "configs/llama3-8b.yaml", ["parallel.cp=4", "train.global_batch=24"])
    link = build_plan(cfg, 12, 6, None).links["cp"]
    assert (link.kind, link.bandwidth) == ("inter", 50e9)
    for world, per_node in ((12, 6), (24, 6), (24, 4), (16, 8), (36, 6), (30, 5), (48, 3)):
        machine = Machine(world, per_node, H100, Topology.uniform(world, per_node, H100))
        for tp in (1, 2, 3, 4, 6):
            for cp in (1, 2, 3, 4):
                for pp in (1, 2, 3):
                    if world % (tp * cp * pp):
                        continue
                    dp = world // (tp * cp * pp)
                    for dp_replicate, ep in itertools.product((1, 2, 3), (1, 2)):
                        if dp % dp_replicate or dp * cp * tp % ep:
                            continue
                        deg = Degrees(pp=pp, dp_replicate=dp_replicate,
                                      dp_shard=dp // dp_replicate, cp=cp, tp=tp, ep=ep)
                        assert machine.links(deg) == machine.topology.worst_links(
                            plan_groups(deg)), (world, per_node, deg)

def test_uniform_links_by_group_placement() -> None:
    topo = Topology.uniform(32, 8, H100)
    assert topo.link([5]) is NO_LINK
    intra = topo.link(list(range(8, 16)))
    assert (intra.kind, intra.bandwidth, intra.nodes) == ("intra", 450e9, 1)
    assert intra.latency_s == H100.intra_latency_s
    inter = topo.link(list(range(4, 12)))
    assert (inter.kind, inter.bandwidth, inter.nodes) == ("inter", 50e9, 2)
    assert inter.latency_s == H100.inter_latency_s
    assert topo.link([0, 8, 16, 24]).nodes == 4
    assert topo.link([0, 1, 9, 17, 30]).nodes == 4  # not a progression: walked node by node


def test_links_of_a_plan_layout() -> None:
    deg = Degrees(pp=2, dp_shard=2, tp=8)
    links = Topology.uniform(deg.world, 8, H100).links(first_groups(deg))
    assert links["tp"].kind == "intra"
    assert links["dp"].kind == "inter" and links["dp"].nodes == 2
    assert links["pp"].kind == "inter" and links["pp"].nodes == 2
    assert links["cp"] is NO_LINK and links["ep"] is NO_LINK
    assert links["edp"].nodes == 2  # the 16 ranks of a stage fold into edp


@pytest.mark.parametrize("deg", [
    Degrees(dp_shard=512, tp=8), Degrees(pp=4, dp_replicate=4, dp_shard=32, tp=8),
    Degrees(pp=8, dp_shard=64, cp=2, tp=4, ep=16, etp=2), Degrees(dp_shard=1365, tp=3),
])
def test_node_counts_match_brute_force(deg: Degrees) -> None:
    for per_node in (8, 6):
        topo = Topology.uniform(deg.world, per_node, H100)
        for dim, group in first_groups(deg).items():
            assert topo.link(group).nodes == len({r // per_node for r in group}), dim


def _ring_by_brute_force(topo: Topology, group: list[int], per_node: int) -> float:
    """A ring collective's bandwidth per device: one ring per rank of the group on a node,
    each through that rank's share of the node's NICs (see Link.ring_bandwidth)."""
    counts: dict[int, int] = {}
    for rank in group:
        counts[rank // per_node] = counts.get(rank // per_node, 0) + 1
    if len(counts) == 1:
        return H100.intra_node_bw
    return min(min(counts.values()) * H100.inter_node_bw, H100.intra_node_bw)


def test_rings_across_nodes_run_over_every_nic_of_the_groups_ranks() -> None:
    """FSDP over whole nodes was priced at one NIC's share per rank (50 GB/s on an H100 node of
    8 x 400 Gb/s), where NCCL runs a ring through each NIC: the plan made FSDP across nodes
    2-2.5x slower than MosaicML's H100 runs measured (13B on 64 GPUs, 70B on 32), and steered
    the search away from it. A group's rings now move its fewest ranks on one node times that
    share, up to NVLink; one rank a node keeps its share; all-to-alls keep ``bandwidth``."""
    topo = Topology.uniform(64, 8, H100)
    fsdp = topo.link(list(range(64)))
    assert (fsdp.bandwidth, fsdp.ring_bandwidth) == (50e9, 400e9)
    assert topo.link(list(range(0, 64, 2))).ring_bandwidth == 200e9  # tp2 inside: 4 a node
    assert topo.link(list(range(0, 64, 8))).ring_bandwidth == 50e9  # HSDP replicas, pipelines
    assert topo.link(list(range(8))).ring_bandwidth == 450e9  # NVLink inside a node
    assert topo.link([0, 1, 8, 9, 10]).ring_bandwidth == 100e9  # walked: 2 on node 0
    wide = Topology.uniform(64, 16, H100)  # 16 shares of 50 GB/s: NVLink bounds the rings
    assert wide.link(list(range(64))).ring_bandwidth == 450e9
    for per_node in (8, 6):
        topo = Topology.uniform(48, per_node, H100)
        for start, step, count in itertools.product((0, 1, 5, 6), (1, 2, 3, 5, 7, 8, 12),
                                                    (2, 3, 5, 6)):
            group = list(range(start, 48, step))[:count]
            if len(group) == count:  # progressions with partly covered end nodes too
                assert topo.link(group).ring_bandwidth == _ring_by_brute_force(
                    topo, group, per_node), (per_node, group)


def test_the_links_line_shows_fsdps_rings() -> None:
    """FSDP runs over dp_shard x cp; with cp the line showed ``dp_shard`` alone, a group of
    ranks cp apart (2 a node: rings at 100 GB/s), where the step priced FSDP's at 400."""
    from orch.config import load_config
    from orch.plan import build_plan
    from orch.plan.render import render_plan

    cfg = load_config(REPO / "configs/llama3-70b.yaml",
                      ["parallel.dp_shard=16", "parallel.cp=4", "train.micro_batch=1"])
    [links] = [line for line in render_plan(build_plan(cfg, 64)).splitlines()
               if line.startswith("  links ")]
    assert links == "  links    cp intra 450 GB/s, dp_shard-cp inter 50 GB/s (rings 400 GB/s)"


def test_fewest_ranks_on_a_node_of_every_progression() -> None:
    """Nodes between a progression's ends hold ``per_node // step`` ranks or one more; all of
    them held one more on 16-device nodes for ranks 0, 9, ..., 63 (two a node), where the
    rings were priced at one rank's share. Every progression on nodes of 1-16 devices (and a
    partly filled last node, walked) against counting its ranks."""
    for per_node in range(1, 17):
        for world in (5 * per_node, 5 * per_node + per_node // 2):
            topo = Topology.uniform(world, per_node, H100)
            for start, step in itertools.product(range(per_node + 1), range(1, per_node + 2)):
                for end in range(start + step, world, step):
                    group = list(range(start, end + 1, step))
                    assert list(topo.nodes_of(group)) == sorted({topo.node_of(r) for r in group})
                    assert topo.link(group).ring_bandwidth == _ring_by_brute_force(
                        topo, group, per_node), (per_node, world, group)
    assert Topology.uniform(64, 16, H100).link(list(range(0, 64, 9))).ring_bandwidth == 100e9


def test_partly_filled_last_node() -> None:
    topo = Topology.uniform(12, 8, H100)
    assert topo.node_ends == [8, 12]
    assert topo.node_of(11) == 1
    assert topo.link(list(range(8, 12))).kind == "intra"


def test_ranks_outside_the_topology_are_a_bug() -> None:
    with pytest.raises(ValueError, match="outside"):
        Topology.uniform(8, 8, H100).link([0, 8])


# --- clusters ----------------------------------------------------------------------------------

def _nics(kind: str, count: int, gbps: float) -> list[dict[str, Any]]:
    return [{"name": f"{kind}{i}", "type": kind, "bandwidth_gbps": gbps} for i in range(count)]


def mixed_cluster() -> dict[str, Any]:
    """An InfiniBand node and an Ethernet node of 8 H100s each."""
    return {
        "name": "mixed",
        "device": "h100",
        "nodes": [
            {"name": "ib0", "devices": 8, "nics": _nics("ib", 8, 400)},
            {"name": "eth0", "devices": 8, "nics": _nics("ethernet", 2, 100)},
        ],
    }


def test_example_cluster_file_loads() -> None:
    cluster = load_cluster(REPO / "configs/clusters/dgx-h100-4node.yaml")
    assert cluster.name == "dgx-h100-4node"
    assert [n.name for n in cluster.nodes] == ["dgx0", "dgx1", "dgx2", "dgx3"]
    assert cluster.world_size == 32
    assert attachments(cluster.nodes[2]) == (Attachment("ib-a", 50e9, "ib"),)
    assert [cluster.node_of(r) for r in (0, 7, 8, 31)] == [0, 0, 1, 3]
    topo = Topology.from_cluster(cluster)
    assert topo.link(list(range(0, 32, 8))).bandwidth == 50e9


def test_group_spanning_ib_and_ethernet_gets_ethernet_bandwidth() -> None:
    cluster = cluster_from_dict(mixed_cluster())
    assert attachments(cluster.nodes[1]) == (Attachment("", 2 * 100e9 / 8 / 8, "ethernet"),)
    topo = Topology.from_cluster(cluster)
    assert topo.link(list(range(8))).bandwidth == 450e9
    both = topo.link(list(range(16)))
    assert (both.kind, both.bandwidth, both.nodes) == ("inter", 100e9 / 8 / 4, 2)
    assert both.ring_bandwidth == 8 * 100e9 / 8 / 4  # the Ethernet node's two NICs in all
    assert topo.link([0, 2, 4, 6, 8, 10]).bandwidth == 100e9 / 8 / 4


def test_worst_links_see_the_slow_translate() -> None:
    data = mixed_cluster()
    data["nodes"] = [data["nodes"][0], {**data["nodes"][0], "name": "ib1"},
                     data["nodes"][1], {**data["nodes"][1], "name": "eth1"}]
    topo = Topology.from_cluster(cluster_from_dict(data))
    deg = Degrees(dp_replicate=2, dp_shard=2, tp=8)
    first = topo.links(first_groups(deg))
    worst = topo.worst_links(plan_groups(deg))
    assert first["dp_shard"].bandwidth == 50e9  # ib0 + ib1
    assert worst["dp_shard"].bandwidth == 100e9 / 8 / 4  # eth0 + eth1
    assert worst["tp"].kind == "intra"


def test_worst_links_see_the_slowest_rings() -> None:
    """A pipeline's first stage on IB nodes of 2 devices (a 50 GB/s share a rank, rings at 100
    GB/s), its second on RoCE nodes of 8 (25 GB/s, rings at 200 through 8 ranks a node): the
    FSDP group with the least share has the faster rings, and the rings were priced at 200."""
    def node(kind: str, devices: int, gbps: float) -> dict[str, Any]:
        nics = [{**nic, "network": kind} for nic in _nics(kind, devices, gbps)]
        return {"name": f"{kind}{{i}}", "devices": devices,
                "nics": [*nics, {"name": "dc", "type": "ethernet", "bandwidth_gbps": 100}]}

    topo = Topology.from_cluster(cluster_from_dict(
        {"name": "stages", "device": "h100",
         "nodes": [{**node("ib", 2, 400), "count": 8}, {**node("roce", 8, 200), "count": 2}]}))
    worst = topo.worst_links(plan_groups(Degrees(pp=2, dp_shard=16)))["dp_shard"]
    assert (worst.nic, worst.bandwidth, worst.ring_bandwidth) == ("roce", 25e9, 100e9)


def test_uneven_nodes_and_mixed_devices() -> None:
    data = mixed_cluster()
    data["nodes"][1] = {"name": "a100-box", "devices": 4, "device": "a100",
                        "device_overrides": {"compute_efficiency": 0.5}}
    cluster = cluster_from_dict(data)
    assert cluster.nodes[1].device.compute_efficiency == 0.5
    assert attachments(cluster.nodes[1]) == (Attachment("", get_device("a100").inter_node_bw),)
    topo = Topology.from_cluster(cluster)
    assert topo.slowest("bf16").name == "a100-80gb"  # the slowest sets the pace
    assert [topo.node_of(r) for r in (7, 8, 11)] == [0, 1, 1]
    assert topo.link([8, 9, 10, 11]).bandwidth == 300e9
    assert topo.link([6, 7, 8]).bandwidth == 25e9


def test_overrides_apply_to_the_top_level_device() -> None:
    data = mixed_cluster()
    data["device_overrides"] = {"peak_flops": 900e12, "memory_bytes": "94GiB"}
    cluster = cluster_from_dict(data)
    assert cluster.nodes[0].device.peak_flops == 900e12
    assert cluster.nodes[0].device.memory_bytes == 94 * 2**30


# --- cluster validation: each rule, fed a bad value ----------------------------------------------

def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


BAD = [
    # (path to change, bad value, where, words in the message, words in the fix)
    (("nodess",), [], "nodess", ["unknown key 'nodess'"], ["did you mean 'nodes'?"]),
    (("device",), "h10", "device", ["unknown device 'h10'"], ["did you mean 'h100'?"]),
    (("name",), "", "name", ["''", "non-empty string"], ["write a name"]),
    (("device_overrides",), {"peak_flop": 1e15}, "device_overrides.peak_flop",
     ["unknown key 'peak_flop'"], ["did you mean 'peak_flops'?"]),
    (("device_overrides",), {"peak_flops": -1}, "device_overrides.peak_flops",
     ["-1", "positive number"], ["write a number"]),
    (("device_overrides",), {"compute_efficiency": 1.5}, "device_overrides.compute_efficiency",
     ["1.5", "fraction"], ["0.55"]),
    (("device_overrides",), {"memory_bytes": "lots"}, "device_overrides.memory_bytes",
     ["'lots'", "byte size"], ["80GB"]),
    (("nodes",), [], "nodes", ["non-empty list"], ["nodes: [{name: node0, devices: 8}]"]),
    (("nodes", 1), "eth0", "nodes[1]", ["'eth0'", "key: value pairs"],
     ["name, count, devices"]),
    (("nodes", 0, "devcies"), 8, "nodes[0].devcies", ["unknown key 'devcies'"],
     ["did you mean 'devices'?"]),
    (("nodes", 0, "devices"), 0, "nodes[0].devices", ["0", "positive whole number"],
     ["integer"]),
    (("nodes", 0, "devices"), True, "nodes[0].devices", ["True"], ["integer"]),
    (("nodes", 1, "device"), "a10O", "nodes[1].device", ["unknown device 'a10O'"],
     ["did you mean 'a100'?"]),
    (("nodes", 1, "count"), 2, "nodes[1].name", ["'eth0'", "count: 2"], ['"eth0{i}"']),
    (("nodes", 1, "count"), -2, "nodes[1].count", ["-2"], ["integer"]),
    (("nodes", 1, "name"), "ib0", "nodes[1].name", ["'ib0'", "used twice"], ["distinct"]),
    # the same NIC twice doubled the node's bandwidth (and NCCL_IB_HCA listed it twice)
    (("nodes", 0, "nics", 1, "name"), "ib0", "nodes[0].nics",
     ["NIC name 'ib0' is listed 2 times"], ["list each NIC once"]),
    (("nodes", 0, "nics"), "mlx5_0", "nodes[0].nics", ["'mlx5_0'", "expected a list"],
     ["name, type, bandwidth_gbps"]),
    (("nodes", 0, "nics", 0), 400, "nodes[0].nics[0]", ["400", "key: value pairs"],
     ["bandwidth_gbps"]),
    (("nodes", 0, "nics", 2, "type"), "ethernt", "nodes[0].nics[2].type",
     ["'ethernt'", "is not one of"], ["did you mean 'ethernet'?", "ib, roce, ethernet"]),
    (("nodes", 0, "nics", 2, "type"), "infiniband", "nodes[0].nics[2].type",
     ["'infiniband'"], ["pick one of ib, roce, ethernet"]),
    (("nodes", 0, "nics", 1, "bandwidth_gbps"), "400G", "nodes[0].nics[1].bandwidth_gbps",
     ["'400G'", "is not a number"], ["write a number"]),
    (("nodes", 0, "nics", 1, "bandwidth_gbps"), -5, "nodes[0].nics[1].bandwidth_gbps",
     ["-5", "positive number"], ["write a number"]),
    (("nodes", 0, "nics", 1, "network"), "", "nodes[0].nics[1].network",
     ["''", "non-empty string"], ["write a name"]),
    (("device_overrides",), {"memory_bytes": 0}, "device_overrides.memory_bytes",
     ["0", "positive byte size"], ["80GiB"]),
    (("nodes", 0, "nics", 1, "speed"), 400, "nodes[0].nics[1].speed", ["unknown key 'speed'"],
     ["known keys here: bandwidth_gbps, interface, measured_gbps, name, network, type"]),
]


def test_a_count_of_one_needs_no_number_in_the_name() -> None:
    """count: 1 with a plain name was refused 'would repeat it', fix 'to get eth00..eth00';
    it is one node of that name."""
    cluster = cluster_from_dict(_set(mixed_cluster(), ("nodes", 1, "count"), 1), "c.yaml")
    assert [node.name for node in cluster.nodes].count("eth0") == 1
    assert len(cluster.nodes) == len(mixed_cluster()["nodes"])


@pytest.mark.parametrize(("path", "value", "where", "message", "fix"), BAD,
                         ids=[b[2] + "=" + repr(b[1]) for b in BAD])
def test_each_rule_names_field_value_and_fix(path: tuple[Any, ...], value: Any, where: str,
                                             message: list[str], fix: list[str]) -> None:
    with pytest.raises(ClusterError) as info:
        cluster_from_dict(_set(mixed_cluster(), path, value), "c.yaml")
    [problem] = info.value.problems
    assert problem.where == f"c.yaml {where}"
    for word in message:
        assert word in problem.message
    for word in fix:
        assert word in problem.fix


def test_missing_fields_are_named() -> None:
    data = mixed_cluster()
    del data["nodes"][0]["devices"], data["nodes"][1]["nics"][0]["type"]
    with pytest.raises(ClusterError) as info:
        cluster_from_dict(data)
    assert [(p.where, p.message) for p in info.value.problems] == [
        ("nodes[0].devices", "is missing"), ("nodes[1].nics[0].type", "is missing")]


def test_a_node_without_any_device_type() -> None:
    data = mixed_cluster()
    del data["device"]
    data["nodes"][1]["device"] = "a100"
    with pytest.raises(ClusterError) as info:
        cluster_from_dict(data)
    [problem] = info.value.problems
    assert problem.where == "nodes[0].device"
    assert "set 'device:'" in problem.fix


def test_a_cluster_over_the_largest_world_is_refused_before_it_is_listed() -> None:
    """count: 100000000 listed nodes for minutes and 11 GB before anything was said."""
    data = {"device": "h100", "nodes": [{"name": "a{i}", "count": 100_000_000, "devices": 8}]}
    with pytest.raises(ClusterError) as info:
        cluster_from_dict(data)
    [problem] = info.value.problems
    assert problem.where == "nodes[0].count" and "800,000,000 devices, over the 1,048,576" in (
        problem.message)


def test_overrides_need_a_top_level_device() -> None:
    data = mixed_cluster()
    del data["device"]
    data["device_overrides"] = {"peak_flops": 900e12}
    for node in data["nodes"]:
        node["device"] = "h100"
    with pytest.raises(ClusterError) as info:
        cluster_from_dict(data)
    [problem] = info.value.problems
    assert problem.where == "device_overrides"
    assert "without a top-level device" in problem.message
    assert "add 'device:'" in problem.fix


def test_name_defaults_to_the_file_and_ranks_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("device: cpu\nnodes: [{name: box, devices: 2}]\n")
    cluster = load_cluster(path)
    assert cluster.name == "lab" and cluster.world_size == 2
    with pytest.raises(ValueError, match="outside"):
        cluster.node_of(2)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ndevice: h10\nnodes:\n  - {name: n0, devices: 0,"
                    " nics: [{name: e0, type: eth, bandwidth_gbps: 100}]}\n")
    with pytest.raises(ClusterError) as info:
        load_cluster(path)
    wheres = [p.where for p in info.value.problems]
    # list items have lines too (a problem at nodes[37].nics[2] of a long file was unplaced)
    assert wheres == [f"{path}:2 device", f"{path}:4 nodes[0].devices",
                      f"{path}:4 nodes[0].nics[0].type"]
    assert "invalid cluster description (3 problems)" in str(info.value)


def _refused(tmp_path: Path, text: str) -> tuple[Path, list]:
    """The problems of a cluster file of ``text`` (which must not load), and its path."""
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ClusterError) as info:
        load_cluster(path)
    return path, info.value.problems


def test_names_used_twice_are_reported_with_the_other_problems(tmp_path: Path) -> None:
    """A node name and a NIC name used twice were said only once every value converted."""
    path, problems = _refused(tmp_path, (
        "device: h100\nnodes:\n"
        "  - {name: n0, devices: 0, nics: [{name: m0, type: ib, bandwidth_gbps: 1},\n"
        "                                  {name: m0, type: ib, bandwidth_gbps: 1}]}\n"
        "  - name: n0\n"
        "    devices: 8\n"))
    said = {p.where: p.message for p in problems}
    assert said[f"{path}:3 nodes[0].devices"] == "0 is not a positive whole number"
    assert said[f"{path}:3 nodes[0].nics"] == "NIC name 'm0' is listed 2 times"
    assert said[f"{path}:5 nodes[1].name"] == "node name 'n0' is used twice"


def test_missing_and_malformed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ClusterError, match="not found"):
        load_cluster(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # a config's relative cluster: is from where orch runs
    with pytest.raises(ClusterError, match="a relative path is from the current directory: "
                       + str(tmp_path / "clusters" / "x.yaml")):
        load_cluster("clusters/x.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("nodes: [\n")
    with pytest.raises(ClusterError, match="malformed YAML"):
        load_cluster(path)
    path.write_text("- node0\n")
    with pytest.raises(ClusterError, match="key: value pairs"):
        load_cluster(path)


def test_mixed_cluster_prices_the_slowest_group(tmp_path) -> None:
    """On a mixed cluster every group counts, not only the one holding rank 0."""
    from orch.config import load_config
    from orch.plan import build_plan

    cluster = tmp_path / "mixed.yaml"
    cluster.write_text(
        "device: h100\nnodes:\n"
        "  - {name: ib0, devices: 8, nics: [{name: mlx5_0, type: ib, bandwidth_gbps: 3200}]}\n"
        "  - {name: ib1, devices: 8, nics: [{name: mlx5_0, type: ib, bandwidth_gbps: 3200}]}\n"
        "  - {name: eth0, devices: 8, nics: [{name: eth0, type: ethernet, bandwidth_gbps: 100}]}\n"
        "  - {name: eth1, devices: 8, nics: [{name: eth0, type: ethernet, bandwidth_gbps: 100}]}\n"
    )
    cfg = load_config("configs/llama3-8b.yaml", [f"cluster={cluster}", "parallel.pp=2"])
    plan = build_plan(cfg)
    # The first dp group spans the two IB nodes; the second spans the Ethernet ones.
    assert plan.world_size == 32 and plan.links["dp"].bandwidth == 100e9 / 8 / 8


def test_a_network_mixing_infiniband_with_other_ports_is_refused(tmp_path: Path) -> None:
    """It was priced at the slower port and labelled ib."""
    path, (problem,) = _refused(tmp_path, (
        "device: h100\nnodes:\n"
        "  - {name: a, devices: 8, nics: [{name: m0, type: ib, bandwidth_gbps: 400, network: f}]}\n"
        "  - {name: b, devices: 8, nics: [{name: e0, type: ethernet, bandwidth_gbps: 100,"
        " network: f}]}\n"))
    assert problem.where == f"{path}:4 nodes[1].nics"
    assert problem.message.startswith("network 'f' has ib NICs and ethernet ones")


def test_a_nodes_unnamed_infiniband_beside_other_ports_is_refused(tmp_path: Path) -> None:
    """Unnamed, a node's 400 Gb/s InfiniBand and 10 GbE ports were one default network: their
    bandwidths added (6.41 GB/s per device, labelled ethernet), so adding the slow port made
    the plan faster than InfiniBand alone (6.25 GB/s), though NCCL with NCCL_IB_HCA set never
    adds socket bandwidth to InfiniBand's. Named, the faster network is taken."""
    node = ("  - {{name: {}, devices: 8, nics: [{{name: mlx5_0, type: ib, bandwidth_gbps: 400{}}},"
            " {{name: eth0, type: ethernet, bandwidth_gbps: 10{}}}]}}\n")
    path, problems = _refused(tmp_path, "device: h100\nnodes:\n" + "".join(
        node.format(name, "", "") for name in ("a", "b")))
    assert [p.where for p in problems] == [f"{path}:3 nodes[0].nics", f"{path}:4 nodes[1].nics"]
    problem = problems[0]
    assert problem.message.startswith("ib NICs and ethernet ones without a 'network'")
    assert "network: ib on the ib NICs and network: dc on the ethernet ones" in problem.fix
    named = tmp_path / "named.yaml"
    named.write_text("device: h100\nnodes:\n" + "".join(
        node.format(name, ", network: ib", ", network: dc") for name in ("a", "b")))
    link = Topology.from_cluster(load_cluster(named)).link(list(range(0, 16, 8)))
    assert (link.bandwidth, link.nic) == (400e9 / 8 / 8, "ib")
    alone = tmp_path / "alone.yaml"  # an ib node and an ethernet node: reachable somehow
    alone.write_text(
        "device: h100\nnodes:\n"
        "  - {name: a, devices: 8, nics: [{name: m0, type: ib, bandwidth_gbps: 400}]}\n"
        "  - {name: b, devices: 8, nics: [{name: e0, type: ethernet, bandwidth_gbps: 100}]}\n")
    assert Topology.from_cluster(load_cluster(alone)).link([0, 8]).nic == "ethernet"


def test_a_missing_key_is_placed_at_its_list_item(tmp_path: Path) -> None:
    path, (problem,) = _refused(tmp_path, "device: h100\nnodes:\n  - name: n0\n    devices: 8\n"
                                "    nics:\n      - name: e0\n        type: ethernet\n")
    assert problem.where == f"{path}:6 nodes[0].nics[0].bandwidth_gbps"
    assert problem.message == "is missing"


def test_a_node_merged_from_another_overrides_its_keys(tmp_path: Path) -> None:
    """``{<<: *n, name: b}`` was refused as 'nodes[1].name appears twice': a key written beside
    a merge overrides the merged one, as in YAML. A merged-in key keeps the line it was written
    on, so a bad value shared by both nodes points at that line."""
    path = tmp_path / "merged.yaml"
    path.write_text("device: h100\nnodes:\n  - &n {name: a, devices: 8}\n"
                    "  - {<<: *n, name: b}\n  - {<<: *n, name: c, devices: 4}\n")
    cluster = load_cluster(path)
    assert [(node.name, node.devices) for node in cluster.nodes] == [("a", 8), ("b", 8), ("c", 4)]
    path.write_text("device: h100\nnodes:\n  - &n {name: a, devices: 0}\n  - {<<: *n, name: b}\n")
    with pytest.raises(ClusterError) as info:
        load_cluster(path)
    assert [p.where for p in info.value.problems] == [f"{path}:3 nodes[0].devices",
                                                      f"{path}:3 nodes[1].devices"]


def test_figures_in_another_unit_are_refused_and_figures_with_units_are_read() -> None:
    """``inter_node_bw: 400`` (meant as Gb/s) priced every collective at 400 bytes/s, a step of
    9.7e9 s, without a word, and "900GB/s" was told to write a number such as 3e-4. A bare
    number no such hardware has is refused with what it likely meant; a unit is read."""
    data = mixed_cluster()
    data["device_overrides"] = {"inter_node_bw": 400, "intra_node_bw": "900 gb/s",
                                "memory_bw": 3.35, "host_bw": 5e7, "peak_flops": 989,
                                "inter_latency_s": 15, "memory_bytes": 80}
    data["nodes"][0]["nics"][1]["bandwidth_gbps"] = 400e9
    with pytest.raises(ClusterError) as info:
        cluster_from_dict(data, "c.yaml")
    said = {p.where.removeprefix("c.yaml "): (p.message, p.fix) for p in info.value.problems}
    assert said.pop("device_overrides.inter_node_bw") == (
        "400 looks like Gb/s or GB/s: this field is bytes/s per device (400 bytes/s is no GPU, "
        "memory or network link)",
        "write 5e10 or '400Gb/s' for 400 Gb/s, 4e11 or '400GB/s' for 400 GB/s")
    assert said.pop("device_overrides.memory_bw")[1] == (
        "write 3.35e12 or '3.35TB/s' for 3.35 TB/s, 3.35e9 or '3.35GB/s' for 3.35 GB/s")
    message, fix = said.pop("device_overrides.intra_node_bw")
    assert message == "'900 gb/s' is not a number of bytes/s per device"
    assert "such as 50e9, or the figure with its unit" in fix and "b is a bit, B a byte" in fix
    assert said.pop("device_overrides.host_bw") == (
        "5e7 bytes/s (0.4 Gb/s) per device is slower than a GPU, memory or network link: this "
        "field is bytes/s per device", "write the figure in bytes/s such as 50e9 (400 Gb/s), or "
        "write it with its unit if it is this slow: '50MB/s'")
    assert said.pop("device_overrides.peak_flops") == (
        "989 FLOP/s is slower than any device: this field is FLOP/s per device",
        "write 9.89e14 or '989TFLOP/s' for 989 TFLOP/s")
    assert said.pop("device_overrides.inter_latency_s")[1] == (
        "write 1.5e-5 or '15us' for 15 microseconds")
    assert said.pop("device_overrides.memory_bytes") == (
        "80 bytes is no device's memory: this field is bytes",
        "write it with its unit: 80GiB (or 80GB)")
    message, fix = said.pop("nodes[0].nics[1].bandwidth_gbps")
    assert message.startswith("4e11 Gb/s is faster than any NIC port: this field is Gb/s")
    assert fix.endswith("as bits/s 4e11 is 400 Gb/s, as bytes/s 3200 Gb/s")
    assert said == {}
    data["nodes"][0]["nics"][1]["bandwidth_gbps"] = 100001  # said "1e5": the limit itself
    with pytest.raises(ClusterError, match="100001 Gb/s is faster than any NIC port"):
        cluster_from_dict(data, "c.yaml")

    data["device_overrides"] = {"inter_node_bw": "400Gb/s", "intra_node_bw": "900GB/s",
                                "memory_bw": "3.35TB/s", "host_bw": "50MB/s",
                                "peak_flops": "989.4 TFLOPS", "inter_latency_s": "15us",
                                "memory_bytes": "80GiB"}
    data["nodes"][0]["nics"][1]["bandwidth_gbps"] = "25GB/s"
    data["nodes"][1]["nics"][0]["bandwidth_gbps"] = "100Mb/s"  # a slow port with its unit
    cluster = cluster_from_dict(data)
    device = cluster.nodes[0].device
    assert (device.inter_node_bw, device.intra_node_bw, device.memory_bw, device.host_bw,
            device.peak_flops, device.inter_latency_s) == (50e9, 900e9, 3.35e12, 50e6,
                                                           989.4e12, 15e-6)
    assert cluster.nodes[0].nics[1].bandwidth_gbps == 200
    assert cluster.nodes[1].nics[0].bandwidth_gbps == 0.1
