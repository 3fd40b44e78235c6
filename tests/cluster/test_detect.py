"""``orch cluster detect``: a node's entry from a fake sysfs tree and a fake NVML, the notes on
what it left out, and cluster files the CLI writes that load back as the same node."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from orch import cli
from orch.cluster import detect
from orch.cluster.detect import CPU_NOTE, catalog_device, detect_node
from orch.cluster.write import write_node
from orch.plan.cluster import (
    ClusterError,
    GpuSpec,
    NicSpec,
    NodeSpec,
    cluster_from_dict,
    load_cluster,
)
from orch.plan.devices import get_device

H100_NAME = "NVIDIA H100 80GB HBM3"
H100_BYTES = 85_520_809_984
SUBNETS = {"ib0": "10.1.0.0/24", "eth2": "10.2.0.0/24", "eth0": "192.168.1.0/24"}
ORCH = Path(sys.executable).parent / "orch"


# --- fakes -------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")


def _port(hca: str, layer: str, rate: str, state: str = "4: ACTIVE") -> dict[str, str]:
    port = f"class/infiniband/{hca}/ports/1"
    return {f"{port}/link_layer": layer, f"{port}/rate": rate, f"{port}/state": state}


def _net(interface: str, speed: str, state: str = "up", kind: str = "1") -> dict[str, str]:
    net = f"class/net/{interface}"
    return {f"{net}/type": kind, f"{net}/operstate": state, f"{net}/speed": speed}


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """An IB HCA (IPoIB ib0, 400 Gb/s), a RoCE HCA on eth2 (200), an IB HCA whose port is down,
    one without a netdev, plain eth0 at 25 Gb/s, bond0 at 50, and interfaces detect must leave
    out: eth1 (down), lo, br0 (a bridge), eth3 (speed -1), eth4 (a member of bond0)."""
    root = tmp_path / "sys"
    _write(
        root,
        {
            **_port("mlx5_0", "InfiniBand", "400 Gb/sec (4X NDR)"),
            **_port("mlx5_1", "Ethernet", "200 Gb/sec (4X HDR)"),
            **_port("mlx5_2", "InfiniBand", "400 Gb/sec (4X NDR)", state="1: DOWN"),
            **_port("mlx5_3", "InfiniBand", "100 Gb/sec (2X HDR)"),
            "class/infiniband/mlx5_0/device/net/ib0/dev_port": "0",
            "class/infiniband/mlx5_1/device/net/eth2/dev_port": "0",
            "class/infiniband/mlx5_2/device/net/ib1/dev_port": "0",
            **_net("ib0", "400000", kind="32"),
            **_net("eth2", "200000"),
            **_net("ib1", "-1"),
            **_net("eth0", "25000"),
            **_net("eth1", "-1", state="down"),
            **_net("lo", "", state="unknown", kind="772"),
            **_net("br0", "10000"),
            **_net("eth3", "-1"),
            **_net("bond0", "50000"),
            **_net("eth4", "25000"),
        },
    )
    (root / "class/net/br0/bridge").mkdir()
    (root / "class/net/eth4/bonding_slave").mkdir()
    return root


class FakeNvml:
    """The pynvml calls detect makes, for ``count`` GPUs all linked by NVLink."""

    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 8, name: str = H100_NAME) -> None:
        self.count, self.name, self.shut_down = count, name, False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle{index}"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return self.name

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return f"GPU-{handle[-1]}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(total=H100_BYTES, free=H100_BYTES, used=0)

    def nvmlDeviceGetP2PStatus(self, first: str, second: str, index: int) -> int:
        assert index == self.NVML_P2P_CAPS_INDEX_NVLINK
        return self.NVML_P2P_STATUS_OK


@pytest.fixture
def subnets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "ipv4_subnet", SUBNETS.get)


# --- what detect finds -------------------------------------------------------------------------

EXPECTED_NICS = [
    {
        "name": "mlx5_0",
        "type": "ib",
        "bandwidth_gbps": 400,
        "network": "10.1.0.0/24",
        "interface": "ib0",
    },
    {
        "name": "mlx5_1",
        "type": "roce",
        "bandwidth_gbps": 200,
        "network": "10.2.0.0/24",
        "interface": "eth2",
    },
    {"name": "mlx5_3", "type": "ib", "bandwidth_gbps": 100, "network": "ib"},
    {"name": "bond0", "type": "ethernet", "bandwidth_gbps": 50, "network": "ethernet"},
    {"name": "eth0", "type": "ethernet", "bandwidth_gbps": 25, "network": "192.168.1.0/24"},
]
EXPECTED_NIC_NOTES = (
    "mlx5_2: left out, port state '1: DOWN'",
    "br0: left out, a bridge (its ports are listed, not it)",
    "eth1: left out, not up (operstate down)",
    "eth3: left out, link speed unknown (speed -1); add it by hand with its bandwidth_gbps",
    "eth4: left out, a bond member (the bond is listed, with its total speed)",
)


def _expected_gpus(count: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "name": H100_NAME,
            "uuid": f"GPU-{i}",
            "memory_bytes": H100_BYTES,
            "nvlink_peers": [j for j in range(count) if j != i],
        }
        for i in range(count)
    ]


def test_a_dgx_like_node(sysfs: Path, subnets: None) -> None:
    nvml = FakeNvml()
    node = detect_node("gpu0", sysfs, nvml)
    assert node.entry == {
        "name": "gpu0",
        "devices": 8,
        "device": "h100-sxm-80gb",
        "nics": EXPECTED_NICS,
        "gpus": _expected_gpus(),
    }
    assert list(node.entry) == ["name", "devices", "device", "nics", "gpus"]  # the YAML order
    assert node.notes == EXPECTED_NIC_NOTES
    assert nvml.shut_down


def test_without_nvml_it_is_a_cpu_node(sysfs: Path, subnets: None) -> None:
    node = detect_node("cpu0", sysfs, None)
    assert node.entry == {
        "name": "cpu0",
        "devices": 1,
        "device": "cpu",
        "nics": EXPECTED_NICS,
        "gpus": [],
    }
    assert node.notes[-2:] == ("NVML not available (pynvml: pip install nvidia-ml-py)", CPU_NOTE)


def test_nvml_that_does_not_start_or_sees_no_gpu(sysfs: Path, subnets: None) -> None:
    broken = FakeNvml()

    def fail() -> None:
        raise broken.NVMLError("Driver Not Loaded")

    broken.nvmlInit = fail  # type: ignore[method-assign]
    node = detect_node("cpu0", sysfs, broken)
    assert node.entry["device"] == "cpu" and node.entry["gpus"] == []
    assert node.notes[-2:] == ("NVML did not start: Driver Not Loaded", CPU_NOTE)
    empty = detect_node("cpu0", sysfs, FakeNvml(count=0))
    assert (empty.entry["devices"], empty.entry["device"]) == (1, "cpu")
    assert empty.notes[-1] == CPU_NOTE


def test_failed_nvml_calls_are_unknown_and_noted(sysfs: Path, subnets: None) -> None:
    nvml = FakeNvml(count=2)

    def nvmlDeviceGetP2PStatus(first: str, second: str, index: int) -> int:
        raise nvml.NVMLError("Not Supported")

    nvml.nvmlDeviceGetP2PStatus = nvmlDeviceGetP2PStatus  # type: ignore[method-assign]
    node = detect_node("gpu0", sysfs, nvml)
    assert [gpu["nvlink_peers"] for gpu in node.entry["gpus"]] == [[], []]
    assert node.notes[len(EXPECTED_NIC_NOTES) :] == (
        "NVML nvmlDeviceGetP2PStatus failed: Not Supported; taken as unknown",
    )


def test_an_unknown_gpu_has_no_device_and_a_note(sysfs: Path, subnets: None) -> None:
    node = detect_node("gpu0", sysfs, FakeNvml(count=4, name="Tesla V100-SXM2-32GB"))
    assert "device" not in node.entry and node.entry["devices"] == 4
    assert node.notes[-1].startswith("GPU 'Tesla V100-SXM2-32GB' matches no orch device type")


@pytest.mark.parametrize(
    ("name", "device"),
    [
        (H100_NAME, "h100-sxm-80gb"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", None),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_catalog_device_from_nvml_names(name: str, device: str | None) -> None:
    assert catalog_device(name) == device


def test_subnet_from_ip_json(monkeypatch: pytest.MonkeyPatch) -> None:
    out = json.dumps(
        [
            {
                "ifname": "ib0",
                "addr_info": [{"family": "inet", "local": "10.1.0.17", "prefixlen": 24}],
            }
        ]
    )
    monkeypatch.setattr(detect.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=out))
    assert detect.ipv4_subnet("ib0") == "10.1.0.0/24"


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_subnet_of_real_interfaces() -> None:
    assert detect.ipv4_subnet("lo") == "127.0.0.0/8"
    assert detect.ipv4_subnet("no-such-interface0") is None


def test_this_machine_without_nvml_is_a_loadable_cpu_node(tmp_path: Path) -> None:
    node = detect_node(nvml=None)
    assert (node.entry["devices"], node.entry["device"], node.entry["gpus"]) == (1, "cpu", [])
    cluster, _ = write_node(tmp_path / "here.yaml", node)
    assert cluster.nodes[0].device.name == "cpu" and cluster.world_size == 1


# --- the schema --------------------------------------------------------------------------------


def test_listed_gpus_must_match_devices() -> None:
    gpu = {"index": 0, "name": H100_NAME, "uuid": "GPU-0"}
    with pytest.raises(ClusterError) as err:
        cluster_from_dict({"device": "h100", "nodes": [{"name": "a", "devices": 8, "gpus": [gpu]}]})
    assert [p.where for p in err.value.problems] == ["nodes[0].gpus"]
    assert "nodes[0].gpus: 1 listed, but devices: 8" in str(err.value)


# --- the command -------------------------------------------------------------------------------


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch, sysfs: Path, subnets: None) -> None:
    """``orch cluster detect`` sees the fake sysfs and 8 H100s."""
    monkeypatch.setattr(
        detect, "detect_node", functools.partial(detect_node, sysfs=sysfs, nvml=FakeNvml())
    )


def _expected_node(name: str) -> NodeSpec:
    nics = tuple(NicSpec(**nic) for nic in EXPECTED_NICS)
    gpus = tuple(
        GpuSpec(**(gpu | {"nvlink_peers": tuple(gpu["nvlink_peers"])})) for gpu in _expected_gpus()
    )
    return NodeSpec(name, 8, get_device("h100"), nics, gpus)


def test_cli_prints_the_entry_with_notes_as_comments(
    fake_node: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["cluster", "detect", "--name", "gpu0"]) == 0
    out = capsys.readouterr().out
    comments = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert tuple(comments) == EXPECTED_NIC_NOTES
    assert yaml.safe_load(out) == {"nodes": [detect.detect_node("gpu0").entry]}


def test_cli_writes_a_cluster_file_that_loads(
    fake_node: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "lab.yaml"
    assert cli.main(["cluster", "detect", "--name", "gpu0", "--out", str(path)]) == 0
    assert "wrote node gpu0 to" in capsys.readouterr().out
    cluster = load_cluster(path)
    assert (cluster.name, cluster.nodes) == ("lab", (_expected_node("gpu0"),))
    # A second run refuses to overwrite it; --append adds or replaces, keeping the rank order.
    assert cli.main(["cluster", "detect", "--name", "gpu1", "--out", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    for name in ("gpu1", "gpu0"):
        assert cli.main(["cluster", "detect", "--name", name, "--out", str(path), "--append"]) == 0
    cluster = load_cluster(path)
    assert cluster.nodes == (_expected_node("gpu0"), _expected_node("gpu1"))
    assert cluster.world_size == 16


def test_cli_writes_nothing_that_would_not_load(
    monkeypatch: pytest.MonkeyPatch,
    sysfs: Path,
    subnets: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(
        detect,
        "detect_node",
        functools.partial(detect_node, sysfs=sysfs, nvml=FakeNvml(name="Tesla V100-SXM2-32GB")),
    )
    path = tmp_path / "lab.yaml"
    assert cli.main(["cluster", "detect", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert "was not written" in err and "nodes[0].device: no device type" in err
    assert not path.exists()
    assert cli.main(["cluster", "detect", "--append"]) == 2
    assert "--append: adds to the file given by --out" in capsys.readouterr().err


def test_orch_cluster_detect_on_this_machine() -> None:
    out = subprocess.run(
        [str(ORCH), "cluster", "detect", "--name", "here"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert [entry["name"] for entry in yaml.safe_load(out.stdout)["nodes"]] == ["here"]


def test_appending_a_node_that_shares_no_network_says_so(
    fake_node: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM whose NIC speeds detect cannot read is written with no NIC; appended beside nodes
    on networks, every plan over the nodes was then refused, and the write said nothing."""
    path = tmp_path / "lab.yaml"
    assert cli.main(["cluster", "detect", "--name", "gpu0", "--out", str(path)]) == 0
    bare = detect.detect_node("vm")
    monkeypatch.setattr(detect, "detect_node", lambda name=None: dataclasses.replace(
        bare, entry={**bare.entry, "nics": []}))
    capsys.readouterr()
    assert cli.main(["cluster", "detect", "--name", "vm", "--out", str(path), "--append"]) == 0
    out = capsys.readouterr().out
    assert ("note: the 2 nodes in the file share no network (no NIC listed on vm): a plan over "
            "more than one node will be refused") in out


def test_appending_a_node_of_a_count_entry_splits_it_out(
    fake_node: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--append "adds or replaces this node", but vm1 of {name: "vm{i}", count: 3} was refused
    as 'nodes[1].name: node name vm1 is used twice', a nodes[1] the file did not have."""
    path = tmp_path / "cnt.yaml"
    path.write_text('name: cnt\ndevice: cpu\nnodes:\n  - {name: "vm{i}", count: 4, devices: 2,'
                    ' nics: [{name: eth0, type: ethernet, bandwidth_gbps: 10, network: lan}]}\n')
    assert cli.main(["cluster", "detect", "--name", "vm2", "--out", str(path), "--append"]) == 0
    assert "wrote node vm2" in capsys.readouterr().out
    was = NodeSpec("", 2, get_device("cpu"), (NicSpec("eth0", "ethernet", 10, "lan"),))
    cluster = load_cluster(path)
    assert cluster.nodes == (dataclasses.replace(was, name="vm0"),
                             dataclasses.replace(was, name="vm1"), _on_lan(_expected_node("vm2")),
                             dataclasses.replace(was, name="vm3"))
    assert [node.get("count") for node in yaml.safe_load(path.read_text())["nodes"]] == [
        2, None, None]  # vm0 and vm1 stay one entry (a count names from 0)
    assert cli.main(["cluster", "detect", "--name", "vm0", "--out", str(path), "--append"]) == 0
    assert [node.name for node in load_cluster(path).nodes] == ["vm0", "vm1", "vm2", "vm3"]
    assert load_cluster(path).nodes[:2] == (_on_lan(_expected_node("vm0")),
                                            dataclasses.replace(was, name="vm1"))


def _on_lan(node: NodeSpec) -> NodeSpec:
    """``node`` as detect writes it over an entry whose eth0 a person put on network lan: eth0
    first (the entry's NIC order), at the speed detect found, on lan; then the NICs it adds."""
    eth0 = next(nic for nic in node.nics if nic.name == "eth0")
    others = tuple(nic for nic in node.nics if nic.name != "eth0")
    return dataclasses.replace(node, nics=(dataclasses.replace(eth0, network="lan"), *others))


def test_appending_a_node_already_in_the_file_keeps_what_a_person_added(
    fake_node: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--append replaced the node's entry wholesale: a NIC added by hand (eth3, whose speed
    reads -1), measured_gbps from a probe, device_overrides and network names vanished, and
    orch plan over the file then refused (the node shared no network with gpu1)."""
    path = tmp_path / "lab.yaml"
    path.write_text("""name: lab
nodes:
  - name: gpu0
    devices: 4
    device: h100-sxm-80gb
    device_overrides: {inter_latency_s: 20us}
    nics:
      - {name: eth3, type: ethernet, bandwidth_gbps: 10, network: lan, measured_gbps: 9.1}
      - {name: mlx5_0, type: ib, bandwidth_gbps: 400Gb/s, network: ib-a, interface: ib0,
         measured_gbps: 380}
      - {name: mlx5_1, type: roce, bandwidth_gbps: 100, network: 10.2.0.0/24, interface: eth2,
         measured_gbps: 90}
  - name: gpu1
    devices: 8
    device: h100
    nics:
      - {name: eth3, type: ethernet, bandwidth_gbps: 10, network: lan}
      - {name: mlx5_0, type: ib, bandwidth_gbps: 400, network: ib-a, interface: ib0}
""")
    assert cli.main(["cluster", "detect", "--name", "gpu0", "--out", str(path), "--append"]) == 0
    out = capsys.readouterr().out
    entry = yaml.safe_load(path.read_text())["nodes"][0]
    assert entry["device_overrides"] == {"inter_latency_s": "20us"}
    assert [nic["name"] for nic in entry["nics"]] == ["eth3", "mlx5_0", "mlx5_1", "mlx5_3",
                                                      "bond0", "eth0"]
    nics = {nic["name"]: nic for nic in entry["nics"]}
    assert nics["eth3"] == {"name": "eth3", "type": "ethernet", "bandwidth_gbps": 10,
                            "network": "lan", "measured_gbps": 9.1}
    assert nics["mlx5_0"] == {"name": "mlx5_0", "type": "ib", "bandwidth_gbps": 400,
                              "network": "ib-a", "interface": "ib0", "measured_gbps": 380}
    assert nics["mlx5_1"] == EXPECTED_NICS[1]  # rated 200 now, not 100: 90 measured another link
    assert ("note: kept from the node's entry in the file (detect does not write or did not find "
            "them): device_overrides, NIC eth3 (not detected), network ib-a of mlx5_0 (detect: "
            "10.1.0.0/24), measured_gbps of mlx5_0\n") in out
    assert ("note: replaced in the node's entry with what detect found: devices 4 -> 8, "
            "bandwidth_gbps of mlx5_1 100 -> 200\n") in out
    assert ("note: dropped measured_gbps of mlx5_1: the link or its network changed since it "
            "was measured; run orch cluster probe again\n") in out
    assert cli.main(["plan", "configs/tiny.yaml", "--set", f"cluster={path}", "--set",
                     "train.global_batch=32"]) == 0


def test_an_empty_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--name "" fell back to the host name without a word."""
    assert cli.main(["cluster", "detect", "--name", ""]) == 2
    err = capsys.readouterr().err
    assert "--name: '' is empty\n        fix: pass this node's name as the description" in err
