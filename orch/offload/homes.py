"""Where each unit's parameters and optimizer states rest between uses: CPU memory or NVMe.

On the cpu tier a parameter's ``data`` is its home and stays in memory. On the NVMe tier it is a
placeholder (right shape, no bytes) and the bytes are in the tier's file, one group per unit for
the parameters and one for the optimizer states; they come into memory only

- to be copied to the device (:meth:`Homes.params_to_copy`: read, copied, the buffer given
  back; nothing is written, the parameters did not change), and
- for the unit's optimizer step (:meth:`Homes.in_memory`: parameters and states read into
  place, stepped, written back, placeholders again), which also covers the states the
  optimizer creates on its first step, and
- for a checkpoint (:mod:`orch.offload.checkpoint_homes`): a save reads one tensor at a time
  (:meth:`Homes.stored`); a load gives one unit at a time memory without reading it
  (:meth:`Homes.in_memory` with ``fill=False``), after a fresh optimizer's states got their
  place without being written (:meth:`Homes.make_states`); so checkpoints are ordinary and
  reshardable without the whole model in CPU memory; and
- all at once (:meth:`Homes.all_in_memory`), to read a whole model's weights.

Parameters read from NVMe stay in memory after each use, kept by the tier for their next one
while the pinned budget has room (the copy due last gives way first): stepped, for the next
forward's fetch, which then neither reads the disk nor waits for the write; fetched for the
forward, for the backward (the last blocks come back first); fetched for the backward, for the
update (the first blocks are stepped first). The passes over the units are numbered
(:meth:`Homes.next_pass`) so that each kept copy says when it is due.

The optimizer states that go to NVMe are a parameter's non-scalar state tensors (AdamW's
moments, AdamW8bit's quantized moments and their block scales); the step counts stay.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from orch.offload.nvme import Due, NvmeTier, placeholder
from orch.offload.threads import helper_pool


class Homes:
    """The rest place of each unit's parameters (``units[i]``) and optimizer states; each unit
    is given its home by :meth:`place`."""

    def __init__(self, units: list[list[nn.Parameter]], tier: NvmeTier | None = None,
                 params_on_nvme: bool = False, optimizer_on_nvme: bool = False,
                 updated: Callable[[int], threading.Event] | None = None,
                 elsewhere: frozenset[int] = frozenset()) -> None:
        """``elsewhere``: units whose parameters rest on other replicas from the start
        (:meth:`rest_elsewhere`; never written here)."""
        if (params_on_nvme or optimizer_on_nvme) and tier is None:
            raise ValueError("an NVMe home needs an NvmeTier")
        self.units, self.tier = units, tier
        self.params_on_nvme, self.optimizer_on_nvme = params_on_nvme, optimizer_on_nvme
        self._updated = updated
        """Unit index -> the event set once its optimizer update has stepped it (a read-ahead
        waits for it; the bytes may still be on their way to disk, readable from memory)."""
        self._reader = helper_pool("orch-nvme-read")
        self._ahead: dict[int, Future[list[torch.Tensor]]] = {}
        """Reads ahead of a fetch (their own thread: each waits for its unit's update)."""
        self._update_reader = helper_pool("orch-nvme-prepare")
        self._prepared: dict[int, Future] = {}
        """Reads ahead of an optimizer step (:meth:`prepare`)."""
        self._writer = helper_pool("orch-nvme-write")
        self._passes = 0
        self.elsewhere: set[int] = set()
        """Units whose parameters rest on another replica (``offload.shard_params``): neither
        read, written nor brought into memory here (their states are the owner's too); set by
        :meth:`rest_elsewhere`."""
        self._resting: list[list[torch.Tensor]] = [[] for _ in units]
        """CPU homes: each unit's home tensors, the same objects for the whole run (the engine
        points ``param.data`` at device copies while a unit is fetched; another thread may read
        a home meanwhile). Filled by :meth:`place`."""
        self.rest_elsewhere(set(elsewhere))

    def place(self, index: int) -> None:
        """Unit ``index``'s parameters as they are now become its home: kept in CPU memory, or
        written to the NVMe file, leaving placeholders (so a model can be placed unit by unit,
        never all in memory). A unit resting elsewhere is let go: placeholders, nothing kept."""
        params = self.units[index]
        if index in self.elsewhere:
            for p in params:
                p.data = placeholder(p.data)
        elif self.params_on_nvme:
            self._put_params(index)
        else:
            self._resting[index] = [p.data for p in params]

    def next_pass(self) -> int:
        """Number the pass over the units that starts now (a forward, a backward, an update):
        a copy kept in pass ``n`` is due in pass ``n + 1``. Called from the trainer's thread."""
        self._passes += 1
        return self._passes

    # --- one unit ---------------------------------------------------------------------------

    @contextmanager
    def params_to_copy(self, index: int, keep: Due | None = None
                       ) -> Iterator[list[torch.Tensor]]:
        """Unit ``index``'s parameters as they rest, readable for the block's duration (from any
        thread); ``keep``: left in memory after, for a read due then."""
        if not self.params_on_nvme:
            yield self._resting[index]
            return
        assert self.tier is not None
        ahead = self._ahead.pop(index, None)
        views = ahead.result() if ahead is not None else None
        if views is None:  # no read ahead, or one that found no room
            views = self.tier.read(("params", index))
            assert views is not None
        try:
            yield views
        finally:
            self.tier.done(("params", index), keep)

    def rest_elsewhere(self, indices: set[int]) -> None:
        """The units ``indices`` rest on other replicas from now on: their homes here are let
        go (the caller leaves placeholders in their parameters)."""
        self.elsewhere = set(indices)
        for index in indices:
            self._resting[index] = []

    def read_ahead(self, index: int) -> None:
        """Start reading unit ``index``'s parameters from NVMe in the background, once its
        update has stepped it, so its fetch finds them in memory (the read overlaps the compute
        of the units before it; a copy the tier kept is taken without a read). Where the pinned
        pool has no room then, nothing is read and the fetch reads for itself: a read ahead that
        waited for room held the pool's room from the transfers it was waiting on (at the
        least ``offload.pinned_budget`` the plan accepts, the run hung)."""
        if not self.params_on_nvme or index in self._ahead:
            return
        assert self.tier is not None
        tier, updated = self.tier, self._updated

        def read() -> list[torch.Tensor] | None:
            if updated is not None:
                updated(index).wait()
            return tier.read(("params", index), wait=False)

        self._ahead[index] = self._reader.submit(read)

    def drop_reads_ahead(self) -> None:
        """Give back what reads ahead brought and nobody fetched (the end of a backward)."""
        assert self.tier is not None or not self._ahead
        for index, ahead in list(self._ahead.items()):
            if ahead.result() is not None:
                self.tier.done(("params", index))  # type: ignore[union-attr]
        self._ahead.clear()

    def prepare(self, index: int) -> None:
        """Start reading what unit ``index``'s optimizer step needs from NVMe (its parameters
        and states) in the background, while the unit before it is stepped; only as far as the
        pinned pool has room (:meth:`read_ahead`), the step reading the rest itself."""
        if (self.tier is None or index >= len(self.units) or index in self._prepared
                or index in self.elsewhere or not (self.params_on_nvme or self.optimizer_on_nvme)):
            return
        self._prepared[index] = self._update_reader.submit(self._read_ahead_for_update, index,
                                                           self._passes)

    def _read_ahead_for_update(self, index: int, due: int
                               ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """:meth:`prepare`'s read: the states, then the parameters, each only where the pool
        has room now; states read without their parameters' room are kept for the step (due in
        pass ``due``), which reads the parameters itself."""
        tier = self.tier
        assert tier is not None
        params = states = None
        if self.optimizer_on_nvme and tier.has(("optimizer", index)):
            if (states := tier.read(("optimizer", index), wait=False)) is None:
                return None, None
        if self.params_on_nvme:
            if (params := tier.read(("params", index), wait=False)) is None:
                if states is not None:
                    tier.done(("optimizer", index), keep=(due, index))
                return None, None
        return params, states

    def _read_for_update(self, index: int, staged: bool, states: bool = True,
                         fill: bool = True
                         ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Unit ``index``'s parameters and (``states``) optimizer states, as views (``fill``:
        :meth:`NvmeTier.read`)."""
        tier = self.tier
        assert tier is not None
        # the states (the larger group) first: holding them, the parameters need a range of
        # their size beside; with the pool at the plan's least (two units' parameters and one's
        # states) one is free wherever the states were put, once the other transfers are through
        state_views = (tier.read(("optimizer", index), staged, fill) if states
                       and self.optimizer_on_nvme and tier.has(("optimizer", index)) else None)
        params = tier.read(("params", index), staged, fill) if self.params_on_nvme else None
        return params, state_views

    @contextmanager
    def in_memory(self, index: int, optimizer: torch.optim.Optimizer | None,
                  staged: bool = True,
                  on_stored: Callable[[BaseException | None], None] | None = None,
                  fill: bool = True, keep: Due | None = None) -> Iterator[None]:
        """Unit ``index``'s parameters and ``optimizer``'s states for them (none without one)
        in memory, in place, for the block's duration; what the block changed is written back.
        ``staged=False`` reads into pageable memory instead of the pinned staging pool (many
        units at once); ``fill=False`` reads nothing, for a block that overwrites every
        parameter and state (a checkpoint load). ``keep``: the parameters stay in memory after
        their write, for a read due then.

        With ``on_stored`` the write-back runs behind, in a writer thread, and ``on_stored``
        is called once the bytes are on disk (with the error, if the write failed); the
        placeholders are in place when the block exits either way."""
        if index in self.elsewhere or not (self.params_on_nvme or self.optimizer_on_nvme):
            yield
            if on_stored is not None:
                on_stored(None)
            return
        prepared = self._prepared.pop(index, None)
        param_views, state_views = prepared.result() if prepared is not None else (None, None)
        if param_views is None and state_views is None:  # none, or one that found no room
            param_views, state_views = self._read_for_update(index, staged,
                                                             optimizer is not None, fill)
        params = self.units[index]
        if param_views is not None:
            for p, view in zip(params, param_views, strict=True):
                p.data = view
        entries = _state_entries(optimizer, params) if self.optimizer_on_nvme else []
        if state_views is not None:
            for (state, key), view in zip(entries, state_views, strict=True):
                state[key] = view
        try:
            yield
        finally:
            keys = []
            if self.params_on_nvme:
                keys.append(self._stage(("params", index), [(p, "data") for p in params], keep))
            entries = _state_entries(optimizer, params) if self.optimizer_on_nvme else []
            if entries:
                keys.append(self._stage(("optimizer", index), entries))
            if on_stored is None:
                self._flush(keys, None)
            else:
                self._writer.submit(self._flush, keys, on_stored)

    def _stage(self, key: tuple[str, int], slots: list[tuple[object, str]],
               keep: Due | None = None) -> tuple[str, int]:
        """Hand the tensors in ``slots`` (a parameter's ``data``, a state dict's entry) to the
        tier as group ``key``'s bytes to write (readable from memory until written, and after
        while kept), leaving placeholders in the slots."""
        assert self.tier is not None
        tensors = []
        for owner, slot in slots:
            if isinstance(owner, dict):
                tensors.append(owner[slot])
                owner[slot] = placeholder(owner[slot])
            else:
                tensors.append(getattr(owner, slot))
                setattr(owner, slot, placeholder(tensors[-1]))
        self.tier.stage(key, tensors, keep)
        return key

    def _flush(self, keys: list[tuple[str, int]],
               on_stored: Callable[[BaseException | None], None] | None) -> None:
        assert self.tier is not None
        error: BaseException | None = None
        try:
            for key in keys:
                self.tier.flush(key)
        except BaseException as exc:  # handed to on_stored: the trainer's thread raises it
            if on_stored is None:
                raise
            error = exc
        if on_stored is not None:
            on_stored(error)

    def _put_params(self, index: int) -> None:
        self._flush([self._stage(("params", index), [(p, "data") for p in self.units[index]])],
                    None)

    def make_states(self, index: int, optimizer: torch.optim.Optimizer,
                    make: Callable[[], None]) -> None:
        """Give unit ``index``'s parameters their ``optimizer`` states by ``make()`` (a zero
        step) and the states their place on NVMe, reading and writing nothing: before a
        checkpoint load, which overwrites both. Parameters on NVMe get memory for the call
        without being read (a zero step's states do not depend on their values) and rest as
        before; the states' region is reserved, not written."""
        params = self.units[index]
        if index in self.elsewhere or not (self.params_on_nvme or self.optimizer_on_nvme):
            make()
            return
        assert self.tier is not None
        resting = [p.data for p in params]
        if self.params_on_nvme:
            for p in params:
                p.data = torch.empty(p.shape, dtype=p.dtype)
        make()
        for p, stand_in in zip(params, resting, strict=True):
            p.data = stand_in
        entries = _state_entries(optimizer, params) if self.optimizer_on_nvme else []
        if entries:
            self.tier.reserve(("optimizer", index), [state[key] for state, key in entries])
            for state, key in entries:
                state[key] = placeholder(state[key])

    def stored(self, index: int, param: nn.Parameter, key: str | None,
               optimizer: torch.optim.Optimizer | None) -> torch.Tensor:
        """A copy of unit ``index``'s parameter ``param`` (``key`` None) or of its optimizer
        state ``key`` as it rests on NVMe, read alone (a checkpoint save reads one tensor at a
        time)."""
        assert self.tier is not None
        slots: list[tuple[nn.Parameter, str | None]]
        if key is None:
            group, slots = "params", [(p, None) for p in self.units[index]]
        else:
            group, slots = "optimizer", list(_state_keys(optimizer, self.units[index]))
        position = next(i for i, (p, k) in enumerate(slots) if p is param and k == key)
        return self.tier.read_one((group, index), position)

    # --- everything -------------------------------------------------------------------------

    @contextmanager
    def all_in_memory(self, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Every unit in memory, to read a whole model's weights (checkpoints go a tensor or a
        unit at a time instead)."""
        with ExitStack() as stack:
            for index in range(len(self.units)):
                if index not in self.elsewhere:
                    stack.enter_context(self.in_memory(index, optimizer, staged=False))
            yield

    def close(self) -> None:
        self._writer.shutdown()  # the writes behind are done (their units' events are set)
        self._update_reader.shutdown()
        self._reader.shutdown()
        if self.tier is not None:
            self.drop_reads_ahead()
            self.tier.close()


def _state_keys(optimizer: torch.optim.Optimizer | None,
                params: list[nn.Parameter]) -> list[tuple[nn.Parameter, str]]:
    """``(parameter, key)`` of each non-scalar state tensor of ``params`` (those an NVMe home
    holds), in the order the tier stores them."""
    if optimizer is None:
        return []
    keys = []
    for p in params:
        state = optimizer.state.get(p, {})
        keys += [(p, key) for key in sorted(state)
                 if isinstance(state[key], torch.Tensor) and state[key].dim() > 0]
    return keys


def _state_entries(optimizer: torch.optim.Optimizer | None,
                   params: list[nn.Parameter]) -> list[tuple[dict, str]]:
    """``(state dict, key)`` of each of :func:`_state_keys`."""
    if optimizer is None:
        return []
    return [(optimizer.state[p], key) for p, key in _state_keys(optimizer, params)]


__all__ = ["Homes"]
