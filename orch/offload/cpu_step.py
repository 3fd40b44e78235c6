"""The optimizer step of offloaded parameters, on the CPU, unit by unit, beside the next forward.

The clip needs the global gradient norm, so no unit can be updated before the whole backward is
done (updating earlier with unclipped gradients would change the numbers). What can overlap is
the update and the next step's forward: the embedding is updated first, then each block in
order, in a background thread, while the trainer starts the next step; the engine waits for a
unit's update only when that unit is fetched (``wait``). The update is the trainer's own
optimizer (torch AdamW, orch's AdamW8bit), stepped on one unit's parameters at a time through a
shallow copy that shares its ``state``, so checkpoints see one optimizer and the numbers are the
unsplit step's exactly (foreach updates are per tensor). With NVMe homes the thread asks
:class:`~orch.offload.homes.Homes` to read the next unit's parameters and states while it steps
one, and the write-back runs behind: a unit's fetch waits only until it is stepped (its
parameters stay readable in memory while they are written, and kept after for that fetch while
the pinned budget has room), checkpoints until every byte is on disk.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from orch.errors import OrchError
from orch.offload.grad_homes import GradsForUpdate
from orch.offload.homes import Homes
from orch.offload.partition import Partition
from orch.offload.threads import helper_thread


class UnitUpdates:
    """Runs ``optimizer``'s step for each unit's parameters in order, in a background thread."""

    def __init__(self, units: list[list[nn.Parameter]], homes: Homes) -> None:
        self.units, self.homes = units, homes
        """Brings a unit's parameters and states into memory around its step (NVMe homes): the
        next unit's are read while one is stepped, and written behind it."""
        self._stepped = [threading.Event() for _ in units]
        """Set once a unit's parameters are stepped (and shared with the other replicas)."""
        self._done = [threading.Event() for _ in units]
        """Set once a unit's update is on its home tier."""
        for event in self._stepped + self._done:
            event.set()
        self.partition: Partition | None = None
        """With data-parallel replicas: a unit is stepped by its owner only, which then sends
        its parameters to the others (:mod:`orch.offload.partition`)."""
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.seconds = self.waited = self._started = 0.0
        self.last: tuple[float, float] | None = None
        """The previous finished update's seconds, and the seconds the trainer waited for it;
        None while no update has run before the current one (a launch's first step)."""

    def start(self, optimizer: torch.optim.Optimizer,
              grads_for: GradsForUpdate | None = None) -> None:
        """Update every unit from its parameters' current ``grad`` (set by the engine), or from
        what ``grads_for(unit)`` puts there (gradients on NVMe), with the hyperparameters the
        optimizer's groups hold now; grads are dropped once used."""
        self.wait_all()
        self.last = (self.seconds, self.waited) if self._started else None  # 0.0: none yet
        steppers = [_unit_optimizer(optimizer, set(params)) for params in self.units]
        for event in self._stepped + self._done:
            event.clear()
        self.seconds = self.waited = 0.0
        self._started = time.perf_counter()
        due = self.homes.next_pass() + 1  # the next forward's, which fetches in this order
        self._thread = helper_thread("orch-cpu-optimizer", self._run, optimizer, steppers,
                                     grads_for, due)
        self._thread.start()

    def _run(self, optimizer: torch.optim.Optimizer, steppers: list[torch.optim.Optimizer],
             grads_for: GradsForUpdate | None, due: int) -> None:
        try:
            for index, (stepper, params) in enumerate(zip(steppers, self.units, strict=True)):
                mine = self.partition is None or self.partition.owns(index)
                with self.homes.in_memory(index, optimizer if mine else None,
                                          on_stored=partial(self._stored, index),
                                          keep=(due, index)), (
                        grads_for(index) if grads_for else nullcontext()):
                    # the next unit's read starts once this one's is through: begun before, it
                    # could take the room this one's own read then waits for
                    self.homes.prepare(index + 1)
                    if mine:
                        stepper.step()
                    for p in params:
                        p.grad = None
                    if self.partition is not None and not self.partition.params_sharded:
                        self.partition.share(index)  # the owner's parameters to every replica
                self._stepped[index].set()
        except BaseException as exc:  # re-raised in the trainer's thread by wait()
            self._error = exc
            for event in self._stepped + self._done:
                event.set()

    def _stored(self, index: int, error: BaseException | None) -> None:
        """Unit ``index``'s update is on its home tier (or failed with ``error``); the update's
        seconds run to the last unit's write-back, which may end after the steps do."""
        if error is not None:
            self._error = error
        if index == len(self.units) - 1:
            self.seconds = time.perf_counter() - self._started
        self._done[index].set()

    def stepped_event(self, index: int) -> threading.Event:
        """Set once unit ``index`` is stepped (for threads that must not read it before)."""
        return self._stepped[index]

    def wait(self, index: int) -> None:
        """Block until unit ``index`` is stepped (its fetch may then read it)."""
        self._wait(self._stepped[index])

    def _wait(self, event: threading.Event) -> None:
        if not event.is_set():
            start = time.perf_counter()
            event.wait()
            self.waited += time.perf_counter() - start
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OrchError):  # the user's to fix (a full disk): said as it is
                raise error
            raise RuntimeError("the CPU optimizer step failed") from error

    def wait_all(self) -> None:
        """Block until the whole update is on its home tiers (before a checkpoint, a clip, the
        end)."""
        for event in self._done:
            self._wait(event)
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _unit_optimizer(optimizer: torch.optim.Optimizer,
                    params: set[nn.Parameter]) -> torch.optim.Optimizer:
    """``optimizer`` restricted to ``params``: same state dict object, groups copied now (so a
    learning rate set for the next step does not leak into this update)."""
    view = object.__new__(type(optimizer))  # not copy.copy: Optimizer.__getstate__ keeps
    view.__dict__.update(optimizer.__dict__)  # only defaults, state and groups
    view.param_groups = [dict(group, params=[p for p in group["params"] if p in params])
                         for group in optimizer.param_groups]
    return view


@torch.no_grad()
def zero_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Give ``params`` their optimizer states without changing them: one step on zero
    gradients at learning rate 0, as torch's ``get_state_dict`` does for a fresh optimizer
    (there for every parameter at once; here for one unit, whose states may then go to NVMe
    before the next unit's are made)."""
    view = _unit_optimizer(optimizer, set(params))
    for group in view.param_groups:
        group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    trained = [p for p in params if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    view.step()
    for p in trained:
        p.grad = None


__all__ = ["UnitUpdates", "zero_step"]
