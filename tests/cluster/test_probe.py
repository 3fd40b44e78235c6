"""Measured figures into a description: every node its own, whatever the file shares."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orch.cluster.probe import NetworkFigures, members, with_measurements
from orch.cluster.write import read_cluster_data, replace_checked
from orch.plan.cluster import ClusterError, load_cluster

REPO = Path(__file__).resolve().parents[2]


def test_networks_to_probe_are_those_with_two_nodes_or_more():
    cluster = load_cluster(REPO / "configs/clusters/mixed-nic.yaml")
    assert members(cluster) == {"dc": list(range(8)), "ib-a": [0, 3, 4, 7], "roce-b": [1, 5]}


def test_measurements_land_on_each_node_even_where_the_file_shares_entries(tmp_path):
    """mixed-nic.yaml shares NIC lists through YAML anchors, dgx-h100-4node.yaml expands one
    entry with count: 4; each node still gets its own figure, split over its NICs of the
    network, and the original data is left alone."""
    data = read_cluster_data(REPO / "configs/clusters/mixed-nic.yaml")
    before = yaml.safe_dump(data)
    figures = [NetworkFigures("ib-a", {"ib-a0": 800.0, "ib-a1": 400.0}, 500.0)]
    out = with_measurements(data, figures)
    assert yaml.safe_dump(data) == before
    nics = {node["name"]: node["nics"] for node in out["nodes"]}
    assert [nic.get("measured_gbps") for nic in nics["ib-a0"]] == [100.0] * 8 + [None]
    assert [nic.get("measured_gbps") for nic in nics["ib-a1"]] == [50.0] * 8 + [None]
    assert all("measured_gbps" not in nic for nic in nics["ib-a2"])
    path = tmp_path / "measured.yaml"
    cluster = replace_checked(path, out)
    assert cluster.nodes[0].nics[0].bandwidth == 100e9 / 8  # measured beats nominal (400)

    dgx = read_cluster_data(REPO / "configs/clusters/dgx-h100-4node.yaml")
    out = with_measurements(dgx, [NetworkFigures("ib-a", {"dgx2": 1600.0}, 1600.0)])
    assert [node["name"] for node in out["nodes"]] == ["dgx0", "dgx1", "dgx2", "dgx3"]
    assert "count" not in out["nodes"][0]
    assert out["nodes"][2]["nics"][0]["measured_gbps"] == 200.0
    assert "measured_gbps" not in out["nodes"][1]["nics"][0]


def test_a_description_that_would_not_load_is_not_written(tmp_path):
    path = tmp_path / "keep.yaml"
    path.write_text("kept\n")
    with pytest.raises(ClusterError, match="so it was not written"):
        replace_checked(path, {"nodes": [{"name": "x", "devices": 0}]})
    assert path.read_text() == "kept\n" and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("nics, said", [
    ("[]", "node(s) vm list no NIC"),  # as orch cluster detect writes an unreadable speed
    ("[{name: eth1, type: ethernet, bandwidth_gbps: 10, network: other}]",
     "the nodes share no network"),
])
def test_a_description_the_probe_cannot_run_over_is_refused(tmp_path, capsys, nics, said):
    """It was a StopIteration traceback (looking for this node's NIC on the shared network)."""
    from orch.cli import main

    path = tmp_path / "cluster.yaml"
    path.write_text(f"""nodes:
  - {{name: vm, device: cpu, devices: 1, nics: {nics}}}
  - name: peer
    device: cpu
    devices: 1
    nics: [{{name: eth0, type: ethernet, bandwidth_gbps: 10, network: lan}}]
""")
    assert main(["cluster", "probe", str(path), "--master-addr", "127.0.0.1", "--master-port",
                 "29779", "--node-name", "vm"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {said}: the probe measures over a network every node is attached to" in err


def test_a_network_of_hcas_without_their_interfaces_is_refused_before_probing(tmp_path, capsys):
    """The DGX description names its HCAs only: the probe set GLOO_SOCKET_IFNAME=mlx5_0, which
    no gloo can bind to; each node is named once, with where to find its netdev."""
    from orch.cli import main

    dgx = Path(__file__).resolve().parents[2] / "configs/clusters/dgx-h100-4node.yaml"
    assert main(["cluster", "probe", str(dgx), "--master-addr", "127.0.0.1", "--master-port",
                 "29779", "--node-name", "dgx0"]) == 2
    err = capsys.readouterr().err
    for node in range(4):
        assert (f"{dgx}: node dgx{node}: lists no 'interface' for its NIC(s) on network 'ib-a'"
                in err)
    assert "ls /sys/class/infiniband/NAME/device/net" in err
