"""User-facing errors.

Every mistake a user can make (a bad config value, an impossible plan, a missing file) raises an
``OrchError``. The CLI prints it without a traceback and exits 2, so the message itself must say
what is wrong, where, and how to fix it. Internal bugs raise ordinary exceptions and keep their
traceback.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from dataclasses import dataclass

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Tell the user ``message`` (something worth knowing that does not stop anything) on stderr,
    as ``orch: warning: ...``, once per process: Python's ``warnings`` would add a file name and
    a source line the user has no use for, and repeat it per call site."""
    if message not in _warned:
        _warned.add(message)
        print(f"orch: warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input.

    ``where`` is a dotted config path (``parallel.tp``) or a file location (``a.yaml:12``);
    ``message`` says what is wrong with the value; ``fix`` says what to do about it.
    """

    where: str
    message: str
    fix: str = ""
    reads: tuple[str, ...] = ()
    """The config fields the check that found it read besides ``where`` (dotted paths; a
    section stands for every field in it): a command that goes on checking a config whose
    failed fields stand at their defaults leaves out what one of those had a part in
    (``orch.config.LoadedConfig``), and only that."""

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text}\n    fix: {self.fix}" if self.fix else text


def reading(problems: Iterable[Problem], fields: Iterable[str]) -> list[Problem]:
    """``problems`` with ``fields`` added to what their checks read (:attr:`Problem.reads`):
    for checks given a value derived from the config, such as the world size, by the code that
    derived it (the checks cannot tell where their arguments came from)."""
    fields = tuple(fields)
    return [dataclasses.replace(p, reads=tuple(dict.fromkeys((*p.reads, *fields))))
            for p in problems]


class OrchError(Exception):
    """Base class of errors caused by user input; printed without a traceback."""

    speaker = True
    """Whether this process prints it: an error every rank of a worker group raises alike is
    said by one rank a node (each node's launcher shows its own workers' output)."""

    exit_code = 2


class ProblemsError(OrchError):
    """An error that carries every problem found, so users fix them all in one round."""

    title = "problems found"

    def __init__(self, problems: list[Problem], title: str | None = None) -> None:
        self.problems = list(problems)
        if title is not None:
            self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [f"{self.title} ({count} {noun}):"]
        lines += ["  - " + str(p).replace("\n", "\n    ") for p in self.problems]
        return "\n".join(lines)


class ConfigError(ProblemsError):
    """The YAML files or ``--set`` overrides do not form a valid config."""

    title = "invalid config"


class PlanError(ProblemsError):
    """The config is valid on its own but cannot be laid out on the requested devices."""

    title = "no valid plan"
