"""Turning plain YAML values into the typed schema, collecting every problem on the way.

The dataclass field types are the only source of truth: this module knows how to read ints,
floats, bools, strings, ``Literal`` choices, optional values, byte sizes, lists and tuples, and
nested sections, and how to say what went wrong in terms a user can act on (dotted path such as
``nodes[2].nics[0].type``, ``file:line``, the value, and a fix, with a did-you-mean for misspelled
keys and choices). A dataclass field without a default is required. ``Annotated[T, check]``
adds a condition on the converted value: ``check`` is a ``Check`` or any callable that returns the
value or raises ``Rejected``; ``Annotated[float, Quantity(...)]`` reads a figure with units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

from orch.errors import Problem

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int | None:
    """``"80GB"`` -> 80e9, ``"1.5GiB"`` -> 1.5 * 2**30; None if it is not a byte size, or not a
    whole number of bytes (``"1.5"`` was cut to 1 byte silently, where a YAML number 1.5 was
    refused). The number is read exactly, so ``"1.1GB"`` is whole."""
    size = byte_count(text)
    return int(size) if size is not None and size.denominator == 1 else None


def byte_count(text: str) -> Fraction | None:
    """The bytes ``text`` says (``"1.5"`` is 3/2: exact, for a caller to say that it is not
    whole), or None if it is not a byte size at all."""
    match = _BYTES_RE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        return None
    return Fraction(match.group(1)) * _UNITS[match.group(2).lower()]


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """``did you mean 'tp'? `` for the choice closest to ``word``, letter case aside (``TP``
    got no suggestion: difflib compares case), or ``""`` where none is close."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean '{by_lower[close[0]]}'? " if close else ""


def locate(path: str, locs: typing.Mapping[str, str], source: str = "") -> str:
    """``file:line path`` where ``path`` was written, or where its nearest written parent was
    (a missing key: the line of the mapping or list item it is missing from), else ``source
    path`` (or just ``path``)."""
    written = path
    while written and written not in locs:
        written = _PARENT.sub("", written)
    return f"{locs.get(written, source)} {path}".strip()


_PARENT = re.compile(r"(^|\.)[^.\[\]]+$|\[\d+\]$")
"""The last step of a dotted path: ``.key`` (or a top-level ``key``) or ``[index]``."""


class Invalid(Exception):
    """A value that does not fit its type; carries the message and fix for the Problem."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message, self.fix = message, fix


class Rejected(Invalid):
    """A value of the right type that fails a check; a union reports it as it is."""


@dataclasses.dataclass(frozen=True)
class Check:
    """``Annotated[T, Check(test, what, fix)]``: the converted value must pass ``test``."""

    test: Callable[[Any], bool]
    what: str
    """Completes "<value> is not ...", e.g. "a positive number"."""
    fix: str

    def __call__(self, value: Any) -> Any:
        if self.test(value):
            return value
        raise Rejected(f"{value!r} is not {self.what}", self.fix)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: Annotated hashes its metadata
class Quantity:
    """``Annotated[float, Quantity(...)]``: a positive figure in ``unit``, written as a number or
    as a string with one of ``units`` (``"900GB/s"`` in a bytes/s field).

    A bare number outside ``plausible`` is refused as a unit slip (``400`` in a bytes/s field
    was meant as Gb/s), ``implausible`` saying what it was likely meant as; a figure written with
    its unit is taken as written, however small."""

    unit: str
    """What a bare number counts, e.g. "bytes/s per device"."""
    example: str
    units: typing.Mapping[str, float]
    """Each spelling of a unit -> what one of it is in ``unit``."""
    spellings: str
    """The units as the fix lists them."""
    plausible: tuple[float, float]
    implausible: Callable[[float], tuple[str, str]]
    """A bare number outside ``plausible`` -> (message, fix)."""
    fold_case: bool = False

    @property
    def what(self) -> str:
        return f"a number of {self.unit}"

    def read(self, value: Any) -> float:
        """``value`` in ``unit``; raises Rejected (a value given is meant as this quantity)."""
        fix = (f"write a number of {self.unit} such as {self.example}, or the figure with its "
               f"unit ({self.spellings})")
        number, bare = None, True
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # YAML 1.1 reads 50e9 (no dot) as a string
            if number is None and (match := _QUANTITY_RE.match(value)):
                unit = match.group(2).lower() if self.fold_case else match.group(2)
                if unit in self.units:  # in decimal: 15us is 1.5e-05, not 1.4999999999999999e-05
                    scale = Decimal(repr(self.units[unit]))
                    number, bare = float(Decimal(match.group(1)) * scale), False
        if number is None:
            raise Rejected(f"{value!r} is not {self.what}", fix)
        if not math.isfinite(number):
            raise Rejected(f"{value!r} is not a finite number", fix)
        if number <= 0:
            raise Rejected(f"{value!r} is not a positive number", fix)
        low, high = self.plausible
        if bare and not low <= number <= high:
            raise Rejected(*self.implausible(number))
        return number


_QUANTITY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(\S+)\s*$")


def _quantity(tp: Any) -> Quantity | None:
    if typing.get_origin(tp) is not typing.Annotated:
        return None
    return next((m for m in tp.__metadata__ if isinstance(m, Quantity)), None)


def _is_bytes(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Annotated and "bytes" in tp.__metadata__


def _split_checks(tp: Any) -> tuple[Any, list[Callable[[Any], Any]]]:
    """``Annotated[T, "bytes", check]`` -> (``Annotated[T, "bytes"]``, [check])."""
    if typing.get_origin(tp) is not typing.Annotated:
        return tp, []
    base, *meta = typing.get_args(tp)
    checks = [m for m in meta if callable(m)]
    rest = [m for m in meta if not callable(m)]
    return (typing.Annotated[(base, *rest)] if rest else base), checks


def _item_type(tp: Any) -> Any:
    """``T`` for ``list[T]`` and ``tuple[T, ...]``; None for any other type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return args[0]
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _fields_text(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _merged_literals(tp: Any) -> Any:
    """A union of Literal types (``Tier | Literal["auto"]``) as one Literal, so a bad value is
    told every choice in one list, not each member's separately; ``tp`` itself otherwise."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return tp
    options = typing.get_args(tp)
    if not all(typing.get_origin(option) is Literal for option in options):
        return tp
    return Literal[tuple(choice for option in options for choice in typing.get_args(option))]


def _describe(tp: Any) -> str:
    if (quantity := _quantity(tp)) is not None:
        return quantity.what
    if _is_bytes(tp):
        return "a byte size"
    tp = _merged_literals(tp)
    base, checks = _split_checks(tp)
    if checks:
        return next((c.what for c in reversed(checks) if hasattr(c, "what")), _describe(base))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if _item_type(tp) is not None:
        return "a list"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _expect_list(value: Any, item: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    each = (f"a {{{_fields_text(item)}}} mapping" if dataclasses.is_dataclass(item)
            else _describe(item))
    raise Invalid(f"expected a list, got {value!r}",
                  f"write one '- ' line per item, or [a, b]; each item is {each}")


def convert(value: Any, tp: Any) -> Any:
    """Convert one YAML value to type ``tp`` or raise Invalid (lists: of scalars only)."""
    if (quantity := _quantity(tp)) is not None:
        return quantity.read(value)
    base, checks = _split_checks(tp)
    if checks:
        value = convert(value, base)
        for check in checks:
            value = check(value)
        return value
    if _is_bytes(tp):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, float) and value.is_integer() and value >= 0:  # 1.0e9 in YAML
            return int(value)
        if isinstance(value, str) and (parsed := parse_bytes(value)) is not None:
            return parsed
        raise Invalid(f"{value!r} is not a byte size",
                      "write a whole number of bytes as 1048576 or 1MiB, 80GB, 1.5TiB")
    tp = _merged_literals(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return convert(value, option)
            except Rejected:
                raise  # the value had this option's type, so say what is wrong with it
            except Invalid as exc:
                errors.append(exc)
        fixes = "; or ".join(dict.fromkeys(e.fix for e in errors))
        raise Invalid(f"{value!r} is not {_describe(tp)}", fixes)
    if (item := _item_type(tp)) is not None:
        items = []
        for index, element in enumerate(_expect_list(value, item)):
            try:
                items.append(convert(element, item))
            except Invalid as exc:
                raise type(exc)(f"item [{index}]: {exc.message}", exc.fix) from None
        return tuple(items) if origin is tuple else items
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if value is None:  # null, ~ or nothing: 'None' read as close to 'cosine' by difflib
            hint = "did you mean 'none'? " if "none" in choices else ""
            read = " (YAML reads null, ~ and an empty value as nothing)"
        else:
            hint = did_you_mean(str(value), [str(c) for c in choices])
            read = " (YAML reads yes, no, on and off as booleans)" if isinstance(value, bool) \
                else ""
        raise Invalid(f"{value!r}{read} is not one of {', '.join(map(str, choices))}",
                      f"{hint}pick one of {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Invalid(f"{value!r} is not true or false", "write true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Invalid(f"{value!r} is not a whole number", "write an integer such as 8")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise Invalid(f"{value!r} is not a number", "write a number such as 3e-4 or 0.1")
        if not math.isfinite(number):  # .inf / .nan / "inf": no setting means that
            raise Invalid(f"{value!r} is not a finite number", "write a number such as 3e-4 "
                          "or 0.1")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise Invalid(f"{value!r} is not a string", "write text, quoted if it has ':' or '#'")
    if tp is type(None):
        if value is None:
            return None
        raise Invalid(f"{value!r} is not null", "write null")
    raise TypeError(f"schema type {tp!r} is not supported")  # a bug in the schema, not user input


_FAILED = object()
"""What ``_Builder.value`` returns for a value it reported; the field keeps its default."""


class _Builder:
    def __init__(self, locs: typing.Mapping[str, str], problems: list[Problem],
                 source: str, failed: set[str]) -> None:
        self.locs, self.problems, self.source, self.failed = locs, problems, source, failed

    def report(self, path: str, message: str, fix: str) -> None:
        self.problems.append(Problem(locate(path, self.locs, self.source), message, fix))

    def value(self, tp: Any, data: Any, path: str) -> Any:
        if dataclasses.is_dataclass(tp):
            return self.build(tp, data, path)
        try:
            if (item := _item_type(tp)) is None:
                return convert(data, tp)
            entries = _expect_list(data, item)
        except Invalid as exc:
            self.report(path, exc.message, exc.fix)
            self.failed.add(path)
            return _FAILED
        built = [self.value(item, entry, f"{path}[{i}]") for i, entry in enumerate(entries)]
        built = [b for b in built if b is not _FAILED]
        return tuple(built) if typing.get_origin(tp) is tuple else built

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        fields = dataclasses.fields(cls)
        missing = dataclasses.MISSING
        required = [f.name for f in fields
                    if f.default is missing and f.default_factory is missing]
        if not isinstance(data, dict):
            fix = (f"write '{prefix}:' followed by indented keys" if prefix and prefix[-1] != "]"
                   else f"write key: value pairs for {_fields_text(cls)}")
            self.report(prefix, f"expected a section of key: value pairs, got {data!r}", fix)
            self.failed.add(prefix)
            return cls(**dict.fromkeys(required))
        hints = typing.get_type_hints(cls, include_extras=True)
        names = {f.name for f in fields}
        values: dict[str, Any] = {}
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in names:
                hint = did_you_mean(str(key), names)
                self.report(path, f"unknown key '{key}'",
                            f"{hint}known keys here: {', '.join(sorted(names))}")
            elif (converted := self.value(hints[key], value, path)) is not _FAILED:
                values[key] = converted
        for name in required:
            if name not in data:
                self.report(f"{prefix}.{name}" if prefix else name, "is missing",
                            f"add '{name}:' here")
            values.setdefault(name, None)
        return cls(**values)


def build(cls: type, data: Any, prefix: str, locs: typing.Mapping[str, str],
          problems: list[Problem], source: str = "", failed: set[str] | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; fields with problems keep their defaults.

    Required fields that are missing or invalid are None. Problems name ``locs[path]`` (the
    ``file:line`` of a key) or else ``source``, then the dotted path below ``prefix``.
    ``failed`` (if given) collects the dotted path of every value that did not convert (a list
    item's as ``path[i]``; a section that is not a mapping: its own), so that checks made on the
    result can leave out what the stand-in values would cause.
    """
    return _Builder(locs, problems, source, set() if failed is None else failed).build(
        cls, data, prefix)


def field_type(cls: type, dotted: str) -> tuple[Any, str]:
    """The schema type at ``dotted`` below ``cls``; raises KeyError(message, fix) if none."""
    current: Any = cls
    walked: list[str] = []
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(current):
            raise KeyError(f"'{'.'.join(walked)}' is a value, it has no key '{part}'",
                           f"set {'.'.join(walked)}=VALUE")
        hints = typing.get_type_hints(current, include_extras=True)
        if part not in hints:
            scope = ".".join(walked) or "the top level"
            raise KeyError(f"{scope} has no key '{part}'",
                           f"{did_you_mean(part, hints)}known keys: {', '.join(sorted(hints))}")
        current = hints[part]
        walked.append(part)
    return current, ".".join(walked)
