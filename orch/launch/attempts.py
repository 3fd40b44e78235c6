"""The attempts of one launch on this node: each failure torchrun restarts after
(``--max-restarts``) reported as the last one is, and no restart where one cannot help.

torchrun's agent restarts every worker after any failure and logs only the first failed
process's exit code, so a run that lived through a restart showed a traceback and a resume but
never which ranks failed and why; a failure on bad input (exit 2: a checkpoint damaged in a way
only the workers' hashing finds) ran again, the same way, until the restarts were spent; and a
pipeline's re-partition exit (``REBALANCE_EXIT``) was taken for a failure, spending a restart,
with the launcher's plan left on the old split.

torchrun builds its agent by one name, ``torch.distributed.launcher.api.LocalElasticAgent``;
while a launch runs, :func:`consulted_on_restarts` puts a subclass there whose
``_monitor_workers`` asks :meth:`Attempts.restart` before a restart, and takes away the restarts
left when told no. The agent then stops the workers and torchrun raises ``ChildFailedError`` as
after the last attempt, which the launcher reports (:meth:`Attempts.final`) or, for a
re-partition, answers by running torchrun again on the new split with the restarts this launch
has left. The subclass asks the launch of its own thread (a context variable), and stays in place
while any launch of the process runs (launches in threads overlap).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from orch.errors import PlanError
from orch.launch.failures import ForcedKills, WorkerFailure, oom_kills, summary, worker_failures
from orch.parallel.pipeline.rebalance import REBALANCE_EXIT, read_rebalance


class Attempts:
    """This node's attempts at one launch, numbered across torchrun's restarts (a rerun after
    a re-partition spends none, and keeps the number)."""

    def __init__(self, run_dir: Path, node: str, nodes: int, max_restarts: int) -> None:
        self.run_dir, self.node, self.nodes = run_dir, node, nodes
        self.max_restarts = max_restarts
        self.restarts = 0
        """Restarts spent so far: ``number - 1``."""
        self.forced = ForcedKills()  # on torchrun's log while it runs: the workers it SIGKILLed
        self._ooms: int | None = None
        self._rebalance: dict | None = None

    @property
    def number(self) -> int:
        return self.restarts + 1

    @property
    def restarts_left(self) -> int:
        """What torchrun's ``--max-restarts`` is for its next run."""
        return self.max_restarts - self.restarts

    def start(self) -> None:
        """Before each attempt: what a failure is then measured against."""
        self._ooms = oom_kills()
        self._rebalance = read_rebalance(self.run_dir)

    def repartitioned(self, failures: dict[int, Any]) -> bool:
        """Whether the workers stopped to re-partition the pipeline: one exited with
        ``REBALANCE_EXIT`` and the run directory has a new re-partition record (the others may
        have been stopped by torchrun before they exited themselves)."""
        if REBALANCE_EXIT not in {failure.exitcode for failure in failures.values()}:
            return False
        try:
            return read_rebalance(self.run_dir) not in (None, self._rebalance)
        except PlanError:  # damaged meanwhile: the workers' failure is what to report
            return False

    def restart(self, failures: dict[int, Any]) -> bool:
        """Whether torchrun should restart every worker after ``failures`` (it has restarts
        left): not for a re-partition (the launcher runs torchrun again on the new split), nor,
        on one node, after bad input, which a restart would meet again (on several, each node
        decides alone: one that stopped would leave the others' restart waiting for it until
        the rendezvous times out, so all restart as torchrun does); else this attempt's report,
        and yes."""
        if self.repartitioned(failures):
            return False
        found = self._failures(failures)
        if self.nodes == 1 and _bad_input(found):
            return False
        left = self.restarts_left - 1
        print(summary(found, f"orch launch: attempt {self.number} of {self.max_restarts + 1} "
                             f"failed on node {self.node}; restarting every worker ({left} "
                             f"restart{'s' * (left != 1)} left after this one)", self.node,
                      self.nodes),
              file=sys.stderr, flush=True)
        self.restarts += 1
        self.start()
        return True

    def final(self, failures: dict[int, Any]) -> int:
        """Report the failure that ends the launch; its exit code: 2 when it was bad input
        (:func:`_bad_input`, as a refused launch), else 1."""
        found = self._failures(failures)
        bad_input = _bad_input(found)
        headline = f"orch launch: training failed on node {self.node}"
        if self.number > 1:
            headline += f" after {self.number} attempts"
        if bad_input and self.restarts_left and self.nodes == 1:
            headline += " (not restarted: a restart would meet the same bad input)"
        print(summary(found, headline, self.node, self.nodes), file=sys.stderr, flush=True)
        return 2 if bad_input else 1

    def _failures(self, failures: dict[int, Any]) -> list[WorkerFailure]:
        oom_rose = self._ooms is not None and (oom_kills() or 0) > self._ooms
        return worker_failures(failures, self.run_dir, oom_rose, self.forced.pids)


def _bad_input(found: list[WorkerFailure]) -> bool:
    """Whether the failure was bad input: every rank that failed on its own stopped on it (the
    others torchrun stopped after it, or lost it as a peer)."""
    causes = [f for f in found if f.primary]
    return bool(causes) and all(f.kind == "bad input" for f in causes)


_RESTART: ContextVar[Callable[[dict[int, Any]], bool] | None] = ContextVar("orch_restart",
                                                                           default=None)
_LOCK = threading.Lock()


class _Standing:
    """While launches run: torch's agent class, whose place the subclass takes, and how many
    launches hold it there (under ``_LOCK``)."""

    torch_agent: Any = None
    holders = 0


@contextmanager
def consulted_on_restarts(restart: Callable[[dict[int, Any]], bool]) -> Iterator[None]:
    """While torchrun runs in this block (in this thread), its agent calls
    ``restart(failures)`` (failures by global rank, as in ``ChildFailedError``) when workers
    failed and it has restarts left, and restarts them only when that says yes."""
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerState

    with _LOCK:
        if not _Standing.holders:
            torch_agent = launcher_api.LocalElasticAgent

            class ConsultingAgent(torch_agent):  # type: ignore[misc, valid-type]
                def _monitor_workers(self, worker_group: Any) -> RunResult:
                    result = super()._monitor_workers(worker_group)
                    ask = _RESTART.get()
                    if (ask is not None and result.state == WorkerState.FAILED
                            and self._remaining_restarts > 0 and not ask(result.failures)):
                        self._remaining_restarts = 0
                    return result

            _Standing.torch_agent = torch_agent
            launcher_api.LocalElasticAgent = ConsultingAgent
        _Standing.holders += 1
    token = _RESTART.set(restart)
    try:
        yield
    finally:
        _RESTART.reset(token)
        with _LOCK:
            _Standing.holders -= 1
            if not _Standing.holders:
                launcher_api.LocalElasticAgent = _Standing.torch_agent


__all__ = ["Attempts", "consulted_on_restarts"]
