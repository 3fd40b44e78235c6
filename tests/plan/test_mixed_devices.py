"""Clusters whose nodes hold different devices: which device bounds memory, speed and MFU."""

from __future__ import annotations

from pathlib import Path

from orch.config import load_config
from orch.plan import build_plan, resolve_machine, search
from orch.plan.devices import GiB
from orch.plan.plan import USABLE_MEMORY_FRACTION
from orch.plan.render import render_plan

IB = "[{name: mlx5_0, type: ib, bandwidth_gbps: 400, network: f}]"


def cluster(tmp_path: Path, *nodes: str, top: str = "") -> str:
    """A cluster file of ``nodes`` (each a node's fields but its NICs, one InfiniBand
    network), as ``cluster=PATH`` for ``--set``."""
    path = tmp_path / "cluster.yaml"
    path.write_text(top + "nodes:\n" + "".join(
        f"  - {{name: n{i}, devices: 8, {fields}, nics: {IB}}}\n"
        for i, fields in enumerate(nodes)))
    return f"cluster={path}"


def test_the_smallest_device_memory_bounds_a_mixed_cluster(tmp_path) -> None:
    """An H200 node listed before an H100 node (equal speed): the 70B search listed plans of
    107 GiB per rank as fitting, against the H200's 141 GB where the H100 has 80 GiB."""
    cfg = load_config("configs/llama3-70b.yaml", [cluster(tmp_path, "device: h200",
                                                          "device: h100")])
    result = search(cfg, resolve_machine(cfg, None, None, None, []))
    assert result.best
    for plan in result.best:
        assert plan.memory_limit_bytes == int(80 * GiB * USABLE_MEMORY_FRACTION)
        assert plan.memory.total <= plan.memory_limit_bytes
    header = render_plan(result.best[0]).splitlines()[0]
    assert header == "plan for llama3-70b on 8 x h200 + 8 x h100-sxm-80gb (2 nodes x 8)"


def test_a_node_overriding_its_memory_bounds_the_plan(tmp_path) -> None:
    """A node with ``device_overrides: {memory_bytes: 40GiB}`` was ignored: the plan was
    checked against the top-level H100's 80 GiB."""
    cfg = load_config("configs/llama3-8b.yaml", [
        cluster(tmp_path, "device: h100", "device_overrides: {memory_bytes: 40GiB}",
                top="device: h100\n"), "parallel.tp=8"])
    plan = build_plan(cfg)
    assert plan.memory_limit_bytes == int(40 * GiB * USABLE_MEMORY_FRACTION)
    assert plan.devices == "16 x h100-sxm-80gb"
