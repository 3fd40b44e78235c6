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

With gradients on NVMe (``offload.grads: nvme``, one process) a unit's buffer holds bytes only
while a backward adds to it: after each micro-batch's backward of the unit it is written to the
tier and freed, and read back before the next one adds (read, add, write: accumulation over
micro-batches stays exact). After the step's last, each gradient's norm is taken before the
write, so the clip needs no second pass over the disk (a deferred norm): the global norm is the
norm of those norms, as ``torch.nn.utils.get_total_norm`` forms it, and the clip's factor is
applied when the optimizer step reads each unit's gradients back (:meth:`GradientHomes.handover`),
so the numbers equal the CPU tier's bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from orch.offload.nvme import NvmeTier

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
                 pin: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """``pin``: makes a buffer page-locked where that lets copies into it run beside the
        compute (CUDA; not NVMe gradients, whose buffers are freed and grown again)."""
        self.units, self.tier = units, tier
        """``tier``: the NVMe tier the buffers rest in between backwards (None: CPU memory)."""
        self.group: dist.ProcessGroup | None = None
        """The replicas (a gloo group); None for one process."""
        self.owners: list[int] = []
        """With replicas: the rank each unit's gradients are summed onto (its owner)."""
        self.free_summed = False
        """With replicas sharing their parameters (``offload.shard_params``): a unit's buffer
        on the replicas that do not own it is freed once its sum has left, and grown again by
        the next backward that adds to it (:meth:`take_in`)."""
        self.of: dict[nn.Parameter, torch.Tensor] = {}
        """Each parameter's home gradient (a view into its unit's buffer)."""
        self._flat: list[torch.Tensor] = []
        self._pending: dict[int, dist.Work] = {}
        self._ready: set[int] = set()
        """Units whose gradients are final but whose sum waits for a later unit's to start."""
        self._next = len(units) - 1
        """The unit whose sum starts next (the backward's order: last unit first)."""
        for params in units:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ValueError(f"a unit's parameters must share one dtype, got {dtypes}")
            flat = torch.zeros(sum(p.numel() for p in params) + len(params),
                               dtype=dtypes.pop() if dtypes else None)
            if tier is None:
                flat = pin(flat)
            self.of |= zip(params, packed_views(flat, params), strict=True)
            self._flat.append(flat)
            if tier is not None:
                flat.untyped_storage().resize_(0)
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
        self._ready, self._next = set(), len(self.units) - 1

    def take_in(self, index: int) -> None:
        """Before a backward adds to unit ``index``'s gradients (NVMe, or a buffer freed after
        its sum): its buffer in memory again, holding this step's partial sums when an earlier
        micro-batch stored some (its first micro-batch copies, so fresh bytes need no zeros)."""
        flat = self._flat[index]
        if flat.untyped_storage().nbytes() > 0:
            return
        flat.untyped_storage().resize_(flat.numel() * flat.element_size())
        if self.tier is not None and index in self._stored:
            (stored,) = self.tier.read(("grads", index), staged=False)
            flat.copy_(stored)
            self.tier.done(("grads", index))

    def put_away(self, index: int, unreached: set[nn.Parameter], final: bool) -> None:
        """After a micro-batch's backward of unit ``index`` (NVMe): write its buffer to the tier
        and free it; after the step's last, first take each reached gradient's norm."""
        if self.tier is None or index in self._final or not self.units[index]:
            return
        flat = self._flat[index]
        if final:
            self._final.add(index)
            reached = [p for p in self.units[index] if p not in unreached]
            if not reached:  # no micro-batch of the step reached the unit: no gradients
                flat.untyped_storage().resize_(0)
                return
            self.take_in(index)  # a unit this micro-batch passed by: its earlier sums
            for p in reached:
                self._norms[p] = torch.linalg.vector_norm(self.of[p])
        if flat.untyped_storage().nbytes() == 0:  # nothing added since it was stored
            return
        self.tier.write(("grads", index), [flat])
        self._stored.add(index)
        flat.untyped_storage().resize_(0)

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The NVMe gradients' global norm over ``params`` (in that order, as the clip of the
        CPU tier forms it)."""
        norms = [self._norms[p] for p in params if p in self._norms]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def handover(self) -> GradsForUpdate | None:
        """For the optimizer step of the finished step (NVMe gradients; None otherwise): a
        context per unit in which its reached parameters' ``grad`` are read back and clipped.
        It keeps its own record of the step, which the next one may start beside it."""
        if self.tier is None:
            return None
        tier, stored, reached, scale = self.tier, set(self._stored), set(self._norms), self.scale

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
        """Sum unit ``index``'s gradients onto its owner, once per step, when no more gradients
        will be added (``unreached``: parameters this rank's micro-batches did not reach; their
        buffers hold an older step's and are zeroed first): started now if every later unit's
        sum has started, else once they have."""
        params = self.units[index]
        if self.group is None or index in self._pending or index in self._ready:
            return
        self.take_in(index)  # a unit this step's backward did not reach: its buffer was freed
        counts = self._flat[index][-len(params):] if params else self._flat[index][:0]
        for slot, p in enumerate(params):
            missed = p in unreached
            if missed:
                self.of[p].zero_()
            counts[slot] = 0.0 if missed else 1.0
        self._ready.add(index)
        while self._next in self._ready:
            self._ready.discard(self._next)
            if self.units[self._next]:
                self._pending[self._next] = dist.reduce(
                    self._flat[self._next], dst=self.owners[self._next], group=self.group,
                    async_op=True)
            self._next -= 1
        self._free_summed(wait=False)

    def _free_summed(self, wait: bool) -> None:
        """With :attr:`free_summed`: free the buffers of the units this replica does not own
        whose sums have left (all of them, waiting, with ``wait``)."""
        if not self.free_summed or self.group is None:
            return
        rank = dist.get_rank(self.group)
        for index, work in list(self._pending.items()):
            if self.owners[index] != rank and (wait or work.is_completed()):
                work.wait()
                del self._pending[index]
                self._flat[index].untyped_storage().resize_(0)

    def finish(self, unreached: set[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor | None]:
        """Every parameter's gradient for the step: its home gradient (with replicas: the
        replicas' mean on the unit's owner, None on the others), or None where no replica
        reached it; None for all with NVMe gradients (the optimizer step reads them back:
        :meth:`handover`)."""
        if self.tier is not None:
            return dict.fromkeys(self.of)
        if self.group is None:
            return {p: None if p in unreached else grad for p, grad in self.of.items()}
        replicas, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        for index in reversed(range(len(self.units))):  # units the backward left unfinished
            self.reduce(index, unreached)
        self._free_summed(wait=True)
        grads: dict[nn.Parameter, torch.Tensor | None] = {}
        for index, params in enumerate(self.units):
            if not params:
                continue
            if (work := self._pending.pop(index, None)) is not None:
                work.wait()
            if self.owners[index] != rank:
                grads.update(dict.fromkeys(params))
                continue
            flat = self._flat[index]
            flat[:-len(params)].div_(replicas)
            for p, count in zip(params, flat[-len(params):].tolist(), strict=True):
                grads[p] = self.of[p] if count > 0 else None
        return grads


__all__ = ["GradientHomes", "GradsForUpdate", "packed_views"]
