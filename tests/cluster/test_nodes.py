"""A launcher's node in a cluster description: the checks before anything starts, the settings
its workers get, and the worker-side rank placement and per-group gloo interfaces."""

from __future__ import annotations

import inspect
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import yaml

from orch.config import load_config
from orch.errors import PlanError
from orch.launch.launcher import prepare
from orch.launch.nodes import check_node, node_settings
from orch.parallel.interfaces import interface_chooser, pin_gloo_groups, place_rank, planned_rank
from orch.plan import build_plan
from orch.plan.cluster import load_cluster
from orch.plan.topology import Topology

REPO = Path(__file__).resolve().parents[2]
MIXED = REPO / "configs/clusters/mixed-nic.yaml"
LLAMA = str(REPO / "configs/llama3-8b.yaml")


def _cluster_file(tmp_path: Path, interface: str = "lo", devices: int = 2) -> Path:
    node = {"name": "here", "devices": devices,
            "nics": [{"name": "nic0", "type": "ethernet", "bandwidth_gbps": 10,
                      "network": "lan", "interface": interface}]}
    other = {**node, "name": "there"}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", "nodes": [node, other]}))
    return path


def _problems(argv: list[str]) -> str:
    with pytest.raises(PlanError) as info:
        prepare(argv)
    return str(info.value)


def test_what_launch_finds_is_checked_against_the_description(tmp_path):
    cluster = _cluster_file(tmp_path, interface="nosuch0")
    text = _problems(["--nnodes", "3", "--nproc-per-node", "3", "configs/tiny.yaml", "--set",
                      f"cluster={cluster}", "--set", f"run.dir={tmp_path / 'run'}",
                      "--node-name", "here"])
    assert "--nnodes: 3, but cluster" in text and "lists 2 nodes" in text
    assert "--nproc-per-node: 3, but cluster" in text and "gives node here 2 devices" in text
    assert "node here, NIC nic0: interface 'nosuch0' does not exist here" in text
    assert "(3 problems)" in text


def test_a_node_with_fewer_gpus_than_described_is_refused(tmp_path):
    cluster = load_cluster(_cluster_file(tmp_path, devices=8))
    problems = []
    check_node(cluster, cluster.nodes[0], 2, 8, problems, gpus=4)
    (problem,) = problems
    assert "node here" in problem.where and "8 devices, but this machine shows 4 GPUs" in (
        problem.message)


def test_a_node_not_in_the_description_is_named_with_the_fix(tmp_path):
    text = _problems(["--nnodes", "2", "configs/tiny.yaml", "--set",
                      f"cluster={_cluster_file(tmp_path)}", "--set",
                      f"run.dir={tmp_path / 'run'}", "--node-name", "elsewhere"])
    assert "'elsewhere' (--node-name) is not a node of cluster two (here, there)" in text
    assert "pass --node-name NAME (after CONFIG) with this machine's node" in text


def test_a_node_name_without_a_cluster_is_refused(tmp_path):
    text = _problems(["configs/tiny.yaml", "--set", f"run.dir={tmp_path / 'run'}",
                      "--node-name", "here"])
    assert "--node-name: 'here' given, but the config names no cluster description" in text


def _mixed_plan(*extra: str):
    cfg = load_config(LLAMA, [f"cluster={MIXED}", "parallel.tp=8", "parallel.pp=4", *extra])
    return build_plan(cfg)


def test_each_backend_gets_the_settings_for_its_node(monkeypatch):
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    cluster, plan = load_cluster(MIXED), _mixed_plan()
    nodes = {node.name: node for node in cluster.nodes}
    ib = node_settings(cluster, plan, nodes["ib-a1"], "nccl")
    assert ib.first_rank == 8 and ib.env == {
        "ORCH_NODE": "ib-a1", "NCCL_SOCKET_IFNAME": "=eth0",
        "NCCL_IB_HCA": "=" + ",".join(f"mlx5_{i}" for i in range(8))}
    roce = node_settings(cluster, plan, nodes["roce-b0"], "nccl")
    assert roce.first_rank == 32 and roce.env["NCCL_IB_GID_INDEX"] == "3"
    eth = node_settings(cluster, plan, nodes["eth-c1"], "nccl")
    assert eth.env["NCCL_IB_DISABLE"] == "1" and eth.env["NCCL_SOCKET_IFNAME"] == "=eth0,eth1"
    assert node_settings(cluster, plan, nodes["eth-c1"], "gloo").env == {
        "ORCH_NODE": "eth-c1", "GLOO_SOCKET_IFNAME": "eth0"}
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "bond0")  # the user's own choice stays
    kept = node_settings(cluster, plan, nodes["ib-a0"], "nccl")
    assert kept.kept == {"NCCL_SOCKET_IFNAME": "bond0"} and "NCCL_SOCKET_IFNAME" not in kept.env
    assert "NCCL_SOCKET_IFNAME=bond0 (yours)" in kept.describe()


def test_workers_take_the_plans_rank_and_each_group_its_networks_interface(monkeypatch):
    cluster, plan = load_cluster(MIXED), _mixed_plan()
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")  # torchrun's: this node joined first
    # the worker's log and terminal take the plan's rank before any group is made (they were
    # torchrun's: the node holding rank 0 logged as another rank and showed no steps)
    assert planned_rank(plan, "roce-b1") == 43 and os.environ["RANK"] == "3"
    assert planned_rank(plan, None) == 3
    assert place_rank(plan, "roce-b1") == 43 and os.environ["RANK"] == "43"
    choose = interface_chooser(cluster, plan, "ib-a1")
    assert choose([8, 9]) is None  # inside the node
    ib_ports = ",".join(f"ib{i}" for i in range(8))
    assert choose([0, 8]) == ib_ports  # an FSDP group of two InfiniBand nodes: their fabric
    assert choose([8, 40]) == "eth0"  # a pipeline pair into the RoCE stage: the shared network


def test_the_launch_uses_every_nic_the_plan_prices(monkeypatch):
    """The plan priced both 100 GbE ports of an Ethernet node (dp_shard at 3.12 GB/s per
    device) and eight InfiniBand ports of an IB node, while the launch pinned eth0 and ib0:
    one NIC each carried the traffic. Now each FSDP group's gloo interfaces on every node add
    up to the link the plan priced for it, and NCCL is given every socket interface and HCA."""
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    cluster, plan = load_cluster(MIXED), _mixed_plan()
    assert f"{plan.links['dp_shard'].bandwidth / 1e9:.2f}" == "3.12"
    nodes = {node.name: node for node in cluster.nodes}
    topology = Topology.from_cluster(cluster, [list(nodes).index(p.name) for p in plan.placement])
    for group in plan.groups()["dp_shard"]:
        link = topology.link(group)
        node = nodes[plan.placement[topology.node_of(group[0])].name]
        used = interface_chooser(cluster, plan, node.name)(group).split(",")
        assert sum(nic.bandwidth for nic in node.nics if nic.netdev in used) / node.devices == (
            pytest.approx(link.bandwidth)), (node.name, used, link)
    choose = interface_chooser(cluster, plan, "eth-c0")
    assert choose([48, 56]) == "eth0,eth1"  # its FSDP group: both 100 GbE ports
    assert choose([40, 48]) == "eth0"  # gloo: each node of a group lists as many (RoCE: one)
    eth = node_settings(cluster, plan, nodes["eth-c0"], "nccl").env
    assert eth["NCCL_SOCKET_IFNAME"] == "=eth0,eth1"  # exact names: eth0 alone matched eth01 too
    ib = node_settings(cluster, plan, nodes["ib-a0"], "nccl").env
    assert ib["NCCL_IB_HCA"] == "=" + ",".join(f"mlx5_{i}" for i in range(8))
    # the world group under gloo: the IB and RoCE nodes have one port on dc, so one each
    assert node_settings(cluster, plan, nodes["eth-c0"], "gloo").env["GLOO_SOCKET_IFNAME"] == "eth0"


def test_nccl_takes_the_hcas_of_the_network_they_give_most(tmp_path):
    """One 400 Gb/s InfiniBand port beside four 200 Gb/s RoCE ports: the planner prices the
    RoCE network (800 Gb/s); NCCL_IB_HCA named the InfiniBand HCA, the fastest single port."""
    nics = [{"name": "mlx5_0", "type": "ib", "bandwidth_gbps": 400, "network": "ib"}] + [
        {"name": f"mlx5_{i}", "type": "roce", "bandwidth_gbps": 200, "network": "roce"}
        for i in range(1, 5)]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"device": "h100-sxm-80gb", "nodes": [
        {"name": name, "devices": 8, "nics": nics} for name in ("a", "b")]}))
    cluster = load_cluster(path)
    plan = build_plan(load_config(LLAMA, [f"cluster={path}", "parallel.tp=8"]))
    assert plan.links["dp_shard"].network == "roce"
    env = node_settings(cluster, plan, cluster.nodes[0], "nccl").env
    assert env["NCCL_IB_HCA"] == "=mlx5_1,mlx5_2,mlx5_3,mlx5_4"


def test_gloo_groups_are_made_on_the_chosen_interface(tmp_path, monkeypatch):
    """The hook wraps torch's group factory: its signature is what the hook passes through."""
    params = list(inspect.signature(c10d._new_process_group_helper).parameters)
    assert params[:4] == ["group_size", "group_rank", "global_ranks_in_group", "backend"]
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    seen = []

    class Recording(c10d.ProcessGroupGloo):  # what gloo reads its interface from, when made
        def __init__(self, *args, **kwargs) -> None:
            seen.append(os.environ.get("GLOO_SOCKET_IFNAME"))
            super().__init__(*args, **kwargs)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        monkeypatch.setattr(c10d, "ProcessGroupGloo", Recording)
        loopback = socket.if_nameindex()[0][1]
        with pin_gloo_groups(lambda ranks: loopback):
            dist.new_group([0], backend="gloo")
        dist.new_group([0], backend="gloo")
        with pin_gloo_groups(lambda ranks: f"{loopback},{loopback}"):  # a network's two ports
            both = dist.new_group([0], backend="gloo")
        devices = both._get_backend(torch.device("cpu")).options._devices
        assert len(devices) == 2  # one gloo device per listed interface, as torch documents
    finally:
        dist.destroy_process_group()
    assert seen == [loopback, None, f"{loopback},{loopback}"]
    assert c10d._new_process_group_helper.__name__ == "_new_process_group_helper"


@pytest.mark.parametrize("argv, warned", [
    (["--node-rank", "0", "--master-addr", "10.9.9.9"], True),  # another machine's address
    (["--node-rank", "0", "--master-addr", "127.0.0.1"], False),
    (["--node-rank", "1", "--master-addr", "10.9.9.9"], False),  # only node 0 can tell
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "10.9.9.9:29500"], False),
])
def test_node_0_whose_master_address_is_elsewhere_is_warned(argv, warned):
    """Swapped node ranks, or two nodes both given rank 0, waited in silence for minutes."""
    from orch.launch.launcher import launch_parser, rendezvous_host_warning

    args = launch_parser().parse_args(["--nnodes", "2", *argv, "configs/tiny.yaml"])
    warning = rendezvous_host_warning(args)
    assert (warning is not None) == warned
    if warned:
        assert "--master-addr 10.9.9.9 is not an address of this machine" in warning


def test_a_rendezvous_that_cannot_form_is_one_line():
    """An unreachable c10d endpoint ended in some 230 lines of Python and C++ traceback."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    from orch.launch.launcher import _rendezvous_failure, launch_parser

    args = launch_parser().parse_args(["--nnodes", "2", "--rdzv-backend", "c10d",
                                       "--rdzv-endpoint", "10.9.9.9:29500", "configs/tiny.yaml"])
    exc = RendezvousConnectionError("The connection to the C10d store has failed.\nmore")
    message = _rendezvous_failure(args, exc)
    assert message.startswith("the nodes could not meet at 10.9.9.9:29500 "
                              "(RendezvousConnectionError: The connection to the C10d store has "
                              "failed.); fix: check that the address is one of the nodes' "
                              "(the one that hosts the store)")
    assert "\n" not in message


@pytest.mark.parametrize("argv, local", [
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29400"], "127.0.0.1"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29400", "--local-addr", "h"], "h"),
    (["--master-addr", "127.0.0.1"], None),  # static: the store is --master-addr's
])
def test_a_c10d_launch_on_a_cluster_gives_torchrun_the_nodes_shared_address(tmp_path, monkeypatch,
                                                                            argv, local):
    """Under c10d torch hands the workers the head agent's host name, which resolved to
    loopback on a Debian head (127.0.1.1): the other nodes' workers waited 30 minutes. With a
    cluster description the node's address on the shared network ("lo" here) is known."""
    for name in ("GLOO_SOCKET_IFNAME", "ORCH_NODE", "ORCH_PLANNED_WORLD", "ORCH_LAUNCH_ID"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    args, _, _ = prepare(["--nnodes", "2", *argv, "configs/tiny.yaml", "--set",
                          f"cluster={_cluster_file(tmp_path)}", "--set",
                          f"run.dir={tmp_path / 'run'}", "--node-name", "here"])
    assert args.local_addr == local


def test_workers_that_placed_the_ranks_differently_are_told_apart():
    """Nodes given the description with its nodes in another order each took the plan rank of
    their own reading: both took rank 0, and the process group waited in silence."""
    from orch.parallel.interfaces import placement_problems

    same = [{"node": "a", "rank": 0, "digest": "d1"}, {"node": "b", "rank": 1, "digest": "d1"}]
    assert placement_problems(same, "c.yaml") == []
    reordered = [{"node": "a", "rank": 0, "digest": "d1"}, {"node": "b", "rank": 0, "digest": "d2"}]
    (problem,) = placement_problems(reordered, "c.yaml")
    assert problem.message.startswith("the nodes hold different descriptions (a: d1; b: d2)")
    assert "give every node the same file c.yaml" in problem.fix
    doubled = [{"node": "a", "rank": 0, "digest": "d1"}, {"node": "a", "rank": 0, "digest": "d1"}]
    (problem,) = placement_problems(doubled, "c.yaml")
    assert problem.message == "rank 0 is taken on nodes a, a"


def test_placement_is_agreed_through_torchruns_store(monkeypatch):
    """Two workers of two nodes, one store: each sees the other's claim."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    from orch.parallel.interfaces import agree_on_placement

    cluster, plan = load_cluster(MIXED), _mixed_plan()
    server = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("LOCAL_RANK", "0")
    other = dist.PrefixStore("orch/placement/attempt-0", server)  # the other node's worker
    other.set("claim/1", json.dumps({"node": "ib-a0", "rank": 0, "digest": "elsewhere"}))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PlanError, match="the nodes hold different descriptions"):
        agree_on_placement(plan, "ib-a1", cluster, 2, timedelta(seconds=10))
    import hashlib

    from orch.parallel.interfaces import planned_rank

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the next attempt: agreeing claims
    digest = hashlib.sha256(repr(cluster.nodes).encode()).hexdigest()[:12]
    claim = {"node": "ib-a0", "rank": planned_rank(plan, "ib-a0"), "digest": digest}
    dist.PrefixStore("orch/placement/attempt-1", server).set("claim/1", json.dumps(claim))
    agree_on_placement(plan, "ib-a1", cluster, 2, timedelta(seconds=10))


def test_a_node_waiting_in_a_dynamic_rendezvous_claims_no_rank():
    """Under c10d every node said "node 0 of 2 waits" (--node-rank's default)."""
    from orch.launch.launcher import launch_parser, waiting_line

    dynamic = launch_parser().parse_args(["--nnodes", "2", "--rdzv-backend", "c10d",
                                          "--rdzv-endpoint", "head:29500", "configs/tiny.yaml"])
    assert waiting_line(dynamic, 2).startswith("orch launch: this node (one of 2, numbered as "
                                               "they join) waits at head:29500 for the others")
    static = launch_parser().parse_args(["--nnodes", "2", "--node-rank", "1", "--master-addr",
                                         "head", "configs/tiny.yaml"])
    assert waiting_line(static, 2).startswith("orch launch: node 1 of 2 waits at head:")


DGX = REPO / "configs/clusters/dgx-h100-4node.yaml"


def test_hcas_are_checked_as_rdma_devices_and_never_bound_to(tmp_path, monkeypatch):
    """The DGX description lists its InfiniBand HCAs without IPoIB interfaces, as orch cluster
    detect writes a port without a netdev: the launch check looked for a network interface
    named mlx5_0 (refusing the machine that wrote it), and the socket transports were told to
    bind to it."""
    import orch.launch.nodes as nodes

    cluster = load_cluster(DGX)
    node = cluster.nodes[0]
    monkeypatch.setattr(nodes, "INFINIBAND", tmp_path)
    for index in range(8):
        (tmp_path / f"mlx5_{index}").mkdir()
    problems: list = []
    check_node(cluster, node, 4, 8, problems, gpus=8)
    assert problems == []
    (tmp_path / "mlx5_7").rmdir()
    (tmp_path / "mlx5_6").rmdir()
    check_node(cluster, node, 4, 8, problems)  # no GPU: said once, not the HCAs (no NCCL)
    (no_gpu,) = problems
    assert no_gpu.where == f"cluster {DGX}: node {node.name}" and no_gpu.message == (
        "8 h100-sxm-80gb devices, but this machine shows no GPU (it would train on its CPUs, "
        "planned as GPUs)") and "device: cpu" in no_gpu.fix  # it trained, MFU 0.0%
    problems.clear()
    check_node(cluster, node, 4, 8, problems, gpus=8)
    (problem,) = problems  # one for the node
    assert problem.where.endswith("node dgx0")
    assert "no RDMA device mlx5_6, mlx5_7 here" in problem.message and "mlx5_0" in problem.message
    plan = build_plan(load_config(LLAMA, [f"cluster={DGX}", "parallel.tp=8"]))
    for backend, variable in (("gloo", "GLOO_SOCKET_IFNAME"), ("nccl", "NCCL_SOCKET_IFNAME")):
        monkeypatch.delenv(variable, raising=False)
        assert variable not in node_settings(cluster, plan, node, backend).env  # torch's choice
    assert interface_chooser(cluster, plan, "dgx0")([0, 8]) == ""  # gloo's default device
    assert node_settings(cluster, plan, node, "nccl").env["NCCL_IB_HCA"].startswith("=mlx5_0,")


def test_every_node_plans_a_cluster_alike_whatever_its_own_device(monkeypatch, tmp_path):
    """Each launcher and worker planned with its own GPU as the cluster's device: an A100 node
    and an H200 node of one job (and a CPU machine) chose different node orders and splits."""
    import orch.launch.launcher as launcher

    nic = {"name": "e0", "type": "ethernet", "bandwidth_gbps": 100, "network": "dc"}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({"nodes": [
        {"name": name, "device": device, "devices": 8, "nics": [nic]}
        for name, device in (("a0", "a100"), ("h0", "h200"), ("a1", "a100"), ("h1", "h200"))]}))
    cfg = load_config(LLAMA, [f"cluster={path}", "parallel.pp=2"])
    seen = set()
    for local in ("a100-80gb", "h200", "cpu"):
        monkeypatch.setattr(launcher, "device_name", lambda local=local: local)
        plan = launcher.launch_plan(cfg, 32, 8)
        seen.add((tuple(place.name for place in plan.placement), plan.layers_per_stage,
                  plan.peak_flops))
    assert len(seen) == 1, seen


def test_a_world_size_problem_on_a_cluster_names_the_description(tmp_path):
    """With nodes of 2 and 1 devices the message read '--nnodes 2 x --nproc-per-node 2 = 3
    processes' and suggested --nproc-per-node, which the description fixes."""
    path = _cluster_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["nodes"][1]["devices"] = 1
    path.write_text(yaml.safe_dump(data))
    text = _problems(["--nnodes", "2", "configs/tiny.yaml", "--set", f"cluster={path}",
                      "--set", "parallel.tp=2", "--set", f"run.dir={tmp_path / 'run'}",
                      "--node-name", "here"])
    assert "world size 3 is not divisible" in text and f"(the 3 devices of cluster {path})" in text
    assert "or edit the cluster description" in text and "--nproc-per-node 2 =" not in text


def test_every_user_of_a_nodes_interface_skips_hcas_without_one(tmp_path):
    """Three copies of "this node's interface on network N" had drifted: the gloo groups took
    the first NIC there even when it named no interface, the launcher and the probe the first
    that did."""
    nics = [{"name": "mlx5_0", "type": "ib", "bandwidth_gbps": 100, "network": "f"},
            {"name": "mlx5_1", "type": "ib", "bandwidth_gbps": 100, "network": "f",
             "interface": "ib1"}]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", "nodes": [
        {"name": name, "devices": 1, "nics": nics} for name in ("a", "b")]}))
    cluster = load_cluster(path)
    plan = build_plan(load_config("configs/tiny.yaml", [f"cluster={path}"]))
    assert cluster.nodes[0].interface_on("f") == "ib1"
    assert interface_chooser(cluster, plan, "a")([0, 1]) == "ib1"
    assert node_settings(cluster, plan, cluster.nodes[0], "gloo").env["GLOO_SOCKET_IFNAME"] == "ib1"


def test_a_node_without_an_interface_on_a_groups_network_takes_one_device_as_the_others_count(
        tmp_path):
    """A node naming no interface on the group's network kept the launcher's world list
    (eth0,eth1: two gloo devices) where the other nodes counted it as one; gloo's first
    collective on such a group timed out. It now takes gloo's one default device."""
    dc = [{"name": f"e{i}", "type": "ethernet", "bandwidth_gbps": 10, "network": "dc",
           "interface": f"eth{i}"} for i in range(2)]
    fabric = {"name": "mlx5_0", "type": "ib", "bandwidth_gbps": 400, "network": "ib"}
    path = tmp_path / "half.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", "nodes": [
        {"name": "a", "devices": 1, "nics": [*dc, {**fabric, "interface": "ib0"}]},
        {"name": "b", "devices": 1, "nics": [*dc, fabric]},
        {"name": "c", "devices": 1, "nics": dc}, {"name": "d", "devices": 1, "nics": dc}]}))
    cluster = load_cluster(path)
    plan = build_plan(load_config("configs/tiny.yaml", [
        f"cluster={path}", "parallel.dp_replicate=2", "parallel.dp_shard=2"]))
    assert [place.name for place in plan.placement][:2] == ["a", "b"]  # a shard group on ib
    assert node_settings(cluster, plan, cluster.nodes[1], "gloo").env[
        "GLOO_SOCKET_IFNAME"] == "eth0,eth1"  # the world group's, on the shared network
    assert interface_chooser(cluster, plan, "a")([0, 1]) == "ib0"
    assert interface_chooser(cluster, plan, "b")([0, 1]) == ""  # one device, as a counts it
