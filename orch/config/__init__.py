"""Typed configs: schema, YAML loading with ``base:`` chains, ``--set`` overrides, validation.

``load_config`` is the one way in: it reads the file chain, applies overrides, converts every
value by its schema type and runs the cross-field rules, raising one ``ConfigError`` that lists
every problem (with ``file:line`` where the value came from a file).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from orch.config.coerce import build, field_type, parse_bytes
from orch.config.rules import check_config
from orch.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OffloadConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from orch.config.source import Locations, deep_merge, read_config_tree
from orch.errors import ConfigError, Problem

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OffloadConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_bytes",
]


def apply_overrides(
    data: dict[str, Any], overrides: list[str], locs: Locations, problems: list[Problem]
) -> dict[str, Any]:
    """Merge ``key.path=value`` strings into ``data``; the schema types the values later."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(
                Problem(
                    f"--set {item}",
                    "is not of the form key.path=value",
                    "write e.g. --set parallel.tp=2",
                )
            )
            continue
        try:
            field_type(Config, key)
        except KeyError as exc:
            problems.append(Problem(f"--set {key}", *exc.args))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except (yaml.YAMLError, ValueError, TypeError, RecursionError):  # e.g. '!!int abc'
            value = text  # the raw text, which the field's type check then names
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        data = deep_merge(data, nested)
        locs[key] = "--set"
        for sub in [p for p in locs if p.startswith((key + ".", key + "["))]:
            locs[sub] = "--set"
    return data


def config_from_dict(
    data: dict[str, Any], locs: Locations | None = None, problems: list[Problem] | None = None
) -> Config:
    """Build and validate a Config from plain data; raise ConfigError listing every problem."""
    problems = [] if problems is None else problems
    cfg = build(Config, data, "", locs or {}, problems)
    if not problems:  # cross-field rules would only repeat conversion errors
        problems.extend(check_config(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when ``path`` is None) with ``--set`` overrides applied."""
    data, locs = read_config_tree(path) if path is not None else ({}, {})
    problems: list[Problem] = []
    if isinstance(data, dict) and "nodes" in data:  # its keys would each be "unknown"
        raise ConfigError([Problem(str(path), "is a cluster description (it lists nodes:), not "
                                   "a training config", "give a config such as "
                                   f"configs/llama3-8b.yaml, with this file as --set "
                                   f"cluster={path}")])
    data = apply_overrides(data, overrides or [], locs, problems)
    return config_from_dict(data, locs, problems)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)
