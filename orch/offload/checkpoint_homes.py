"""An offloaded run's state in a checkpoint, one tensor or one unit in memory at a time.

A checkpoint of an offloaded run is an ordinary DCP checkpoint, with a device run's keys and
values (orch's flattened state dicts), so it resumes onto any plan and any plan's resumes onto
it. What differs is where the bytes are: with NVMe homes the model and its optimizer states may
be larger than the machine's memory (that is what the tier is for), so they never come into
CPU memory all at once:

- First the optimizer has a state for every parameter it steps here. A fresh optimizer (a
  resume) makes them unit by unit (:func:`~orch.offload.cpu_step.zero_step`), each unit in
  memory only for that step, and on NVMe they get their place without a byte read or written
  (the load overwrites them); torch's ``get_state_dict`` would make them all at once, in
  memory, with the same zero step.
- ``get_state_dict`` then holds placeholders (no bytes) where the bytes rest on NVMe or, with
  ``offload.shard_params``, on another replica: the :class:`Resting` entries.
- A save leaves the entries resting on another replica to their owner and writes those on NVMe
  through :class:`ReadingSavePlanner`, which reads each from the tier alone as DCP writes it.
- A load first reads everything else in place with the ranks together (CPU homes, step counts,
  hyperparameters); torch's optimizer loader, which copies or casts every state tensor, never
  sees a placeholder (:meth:`CheckpointHomes.states_kept`). Then each unit on NVMe gets memory
  for its parameters and states (nothing read from the tier: the checkpoint overwrites it all),
  its entries are read from the checkpoint into it by this process alone, and it is written
  back (:meth:`CheckpointHomes.load_units`).

So beyond the CPU homes, a save holds at most one file's tensors (DCP's writer keeps them until
the file closes: :mod:`orch.runtime.checkpoint.bounded_files`) and a load one unit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from orch.kernels.adamw8bit.loading import repair_orphaned_second_moments_
from orch.models.weights import is_placeholder
from orch.offload.cpu_step import zero_step

if TYPE_CHECKING:
    from orch.offload.engine import OffloadEngine

State = dict[str, dict[str, Any]]
"""``{"model": ..., "optim": ...}``: torch's model and flattened optimizer state dicts."""


@dataclass(frozen=True, eq=False)
class Resting:
    """A state-dict entry whose bytes are not in this process's memory."""

    part: str
    """``"model"`` or ``"optim"``: which state dict holds it."""
    key: str
    unit: int
    param: nn.Parameter
    state_key: str | None
    """The optimizer state's key (``exp_avg``); None for the parameter itself."""
    elsewhere: bool
    """On another replica (``offload.shard_params``), else on this process's NVMe file."""
    stand_in: torch.Tensor
    """The placeholder the state dict held: the entry's shape and dtype."""


class ReadingSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, except that the tensors ``readers`` names (by the identity of
    the placeholder in the state dict) are read when DCP writes them, one at a time."""

    def __init__(self, readers: dict[int, Callable[[], torch.Tensor]]) -> None:
        super().__init__()
        self._readers = readers

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type != WriteItemType.BYTE_IO:
            reader = self._readers.get(id(self.lookup_object(write_item.index)))
            if reader is not None:
                return reader()
        return super().resolve_data(write_item)


class CheckpointHomes:
    """``engine``'s offloaded state, saved and loaded with ``optimizer``'s (module docstring)."""

    def __init__(self, engine: OffloadEngine, optimizer: torch.optim.Optimizer) -> None:
        self.engine, self.optimizer, self.homes = engine, optimizer, engine.homes
        self._params = {name: (unit.index, p) for unit in engine.units
                        for name, p in zip(unit.param_names, unit.params, strict=True)}

    def prepare(self, loading: bool = False) -> None:
        """Before ``get_state_dict``: the last update is on its home tiers, and a fresh
        optimizer has its states, made unit by unit for the units this replica steps. Before a
        load (``loading``) that reads and writes nothing on NVMe (the load overwrites both the
        parameters and the states: :meth:`~orch.offload.homes.Homes.make_states`); before a
        save the zero states are written, to be saved."""
        self.engine.wait_updates()
        if self.optimizer.state:
            return
        partition = self.engine.partition
        for unit in self.engine.units:
            if partition is not None and not partition.owns(unit.index):
                continue
            step = partial(zero_step, self.optimizer, unit.params)
            if loading:
                self.homes.make_states(unit.index, self.optimizer, step)
                continue
            with self.homes.in_memory(unit.index, self.optimizer, staged=False):
                step()

    def save_planner(self, state: State) -> ReadingSavePlanner | None:
        """The planner that saves ``state``: entries resting on another replica are taken out
        (their owner saves them), those on NVMe here are read from the tier as DCP writes
        them; None when nothing rests on NVMe here (DCP's own planner will do)."""
        readers: dict[int, Callable[[], torch.Tensor]] = {}
        for entry in self._resting(state):
            if entry.elsewhere:
                del state[entry.part][entry.key]
            else:
                readers[id(entry.stand_in)] = partial(self.homes.stored, entry.unit, entry.param,
                                                      entry.state_key, self.optimizer)
        return ReadingSavePlanner(readers) if readers else None

    def set_aside(self, state: State) -> list[Resting]:
        """Before a load: take every entry whose bytes are not in memory out of ``state`` (a
        load cannot copy into a placeholder) and return them for :meth:`load_units`."""
        resting = list(self._resting(state))
        for entry in resting:
            del state[entry.part][entry.key]
        return resting

    @contextmanager
    def states_kept(self, resting: list[Resting]) -> Iterator[None]:
        """Around torch's optimizer loader, which replaces every state: the placeholders of
        the states resting on NVMe come back after it (it would copy or cast them, and they
        hold no bytes; their values come with :meth:`load_units`)."""
        kept = [(e.param, e.state_key, self.optimizer.state[e.param][e.state_key])
                for e in resting if e.state_key is not None and not e.elsewhere]
        yield
        for param, key, stand_in in kept:
            self.optimizer.state[param][key] = stand_in

    def load_units(self, resting: list[Resting], read: Callable[[State], None]) -> None:
        """Each unit with entries on NVMe in ``resting``, one at a time: memory for its
        parameters and states, ``read`` loads its entries into it (a state dict shaped like
        the one they were set aside from), then they are written back. These states never pass
        through the optimizer's loader, so AdamW8bit's repair of states saved by older versions
        (``repair_orphaned_second_moments_``) runs on them here, before the write."""
        by_unit: dict[int, list[Resting]] = defaultdict(list)
        for entry in resting:
            if not entry.elsewhere:
                by_unit[entry.unit].append(entry)
        for index in sorted(by_unit):
            # nothing read from NVMe: the checkpoint overwrites every parameter and state there
            with self.homes.in_memory(index, self.optimizer, staged=False, fill=False):
                state: State = {}
                for entry in by_unit[index]:
                    into = (entry.param.data if entry.state_key is None
                            else self.optimizer.state[entry.param][entry.state_key])
                    state.setdefault(entry.part, {})[entry.key] = into
                read(state)
                for param in dict.fromkeys(e.param for e in by_unit[index] if e.state_key):
                    repair_orphaned_second_moments_(self.optimizer.state[param])

    def _resting(self, state: State) -> Iterator[Resting]:
        """The entries of ``state`` that hold placeholders, located in their units."""
        for part, entries in state.items():
            for key, value in list(entries.items()):
                if not (isinstance(value, torch.Tensor) and is_placeholder(value)):
                    continue
                name, state_key = key, None
                if part == "optim":  # flattened: state.<parameter name>.<state key>
                    name, state_key = key.removeprefix("state.").rsplit(".", 1)
                if name not in self._params:
                    raise RuntimeError(f"checkpoint entry {part}.{key} holds no bytes and no "
                                       "offloaded unit holds it")
                unit, param = self._params[name]
                yield Resting(part, key, unit, param, state_key, unit in self.homes.elsewhere,
                              value)


__all__ = ["CheckpointHomes", "ReadingSavePlanner", "Resting"]
