"""Gradients at home in CPU memory: one flat buffer per unit, averaged over data-parallel replicas.

Offloaded training on several processes replicates the model (``parallel.dp_replicate``): each
process keeps the whole model at home and runs its share of the batch, so the gradients are
averaged over the replicas before the clip and the CPU optimizer step, as DDP would average
them on the device, onto the replica that steps the unit (its owner,
:mod:`orch.offload.partition`). They are CPU tensors by then (the engine moves each home as
autograd produces it), so the sum runs on a gloo group whatever the device's backend: one
reduce per unit, started as soon as the unit's last backward of the step is through, so it
overlaps the backward of the units before it. Every replica starts them in the same order, the
backward's (last unit first), a unit's sum held back until every later unit's has started:
a replica whose micro-batches missed a parameter of a unit (an expert no token chose) is through
with that unit only at the end of its backward, and starting the units backward reaches next
before it would pair its collectives with other units on the other replicas. Each unit's buffer
ends with one count per parameter of the replicas that reached it: a parameter that no
replica's micro-batches reached (an expert no token chose) gets no gradient, as in one process,
and one that only some reached gets the replicas' mean with zeros for the others, as DDP gives.

With gradients on NVMe (``offload.grads: nvme``, one process) a unit's buffer is in memory only
while a backward adds to it, in one of a few locked buffers (:mod:`orch.offload.grad_staging`):
after each micro-batch's backward of the unit it is written to the tier behind, and read back before
the next one adds (read, add, write: accumulation over micro-batches stays exact). After the step's
last, each gradient's norm is taken before the write, so the clip needs no second pass over the disk
(a deferred norm): the global norm is the norm of those norms, as ``torch.nn.utils.get_total_norm``
forms it, and the clip's factor is applied when the optimizer step reads each unit's gradients back
(:meth:`GradientHomes.handover`), so the numbers equal the CPU tier's bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from orch.models.weights import placeholder
from orch.offload.grad_staging import GradientStaging
from orch.offload.nvme import NvmeTier
from orch.parallel.comm_stats import dimension

GradsForUpdate = Callable[[int], AbstractContextManager]
"""Unit index -> a context in which its parameters' ``grad`` are the step's (clipped) gradients."""


def packed_views(buffer: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Views of ``buffer``'s leading elements shaped like ``params``, packed one after another
    (a unit's gradients in its buffer, a unit's parameters in one broadcast)."""
    sizes = [p.numel() for p in params]
    return [part.view_as(p)
            for part, p in zip(buffer[:sum(sizes)].split(sizes), params, strict=True)]


class GradientHomes:
    """The home gradient of every parameter of ``units`` (lists of parameters), as views into
    one flat buffer per unit; with :attr:`group` set, averaged over its ranks."""

    def __init__(self, units: list[list[nn.Parameter]], tier: NvmeTier | None = None,
                 pin: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                 register: Callable[[torch.Tensor], Callable[[], None]] = lambda t: lambda: None
                 ) -> None:
        """``pin``: makes a buffer page-locked where that lets copies into it run beside the
        compute (CUDA); ``register`` does so in place, for NVMe gradients' locked buffers
        (:meth:`~orch.offload.transfers.HostTransfers.register`)."""
        self.units, self.tier = units, tier
        """``tier``: the NVMe tier the buffers rest in between backwards (None: CPU memory)."""
        self.group: dist.ProcessGroup | None = None
        """The replicas (a gloo group); None for one process."""
        self.owners: list[int] = []
        """With replicas: the rank each unit's gradients are summed onto (its owner)."""
        self.free_summed = False
        """With replicas sharing their parameters (``offload.shard_params``): every micro-batch
        sums its gradients onto the owners, and a unit's buffer on the replicas that do not own
        it is freed once its sum has left, and grown again by the next backward that adds to it
        (:meth:`take_in`). The owner keeps its own micro-batches' gradients in its buffer, as
        one process would, and the others' sums beside them until the step's end."""
        self.of: dict[nn.Parameter, torch.Tensor] = {}
        """Each parameter's home gradient (a view into its unit's buffer)."""
        self._flat: list[torch.Tensor] = []
        self._pending: dict[int, dist.Work] = {}
        """The sum in flight of each unit (at most one: a unit's next waits for it)."""
        self._started: set[int] = set()
        """Units whose sum of this step (with :attr:`free_summed`: this micro-batch) started,
        or is held back in :attr:`_ready`."""
        self._ready: dict[int, torch.Tensor] = {}
        """Units whose gradients are final but whose sum waits for a later unit's to start:
        the buffer that goes into the sum."""
        self._next = len(units) - 1
        """The unit whose sum starts next (the backward's order: last unit first)."""
        self._incoming: dict[int, torch.Tensor] = {}
        """With :attr:`free_summed`, on the owner: the buffer a sum in flight lands in."""
        self._others: dict[int, torch.Tensor] = {}
        """With :attr:`free_summed`, on the owner: the other replicas' sums so far this step."""
        for params in units:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ValueError(f"a unit's parameters must share one dtype, got {dtypes}")
            flat = (torch.zeros if tier is None else torch.empty)(
                sum(p.numel() for p in params) + len(params),
                dtype=dtypes.pop() if dtypes else None)
            if tier is None:
                flat = pin(flat)
            else:  # bytes only while a backward adds (:meth:`take_in`)
                tier.reserve(("grads", len(self._flat)), [flat])
            self._flat.append(flat)
            self._point_at(len(self._flat) - 1, flat if tier is None else None)
        self.staging = None if tier is None else GradientStaging(
            tier, max(flat.numel() * flat.element_size() for flat in self._flat), register)
        """With NVMe gradients: the locked buffers a unit's gradients gather in."""
        self._taken: set[int] = set()
        """With NVMe gradients: units whose buffer is in memory (:meth:`take_in`)."""
        self._stored: set[int] = set()
        """Units whose buffer (this step's partial sums) is on the NVMe tier."""
        self._final: set[int] = set()
        """Units whose gradients for this step are complete (on NVMe, with their norms)."""
        self._norms: dict[nn.Parameter, torch.Tensor] = {}
        """With NVMe gradients: each reached parameter's gradient norm, taken before the write."""
        self.scale: torch.Tensor | None = None
        """The clip's factor for this step's NVMe gradients (None: not clipped)."""

    def start_step(self) -> None:
        """A new step: its first micro-batch copies into the buffers (nothing to read back)."""
        self._stored, self._final, self._norms, self.scale = set(), set(), {}, None
        self._started, self._ready, self._next = set(), {}, len(self.units) - 1
        self._others = {}

    def end_micro_batch(self) -> None:
        """After a micro-batch's backward (every unit's sum started): with
        :attr:`free_summed` the next micro-batch sums its own, in the same order again."""
        if self.free_summed:
            self._started, self._ready, self._next = set(), {}, len(self.units) - 1

    def take_in(self, index: int) -> None:
        """Before a backward adds to unit ``index``'s gradients (NVMe, or a buffer freed after
        its sum): its buffer in memory again, holding this step's partial sums when an earlier
        micro-batch stored some (its first micro-batch copies, so fresh bytes need no zeros)."""
        if index in self._pending and not self.owns(index):
            self._collect(index)  # its last sum must have read the buffer
        if self.staging is not None:
            if index not in self._taken:
                self._taken.add(index)
                self._point_at(index, self.staging.take(("grads", index),
                                                        fill=index in self._stored))
                before = index - 1  # the backward's next unit: its earlier sums, read ahead
                if before in self._stored and not {before} & (self._taken | self._final):
                    self.staging.read_ahead(("grads", before))
            return
        flat = self._flat[index]
        if flat.untyped_storage().nbytes() == 0:
            flat.untyped_storage().resize_(flat.numel() * flat.element_size())

    def _point_at(self, index: int, flat: torch.Tensor | None) -> None:
        """Unit ``index``'s gradients are ``flat`` from now on; None: placeholders (NVMe
        gradients between uses)."""
        params = self.units[index]
        if flat is None:
            self._flat[index] = placeholder(self._flat[index])
            self.of.update((p, placeholder(p)) for p in params)
        else:
            self._flat[index] = flat
            self.of.update(zip(params, packed_views(flat, params), strict=True))

    def put_away(self, index: int, unreached: set[nn.Parameter], final: bool) -> None:
        """After a micro-batch's backward of unit ``index`` (NVMe): write its buffer to the tier
        (behind) and let it go; after the step's last, first take each reached gradient's
        norm."""
        if self.staging is None or index in self._final or not self.units[index]:
            return
        added = index in self._taken  # else nothing was added since it was stored
        if final:
            self._final.add(index)
            reached = [p for p in self.units[index] if p not in unreached]
            if reached:
                self.take_in(index)  # a unit this micro-batch passed by: its earlier sums
                for p in reached:
                    self._norms[p] = torch.linalg.vector_norm(self.of[p])
            added = added and bool(reached)  # none reached: no gradients, nothing to write
        if index not in self._taken:  # a backward that passed it by: a read ahead, if any, goes
            self.staging.cancel(("grads", index))
            return
        flat, key = self._flat[index], ("grads", index)
        self._taken.discard(index)
        self._point_at(index, None)
        if added:
            self.staging.put(key, flat)
            self._stored.add(index)
        else:
            self.staging.drop(key, flat)

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The NVMe gradients' global norm over ``params`` (in that order, as the clip of the
        CPU tier forms it)."""
        norms = [self._norms[p] for p in params if p in self._norms]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def handover(self) -> GradsForUpdate | None:
        """For the optimizer step of the finished step (NVMe gradients; None otherwise): a
        context per unit in which its reached parameters' ``grad`` are read back and clipped.
        It keeps its own record of the step, which the next one may start beside it."""
        if self.staging is None:
            return None
        self.staging.wait()  # every write of the step is on disk, before it is read back
        tier, stored, reached, scale = (self.staging.tier, set(self._stored), set(self._norms),
                                        self.scale)

        @contextmanager
        def grads_for(index: int) -> Iterator[None]:
            params = self.units[index]
            if index not in stored:
                yield
                return
            (flat,) = tier.read(("grads", index), staged=False)
            for p, grad in zip(params, packed_views(flat, params), strict=True):
                if p in reached:
                    p.grad = grad.mul_(scale) if scale is not None else grad
            try:
                yield
            finally:
                for p in params:
                    p.grad = None
                tier.done(("grads", index))

        return grads_for

    def reduce(self, index: int, unreached: set[nn.Parameter]) -> None:
        """Sum unit ``index``'s gradients onto its owner, once per step (with
        :attr:`free_summed`, once per micro-batch), when no more gradients will be added
        (``unreached``: parameters this rank's micro-batches did not reach; their buffers hold
        an older step's and are zeroed first): started now if every later unit's sum has
        started, else once they have. With :attr:`free_summed` the owner puts in nothing and
        receives the others' sums beside its buffer."""
        if self.group is None or index in self._started:
            return
        self._started.add(index)
        if self.free_summed and self.owns(index):
            self._collect(index)  # the last micro-batch's sum lands first (a fixed order)
            buffer = self._incoming[index] = torch.zeros_like(self._flat[index])
        else:
            self.take_in(index)  # a unit this backward did not reach: its buffer was freed
            buffer = self._flat[index]
            self._mark_reached(index, unreached)
        self._ready[index] = buffer
        while self._next in self._ready:
            unit, summed = self._next, self._ready.pop(self._next)
            if self.units[unit]:
                with dimension("dp"):  # the replicas' group is no mesh's (on CUDA)
                    self._pending[unit] = dist.reduce(summed, dst=self.owners[unit],
                                                      group=self.group, async_op=True)
            self._next -= 1
        for unit, work in list(self._pending.items()):  # let what has landed go
            if work.is_completed():
                self._collect(unit)

    def _mark_reached(self, index: int, unreached: set[nn.Parameter]) -> None:
        """Zero the gradients of unit ``index``'s parameters in ``unreached`` and count one
        replica for each of the others (the counts that end the unit's buffer)."""
        params = self.units[index]
        counts = self._flat[index][-len(params):] if params else self._flat[index][:0]
        for slot, p in enumerate(params):
            missed = p in unreached
            if missed:
                self.of[p].zero_()
            counts[slot] = 0.0 if missed else 1.0

    def _collect(self, index: int) -> None:
        """Wait for unit ``index``'s sum in flight, if any; with :attr:`free_summed`, add what
        the owner received to the others' sums so far, or free the sender's buffer."""
        work = self._pending.pop(index, None)
        if work is None:
            return
        work.wait()
        if not self.free_summed:
            return
        if self.owns(index):
            received = self._incoming.pop(index)
            if index in self._others:
                self._others[index].add_(received)
            else:
                self._others[index] = received
        else:
            self._flat[index].untyped_storage().resize_(0)

    def close(self) -> None:
        """End the NVMe gradients' writes and give back their buffers (before the tier closes)."""
        if self.staging is not None:
            self.staging.close()

    def owns(self, index: int) -> bool:
        """This replica sums unit ``index``'s gradients (its owner; one process owns all)."""
        return self.group is None or self.owners[index] == dist.get_rank(self.group)

    def finish(self, unreached: set[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor | None]:
        """Every parameter's gradient for the step: its home gradient (with replicas: the
        replicas' mean on the unit's owner, None on the others), or None where no replica
        reached it; None for all with NVMe gradients (the optimizer step reads them back:
        :meth:`handover`)."""
        if self.tier is not None:
            return dict.fromkeys(self.of)
        if self.group is None:
            return {p: None if p in unreached else grad for p, grad in self.of.items()}
        replicas = dist.get_world_size(self.group)
        if not self.free_summed:  # units the backward left unfinished (with free_summed every
            for index in reversed(range(len(self.units))):  # micro-batch's backward sums all)
                self.reduce(index, unreached)
        grads: dict[nn.Parameter, torch.Tensor | None] = {}
        for index, params in enumerate(self.units):
            self._collect(index)
            if not params:
                continue
            if not self.owns(index):
                grads.update(dict.fromkeys(params))
                continue
            flat = self._flat[index]
            if self.free_summed:  # its own micro-batches' sum, then the others'
                self._mark_reached(index, unreached)
                if (others := self._others.pop(index, None)) is not None:
                    flat.add_(others)
            flat[:-len(params)].div_(replicas)
            for p, count in zip(params, flat[-len(params):].tolist(), strict=True):
                grads[p] = self.of[p] if count > 0 else None
        return grads


__all__ = ["GradientHomes", "GradsForUpdate", "packed_views"]
