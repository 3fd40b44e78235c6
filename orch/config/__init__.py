"""Typed configs: schema, YAML loading with ``base:`` chains, ``--set`` overrides, validation.

``load_config`` is the one way in: it reads the file chain, applies overrides, converts every
value by its schema type and runs the cross-field rules, raising one ``ConfigError`` that lists
every problem (with ``file:line`` where the value came from a file). Commands that check more
than the config (``orch plan``, ``orch launch``) use ``load_config_lenient``, which returns the
problems beside a config they can go on checking, so that one run lists them all.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import yaml

from orch.config.coerce import build, field_type, parse_bytes
from orch.config.rules import check_config
from orch.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OffloadConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from orch.config.source import Locations, deep_merge, read_config_tree
from orch.errors import ConfigError, PlanError, Problem

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LoadedConfig",
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
    "load_config_lenient",
    "parse_bytes",
    "recorded_config",
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


@dataclasses.dataclass(frozen=True)
class LoadedConfig:
    """A config read leniently, with its problems, for a command that checks more than the
    config (the plan, the launch) and lists everything in one round.

    A field whose value did not convert, or that a cross-field rule refuses, is set to its
    default in ``config`` (the plan divides by degrees a rule refused, such as tp=0); where a
    rule still refuses that, so are the fields the rule compared it with, and only where it
    refuses those too, its section, up to the whole config. Those are the ``stand_ins``:
    whatever a later check says about one, or found reading one, would be about the default,
    not the user's value, so :meth:`check` leaves it out. What a check read is
    what its Problems declare (``where`` and ``reads``), never words in their text: a field's
    name is often an ordinary word ("steps", "name"), and a section's other fields are not
    what a check of some of them read.
    """

    config: Config
    """As read where there are no problems; else with the stand-ins at their defaults, which
    every cross-field rule accepts."""
    problems: tuple[Problem, ...]
    """Every problem of the config: conversion, unknown keys, cross-field rules."""
    stand_ins: frozenset[str]
    """Dotted paths of the fields at their defaults in ``config`` (``parallel.tp``)."""
    locs: Locations = dataclasses.field(default_factory=dict)
    """Where each value was written (``file:line``), for the later checks' problems too."""

    def check(self, later: Iterable[Problem] = (), title: str | None = None) -> Config:
        """The config, or one error listing every problem: the config's, then those of
        ``later`` (found on ``config``) that no stand-in had a part in, each at the
        ``file:line`` its field was written at as the config's own are. ConfigError where the
        config has problems (so that callers catching it still do), else PlanError; ``title``
        replaces either's own."""
        problems = [*self.problems, *(_at_source(problem, self.locs)
                                      for problem in _unaffected(later, self.stand_ins))]
        if self.problems:
            raise ConfigError(problems, title)
        if problems:
            raise PlanError(problems, title)
        return self.config


_FILLS_THE_WORLD = frozenset({"cluster", "parallel", "parallel.pp", "parallel.dp_replicate",
                              "parallel.cp", "parallel.tp"})
"""What ``parallel.dp_shard: -1`` takes the rest of the world from (the other degrees, and the
world the cluster description sets): a stand-in among them makes dp_shard one too (tp=0 at its
default 1 gave a dp of 3 that global_batch 8 does not divide, on 3 devices)."""


def _about(problem: Problem, stand_in: str) -> bool:
    """Whether ``stand_in`` had a part in ``problem``: its ``where`` is the stand-in or lies
    inside it, or a field its check read (:attr:`Problem.reads`) is, lies inside it, or is a
    section holding it. A ``where`` that is a section holding the stand-in is not enough: the
    world-size product said at ``parallel`` reads the degrees, not ``parallel.cp_kind``."""
    return (_inside(problem.where, stand_in)
            or any(_inside(read, stand_in) or _inside(stand_in, read) for read in problem.reads))


def _inside(path: str, section: str) -> bool:
    """Whether dotted ``path`` is ``section`` or lies inside it (``""``: the whole config)."""
    return not section or path == section or path.startswith((section + ".", section + "["))


def _unaffected(problems: Iterable[Problem], fields: Collection[str]) -> list[Problem]:
    return [p for p in problems if not any(_about(p, field) for field in fields)]


def _with_default(section: Any, path: str) -> Any:
    """``section`` (a schema dataclass) with the field at dotted ``path`` set to its default;
    a list item (``blend[1]``) to its field's ``item_stand_in`` of it where it has one (the
    other items, and their places, stay: the checks after name them), else the whole list."""
    if not path:
        return type(section)()
    name, _, rest = path.partition(".")
    if rest:
        return dataclasses.replace(section, **{name: _with_default(getattr(section, name), rest)})
    name, bracket, index = name.partition("[")
    field = next(f for f in dataclasses.fields(section) if f.name == name)
    if bracket and (stand_in := field.metadata.get("item_stand_in")):
        items = list(getattr(section, name))
        items[int(index.rstrip("]"))] = stand_in(items[int(index.rstrip("]"))])
        return dataclasses.replace(section, **{name: items})
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return dataclasses.replace(section, **{name: default})


def _with_defaults(cfg: Config, stand_ins: set[str]) -> Config:
    """``cfg`` with each of ``stand_ins`` at its default, adding to them until every
    cross-field rule accepts the result (see :func:`_widened`)."""
    while True:
        if stand_ins & _FILLS_THE_WORLD:
            stand_ins.add("parallel.dp_shard")
        checked = cfg
        for path in sorted(stand_ins):  # a section before the fields in it
            if not _covered(path, stand_ins - {path}):  # (a list item of a list at default)
                checked = _with_default(checked, path)
        if not (refused := check_config(checked)):
            return checked
        before = len(stand_ins)
        for problem in refused:
            stand_ins |= _widened(problem, stand_ins)
        if len(stand_ins) == before:  # the whole config stands in, and a rule refuses even it
            raise AssertionError(f"the schema's defaults break a rule: {refused}")


def _widened(problem: Problem, stand_ins: set[str]) -> set[str]:
    """What else stands in where a rule refuses the config with ``stand_ins`` at defaults: the
    field it refused; where that stands in already, the fields the rule compared it with
    (:attr:`Problem.reads`: train.seq_len's default 256 is still past a model.max_seq_len of
    128, warmup_steps' default 10 past train.steps=2); only where those do too, the section
    holding the field. Climbing first put a whole section, then the whole config, at defaults,
    and the later checks found nothing of the user's (nvme_path, init_from) to say."""
    if not _covered(problem.where, stand_ins):
        return {problem.where}
    if reads := {read for read in problem.reads if not _covered(read, stand_ins)}:
        return reads
    covering = [p for p in _sections_of(problem.where) if p in stand_ins]
    return {_sections_of(covering[-1])[1]}


def _field_of(where: str) -> str:
    """The field a ``where`` is in: a list item (``data.blend[1]``) is in its list."""
    return where.partition("[")[0]


def _covered(path: str, stand_ins: Collection[str]) -> bool:
    """Whether ``path`` stands in, or a section holding it does."""
    return any(section in stand_ins for section in _sections_of(path))


def _sections_of(path: str) -> list[str]:
    """``train.seq_len`` -> [``train.seq_len``, ``train``, ``""`` (the whole config)]; a list
    item's list comes after it (``data.blend[1]``, ``data.blend``, ``data``, ``""``)."""
    paths = [path]
    if path != _field_of(path):
        path = _field_of(path)
        paths.append(path)
    while path:
        path = path.rpartition(".")[0]
        paths.append(path)
    return paths


def _build(data: dict[str, Any], locs: Locations, problems: list[Problem]) -> LoadedConfig:
    """Convert ``data`` (fields that fail keep their defaults), run the cross-field rules, and
    make the config later checks can run on (see LoadedConfig)."""
    failed: set[str] = set()
    cfg = build(Config, data, "", locs, problems, failed=failed)
    converted = {_field_of(path) for path in failed}
    rules = check_config(cfg)
    problems = [*problems, *(_at_source(p, locs) for p in _unaffected(rules, converted))]
    if not problems:
        return LoadedConfig(cfg, (), frozenset(), locs)
    stand_ins = converted | {p.where for p in rules}
    cfg = _with_defaults(cfg, stand_ins)
    return LoadedConfig(cfg, tuple(problems), frozenset(stand_ins), locs)


def _at_source(problem: Problem, locs: Locations) -> Problem:
    """A rule's ``problem`` with the ``file:line`` its field's value was written at, as a
    value that does not convert says it (``a.yaml:16 train.lr``); as it is where the value
    came from ``--set`` or is the schema's default, or where it is about a whole section
    (``parallel``: its values may come from anywhere, the section's line says none of them)."""
    written = locs.get(problem.where, "--set")
    if written == "--set" or any(path.startswith(f"{problem.where}.") for path in locs):
        return problem
    return dataclasses.replace(problem, where=f"{written} {problem.where}")


def config_from_dict(
    data: dict[str, Any], locs: Locations | None = None, problems: list[Problem] | None = None
) -> Config:
    """Build and validate a Config from plain data; raise ConfigError listing every problem."""
    return _build(data, locs or {}, [] if problems is None else problems).check()


def load_config_lenient(path: str | Path | None, overrides: list[str] | None = None
                        ) -> LoadedConfig:
    """``load_config`` for a command that goes on checking (see LoadedConfig): its problems are
    returned, not raised, except where nothing can be built (a file that does not read, a
    cluster description given as the config)."""
    data, locs = read_config_tree(path) if path is not None else ({}, {})
    problems: list[Problem] = []
    if isinstance(data, dict) and "nodes" in data:  # its keys would each be "unknown"
        raise ConfigError([Problem(str(path), "is a cluster description (it lists nodes:), not "
                                   "a training config", "give a config such as "
                                   f"configs/llama3-8b.yaml, with this file as --set "
                                   f"cluster={path}")])
    data = apply_overrides(data, overrides or [], locs, problems)
    return _build(data, locs, problems)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when ``path`` is None) with ``--set`` overrides applied;
    raise ConfigError listing every problem."""
    return load_config_lenient(path, overrides).check()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def recorded_config(cfg: Config) -> dict[str, Any]:
    """:func:`config_to_dict` as a run records it (its config.yaml, every checkpoint's
    manifest), with ``model.init_from`` made absolute: ``orch ckpt export`` reads that
    directory's tokenizer files and special token ids later, from wherever it runs, and a
    relative path there named another directory or none (noted as gone while it was there).
    The field is not fingerprinted, so a resume giving the path as before still matches."""
    recorded = config_to_dict(cfg)
    if cfg.model.init_from:
        recorded["model"]["init_from"] = os.path.abspath(cfg.model.init_from)
    return recorded
