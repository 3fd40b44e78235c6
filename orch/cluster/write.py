"""Cluster description files from detected nodes: YAML text with notes, and adding a node.

A file is only written once its new text passes the cluster loader, so a bad entry never
replaces a good file; the file written is then read back with ``load_cluster``. The text comes from
PyYAML, so a file rewritten to add a node loses the comments it had; the notes of the node being
written go back above its entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orch.cluster.detect import DetectedNode
from orch.config.source import parse_yaml_text
from orch.errors import Problem, ProblemsError
from orch.plan.cluster import (
    MAX_WORLD_SIZE,
    ClusterError,
    ClusterSpec,
    cluster_from_dict,
    load_cluster,
)


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


def with_node(data: dict[str, Any], entry: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` with ``entry`` in place of the node of its name (ranks keep their order), or
    after the last node.

    A node of a ``count:`` entry is split out of it: replacing ``vm2`` of ``{name: "vm{i}",
    count: 5}`` leaves ``{name: "vm{i}", count: 2}`` (vm0 and vm1: a count names from 0), the
    new ``vm2``, then ``vm3`` and ``vm4`` as entries of their own, with the fields they had."""
    nodes = list(data.get("nodes") or [])
    if not all(isinstance(node, dict) for node in nodes):
        raise _not_written(
            f"{where} nodes",
            "expected a list of node mappings",
            "write nodes: [{name: node0, devices: 8}]",
        )
    names = [node.get("name") for node in nodes]
    if entry["name"] in names:
        nodes[names.index(entry["name"])] = entry
        return data | {"nodes": nodes}
    for index, node in enumerate(nodes):
        expanded = _expanded_names(node)
        if entry["name"] in expanded:
            split = expanded.index(entry["name"])
            one = {key: value for key, value in node.items() if key != "count"}
            before = ([node | {"count": split}] if split > 1
                      else [one | {"name": expanded[0]}] if split else [])
            after = [one | {"name": name} for name in expanded[split + 1:]]
            nodes[index:index + 1] = [*before, entry, *after]
            return data | {"nodes": nodes}
    return data | {"nodes": [*nodes, entry]}


def _expanded_names(node: dict[str, Any]) -> list[str]:
    """The node names of a ``count:`` entry (as the cluster loader expands them); [] for any
    other entry, or one the loader would refuse."""
    name, count = node.get("name"), node.get("count")
    if (not isinstance(name, str) or "{i}" not in name or isinstance(count, bool)
            or not isinstance(count, int) or not 0 < count <= MAX_WORLD_SIZE):
        return []
    return [name.replace("{i}", str(i)) for i in range(count)]


def write_node(path: Path, node: DetectedNode, append: bool = False) -> ClusterSpec:
    """Write ``node`` into the cluster file ``path`` and return the file as loaded.

    A new file is named after ``path``'s stem. An existing one is only changed with ``append``:
    the node replaces the entry of its name or is added last.
    """
    if path.exists() and not append:
        raise _not_written(
            str(path),
            "already exists",
            "pass --append to add this node to it, or pick another file",
        )
    data = read_cluster_data(path) if path.exists() else {"name": path.stem, "nodes": []}
    _replace(path, render_cluster(with_node(data, node.entry, str(path)), node))
    return load_cluster(path)


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
