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
and the job can show it resumes from the newest complete checkpoint. Without the variable
nothing here does anything.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from functools import cache

from orch.errors import Problem, ProblemsError

DRILL_ENV = "ORCH_DRILL"
POINTS = ("step", "save")
ACTIONS = ("kill", "raise")


class DrillError(RuntimeError):
    """What a ``raise`` drill raises: an error no code in orch expects."""


@dataclass(frozen=True)
class Drill:
    rank: int
    step: int
    during: str
    action: str = "kill"


def parse_drill(text: str) -> Drill:
    """``kill|raise rank=R step=S [during=step|save]``; ProblemsError naming the variable
    otherwise."""
    words = text.split()
    fields = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    try:
        if not words or words[0] not in ACTIONS or set(fields) - {"rank", "step", "during"}:
            raise ValueError
        drill = Drill(int(fields["rank"]), int(fields["step"]), fields.get("during", "step"),
                      words[0])
        if drill.during not in POINTS or drill.rank < 0 or drill.step < 1:
            raise ValueError
    except (ValueError, KeyError):
        raise ProblemsError([Problem(DRILL_ENV, f"{text!r} is not a drill",
                                     "set it like 'kill rank=1 step=7 during=step' (kill or "
                                     "raise; during: step or save)")],
                            title="invalid fault drill") from None
    return drill


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
    if drill is None or (drill.during, drill.step) != (point, step):
        return
    if drill.action == "raise":
        raise DrillError(f"drill: rank {drill.rank} raises during {point} {step}")
    print(f"orch: drill: rank {drill.rank} kills itself (SIGKILL) during {point} {step}",
          file=sys.stderr, flush=True)  # stderr: the terminal shows every rank's
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["DRILL_ENV", "Drill", "DrillError", "maybe_fail", "parse_drill"]
