"""``data.blend``: a weighted mixture of data files, each entry ``'WEIGHT PATH'``.

Megatron users give their mixture as ``--data-path 0.7 web 0.3 code``; ``data.blend`` holds the
same pairs, one string each (``['0.7 /data/web_text_document', '0.3 /data/code_text_document']``),
so a path may hold spaces (everything after the weight is the path). Weights are relative: they
are normalized to sum to one. Parsed here without reading any file, so the config's rules can
check the entries before the launcher looks at the files.
"""

from __future__ import annotations

import math

from orch.errors import Problem

FIELD = "data.blend"
_FORM = ("write each entry as 'WEIGHT PATH', a positive number then the file (or Megatron "
         "prefix), e.g. '0.3 /data/code_text_document'")


def blend_field(index: int) -> str:
    """The dotted name of entry ``index`` of ``data.blend``, as problems name it."""
    return f"{FIELD}[{index}]"


def blend_paths(entries: list[str]) -> list[str]:
    """Each entry's path, in place ("" where it has none), whether or not its weight is good:
    rules about the files name them by their places."""
    return [parts[1] if len(parts := str(entry).strip().split(maxsplit=1)) == 2 else ""
            for entry in entries]


def blend_stand_in(entry: str) -> str:
    """What stands in for an entry a rule refused while the config's other checks run: weight
    1 and its path where it has one (the checks of the files then keep their places)."""
    return f"1 {blend_paths([entry])[0] or '-'}"


def parse_blend(entries: list[str]) -> tuple[list[tuple[float, str]], list[Problem]]:
    """Each entry's normalized weight and path, and every problem with the entries (the pairs
    are only meaningful when there are none)."""
    pairs: list[tuple[float, str]] = []
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        where = blend_field(index)
        parts = str(entry).strip().split(maxsplit=1)
        if len(parts) < 2:
            problems.append(Problem(where, f"{entry!r} is not a weight and a path", _FORM))
            continue
        try:
            weight = float(parts[0])
        except ValueError:
            problems.append(Problem(where, f"{entry!r}: its weight {parts[0]!r} is not a number",
                                    _FORM))
            continue
        if not (math.isfinite(weight) and weight > 0):
            problems.append(Problem(where, f"{entry!r}: its weight {parts[0]} is not a positive "
                                    "finite number", "give each file a weight above 0 (leave "
                                    "a file out rather than weigh it 0)"))
            continue
        pairs.append((weight, parts[1]))
    # relative to the largest first: a sum of weights near the float maximum is infinite
    largest = max((weight for weight, _ in pairs), default=1.0)
    total = sum(weight / largest for weight, _ in pairs)
    normalized = [(weight / largest / total, path) for weight, path in pairs]
    problems += [Problem(blend_field(index), f"{entries[index]!r}: its weight is 0 beside the "
                         "others' (below the smallest float)", "give each file a weight within "
                         "a factor of 1e300 of the largest")
                 for index, (weight, _) in zip(_valid_indices(entries, problems), normalized,
                                               strict=True) if weight <= 0]
    return normalized, problems


def _valid_indices(entries: list[str], problems: list[Problem]) -> list[int]:
    refused = {problem.where for problem in problems}
    return [index for index in range(len(entries)) if blend_field(index) not in refused]


def blend_weights(entries: list[str]) -> list[float]:
    """The normalized weights of ``data.blend``'s ``entries``, in order (entries checked)."""
    return [weight for weight, _ in parse_blend(entries)[0]]
