"""Measured figures into a description: every node its own, whatever the file shares."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from orch.cluster.probe import NetworkFigures, members, with_measurements, write_measurements
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


LOOP_PAIR = """nodes:
  - {name: n0, device: cpu, devices: 1, nics: [{name: lo, type: ethernet, bandwidth_gbps: 10,
                                               network: loop, interface: lo}]}
  - {name: n1, device: cpu, devices: 1, nics: [{name: lo, type: ethernet, bandwidth_gbps: 10,
                                               network: loop, interface: lo}]}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("node, said", [
    ("n0", "1 of 2 nodes joined the probe at 127.0.0.1:{port} within 1 s (not joined: n1)"),
    ("n1", "node n1 could not reach the probe's store at 127.0.0.1:{port}, which node n0 (the "
           "first listed) holds, within 1 s"),
])
def test_a_node_that_never_joins_ends_the_probe_after_timeout_with_the_count(
        tmp_path, capsys, monkeypatch, node, said):
    """Node n0 alone waited 5 minutes, then died with a DistStoreError traceback (exit 1). The
    probe's GLOO_SOCKET_IFNAME (lo) stayed set after it, into the worker's later tests."""
    from orch.cli import main

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)  # restored after, whatever probe does
    path, port = tmp_path / "pair.yaml", _free_port()
    path.write_text(LOOP_PAIR)
    start = time.monotonic()
    assert main(["cluster", "probe", str(path), "--master-addr", "127.0.0.1", "--master-port",
                 str(port), "--node-name", node, "--mbytes", "1", "--timeout", "1"]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "the probe did not run" in err and said.format(port=port) in err
    assert (f"fix: start orch cluster probe on every node of {path} within --timeout (1 s) of "
            "each other, each with --master-addr the address of node n0 (the first listed; "
            f"127.0.0.1 here) and the same --master-port ({port})") in err
    assert "Traceback" not in err and yaml.safe_load(path.read_text()) == yaml.safe_load(LOOP_PAIR)
    assert "GLOO_SOCKET_IFNAME" not in os.environ


def test_a_timeout_under_a_second_is_refused_with_the_other_flags(tmp_path, capsys):
    from orch.cli import main

    path = tmp_path / "pair.yaml"
    path.write_text(LOOP_PAIR)
    assert main(["cluster", "probe", str(path), "--master-addr", "127.0.0.1", "--node-name",
                 "n0", "--repeats", "0", "--timeout", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot probe (2 problems)" in err
    assert "--timeout: 0 s\n        fix: pass at least 1 second" in err


def test_nodes_that_joined_but_cannot_connect_over_their_interface_are_told_so(
        tmp_path, monkeypatch):
    """gloo's own connection (after the store) failing was a traceback too. The group's timeout
    is not --timeout (3 s here, how long a node waits for the others) but at least 5 minutes:
    as --timeout, it also bounded every transfer timed on it."""
    from datetime import timedelta

    import torch.distributed as dist

    from orch.cluster import probe
    from orch.errors import ProblemsError

    timeouts = []

    def refuse(*args, timeout, **kwargs):
        timeouts.append(timeout)
        raise dist.DistBackendError("Gloo connectFullMesh failed with timeout\nmore")

    path = tmp_path / "pair.yaml"
    path.write_text(LOOP_PAIR)
    cluster = load_cluster(path)
    monkeypatch.setattr(probe, "_join", lambda *args: None)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)  # restored after: probe sets it
    monkeypatch.setattr(dist, "init_process_group", refuse)
    with pytest.raises(ProblemsError) as raised:
        probe.probe(cluster, cluster.nodes[1], "127.0.0.1", _free_port(), 3)
    assert str(raised.value.problems[0]) == (
        "node n1: every node joined, but gloo could not connect them over interface 'lo' within "
        "300 s (Gloo connectFullMesh failed with timeout)\n    fix: check that each node's "
        f"'interface' on network 'loop' in {path} has an address the other nodes reach (not lo, "
        "on more than one machine)")
    assert timeouts == [timedelta(seconds=300)]


@pytest.mark.parametrize("text, said", [
    # what orch cluster detect --out F --append writes where every link speed reads -1
    ("# lab\nnodes:\n  - {name: n0, device: cpu, devices: 1, nics: []}\n"
     "  - {name: 'w{i}', device: cpu, devices: 1, count: 2, nics: []}\n",
     "node(s) n0, w0, w1 list no NIC: the probe measures over a network every node is attached "
     "to"),
    ("# lab\nnodes:\n  - {name: n0, device: cpu, devices: 1, nics: [{name: lo, type: ethernet, "
     "bandwidth_gbps: 10, network: loop, interface: lo}]}\n",
     "one node (n0): the probe measures networks between two nodes or more, so it would measure "
     "nothing"),
])
def test_a_description_with_nothing_to_measure_is_refused_and_left_as_it_was(
        tmp_path, capsys, text, said):
    """Nodes without NICs all rode the default network: the probe measured nothing, printed an
    empty table, said 'wrote measured_gbps' (exit 0) and rewrote the file without its comments
    and count: entries."""
    from orch.cli import main

    path = tmp_path / "lab.yaml"
    path.write_text(text)
    assert main(["cluster", "probe", str(path), "--master-addr", "127.0.0.1", "--master-port",
                 str(_free_port()), "--node-name", "n0", "--timeout", "1"]) == 2
    out, err = capsys.readouterr()
    assert f"cannot probe (1 problem):\n  - {path}: {said}" in err
    assert "wrote" not in out and path.read_text() == text


def test_no_figures_never_rewrite_the_description(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text("# lab\n" + LOOP_PAIR)
    with pytest.raises(ValueError, match="nothing was measured"):
        write_measurements(path, [], path)
    assert path.read_text() == "# lab\n" + LOOP_PAIR


def test_an_unknown_node_name_gets_the_probes_own_fix(tmp_path, capsys):
    """The fix said '(after CONFIG)', launch's positional; probe's is CLUSTER, and there
    --node-name may go anywhere."""
    from orch.cli import main

    path = tmp_path / "pair.yaml"
    path.write_text(LOOP_PAIR)
    assert main(["cluster", "probe", str(path), "--master-addr", "127.0.0.1", "--node-name",
                 "n9"]) == 2
    err = capsys.readouterr().err
    assert "--node-name: 'n9' (--node-name) is not a node of cluster pair (n0, n1)" in err
    assert "fix: pass --node-name NAME with this machine's node in the description" in err


def test_the_readme_shows_the_probe_table_as_it_is_printed(monkeypatch):
    """The README's header read 'probe of 4 MiB buffers (--mbytes 4), DATE:', which the probe
    never printed: its table, rebuilt from the figures it shows, must be what report prints."""
    import datetime

    from orch.cluster import probe

    text = (REPO / "README.md").read_text()
    shown = text[text.index("\nprobe of ") + 1:]
    shown = shown[:shown.index("\n```")]
    head = re.fullmatch(r"probe of (\d+) MiB buffers, (\d{4}-\d\d-\d\d):", shown.splitlines()[0])
    assert head, shown.splitlines()[0]
    figures: list[NetworkFigures] = []
    for row in shown.splitlines()[2:]:
        network, node, p2p, bus = re.fullmatch(
            r"  (\S*)\s+(\S+)\s+([\d.]+) Gb/s(?:\s+([\d.]+) Gb/s)?", row).groups()
        if network:
            figures.append(NetworkFigures(network, {}, float(bus)))
        figures[-1].p2p_gbps[node] = float(p2p)
    day = datetime.date.fromisoformat(head[2])
    monkeypatch.setattr(probe, "datetime", SimpleNamespace(date=SimpleNamespace(today=lambda: day)))
    assert probe.report(figures, int(head[1]) * 2**20) == shown


def test_a_master_port_in_use_is_named_with_another_to_pass(tmp_path, capsys, monkeypatch):
    """The first node's store could not listen on a taken --master-port (a probe still running,
    another job): a DistNetworkError traceback ending in EADDRINUSE."""
    from orch.cli import main

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)  # restored after: probe sets it
    path = tmp_path / "pair.yaml"
    path.write_text(LOOP_PAIR)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["cluster", "probe", str(path), "--master-addr", "127.0.0.1",
                     "--master-port", str(port), "--node-name", "n0", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert "the probe did not run" in err and "Traceback" not in err
    assert (f"--master-port: node n0 could not hold the probe's store on port {port} (") in err
    assert "EADDRINUSE" in err and "the port is in use on this machine" in err
    assert "fix: pass another --master-port, the same on every node" in err


def test_a_node_the_store_turns_away_is_told_where_and_why(tmp_path, monkeypatch):
    """A node whose port check passed but whose store client failed had a traceback too."""
    import torch.distributed as dist

    from orch.cluster import probe
    from orch.errors import ProblemsError

    def refuse(*args, **kwargs):
        raise dist.DistNetworkError("Connection reset by peer\nmore")

    path = tmp_path / "pair.yaml"
    path.write_text(LOOP_PAIR)
    cluster = load_cluster(path)
    monkeypatch.setattr(probe, "_port_answers", lambda *args: True)
    monkeypatch.setattr(dist, "TCPStore", refuse)
    with pytest.raises(ProblemsError) as raised:
        probe._join(cluster, 1, "127.0.0.1", 29779, 3)
    assert str(raised.value.problems[0]).startswith(
        "--master-addr/--master-port: node n1 reached 127.0.0.1:29779 but could not join the "
        "probe's store there (Connection reset by peer)\n    fix: start orch cluster probe")
