"""Gradients at home in CPU memory: one flat buffer per unit, averaged over data-parallel replicas.

Offloaded training on several processes replicates the model (``parallel.dp_replicate``): each
process keeps the whole model at home and runs its share of the batch, so the gradients are
averaged over the replicas before the clip and the CPU optimizer step, as DDP would average
them on the device. They are CPU tensors by then (the engine moves each home as autograd
produces it), so the average runs on a gloo group whatever the device's backend: one
all-reduce per unit, started as soon as the unit's last backward of the step is through, so it
overlaps the backward of the units before it. Each unit's buffer ends with one count per
parameter of the replicas that reached it: a parameter that no replica's micro-batches reached
(an expert no token chose) gets no gradient, as in one process, and one that only some reached
gets the replicas' mean with zeros for the others, as DDP gives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GradientHomes:
    """The home gradient of every parameter of ``units`` (lists of parameters), as views into
    one flat buffer per unit; with :attr:`group` set, averaged over its ranks."""

    def __init__(self, units: list[list[nn.Parameter]]) -> None:
        self.units = units
        self.group: dist.ProcessGroup | None = None
        """The replicas (a gloo group); None for one process."""
        self.of: dict[nn.Parameter, torch.Tensor] = {}
        """Each parameter's home gradient (a view into its unit's buffer)."""
        self._flat: list[torch.Tensor] = []
        self._pending: dict[int, dist.Work] = {}
        for params in units:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ValueError(f"a unit's parameters must share one dtype, got {dtypes}")
            sizes = [p.numel() for p in params]
            flat = torch.zeros(sum(sizes) + len(params), dtype=dtypes.pop() if dtypes else None)
            for p, view in zip(params, flat[:sum(sizes)].split(sizes), strict=True):
                self.of[p] = view.view_as(p)
            self._flat.append(flat)

    def reduce(self, index: int, unreached: set[nn.Parameter]) -> None:
        """Start averaging unit ``index``'s gradients over the replicas, once per step, when no
        more gradients will be added (``unreached``: parameters this rank's micro-batches did not
        reach; their buffers hold an older step's and are zeroed first)."""
        params = self.units[index]
        if self.group is None or index in self._pending or not params:
            return
        counts = self._flat[index][-len(params):]
        for slot, p in enumerate(params):
            missed = p in unreached
            if missed:
                self.of[p].zero_()
            counts[slot] = 0.0 if missed else 1.0
        self._pending[index] = dist.all_reduce(self._flat[index], group=self.group,
                                               async_op=True)

    def finish(self, unreached: set[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor | None]:
        """Every parameter's gradient for the step: its home gradient (the replicas' mean), or
        None where no replica reached it."""
        if self.group is None:
            return {p: None if p in unreached else grad for p, grad in self.of.items()}
        replicas = dist.get_world_size(self.group)
        grads: dict[nn.Parameter, torch.Tensor | None] = {}
        for index, params in enumerate(self.units):
            if not params:
                continue
            self.reduce(index, unreached)  # a unit the backward never passed through
            self._pending.pop(index).wait()
            flat = self._flat[index]
            flat[:-len(params)].div_(replicas)
            for p, count in zip(params, flat[-len(params):].tolist(), strict=True):
                grads[p] = self.of[p] if count > 0 else None
        return grads


__all__ = ["GradientHomes"]
