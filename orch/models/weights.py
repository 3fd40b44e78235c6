"""Where a model's first weights come from, one parameter at a time.

A :class:`WeightSource` writes one parameter's starting values, by name, into a tensor the caller
allocated. That lets every run build its model on the meta device (shapes only) and give each
piece memory only where it will live:

- an offloaded model is filled unit by unit straight into its home tier
  (:func:`orch.offload.engine.offload_transformer`): an NVMe-homed model never has all its
  parameters in CPU memory at once, and a replica that shares its parameters
  (``offload.shard_params``) never allocates the units other replicas own;
- any other model is pruned to the rank's pipeline stages and sharded (tensor, expert and FSDP
  data parallelism) first, and then each rank allocates and fills only its share
  (:func:`materialize`, called by ``orch.runtime.parallelize``), as torchtitan does.

Two sources: orch's seeded initialization (:class:`SeededInit`) and a HuggingFace checkpoint
(:class:`orch.models.hf_load.HFCheckpoint`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard  # FSDP2's over TP or EP

from orch.models.moe import INIT_STD


class WeightSource(Protocol):
    """Starting values by parameter name (``model.named_parameters()``'s names)."""

    def fill(self, name: str, into: torch.Tensor) -> None:
        """Write parameter ``name``'s whole values into ``into`` (its full shape; on the CPU, or
        on the device a parameter was allocated on)."""
        ...


@runtime_checkable
class ShardSource(Protocol):
    """A :class:`WeightSource` that can also read just the elements a shard holds: a checkpoint
    on disk (where every rank reading every whole tensor to keep its share multiplies the
    reads by the ranks sharing it), not a random stream (whose draws depend on the order)."""

    def fill_shard(self, name: str, into: torch.Tensor, index: list[torch.Tensor]) -> None:
        """Write parameter ``name``'s elements at the global indices ``index`` (one ascending
        index tensor per dim: :func:`shard_indices`) into ``into``, of their shape."""
        ...


class SeededInit:
    """orch's initialization: norm weights 1, biases 0, everything else N(0, 0.02), drawn from
    one CPU generator in the model's parameter order, so the weights are the same on every
    device and layout for a seed.

    Parameters must be filled in that order, but any may be left out (a replica that does not
    hold them): the values a skipped parameter would take are drawn and dropped, so every
    parameter filled gets exactly what filling the whole model gives it.
    """

    def __init__(self, model: nn.Module, seed: int) -> None:
        self._order = [(name, p.shape) for name, p in model.named_parameters()]
        self._next = 0
        self._gen = torch.Generator().manual_seed(seed)

    def fill(self, name: str, into: torch.Tensor) -> None:
        while self._next < len(self._order):
            current, shape = self._order[self._next]
            self._next += 1
            constant = 1.0 if current.endswith("norm.weight") else (
                0.0 if current.endswith(".bias") else None)  # drawn for neither
            if constant is None:  # drawn in float32 whatever the parameter's dtype
                values = torch.empty(shape).normal_(0.0, INIT_STD, generator=self._gen)
            if current == name:
                if constant is not None:
                    into.fill_(constant)
                else:
                    into.copy_(values)
                return
        raise ValueError(f"{name!r} is not a parameter after the ones already filled: "
                         "SeededInit fills in the model's parameter order")


def meta_to_placeholders(model: nn.Module) -> None:
    """Replace each parameter of ``model`` on the meta device by a CPU parameter of its shape
    and dtype that holds no bytes (tied parameters stay tied): what a :class:`WeightSource`
    fills once memory is given to it. Meta parameters cannot take CPU data (``param.data =``
    refuses a change of device type); these can, one at a time."""
    done: dict[nn.Parameter, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                if p not in done:
                    done[p] = nn.Parameter(placeholder(p), requires_grad=p.requires_grad)
                setattr(module, name, done[p])


class Unfilled:
    """No values: parameters keep what their allocation left, for a run that resumes from a
    checkpoint, whose load overwrites every one of them (drawing orch's init or reading
    ``model.init_from`` first would be a whole model's work thrown away at every restart)."""

    def fill(self, name: str, into: torch.Tensor) -> None:
        pass


def placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor shaped like ``tensor`` that holds no bytes (its storage has size 0)."""
    empty = torch.empty(tensor.shape, dtype=tensor.dtype)
    empty.untyped_storage().resize_(0)
    return empty


def is_placeholder(tensor: torch.Tensor) -> bool:
    """``tensor`` has elements but its storage holds no bytes (:func:`placeholder`)."""
    return tensor.numel() > 0 and tensor.untyped_storage().size() == 0


def shard_indices(param: DTensor) -> list[torch.Tensor]:
    """The global indices, one ascending tensor per dim, of the elements ``param``'s local
    shard holds: per dim, a 1-d ``arange`` distributed with the placements that split that dim
    (DTensor's own split, and FSDP2's strided one over tensor or expert parallelism, which is
    no ``Shard``), the others replicated; nothing is communicated."""
    index = []
    for dim, size in enumerate(param.shape):
        placements = [p if isinstance(p, Shard | _StridedShard) and p.dim == dim
                      else Replicate() for p in param.placements]
        positions = torch.arange(size).view([size if d == dim else 1 for d in range(param.ndim)])
        local = distribute_tensor(positions, param.device_mesh, placements,
                                  src_data_rank=None).to_local()
        index.append(local.flatten().cpu())
    return index


@torch.no_grad()
def fill_all(model: nn.Module, source: WeightSource) -> None:
    """Every parameter of ``model`` (already allocated) from ``source``, in parameter order.

    A DTensor parameter (sharded by tensor, expert or data parallelism) gets its local shard:
    from a :class:`ShardSource`, only its elements are read (:func:`shard_indices`); else its
    full values are made on the CPU (one parameter at a time) and split as its placements say,
    the same split on every rank without communication, since every rank's source gives the
    same values."""
    if isinstance(source, Unfilled):  # nothing to write, so no full-size copy per shard either
        return
    for name, p in model.named_parameters():
        into = p.data
        if isinstance(into, DTensor) and isinstance(source, ShardSource):
            source.fill_shard(name, into.to_local(), shard_indices(into))
        elif isinstance(into, DTensor):
            full = torch.empty(into.shape, dtype=into.dtype)
            source.fill(name, full)
            local = into.to_local()
            shard = distribute_tensor(full.to(local.device), into.device_mesh, into.placements,
                                      src_data_rank=None)
            local.copy_(shard.to_local())
        else:
            source.fill(name, into)


def materialize(model: nn.Module, device: torch.device, source: WeightSource,
                roots: list[nn.Module] | None = None) -> None:
    """Give ``model`` (orch's Transformer) built on the meta device (maybe pruned to a pipeline
    rank's stages and sharded already) memory on ``device`` and its values from ``source``: each
    rank allocates only what it holds, never the whole model first. ``roots``: the modules that
    together hold all of ``model``'s, through which to allocate (FSDP roots, which must reset the
    sharded parameters they manage; pipeline stages that share ``model``'s modules); default
    ``model``. Buffers are computed again (``model.init_buffers()``) and moved to ``device``."""
    ties = _ties(model)
    for root in roots or [model]:
        root.to_empty(device=device)
    for (first, first_name), *others in ties:  # a meta -> device move gives each use its own
        for module, name in others:
            if getattr(module, name) is not getattr(first, first_name):
                setattr(module, name, getattr(first, first_name))
    model.init_buffers()  # type: ignore[operator]
    buffers_to(model, device)
    fill_all(model, source)


def _ties(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Each parameter held by more than one module (tied embeddings), as (module, name) uses."""
    uses: dict[nn.Parameter, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            uses.setdefault(p, []).append((module, name))
    return [held for held in uses.values() if len(held) > 1]


def buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move ``model``'s buffers (RoPE tables, MoE balancing state) to ``device``."""
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))


__all__ = ["SeededInit", "ShardSource", "Unfilled", "WeightSource", "buffers_to", "fill_all",
           "is_placeholder", "materialize", "meta_to_placeholders", "placeholder",
           "shard_indices"]
