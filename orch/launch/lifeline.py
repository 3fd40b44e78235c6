"""Workers end with their launcher, however the launcher ends.

A launcher that is signalled (Ctrl-C, Slurm's SIGTERM) ends its workers itself, through
torchrun. One killed outright (SIGKILL, an out-of-memory kill, a node agent's cleanup) cannot:
its workers went on training and saving checkpoints into the run directory whose lock
(:mod:`orch.launch.run_lock`) had died with the launcher, so a second launch could start beside
them. So each worker asks the kernel to kill it when the process that started it, its launcher,
ends (Linux's ``PR_SET_PDEATHSIG``); the launcher's pid, passed in the environment, catches a
launcher that ended before the worker asked.
"""

from __future__ import annotations

import os
import signal
import sys

from orch.offload.host_memory import libc

LAUNCHER_PID = "ORCH_LAUNCHER_PID"
"""Environment variable: the pid of the ``orch launch`` process that starts the workers."""

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent ends."""


def mark_launcher() -> None:
    """In the launcher, before torchrun starts workers (they inherit the environment)."""
    os.environ[LAUNCHER_PID] = str(os.getpid())


def end_with_launcher() -> None:
    """In a worker: be killed when the launcher ends; exit at once if it already has. Nothing
    outside Linux, or for a worker not started by ``orch launch`` (plain torchrun)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux") or (c := libc()) is None:
        return
    c.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(launcher):  # gone before the call above: nobody would reap us
        print(f"orch worker: its launcher (pid {launcher}) has ended; not starting",
              file=sys.stderr, flush=True)
        os._exit(1)


__all__ = ["LAUNCHER_PID", "end_with_launcher", "mark_launcher"]
