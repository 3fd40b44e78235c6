"""Offloaded replicas split the CPU optimizer step between them, unit by unit (ZeRO-Offload).

Each data-parallel replica keeps the whole model at home, but only one replica, the unit's
owner, holds a unit's optimizer states and steps it: the others send it their gradients of that
unit (a reduce, not an all-reduce) and receive its updated parameters (a broadcast) once it has
stepped. So each process holds about ``1 / replicas`` of the optimizer states and does that
share of the CPU optimizer work, as ZeRO-Offload's partitioned optimizer does, and the
parameters stay equal on every replica. Units go to owners by size (largest first, to the
least loaded replica), so the embedding and the head, often the largest units, land apart.

The clip needs the norm of every gradient, which only the owners hold: each replica norms its
own units' gradients, and one all-reduce of a vector with one entry per parameter (its norm on
its owner, zero elsewhere; -1 where no replica reached it) gives every replica the norms, in the
model's parameter order, from which the global norm forms as ``clip_grad_norm_`` forms it.

Checkpoints stay ordinary: each replica saves the states it owns (distinct keys) and the
replicated parameters once; a resume makes and loads only the states of the units it owns
(:mod:`orch.offload.checkpoint_homes`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from orch.offload.grad_homes import packed_views
from orch.parallel.comm_stats import dimension


def owners_by_size(unit_bytes: list[int], replicas: int) -> list[int]:
    """Each unit's owner: largest unit first, to the replica holding the fewest bytes so far
    (ties: the lower unit index, the lower rank), so every replica owns a similar share."""
    load = [0] * replicas
    owners = [0] * len(unit_bytes)
    for index in sorted(range(len(unit_bytes)), key=lambda i: (-unit_bytes[i], i)):
        owner = min(range(replicas), key=lambda r: (load[r], r))
        owners[index] = owner
        load[owner] += unit_bytes[index]
    return owners


class Partition:
    """Which replica steps which unit, and the collectives that keep the replicas equal.

    ``group``: every replica (ranks in it are global ranks: pure replication spans the world);
    collectives from the optimizer's background thread run on a group of their own, so they
    never interleave with the training thread's.
    """

    def __init__(self, units: list[list[nn.Parameter]], group: dist.ProcessGroup) -> None:
        replicas = dist.get_world_size(group)
        if len(units) < replicas:
            raise ValueError(f"{replicas} replicas need at least as many units; the model has "
                             f"{len(units)}")
        self.units, self.group = units, group
        self.rank = dist.get_rank(group)
        self.owners = owners_by_size(
            [sum(p.numel() * p.element_size() for p in params) for params in units], replicas)
        self._sharing = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
        self._unit_of = {p: index for index, unit in enumerate(units) for p in unit}
        self.params_sharded = False
        """Replicas keep only their own units' parameters (:mod:`orch.offload.param_shards`):
        a stepped unit is not sent to the others, who fetch it from its owner per use."""

    def owns(self, index: int) -> bool:
        return self.owners[index] == self.rank

    def share(self, index: int) -> None:
        """Every replica: unit ``index``'s parameters as its owner has just stepped them (one
        broadcast of the unit's parameters packed together)."""
        params = self.units[index]
        if not params:
            return
        packed = (torch.cat([p.data.reshape(-1) for p in params]) if self.owns(index)
                  else torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype))
        with dimension("dp"):  # a group of its own, no mesh's
            dist.broadcast(packed, src=self.owners[index], group=self._sharing)
        if not self.owns(index):
            for p, part in zip(params, packed_views(packed, params), strict=True):
                p.data.copy_(part)

    def global_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The norm of every replica's owned gradients together (``params``: the model's, in
        order; a parameter without ``grad`` on its owner counts as unreached)."""
        norms = torch.zeros(len(params))
        for slot, p in enumerate(params):
            if self.owns(self._unit_of[p]):
                norms[slot] = -1.0 if p.grad is None else torch.linalg.vector_norm(p.grad)
        with dimension("dp"):  # the replicas' group is no mesh's (on CUDA)
            dist.all_reduce(norms, group=self.group)
        reached = norms[~(norms < 0)]  # a NaN norm is reached: NaN >= 0 is False too
        return torch.linalg.vector_norm(reached) if reached.numel() else torch.zeros(())


__all__ = ["Partition", "owners_by_size"]
