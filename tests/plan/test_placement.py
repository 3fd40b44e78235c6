"""NIC-aware placement: node orders, networks, and the rules the plan keeps or relaxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orch.config import load_config
from orch.errors import PlanError
from orch.plan import build_plan, evaluate, resolve_machine
from orch.plan.cluster import cluster_from_dict, load_cluster
from orch.plan.cost import head_flops, layer_flops
from orch.plan.placement import candidate_orders, mixing
from orch.plan.plan import config_degrees
from orch.plan.topology import Topology

REPO = Path(__file__).resolve().parents[2]
MIXED = REPO / "configs/clusters/mixed-nic.yaml"
LLAMA = REPO / "configs/llama3-8b.yaml"


def mixed_plan(*extra: str):
    return build_plan(load_config(LLAMA, [f"cluster={MIXED}", "parallel.tp=8", *extra]))


def test_nodes_are_ordered_by_their_fastest_network() -> None:
    cluster = load_cluster(MIXED)
    names = [node.name for node in cluster.nodes]
    listed, fastest_first, slowest_first = candidate_orders(cluster)
    assert listed == tuple(range(8))
    assert [names[i] for i in fastest_first] == ["ib-a0", "ib-a1", "ib-a2", "ib-a3",
                                                  "roce-b0", "roce-b1", "eth-c0", "eth-c1"]
    assert [names[i] for i in slowest_first] == ["eth-c0", "eth-c1", "roce-b0", "roce-b1",
                                                  "ib-a0", "ib-a1", "ib-a2", "ib-a3"]


def test_stages_matching_the_nic_groups_keep_data_parallel_inside_one_type() -> None:
    """pp4 over 4 IB + 2 RoCE + 2 Ethernet nodes: each stage is two nodes of one type, so
    every FSDP group stays on one fabric; only the pipeline crosses, over the shared network."""
    plan = mixed_plan("parallel.pp=4")
    ranks = plan.ranks()
    assert [(r["rank"], r["node"], r["nic"]) for r in ranks[::8]] == [
        (0, "ib-a0", "ib"), (8, "ib-a1", "ib"), (16, "ib-a2", "ib"), (24, "ib-a3", "ib"),
        (32, "roce-b0", "roce"), (40, "roce-b1", "roce"), (48, "eth-c0", "ethernet"),
        (56, "eth-c1", "ethernet")]
    for group in plan.groups()["dp_shard"]:
        assert len({ranks[r]["nic"] for r in group}) == 1
    assert plan.notes == ()
    # the slowest FSDP group is the Ethernet stage's (2 x 100 Gb/s for 8 GPUs), the pipeline
    # runs over the data-centre network every node shares (100 Gb/s for 8 GPUs)
    assert (plan.links["dp_shard"].nic, plan.links["dp_shard"].bandwidth) == ("ethernet",
                                                                              200e9 / 8 / 8)
    assert (plan.links["pp"].network, plan.links["pp"].bandwidth) == ("dc", 100e9 / 8 / 8)
    # the NIC-oblivious order (as listed) mixes types in every stage and is slower
    cfg = load_config(LLAMA, [f"cluster={MIXED}", "parallel.tp=8", "parallel.pp=4"])
    machine = resolve_machine(cfg, None, None, None, [])
    listed = machine.placements()[0]
    deg = config_degrees(cfg, 64, [])
    oblivious = evaluate(cfg, deg, listed)
    assert mixing(deg, listed.topology, oblivious.placement, oblivious.step.comm_s) == 32
    # (every FSDP group: 8 tp positions x 4 stages)
    assert oblivious.step.total_s > plan.step.total_s
    assert oblivious.links["dp_shard"].bandwidth == 100e9 / 8 / 8


def test_degrees_that_cannot_respect_nic_boundaries_get_a_note_with_the_cost() -> None:
    plan = mixed_plan("parallel.pp=2")
    (note,) = plan.notes
    assert note.startswith("data-parallel (FSDP) groups span NIC types ethernet + ib + roce")
    assert "rule relaxed" in note and "over ethernet at 1.6 GB/s per device" in note
    assert f"estimated {plan.step.comm_s['dp_shard-cp']:.3f} s per step" in note
    assert "no node order tried keeps them inside one" in note
    # only the description's order tried: the note says so (it said no order tried kept them,
    # where the default orders do)
    (listed,) = mixed_plan("parallel.pp=4", "parallel.node_order=listed").notes
    assert "the listed node order (parallel.node_order: listed) does not keep them" in listed
    assert mixed_plan("parallel.pp=4").notes == ()


def test_a_note_names_every_mix_of_nic_types_its_groups_span() -> None:
    """As listed, pp4's stages are ib-a0 + roce-b0, eth-c0 + ib-a1, ib-a2 + roce-b1 and
    eth-c1 + ib-a3: the note said 'ib + roce (32 of 32)', the first group's types, where half
    the groups are ethernet + ib."""
    (note,) = mixed_plan("parallel.pp=4", "parallel.node_order=listed").notes
    assert note.startswith("data-parallel (FSDP) groups span NIC types ethernet + ib in 16, "
                           "ib + roce in 16 (32 of 32; ")


def test_plan_json_lists_each_rank_with_its_node_and_nic(capsys) -> None:
    from orch.cli import main

    assert main(["plan", str(LLAMA), "--set", f"cluster={MIXED}", "--set", "parallel.tp=8",
                 "--set", "parallel.pp=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ranks"]) == 64 and out["ranks"][63] == {"rank": 63, "node": "eth-c1",
                                                            "nic": "ethernet"}
    assert [n["name"] for n in out["nodes_in_rank_order"]][:2] == ["ib-a0", "ib-a1"]
    assert out["links"]["pp"]["nic"] == "ethernet"


def _two_islands() -> dict:
    nic = {"type": "ib", "bandwidth_gbps": 400}
    return {"device": "h100", "nodes": [
        {"name": "a", "devices": 8, "nics": [{"name": "mlx5_0", "network": "fabric-a", **nic}]},
        {"name": "b", "devices": 8, "nics": [{"name": "mlx5_0", "network": "fabric-b", **nic}]}]}


def test_a_node_with_no_nic_is_named_in_a_note_as_the_nodes_line_names_it(tmp_path) -> None:
    """A node with no NICs listed was an empty NIC type: 'span NIC types  + ethernet + ib'."""
    path = tmp_path / "bare.yaml"
    path.write_text("device: h100\nnodes:\n"
                    "  - {name: a, devices: 8, nics: [{name: m0, type: ib, bandwidth_gbps: 400}]}\n"
                    "  - {name: b, devices: 8, nics: [{name: e0, type: ethernet, "
                    "bandwidth_gbps: 100}]}\n"
                    "  - {name: c, devices: 8}\n")
    plan = build_plan(load_config(LLAMA, [f"cluster={path}", "parallel.tp=8",
                                          "train.global_batch=2040"]))
    (note,) = [n for n in plan.notes if not n.startswith("parallel.grad_reduce=")]
    assert note.startswith("data-parallel (FSDP) groups span NIC types ethernet + ib + no NIC "
                           "listed (8 of 8; ")


def test_groups_across_nodes_without_a_common_network_are_refused(tmp_path) -> None:
    import yaml

    path = tmp_path / "islands.yaml"
    path.write_text(yaml.safe_dump(_two_islands()))
    with pytest.raises(PlanError) as info:
        build_plan(load_config(LLAMA, [f"cluster={path}", "parallel.tp=8"]))
    text = str(info.value)
    assert "dp_shard" in text and "share no network" in text and "a common network" in text


def test_the_fastest_common_network_carries_a_group() -> None:
    data = _two_islands()
    for node in data["nodes"]:
        node["nics"].append({"name": "eth0", "type": "ethernet", "bandwidth_gbps": 100,
                             "network": "dc"})
    topo = Topology.from_cluster(cluster_from_dict(data))
    link = topo.link(list(range(16)))
    assert (link.network, link.nic, link.bandwidth) == ("dc", "ethernet", 100e9 / 8 / 8)
    data["nodes"][1]["nics"][0]["network"] = "fabric-a"
    link = Topology.from_cluster(cluster_from_dict(data)).link(list(range(16)))
    assert (link.network, link.nic, link.bandwidth) == ("fabric-a", "ib", 400e9 / 8 / 8)


def test_the_search_counts_degrees_whose_groups_cannot_reach_each_other(tmp_path) -> None:
    import yaml

    from orch.plan import search
    from orch.plan.render import render_search

    path = tmp_path / "islands.yaml"
    path.write_text(yaml.safe_dump(_two_islands()))
    cfg = load_config(LLAMA, [f"cluster={path}"])
    machine = resolve_machine(cfg, None, None, None, [])
    result = search(cfg, machine)
    assert result.best == [] and result.unconnected > 0
    text = render_search(result, "16 x h100-sxm-80gb")
    assert "share no network" in text
    # fitting in memory was not the problem: "no plan fits: add devices, ..." said it was
    assert text.splitlines()[-1] == (
        "no plan can run: the degrees that fit in memory need groups across nodes that share no "
        "network; attach the nodes to a common network in the cluster description (a NIC's "
        "'network')")


def _mixed_devices(tmp_path: Path) -> Path:
    """An H100 node and an A100 node on one InfiniBand network."""
    nic = "[{name: mlx5_0, type: ib, bandwidth_gbps: 400, network: ib}]"
    path = tmp_path / "mixdev.yaml"
    path.write_text(f"nodes:\n  - {{name: h, device: h100, devices: 8, nics: {nic}}}\n"
                    f"  - {{name: a, device: a100, devices: 8, nics: {nic}}}\n")
    return path


def test_the_slowest_pipeline_stage_sets_the_step(tmp_path) -> None:
    """Every split was priced as an even one at the slowest device: 31/1 as fast as 16/16, the
    split in proportion to mixed devices' speeds no faster than all on the A100s, and the last
    stage's output head (about 1.8 layers of Llama 3 8B at 8K tokens) was free."""
    def step(cluster: str | None, *sets: str) -> float:
        cfg = load_config("configs/llama3-8b.yaml", ["parallel.tp=8", "parallel.pp=2", *sets,
                                                      *([f"cluster={cluster}"] if cluster else [])])
        return build_plan(cfg, None if cluster else 16, None, None).step.compute_s

    cfg = load_config("configs/llama3-8b.yaml")
    layer, head = layer_flops(cfg.model, cfg.train.seq_len)[0], head_flops(cfg.model)
    even = step(None, "parallel.stage_layers=[16,16]")  # its last stage: 16 layers and the head
    assert step(None, "parallel.stage_layers=[31,1]") == pytest.approx(
        even * 31 * layer / (16 * layer + head))
    assert step(None, "parallel.stage_layers=[1,31]") == pytest.approx(
        even * (31 * layer + head) / (16 * layer + head))
    assert step(None) == pytest.approx(even * 17 * layer / (16 * layer + head))  # 17/15
    mixed = str(_mixed_devices(tmp_path))
    slowest = step(mixed, "parallel.stage_layers=[16,16]")  # the A100 stage's 16 layers
    by_speed = step(mixed)  # 23/9 by the devices' speeds
    assert by_speed < 0.7 * slowest
    assert step(mixed, "parallel.stage_layers=[9,23]") > slowest  # the slow node holds more


def test_the_header_counts_nodes_of_different_sizes(tmp_path) -> None:
    """An 8-device and a 4-device node were "2 nodes x 4" (their greatest common divisor)."""
    from orch.plan.render import render_plan

    nic = "[{name: mlx5_0, type: ib, bandwidth_gbps: 400, network: ib}]"
    path = tmp_path / "sizes.yaml"
    path.write_text(f"device: h100\nnodes:\n  - {{name: big, devices: 8, nics: {nic}}}\n"
                    f"  - {{name: small, devices: 4, nics: {nic}}}\n")
    cfg = load_config("configs/tiny.yaml", [f"cluster={path}", "train.global_batch=96",
                                            "train.micro_batch=1"])
    header = render_plan(build_plan(cfg, None, None, None)).splitlines()[0]
    assert header == "plan for tiny on 12 x h100-sxm-80gb (2 nodes: 1 x 8 + 1 x 4)"


def test_the_search_splits_each_node_order_by_its_own_speeds(tmp_path, monkeypatch) -> None:
    """``--auto`` priced every node order with the split made for the listed one: with H100
    nodes on Ethernet and A100 nodes on InfiniBand listed H, A, H, A, the pipeline it chose ran
    the H100s first but kept the listed order's 17/15 (220 s a step), where the plan of the same
    degrees and order splits 25/7 (133 s); such plans could drop out of the ranking."""
    import importlib

    search_module = importlib.import_module("orch.plan.search")  # (orch.plan.search: a function)
    eth = "{name: eth0, type: ethernet, bandwidth_gbps: 100, network: dc}"
    ib = "{name: mlx5_0, type: ib, bandwidth_gbps: 400, network: ib}"
    path = tmp_path / "mixed.yaml"
    path.write_text("nodes:\n" + "".join(
        f"  - {{name: {name}, device: {device}, devices: 8, nics: [{nics}]}}\n"
        for name, device, nics in (("h0", "h100", eth), ("a0", "a100", f"{ib}, {eth}"),
                                   ("h1", "h100", eth), ("a1", "a100", f"{ib}, {eth}"))))
    every = search_module.candidate_degrees
    monkeypatch.setattr(search_module, "candidate_degrees", lambda cfg, machine, fixed: (
        d for d in every(cfg, machine, fixed) if d.pp == 2 and d.tp == 8 and d.cp == 1))
    cluster = f"cluster={path}"
    cfg = load_config("configs/llama3-8b.yaml", [cluster])
    result = search_module.search(cfg, resolve_machine(cfg, None, None, None, []), top=3)
    assert result.best
    for plan in result.best:
        d = plan.degrees
        sets = [f"parallel.{name}={getattr(d, name)}" for name in (
            "pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "etp", "virtual_stages")]
        sets += [f"train.micro_batch={plan.micro_batch}", f"train.recompute={plan.recompute}"]
        own = build_plan(load_config("configs/llama3-8b.yaml", [cluster, *sets]), None, None,
                         None)
        assert [n.name for n in own.placement] == [n.name for n in plan.placement], d.short()
        assert own.layers_per_stage == plan.layers_per_stage, d.short()
        assert own.step.total_s == pytest.approx(plan.step.total_s), d.short()


def test_the_shortcuts_of_the_search_give_what_every_group_gives(monkeypatch) -> None:
    """--auto on 128 mixed nodes took 26-66 s, building every group of every dimension for
    each plan it priced (and each node's NICs again for its placement). Links and NIC-mixing
    groups, now found per distinct group set and per (degrees, node order), equal what every
    group of ``plan_groups`` gives, and a placement is made once per node order."""
    from orch.plan import machine as machine_module
    from orch.plan import search
    from orch.plan.layout import plan_groups
    from orch.plan.placement import mixed_groups

    cfg = load_config(LLAMA, [f"cluster={MIXED}"])
    machine = resolve_machine(cfg, None, None, None, [])
    for placed in machine.placements():
        topo, places = placed.topology, placed.places()
        for deg in (config_degrees(load_config(LLAMA, [f"cluster={MIXED}", *sets]), 64, [])
                    for sets in ([], ["parallel.tp=8"], ["parallel.pp=4", "parallel.tp=2"],
                                 ["parallel.pp=2", "parallel.cp=2", "parallel.dp_replicate=2"])):
            groups = plan_groups(deg)
            assert placed.links(deg) == topo.worst_links(groups)
            every = {}
            for dim in ("dp_shard-cp", "dp_replicate", "ep", "edp"):
                spans = [types for g in groups[dim] if len(types := tuple(sorted(
                    {places[topo.node_of(r)].nic for r in g}))) > 1]
                if spans and len(groups[dim][0]) > 1:
                    combos = sorted({t: spans.count(t) for t in spans}.items(),
                                    key=lambda item: (-item[1], item[0]))
                    every[dim] = (len(spans), len(groups[dim]), tuple(combos))
            assert mixed_groups(deg, topo, places) == every
    made = []
    placement_of = machine_module.placement_of
    monkeypatch.setattr(machine_module, "placement_of",
                        lambda *args: made.append(args) or placement_of(*args))
    assert search(cfg, machine).best
    assert len(made) == len(machine.placements()) == 3


def test_the_nodes_line_writes_numbered_names_as_ranges(tmp_path) -> None:
    """With 4,096 nodes the ``nodes`` line listed every name, 27 KB on one line, where the rank
    grid says "... N more nodes": names in sequence are a range, and a line of names that are
    not shows its first ones, how many it leaves out, and the last."""
    from orch.plan.render import _names, render_plan

    ib = "[{name: m0, type: ib, bandwidth_gbps: 400, network: ib}, {name: e0, type: ethernet, " \
        "bandwidth_gbps: 100, network: dc}]"
    eth = "[{name: e0, type: ethernet, bandwidth_gbps: 100, network: dc}]"
    path = tmp_path / "big.yaml"
    path.write_text(f"device: h100\nnodes:\n  - {{name: 'ib{{i}}', count: 512, devices: 8, "
                    f"nics: {ib}}}\n  - {{name: 'eth{{i}}', count: 512, devices: 8, nics: {eth}}}"
                    "\n")
    cfg = load_config(LLAMA, [f"cluster={path}", "parallel.tp=8", "parallel.pp=2"])
    [nodes] = [line for line in render_plan(build_plan(cfg)).splitlines()
               if line.startswith("  nodes ")]
    assert nodes == ("  nodes    ranks 0-4095 ib0..ib511 (ib); ranks 4096-8191 eth0..eth511 "
                     "(ethernet)")
    assert _names(["n08", "n09", "n10", "x", "y1", "y2", "z", "a", "b", "c", "d", "e"]) == (
        "n08..n10 x y1 y2 z a b ... 2 more nodes ... e")
