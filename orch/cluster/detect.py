"""This node's entry of a cluster description, read from sysfs and NVML.

``detect_node`` returns the plain data of one ``nodes:`` entry (the format ``orch.plan.cluster``
reads) and notes on whatever it left out or could not tell, so a user sees every gap:

- NICs: each active port of an RDMA HCA under ``/sys/class/infiniband`` (link layer InfiniBand:
  ``ib``, Ethernet: ``roce``; the port's rate; the HCA's netdev as ``interface``), then every
  other Ethernet interface under ``/sys/class/net`` that is up, is neither a bridge nor a bond
  member (so no link is counted twice) and reports its speed. The schema needs a positive
  bandwidth, so an interface without a known speed is left out with a note rather than written
  with a made-up figure.
- ``network``: sysfs cannot say which fabric a NIC is cabled into, so the IPv4 subnet of its
  interface stands in (``10.1.0.0/24``): interfaces that share a subnet reach each other directly,
  and a rail-optimized fabric, one subnet per rail, gets one network per rail. A NIC without an
  address (an IB HCA without IPoIB) gets its type name (``ib``), the usual one-fabric case. Edit
  the file where the fabric differs (routed networks, several fabrics without IPoIB).
- GPUs: NVML (nvidia-ml-py) gives names, UUIDs, memory and NVLink reach, by NVML index (PCI bus
  order; CUDA's default order is fastest first, the same on a node of identical GPUs). An NVML
  call that fails means "unknown": the field keeps its empty value and a note says why. Without a
  usable GPU the node is a CPU node: one gloo process on device ``cpu``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPU_NOTE = "no GPU: CPU node (one gloo process)"
_AUTO: Any = object()
"""Default of ``detect_node(nvml=...)``: use pynvml if it imports."""
_ARPHRD_ETHER = "1"
"""``/sys/class/net/<if>/type`` of an Ethernet interface (linux/if_arp.h)."""
_LINK_LAYERS = {"InfiniBand": "ib", "Ethernet": "roce"}
_USABLE_STATES = ("up", "unknown")
"""Operstates of an interface that carries traffic; drivers without carrier reporting say
``unknown``."""
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*Gb/sec")
_CATALOG_RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # (must appear in the NVML name, one of these too (if any), catalog device)
    ("H100", ("80GB", "HBM3"), "h100-sxm-80gb"),
    ("H200", (), "h200"),
    ("A100", ("80GB",), "a100-80gb"),  # an A100 40GB would get twice its memory
    ("4090", (), "rtx4090"),
)


@dataclass(frozen=True)
class DetectedNode:
    entry: dict[str, Any]
    """One ``nodes:`` entry: name, devices, device (absent when unknown), nics, gpus."""
    notes: tuple[str, ...]
    """What was left out or unknown, one line each, for the user to check."""


def detect_node(
    name: str | None = None, sysfs: Path = Path("/sys"), nvml: Any = _AUTO
) -> DetectedNode:
    """Describe this node from ``sysfs`` and ``nvml`` (pynvml, a stand-in, or None for none).

    ``name`` defaults to the host name.
    """
    notes: list[str] = []
    nics, claimed = _hca_nics(sysfs, notes)
    nics += _ethernet_nics(sysfs, claimed, notes)
    gpus = _gpus(_import_pynvml() if nvml is _AUTO else nvml, notes)
    entry: dict[str, Any] = {"name": name or socket.gethostname(), "devices": len(gpus) or 1}
    if not gpus:
        entry["device"] = "cpu"
        notes.append(CPU_NOTE)
    elif device := _device(gpus, notes):
        entry["device"] = device
    return DetectedNode(entry | {"nics": nics, "gpus": gpus}, tuple(notes))


def ipv4_subnet(interface: str) -> str | None:
    """The subnet of ``interface``'s first IPv4 address (``10.1.0.0/24``); None without one."""
    found = ipv4_interface(interface)
    return str(found.network) if found else None


def ipv4_interface(interface: str) -> ipaddress.IPv4Interface | None:
    """``interface``'s first IPv4 address with its prefix (``10.1.0.17/24``), by ``ip -j addr``.

    None when it has no address or ``ip`` is missing or fails.
    """
    try:
        out = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", interface],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        links = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return None
    for link in links:
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet":
                return ipaddress.IPv4Interface(f"{addr['local']}/{addr['prefixlen']}")
    return None


def catalog_device(gpu_name: str) -> str | None:
    """The orch catalog device for an NVML GPU name, or None when none fits."""
    upper = gpu_name.upper()
    for model, variants, device in _CATALOG_RULES:
        if model in upper and (not variants or any(v in upper for v in variants)):
            return device
    return None


# --- NICs --------------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    """A sysfs attribute, stripped; None when absent or unreadable (``speed`` of a down link
    raises EINVAL)."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _natural(name: str) -> list[str | int]:
    """Sort key putting mlx5_2 before mlx5_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listing(directory: Path) -> list[str]:
    return sorted((p.name for p in directory.iterdir()), key=_natural) if directory.is_dir() else []


def _gbps(value: float) -> int | float:
    return int(value) if value == int(value) else value


def _network(interface: str, nic_type: str) -> str:
    return (ipv4_subnet(interface) if interface else None) or nic_type


def _hca_nics(sysfs: Path, notes: list[str]) -> tuple[list[dict[str, Any]], set[str]]:
    """NICs of the RDMA HCAs' active ports, and every netdev the HCAs own (claimed, so the
    Ethernet scan does not list a RoCE port twice)."""
    nics: list[dict[str, Any]] = []
    claimed: set[str] = set()
    for hca in _listing(sysfs / "class/infiniband"):
        hca_dir = sysfs / "class/infiniband" / hca
        netdevs = _listing(hca_dir / "device/net")
        claimed.update(netdevs)
        ports = _listing(hca_dir / "ports")
        for port in ports:
            # NCCL_IB_HCA names one port of a multi-port HCA as mlx5_0:1.
            label = hca if len(ports) == 1 else f"{hca}:{port}"
            nic = _hca_port(hca_dir, int(port), label, netdevs, notes)
            if nic is not None:
                nics.append(nic)
    return nics, claimed


def _hca_port(
    hca_dir: Path, port: int, label: str, netdevs: list[str], notes: list[str]
) -> dict[str, Any] | None:
    port_dir = hca_dir / "ports" / str(port)
    state = _read(port_dir / "state") or "unreadable"
    layer = _read(port_dir / "link_layer") or "unreadable"
    rate = _RATE.match(_read(port_dir / "rate") or "")
    if not state.endswith("ACTIVE"):  # "4: ACTIVE"
        notes.append(f"{label}: left out, port state {state!r}")
    elif layer not in _LINK_LAYERS:
        notes.append(f"{label}: left out, link layer {layer!r} is neither InfiniBand nor Ethernet")
    elif rate is None:
        notes.append(f"{label}: left out, rate unknown; add it by hand with its bandwidth_gbps")
    else:
        nic_type = _LINK_LAYERS[layer]
        interface = _port_netdev(hca_dir, port, netdevs)
        nic = {
            "name": label,
            "type": nic_type,
            "bandwidth_gbps": _gbps(float(rate.group(1))),
            "network": _network(interface, nic_type),
        }
        return nic | ({"interface": interface} if interface else {})
    return None


def _port_netdev(hca_dir: Path, port: int, netdevs: list[str]) -> str:
    """The netdev of ``port``: the HCA's only one, else the one whose dev_port is port - 1."""
    if len(netdevs) == 1:
        return netdevs[0]
    for netdev in netdevs:
        if _read(hca_dir / "device/net" / netdev / "dev_port") == str(port - 1):
            return netdev
    return ""


def _ethernet_nics(sysfs: Path, claimed: set[str], notes: list[str]) -> list[dict[str, Any]]:
    nics: list[dict[str, Any]] = []
    for interface in _listing(sysfs / "class/net"):
        if interface == "lo" or interface in claimed:
            continue
        net_dir = sysfs / "class/net" / interface
        reason = _unusable(net_dir)
        if reason:
            notes.append(f"{interface}: left out, {reason}")
            continue
        mbps = _mbps(net_dir)
        nics.append(
            {
                "name": interface,
                "type": "ethernet",
                "bandwidth_gbps": _gbps(mbps / 1000),
                "network": _network(interface, "ethernet"),
            }
        )
    return nics


def _unusable(net_dir: Path) -> str:
    """Why this interface is no NIC of the node; empty when it is one."""
    kind, state = _read(net_dir / "type"), _read(net_dir / "operstate")
    if (net_dir / "bridge").exists():
        return "a bridge (its ports are listed, not it)"
    if (net_dir / "bonding_slave").is_dir():
        return "a bond member (the bond is listed, with its total speed)"
    if kind != _ARPHRD_ETHER:
        return f"not an Ethernet interface (ARPHRD type {kind})"
    if state not in _USABLE_STATES:
        return f"not up (operstate {state})"
    if _mbps(net_dir) <= 0:
        speed = _read(net_dir / "speed")
        return (
            f"link speed unknown (speed {speed or 'unreadable'}); "
            "add it by hand with its bandwidth_gbps"
        )
    return ""


def _mbps(net_dir: Path) -> int:
    """The link speed in Mb/s; 0 or less when the driver does not know it."""
    try:
        return int(_read(net_dir / "speed") or "")
    except ValueError:
        return 0


# --- GPUs --------------------------------------------------------------------------------------


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _gpus(nvml: Any, notes: list[str]) -> list[dict[str, Any]]:
    """One dict per GPU NVML sees; [] (with a note why) when there is none to see."""
    if nvml is None:
        notes.append("NVML not available (pynvml: pip install nvidia-ml-py)")
        return []
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        notes.append(f"NVML did not start: {exc}")
        return []
    try:
        count = _ask(nvml, notes, 0, nvml.nvmlDeviceGetCount)
        handles = [
            _ask(nvml, notes, None, nvml.nvmlDeviceGetHandleByIndex, i) for i in range(count)
        ]
        return [_gpu(nvml, index, handles, notes) for index in range(count)]
    finally:
        _ask(nvml, notes, None, nvml.nvmlShutdown)


def _gpu(nvml: Any, index: int, handles: list[Any], notes: list[str]) -> dict[str, Any]:
    handle = handles[index]
    memory = _ask(nvml, notes, None, nvml.nvmlDeviceGetMemoryInfo, handle)
    return {
        "index": index,
        "name": _text(_ask(nvml, notes, "", nvml.nvmlDeviceGetName, handle)),
        "uuid": _text(_ask(nvml, notes, "", nvml.nvmlDeviceGetUUID, handle)),
        "memory_bytes": int(memory.total) if memory is not None else 0,
        "nvlink_peers": [
            other
            for other, peer in enumerate(handles)
            if other != index and _nvlinked(nvml, notes, handle, peer)
        ],
    }


def _nvlinked(nvml: Any, notes: list[str], handle: Any, peer: Any) -> bool:
    """Whether ``handle`` reaches ``peer`` over NVLink. NVML's P2P status answers this behind
    NVSwitch too, where a link's remote end is the switch, not the peer GPU."""
    nvlink = nvml.NVML_P2P_CAPS_INDEX_NVLINK
    status = _ask(nvml, notes, None, nvml.nvmlDeviceGetP2PStatus, handle, peer, nvlink)
    return status == nvml.NVML_P2P_STATUS_OK


def _ask(nvml: Any, notes: list[str], unknown: Any, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, or ``unknown`` when NVML fails (noted once per call and message) or an
    argument is an unknown handle."""
    if any(arg is None for arg in args):
        return unknown
    try:
        return call(*args)
    except nvml.NVMLError as exc:
        note = f"NVML {call.__name__} failed: {exc}; taken as unknown"
        if note not in notes:
            notes.append(note)
        return unknown


def _text(value: str | bytes) -> str:
    """NVML strings: str in current nvidia-ml-py, bytes in old releases."""
    return value.decode() if isinstance(value, bytes) else value


def _device(gpus: list[dict[str, Any]], notes: list[str]) -> str | None:
    """The catalog device of the node's GPUs; None (noted) for unknown or mixed types, which
    a user must settle by hand: a node has one device type."""
    names = sorted({gpu["name"] for gpu in gpus})
    if len(names) > 1:
        notes.append(f"GPUs of several types ({', '.join(names)}): set 'device:' by hand")
        return None
    device = catalog_device(names[0])
    if device is None:
        notes.append(
            f"GPU {names[0]!r} matches no orch device type: set 'device:' by hand "
            "(see orch plan --help) and device_overrides for figures that differ"
        )
    return device
