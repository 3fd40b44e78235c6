"""Turning plain YAML values into the typed schema, collecting every problem on the way.

The dataclass field types are the only source of truth: this module knows how to read ints,
floats, bools, strings, ``Literal`` choices, optional values, byte sizes and nested sections, and
how to say what went wrong in terms a user can act on (dotted path, ``file:line``, the value, and
a fix, with a did-you-mean for misspelled keys and choices).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from orch.errors import Problem

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int | None:
    """``"80GB"`` -> 80e9, ``"1.5GiB"`` -> 1.5 * 2**30; None if it is not a byte size."""
    match = _BYTES_RE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


class _Invalid(Exception):
    """A value that does not fit its type; carries the message and fix for the Problem."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message, self.fix = message, fix


def _is_bytes(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Annotated and "bytes" in tp.__metadata__


def _describe(tp: Any) -> str:
    if _is_bytes(tp):
        return "a byte size"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value: Any, tp: Any) -> Any:
    """Convert one YAML value to type ``tp`` or raise _Invalid."""
    if _is_bytes(tp):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and (parsed := parse_bytes(value)) is not None:
            return parsed
        raise _Invalid(f"{value!r} is not a byte size", "write bytes as 1048576 or 1MiB, 80GB, 1.5TiB")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return convert(value, option)
            except _Invalid as exc:
                errors.append(exc)
        fixes = "; or ".join(dict.fromkeys(e.fix for e in errors))
        raise _Invalid(f"{value!r} is not {_describe(tp)}", fixes)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise _Invalid(f"{value!r} is not one of {', '.join(map(str, choices))}",
                       f"{hint}pick one of {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(f"{value!r} is not true or false", "write true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid(f"{value!r} is not a whole number", "write an integer such as 8")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Invalid(f"{value!r} is not a number", "write a number such as 3e-4 or 0.1")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Invalid(f"{value!r} is not a string", "write text, quoted if it has ':' or '#'")
    if tp is type(None):
        if value is None:
            return None
        raise _Invalid(f"{value!r} is not null", "write null")
    raise TypeError(f"schema type {tp!r} is not supported")  # a bug in the schema, not user input


def build(cls: type, data: Any, prefix: str, locs: dict[str, str],
          problems: list[Problem]) -> Any:
    """Build dataclass ``cls`` from ``data``; fields with problems keep their defaults."""

    def where(path: str) -> str:
        return f"{locs[path]} {path}" if path in locs else path

    if not isinstance(data, dict):
        problems.append(Problem(where(prefix), f"expected a section of key: value pairs, "
                                f"got {data!r}", f"write '{prefix}:' followed by indented keys"))
        return cls()
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = did_you_mean(str(key), names)
            problems.append(Problem(where(path), f"unknown key '{key}'",
                                    f"{hint}known keys here: {', '.join(sorted(names))}"))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = build(tp, value, path, locs, problems)
            continue
        try:
            values[key] = convert(value, tp)
        except _Invalid as exc:
            problems.append(Problem(where(path), exc.message, exc.fix))
    return cls(**values)


def field_type(cls: type, dotted: str) -> tuple[Any, str]:
    """The schema type at ``dotted`` below ``cls``; raises KeyError(message) if there is none."""
    current: Any = cls
    walked: list[str] = []
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(current):
            raise KeyError(f"'{'.'.join(walked)}' is a value, it has no key '{part}'")
        hints = typing.get_type_hints(current, include_extras=True)
        if part not in hints:
            hint = did_you_mean(part, hints)
            scope = ".".join(walked) or "the top level"
            raise KeyError(f"{scope} has no key '{part}'; {hint}known: {', '.join(sorted(hints))}")
        current = hints[part]
        walked.append(part)
    return current, ".".join(walked)
