"""Fault drills: kill one rank with SIGKILL, or make it raise, at a chosen point, to see a job
survive it.

``ORCH_DRILL="kill rank=1 step=7 during=step"`` in the environment of ``orch launch`` makes rank
1 send itself SIGKILL (a real ``kill -9``: no handler, no cleanup, no flush) in the middle of
step 7, after its forward and backward and before the optimizer step; ``during=save`` does it
in the middle of saving checkpoint 7, after the sharded state is written and before the
manifest. ``raise`` in place of ``kill`` raises ``DrillError`` there instead: a Python error
(a bug, a bad batch) that unwinds the worker, its cleanup included, while its peers run on. The
drill fires on the job's first attempt only (torchrun's
``TORCHELASTIC_RESTART_COUNT`` is 0), so with ``--max-restarts`` the restarted workers run on
and the job can show it resumes from the newest complete checkpoint. ``nan`` (during a step
only) makes the rank's model outputs NaN for step 7, as a diverged step would, so its gradient
norm is NaN on every rank: the run's ``train.stop_on_nonfinite`` is what it shows. Without the
variable nothing here does anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from torch import nn

from orch.errors import Problem, ProblemsError

DRILL_ENV = "ORCH_DRILL"
POINTS = ("step", "save")
ACTIONS = ("kill", "raise", "nan")


class DrillError(RuntimeError):
    """What a ``raise`` drill raises: an error no code in orch expects."""


@dataclass(frozen=True)
class Drill:
    rank: int
    step: int
    during: str
    action: str = "kill"


EXAMPLE = ("set it like 'kill rank=1 step=7 during=step' (kill, raise or nan; during: step or "
           "save, nan during a step only)")
KEYS = ("rank", "step", "during")


def _why_not(words: list[str]) -> tuple[str, str] | None:
    """Why ``words`` are not a drill, and its fix; ``None`` when they are one. Every word after
    the action is ``key=value``, each key once: a word without ``=`` (``during save``) or a
    repeated key was once dropped, or took the last, and ran another drill than the one
    written."""
    if not words or words[0] not in ACTIONS:
        return "its first word must be kill, raise or nan", EXAMPLE
    seen: set[str] = set()
    for i, word in enumerate(words[1:], 1):
        key, eq, value = word.partition("=")
        if not eq:
            after = words[i + 1] if i + 1 < len(words) else ""
            if word in KEYS and after and "=" not in after:
                return f"{word!r} is not key=value", f"write {word}={after}"
            return f"{word!r} is not key=value", f"remove it, or {EXAMPLE}"
        if key not in KEYS:
            return f"{key!r} is not one of {', '.join(KEYS)}", EXAMPLE
        if key in seen:
            return f"{key} is given twice", f"give {key} once; {EXAMPLE}"
        seen.add(key)
    return None


def parse_drill(text: str) -> Drill:
    """``kill|raise rank=R step=S [during=step|save]``; ProblemsError naming the variable,
    the word at fault and its fix otherwise."""
    words = text.split()
    why = _why_not(words)
    if why is None:
        fields = dict(word.split("=", 1) for word in words[1:])
        try:
            drill = Drill(int(fields["rank"]), int(fields["step"]), fields.get("during", "step"),
                          words[0])
            if (drill.during not in POINTS or drill.rank < 0 or drill.step < 1
                    or (drill.action == "nan" and drill.during != "step")):
                raise ValueError
            return drill
        except (ValueError, KeyError):
            why = None
    message = f"{text!r} is not a drill" + (f": {why[0]}" if why else "")
    raise ProblemsError([Problem(DRILL_ENV, message, why[1] if why else EXAMPLE)],
                        title="invalid fault drill")


@cache
def _armed() -> Drill | None:
    """This process's drill, when the variable is set and this is the first attempt."""
    text = os.environ.get(DRILL_ENV)
    if not text or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    drill = parse_drill(text)
    return drill if drill.rank == int(os.environ.get("RANK", "0")) else None


def maybe_fail(point: str, step: int) -> None:
    """SIGKILL this process, or raise DrillError, if its drill is for ``point`` of ``step``."""
    drill = _armed()
    if drill is None or drill.action == "nan" or (drill.during, drill.step) != (point, step):
        return
    if drill.action == "raise":
        raise DrillError(f"drill: rank {drill.rank} raises during {point} {step}")
    print(f"orch: drill: rank {drill.rank} kills itself (SIGKILL) during {point} {step}",
          file=sys.stderr, flush=True)  # stderr: the terminal shows every rank's
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def nan_drill(models: list[nn.Module], step: int) -> Iterator[None]:
    """Within the block, the outputs of ``models`` (what this rank runs: its model, or each of
    its pipeline stages) are NaN if this process's drill is ``nan`` for ``step``."""
    drill = _armed()
    if drill is None or drill.action != "nan" or drill.step != step:
        yield
        return
    print(f"orch: drill: rank {drill.rank} makes its outputs NaN in step {step}",
          file=sys.stderr, flush=True)
    handles = [model.register_forward_hook(lambda _module, _args, out: out * float("nan"))
               for model in models]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["DRILL_ENV", "Drill", "DrillError", "maybe_fail", "nan_drill", "parse_drill"]
