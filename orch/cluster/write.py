"""Cluster description files from detected nodes: YAML text with notes, and adding a node.

A file is only written once its new text passes the cluster loader, so a bad entry never
replaces a good file; the file written is then read back with ``load_cluster``. The text comes from
PyYAML, so a file rewritten to add a node loses the comments it had; the notes of the node being
written go back above its entry. A node already in the file is merged, not replaced: detect's
findings update its entry, and what a person added there stays (``merged_entry``).
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml

from orch.cluster.detect import DetectedNode
from orch.config.coerce import Quantity, Rejected
from orch.config.source import parse_yaml_text
from orch.errors import Problem, ProblemsError
from orch.plan.cluster import (
    MAX_WORLD_SIZE,
    NIC_TYPES,
    ClusterError,
    ClusterSpec,
    cluster_from_dict,
    load_cluster,
)
from orch.plan.units import Gbps


def render_cluster(data: dict[str, Any], node: DetectedNode) -> str:
    """YAML text of a cluster description, ``node``'s notes as comments above its entry."""
    head = {key: value for key, value in data.items() if key != "nodes"}
    parts = [yaml.safe_dump(head, sort_keys=False, width=100)] if head else []
    parts.append("nodes:\n")
    for entry in data.get("nodes") or []:
        if isinstance(entry, dict) and entry.get("name") == node.entry["name"]:
            parts += [f"# {' '.join(note.split())}\n" for note in node.notes]
        parts.append(_dump([entry]))
    return "".join(parts)


def with_node(data: dict[str, Any], entry: dict[str, Any],
              where: str) -> tuple[dict[str, Any], list[str]]:
    """``data`` with ``entry`` in place of the node of its name (ranks keep their order), or
    after the last node; and notes on what of the entry it replaced was kept or replaced.

    ``entry`` is merged into the entry it replaces (``merged_entry``), so what a user added by
    hand stays. A node of a ``count:`` entry is split out of it first: replacing ``vm2`` of
    ``{name: "vm{i}", count: 5}`` leaves ``{name: "vm{i}", count: 2}`` (vm0 and vm1: a count
    names from 0), the new ``vm2`` (the count entry's fields merged with ``entry``), then
    ``vm3`` and ``vm4`` as entries of their own, with the fields they had."""
    nodes = list(data.get("nodes") or [])
    if not all(isinstance(node, dict) for node in nodes):
        raise _not_written(
            f"{where} nodes",
            "expected a list of node mappings",
            "write nodes: [{name: node0, devices: 8}]",
        )
    names = [node.get("name") for node in nodes]
    if entry["name"] in names:
        at = names.index(entry["name"])
        nodes[at], notes = merged_entry(nodes[at], entry)
        return data | {"nodes": nodes}, notes
    for index, node in enumerate(nodes):
        expanded = _expanded_names(node)
        if entry["name"] in expanded:
            split = expanded.index(entry["name"])
            one = {key: value for key, value in node.items() if key != "count"}
            before = ([node | {"count": split}] if split > 1
                      else [one | {"name": expanded[0]}] if split else [])
            after = [one | {"name": name} for name in expanded[split + 1:]]
            merged, notes = merged_entry(one, entry)
            nodes[index:index + 1] = [*before, merged, *after]
            return data | {"nodes": nodes}, notes
    return data | {"nodes": [*nodes, entry]}, []


_NIC_FACTS = ("type", "bandwidth_gbps", "interface")
"""What ``orch cluster detect`` reads of a NIC from sysfs: a NIC found again takes these."""
_GBPS: Quantity = get_args(Gbps)[1]


@dataclass
class _Changes:
    """What a merge kept of the file's entry, replaced in it, and dropped from it."""

    kept: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def merged_entry(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The detected entry ``new`` merged into the file's entry ``old`` of the same node, and
    notes on what changed.

    Detect's findings win: devices, device, gpus, and each NIC's type, speed and interface. What
    a user added stays: keys detect does not write (``device_overrides``; a ``device`` set by
    hand where detect could tell none), NICs detect did not see (an interface whose speed reads
    -1, added by hand), a NIC's other keys (``measured_gbps``), and a network a person named
    (``ib-a``) where detect writes a stand-in (a subnet, or the NIC type). A NIC whose findings
    or network changed loses its ``measured_gbps``: that measured another link."""
    changes = _Changes(kept=[key for key in old if key not in new])
    changes.replaced = [key if key == "gpus" else f"{key} {old[key]} -> {new[key]}"
                        for key in new if key not in ("name", "nics") and key in old
                        and old[key] != new[key]]
    old_nics = old.get("nics")
    nics = _merged_nics(old_nics if isinstance(old_nics, list) else [], new["nics"], changes)
    return old | new | {"nics": nics}, _merge_notes(changes)


def _merged_nics(old: list[Any], new: list[dict[str, Any]],
                 changes: _Changes) -> list[Any]:
    """The file's NICs in their order (the first on a network is the one launch binds to),
    each one detect found again merged with it, then the NICs detect found that are new."""
    found = {nic["name"]: nic for nic in new}
    merged = []
    for nic in old:
        name = nic.get("name") if isinstance(nic, dict) else None
        if name in found:
            merged.append(_merged_nic(nic, found.pop(name), changes))
        else:
            merged.append(nic)
            changes.kept.append(f"NIC {name} (not detected)")
    return merged + list(found.values())


def _merged_nic(old: dict[str, Any], new: dict[str, Any], changes: _Changes) -> dict[str, Any]:
    """One NIC detect found again (see ``merged_entry``)."""
    name, network = new["name"], old.get("network", "")
    nic = old | new
    if not _named_by_detect(network) and network != new["network"]:
        nic["network"] = network
        changes.kept.append(f"network {network} of {name} (detect: {new['network']})")
    changed = [f"{key} of {name} {old.get(key, '(none)')} -> {nic[key]}"
               for key in (*_NIC_FACTS, "network") if key in nic
               and not _same(key, old.get(key), nic[key])]
    changes.replaced += changed
    extra = [key for key in old if key not in new and key != "measured_gbps"]
    changes.kept += [f"{key} of {name}" for key in extra]
    if "measured_gbps" in old and changed:
        del nic["measured_gbps"]
        changes.dropped.append(name)
    elif "measured_gbps" in old:
        changes.kept.append(f"measured_gbps of {name}")
    return nic


def _same(key: str, was: Any, found: Any) -> bool:
    """Whether a NIC's ``key`` is unchanged: a speed written with its unit (``200Gb/s``) is the
    200 detect writes."""
    if key == "bandwidth_gbps":
        with contextlib.suppress(Rejected):
            return _GBPS.read(was) == _GBPS.read(found)
    return was == found


def _named_by_detect(network: str) -> bool:
    """Whether ``network`` is a name ``orch cluster detect`` writes (a subnet, or a NIC type
    where the interface has no address) or the default network, rather than a person's."""
    try:
        ipaddress.ip_network(network)
    except ValueError:
        return not network or network in NIC_TYPES
    return True


def _merge_notes(changes: _Changes) -> list[str]:
    """One note per kind of change, for the user to check against the machine."""
    notes = []
    if changes.kept:
        notes.append(f"kept from the node's entry in the file (detect does not write or did not "
                     f"find them): {', '.join(changes.kept)}")
    if changes.replaced:
        notes.append(f"replaced in the node's entry with what detect found: "
                     f"{', '.join(changes.replaced)}")
    if changes.dropped:
        notes.append(f"dropped measured_gbps of {', '.join(changes.dropped)}: the link or its "
                     "network changed since it was measured; run orch cluster probe again")
    return notes


def _expanded_names(node: dict[str, Any]) -> list[str]:
    """The node names of a ``count:`` entry (as the cluster loader expands them); [] for any
    other entry, or one the loader would refuse."""
    name, count = node.get("name"), node.get("count")
    if (not isinstance(name, str) or "{i}" not in name or isinstance(count, bool)
            or not isinstance(count, int) or not 0 < count <= MAX_WORLD_SIZE):
        return []
    return [name.replace("{i}", str(i)) for i in range(count)]


def write_node(path: Path, node: DetectedNode,
               append: bool = False) -> tuple[ClusterSpec, list[str]]:
    """Write ``node`` into the cluster file ``path``; return the file as loaded, and notes on
    what of an entry of the node's name was kept or replaced (``with_node``).

    A new file is named after ``path``'s stem. An existing one is only changed with ``append``:
    the node is merged into the entry of its name or is added last.
    """
    if path.exists() and not append:
        raise _not_written(
            str(path),
            "already exists",
            "pass --append to add this node to it, or pick another file",
        )
    data = read_cluster_data(path) if path.exists() else {"name": path.stem, "nodes": []}
    data, notes = with_node(data, node.entry, str(path))
    _replace(path, render_cluster(data, node))
    return load_cluster(path), notes


def replace_checked(path: Path, data: dict[str, Any]) -> ClusterSpec:
    """Write the description ``data`` over ``path`` once it loads; return it as loaded."""
    _replace(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
    return load_cluster(path)


def _replace(path: Path, text: str) -> None:
    """Check ``text`` loads, then put it at ``path`` atomically: a failure leaves the old file
    (or none), never a part of the new one."""
    _check(text, str(path))
    part = path.with_name(path.name + ".part")
    try:
        part.write_text(text)
        part.replace(path)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise _not_written(
            str(path),
            f"cannot write: {exc.strerror}",
            "check that its folder exists and is writable",
        ) from None


def read_cluster_data(path: Path) -> dict[str, Any]:
    """The description at ``path`` as plain data (YAML mapping), without building it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise _not_written(
            str(path), f"cannot read: {exc.strerror}", "pass a cluster description file"
        ) from None
    data, _, problems = parse_yaml_text(text, str(path))
    if problems:
        raise ClusterError(problems)
    if not isinstance(data, dict):
        raise _not_written(
            str(path),
            "expected a mapping with a nodes: list",
            "see configs/clusters/dgx-h100-4node.yaml",
        )
    return data


def _check(text: str, where: str) -> None:
    """Raise what ``load_cluster`` would raise for ``text``, saying the file was not written.

    Problems name keys, not lines: the lines would be those of text that was not written.
    """
    data, _, problems = parse_yaml_text(text, where)
    try:
        if not problems:
            cluster_from_dict(data, where)
    except ClusterError as exc:
        problems = exc.problems
    if problems:
        raise ClusterError(
            problems,
            title=f"{where} would not be a valid cluster description, so it was not written",
        )


def _not_written(where: str, message: str, fix: str) -> ProblemsError:
    return ProblemsError([Problem(where, message, fix)], title="cluster file not written")


def _dump(value: Any) -> str:
    # Flow style for the innermost lists and mappings: one line per NIC, GPU peers on one line.
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=None, width=100)
