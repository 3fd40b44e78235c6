"""The schema engine on its own: lists and tuples, required fields, checks, locations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from orch.config.coerce import Check, Invalid, build, convert, field_type
from orch.errors import Problem

Positive = Annotated[int, Check(lambda n: n > 0, "a positive whole number", "write 1 or more")]


@dataclass(kw_only=True)
class Port:
    name: str
    kind: Literal["a", "b"] = "a"


@dataclass(kw_only=True)
class Box:
    name: str
    size: Positive | None = None
    ports: tuple[Port, ...] = ()
    tags: list[str] = field(default_factory=list)


@dataclass
class Rack:
    boxes: list[Box] = field(default_factory=list)


def _build(data: Any, locs: dict[str, str] | None = None, source: str = "") -> tuple[Any, list]:
    problems: list[Problem] = []
    return build(Rack, data, "", locs or {}, problems, source), problems


def test_lists_of_sections_and_scalars() -> None:
    rack, problems = _build({"boxes": [{"name": "x", "size": 2, "tags": ["t", 3],
                                        "ports": [{"name": "p", "kind": "b"}]}]})
    assert not problems
    assert rack.boxes == [Box(name="x", size=2, ports=(Port(name="p", kind="b"),),
                              tags=["t", "3"])]


def test_element_paths_missing_fields_and_fallback_source() -> None:
    data = {"boxes": [{"name": "x"}, {"ports": [{"name": "p"}, {"name": "q", "knd": "b"}],
                                      "tags": "t", "size": 0}]}
    _, problems = _build(data, {"boxes": "r.yaml:1"}, source="r.yaml")
    assert [(p.where, p.message) for p in problems] == [  # placed at the nearest written parent
        ("r.yaml:1 boxes[1].ports[1].knd", "unknown key 'knd'"),
        ("r.yaml:1 boxes[1].tags", "expected a list, got 't'"),
        ("r.yaml:1 boxes[1].size", "0 is not a positive whole number"),  # a check, not "or null"
        ("r.yaml:1 boxes[1].name", "is missing"),
    ]
    assert "did you mean 'kind'?" in problems[0].fix
    assert "'- ' line" in problems[1].fix
    assert problems[3].fix == "add 'name:' here"
    _, problems = _build(data, {}, source="r.yaml")  # nothing written has a line: the file
    assert problems[3].where == "r.yaml boxes[1].name"


def test_not_a_list_or_not_a_section() -> None:
    _, problems = _build({"boxes": {"name": "x"}})
    assert problems[0].where == "boxes" and "expected a list" in problems[0].message
    assert "{name, size, ports, tags}" in problems[0].fix
    _, problems = _build({"boxes": ["x"]})
    assert (problems[0].where, problems[0].message) == (
        "boxes[0]", "expected a section of key: value pairs, got 'x'")
    assert "name, size, ports, tags" in problems[0].fix


def test_convert_lists_of_scalars() -> None:
    assert convert([1, "2"], tuple[float, ...]) == (1.0, 2.0)
    with pytest.raises(Invalid, match=r"item \[1\]: 'x' is not a whole number"):
        convert([1, "x"], list[int])
    with pytest.raises(Invalid, match="expected a list"):
        convert(5, list[int])
    with pytest.raises(Invalid, match="'x' is not a positive whole number or null"):
        convert("x", Positive | None)


def test_field_type_reaches_lists() -> None:
    assert field_type(Rack, "boxes") == (list[Box], "boxes")
    with pytest.raises(KeyError, match="is a value"):
        field_type(Rack, "boxes.name")
