"""Four "nodes" on one machine (network namespaces): two on a fast InfiniBand-like pair, two on a
fast RoCE-like pair, all four on a slow shared Ethernet-like network, listed interleaved as a
scheduler might hand them out (ib0, roce0, ib1, roce1). ``orch launch`` runs once in each, as on
a real cluster, and trains the tiny model with pp2 x FSDP2.

Checked: the plan puts the two InfiniBand nodes in stage 0 and the RoCE nodes in stage 1 whatever
order the nodes joined in, each launcher says which interface its node's gloo uses, the FSDP
groups' traffic goes over the fast pairs (interface byte counters in each namespace) and the
pipeline's over the shared network, and the losses equal a plain 4-process run of the same
degrees on the host (the placement changes which process holds a rank, not the numbers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orch.cluster.netbed import NetBed, Network, run_together, unavailable

REPO = Path(__file__).resolve().parents[2]
ORCH = str(Path(sys.executable).parent / "orch")
NODES = {"ib0": ["ib", "eth"], "roce0": ["roce", "eth"], "ib1": ["ib", "eth"],
         "roce1": ["roce", "eth"]}
NETWORKS = [Network("ib", "ib", 1000), Network("roce", "roce", 800),
            Network("eth", "ethernet", 200)]
STEPS = 3
SETTINGS = ["train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
            "train.warmup_steps=1", f"train.steps={STEPS}", "run.log_interval=1",
            "checkpoint.interval=0", "parallel.pp=2", "parallel.dp_shard=2"]

pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("netbed")
    with NetBed(NETWORKS, NODES) as bed:
        cluster = tmp / "cluster.yaml"
        cluster.write_text(yaml.safe_dump(bed.cluster()))
        run_dir = tmp / "run"
        done = bed.orch_launch(ORCH, ["configs/tiny.yaml", *_sets(*SETTINGS, f"cluster={cluster}",
                                                                  f"run.dir={run_dir}")],
                               ("ib0", "eth"), 29517, REPO)
        sent = {(node, net): bed.tx_bytes(node, net) for node, nets in NODES.items()
                for net in nets}
    plain = tmp / "plain"
    out = subprocess.run([ORCH, "launch", "--nproc-per-node", "4", "configs/tiny.yaml",
                          *_sets(*SETTINGS, f"run.dir={plain}")], cwd=REPO, text=True,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return done, sent, run_dir, plain


def test_every_node_trained_to_the_end(bed_run):
    done, *_ = bed_run
    for node, (code, output) in done.items():
        assert code == 0, f"{node}:\n{output}"
    assert f"step {STEPS}/{STEPS}" in "".join(output for _, output in done.values())


def test_the_plan_groups_nodes_by_network_and_each_launcher_says_its_interface(bed_run):
    done, _, run_dir, _ = bed_run
    plan = json.loads((run_dir / "plan.json").read_text())
    assert [(r["rank"], r["node"], r["nic"]) for r in plan["ranks"]] == [
        (0, "ib0", "ib"), (1, "ib1", "ib"), (2, "roce0", "roce"), (3, "roce1", "roce")]
    assert plan["links"]["dp_shard"]["nic"] == "roce"  # the slower of the two stages' groups
    assert plan["links"]["pp"]["network"] == "eth" and plan["notes"] == []
    for rank, node in enumerate(["ib0", "ib1", "roce0", "roce1"]):
        assert (f"orch launch: node {node}, ranks {rank}-{rank}: ORCH_NODE={node} "
                "GLOO_SOCKET_IFNAME=eth") in done[node][1]


def test_data_parallel_traffic_stays_on_the_fast_pairs(bed_run):
    """Per step each FSDP rank gathers its stage's parameters twice and reduce-scatters their
    gradients (about 6 MB a stage of the tiny model): that goes over ib or roce; the shared
    network carries the pipeline's activations (64 KB a micro-batch each way) and the
    rendezvous, losses and metrics."""
    _, sent, _, _ = bed_run
    for node in NODES:
        fast = sent[(node, NODES[node][0])]
        assert fast > STEPS * 3 * 10**6, (node, fast)
        assert sent[(node, "eth")] < fast / 2, (node, sent)


def test_losses_equal_a_plain_run_of_the_same_degrees(bed_run):
    *_, run_dir, plain = bed_run
    got, want = _metrics(run_dir), _metrics(plain)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_probe_writes_what_each_network_carries_into_the_description(tmp_path):
    """Three nodes, a fast pair (1000 Mbit/s) and all three on a slow network (100 Mbit/s):
    `orch cluster probe` in each namespace at once; the first node writes measured_gbps on
    every NIC, and the planner then prices links by them."""
    from orch.plan.cluster import load_cluster
    from orch.plan.topology import Topology

    networks = [Network("fast", "ib", 1000), Network("slow", "ethernet", 100)]
    with NetBed(networks, {"a": ["fast", "slow"], "b": ["fast", "slow"],
                           "c": ["slow"]}) as bed:
        path = tmp_path / "bed.yaml"
        path.write_text(yaml.safe_dump(bed.cluster()))
        done = run_together({node: bed.command(
            node, [ORCH, "cluster", "probe", str(path), "--master-addr",
                   bed.address("a", "slow"), "--node-name", node, "--mbytes", "4"])
            for node in "abc"}, REPO, timeout=300)
    outputs = {node: output for node, (_, output) in done.items()}
    assert all(code == 0 for code, _ in done.values()), outputs
    assert "point to point" in outputs["a"] and f"wrote measured_gbps to {path}" in outputs["a"]
    assert "orch cluster probe: node c done" in outputs["c"]
    cluster = load_cluster(path)
    measured = {(node.name, nic.network): nic.measured_gbps for node in cluster.nodes
                for nic in node.nics}
    assert set(measured) == {("a", "fast"), ("a", "slow"), ("b", "fast"), ("b", "slow"),
                             ("c", "slow")}
    for node in "ab":  # the fast pair measured faster than the shared network (10x apart)
        assert measured[(node, "fast")] > 3 * measured[(node, "slow")], measured
    link = Topology.from_cluster(cluster).link([0, 1])
    assert link.network == "fast"
    assert link.bandwidth == min(measured[("a", "fast")], measured[("b", "fast")]) * 1e9 / 8
