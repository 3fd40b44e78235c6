"""Reading config YAML: line numbers for every key, ``base:`` chains, and deep merging.

A config file may say ``base: other.yaml`` (or a list of files), a path relative to itself. The
bases are read first, in order, and the file's own keys are merged on top: mappings merge key by
key, anything else is replaced. Cycles are reported with the whole chain. Every key remembers the
``file:line`` it came from so later errors can point at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orch.errors import ConfigError, Problem

Locations = dict[str, str]
"""Dotted key path -> ``file:line`` where its value was written."""


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


_UNREADABLE_FIX = ("write plain values (numbers, strings, true/false, lists, mappings); YAML tags "
                   "(!name) and aliases of a mapping inside itself have no config meaning")


_PLAIN_LIST = "tag:yaml.org,2002:seq"
"""A list without a tag (``!!omap``, ``!!python/tuple`` and the like are left to the loader,
which accepts or refuses them as a whole)."""


def _node_to_python(
    node: yaml.Node, prefix: str, where: str, locs: Locations, problems: list[Problem],
    enclosing: frozenset[int] = frozenset(),
) -> Any:
    """Build plain Python values from a composed YAML node, recording each key's and each list
    item's line; a value that is not plain data (a tag, ``!!int abc``, a mapping or list
    aliased inside itself) becomes a Problem at its line. Merge keys (``<<: *defaults``) merge
    as YAML defines them."""
    line = f"{where}:{node.start_mark.line + 1}"
    try:
        if id(node) in enclosing:
            raise ValueError("an alias refers to a mapping or list that contains it")
        if isinstance(node, yaml.SequenceNode) and node.tag == _PLAIN_LIST:  # nodes[37].nics[2]
            items = [(f"{prefix}[{index}]", item) for index, item in enumerate(node.value)]
            for path, item in items:
                locs[path] = f"{where}:{item.start_mark.line + 1}"
            return [_node_to_python(item, path, where, locs, problems, enclosing | {id(node)})
                    for path, item in items]
        if not isinstance(node, yaml.MappingNode):
            return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        merged, own = _pairs(node, enclosing)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        name = prefix or "the file"
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problems.append(Problem(line, f"cannot read {name}: {reason}", _UNREADABLE_FIX))
        return None
    # A key written in the mapping replaces one merged in (``{<<: *t, steps: 20}``); only a key
    # written twice in the mapping itself is a mistake.
    written = {key for key, _, _ in own}
    entries = [(key, *pair) for key, pair in merged.items() if key not in written] + own
    out: dict[str, Any] = {}
    for key, key_node, value_node in entries:
        path = f"{prefix}.{key}" if prefix else key
        key_line = f"{where}:{key_node.start_mark.line + 1}"  # a merged key: where it was written
        if key in out:
            problems.append(
                Problem(key_line, f"key '{path}' appears twice", "keep only one of them")
            )
        locs[path] = key_line
        out[key] = _node_to_python(value_node, path, where, locs, problems,
                                   enclosing | {id(node)})
    return {key: out[key] for key in [*merged, *out] if key in out}  # PyYAML's order


_MERGE = "tag:yaml.org,2002:merge"


def _key(node: yaml.Node) -> str:
    if node.tag == "tag:yaml.org,2002:value":  # a '=' key, which PyYAML reads as the string
        return str(node.value)
    return str(yaml.constructor.SafeConstructor().construct_object(node))


Pair = tuple[yaml.Node, yaml.Node]


def _pairs(node: yaml.MappingNode, enclosing: frozenset[int]
           ) -> tuple[dict[str, Pair], list[tuple[str, yaml.Node, yaml.Node]]]:
    """A mapping's merged-in pairs (one per key) and its own pairs (in order, repeats kept).

    Merging is the YAML merge key's: ``<<: *a`` brings in ``a``'s keys (its own merges
    resolved), ``<<: [*a, *b]`` the keys of both with ``a`` winning a key they share, and the
    mapping's own keys override them all. The nodes are not changed (PyYAML's
    ``flatten_mapping`` rewrites them, so an anchor read again looked like repeated keys)."""
    merged: dict[str, Pair] = {}
    own: list[tuple[str, yaml.Node, yaml.Node]] = []
    inside = enclosing | {id(node)}
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE:
            own.append((_key(key_node), key_node, value_node))
            continue
        sources = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                   else [value_node])
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                raise ValueError(f"'<<' merges a mapping or a list of mappings, but found a "
                                 f"{source.id}")
            if id(source) in inside:
                raise ValueError("an alias refers to a mapping or list that contains it")
            inner, inner_own = _pairs(source, inside)
            resolved = dict(inner) | {key: (k, v) for key, k, v in inner_own}
            for key, pair in resolved.items():
                merged.setdefault(key, pair)  # an earlier source wins
    return merged, own


def parse_yaml_text(
    text: str, where: str, prefix: str = ""
) -> tuple[Any, Locations, list[Problem]]:
    """Parse YAML text; malformed YAML becomes a Problem naming the file and line."""
    locs: Locations = {}
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{where}:{mark.line + 1}" if mark is not None else where
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return None, locs, [Problem(line, f"malformed YAML: {reason}", "fix the YAML syntax")]
    if node is None:
        return {}, locs, problems
    return _node_to_python(node, prefix, where, locs, problems), locs, problems


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` on ``base``: nested mappings merge, every other value replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_tree(path: str | Path) -> tuple[dict[str, Any], Locations]:
    """Read ``path`` with its ``base:`` chain merged in; raise ConfigError listing all problems."""
    problems: list[Problem] = []
    data, locs = _read(Path(path), [], problems)
    if problems:
        raise ConfigError(problems)
    return data, locs


def _read(
    path: Path, chain: list[Path], problems: list[Problem]
) -> tuple[dict[str, Any], Locations]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(_display(p) for p in [*chain, resolved])
        problems.append(Problem(_display(path), f"base files form a cycle: {cycle}",
                                "remove one 'base:' entry so the chain ends"))
        return {}, {}
    where = _display(path)
    if not path.is_file():
        referrer = f" (named as base by {_display(chain[-1])})" if chain else ""
        problems.append(Problem(where, "is a directory, not a config file" + referrer,
                                "give a YAML file, e.g. configs/tiny.yaml") if path.is_dir()
                        else Problem(where, f"config file not found{referrer}", "check the path; "
                                     "base paths are relative to the file naming them"))
        return {}, {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(where, f"is not UTF-8 text (byte {exc.start}: "
                                f"{exc.object[exc.start:exc.start + 1]!r})",
                                "save the file as UTF-8"))
        return {}, {}
    data, locs, found = parse_yaml_text(text, where)
    problems.extend(found)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        problems.append(Problem(where, f"top level is a {type(data).__name__}, not a mapping",
                                "write 'section: {key: value}' pairs such as 'model:'"))
        return {}, {}
    bases = data.pop("base", None)
    if bases is None:
        return data, locs
    base_line = locs.pop("base", where)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        problems.append(Problem(base_line, f"base must be a file path or a list of paths, "
                                f"got {bases!r}", "write base: relative/path.yaml"))
        return data, locs
    merged: dict[str, Any] = {}
    merged_locs: Locations = {}
    for name in bases:
        base_data, base_locs = _read(path.parent / name, [*chain, resolved], problems)
        merged = deep_merge(merged, base_data)
        merged_locs.update(base_locs)
    merged_locs.update(locs)
    return deep_merge(merged, data), merged_locs
