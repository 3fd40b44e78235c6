"""Activation swapping: what a unit's forward saves for backward goes home to the CPU, and comes
back to the device, all of the unit's at once, when its backward begins.

The swap is a pair of saved-tensor hooks pushed around each unit's forward. Packing copies the
*storage* under a saved tensor home, once per storage (a block saves the same activation under
several views: ``x`` and its ``(batch * seq, dim)`` reshape for a matmul, the rotary tables in
every attention; copying per tensor sent 3.41 MB per tiny block where its storages are 2.61 MB),
and keeps a slot number and the view's offset, shape and strides; the unit's parameters and views
of them (such as ``weight.t()``) are kept as they are: their storage is the engine's, freed on
release and refilled when the unit is fetched for its backward. :meth:`ActivationSwap.fetch` brings
the unit's tensors back in one go, accounted against the device budget, before the unit's backward;
:meth:`ActivationSwap.release` drops them once its gradients have left. Copies are exact, so the
numbers equal the run that kept activations on the device.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

from orch.offload.budget import DeviceBudget

Packed = tuple[int, int, torch.dtype, int, tuple[int, ...], tuple[int, ...]] | torch.Tensor
"""A kept tensor, or (unit, slot, dtype, storage offset, shape, strides) of a swapped one."""


class ActivationSwap:
    """Saved activations of the units it wraps, at home on the CPU between forward and backward."""

    def __init__(self, device: torch.device, budget: DeviceBudget) -> None:
        self.device, self.budget = device, budget
        self._home: dict[int, list[torch.UntypedStorage]] = {}
        self._back: dict[int, list[torch.UntypedStorage]] = {}
        self._slots: dict[tuple[int, int], tuple[torch.UntypedStorage, int]] = {}
        """During a unit's forward: slot of each storage sent home, by address and version (the
        storage is referenced, so no new tensor can take its address before the forward ends;
        an in-place write in between makes a new version, copied again)."""
        self._held: dict[int, int] = {}
        self._active: dict[int, torch.autograd.graph.saved_tensors_hooks] = {}
        self.bytes_out = self.bytes_in = 0
        self.measured: dict[int, tuple[int, float]] = {}
        """Per unit, its first forward's bytes sent home and the seconds the copies took (what
        the automatic policy, :mod:`orch.offload.policy`, decides from)."""
        self._forward: list[float] = [0, 0.0]

    def enter(self, index: int, params: list[torch.Tensor]) -> None:
        """Start sending unit ``index``'s saved tensors home (the unit's forward begins);
        tensors on the storage of ``params`` (its device parameters) stay."""
        keep = {p.untyped_storage().data_ptr() for p in params}
        hooks = torch.autograd.graph.saved_tensors_hooks(partial(self._pack, index, keep),
                                                         self._unpack)
        hooks.__enter__()
        self._active[index] = hooks
        self._forward = [0, 0.0]
        self._home.setdefault(index, [])

    def exit(self, index: int) -> None:
        """Stop (the unit's forward ended)."""
        hooks = self._active.pop(index, None)
        if hooks is not None:
            hooks.__exit__(None, None, None)
            self.measured.setdefault(index, (int(self._forward[0]), self._forward[1]))
        self._slots.clear()

    def _pack(self, index: int, keep: set[int], tensor: torch.Tensor) -> Packed:
        storage = tensor.untyped_storage()
        if isinstance(tensor, nn.Parameter) or storage.data_ptr() in keep:
            return tensor
        key = (storage.data_ptr(), tensor._version)
        if key not in self._slots:
            start = time.perf_counter()
            home = self._home[index]
            copy = torch.empty(storage.nbytes(), dtype=torch.uint8).untyped_storage()
            home.append(copy.copy_(storage))
            self._slots[key] = (storage, len(home) - 1)
            self.bytes_out += storage.nbytes()
            self._forward[0] += storage.nbytes()
            self._forward[1] += time.perf_counter() - start
        slot = self._slots[key][1]
        return (index, slot, tensor.dtype, tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride())

    def _unpack(self, packed: Packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        index, slot, dtype, offset, shape, stride = packed
        self.fetch(index)
        storage = self._back[index][slot]
        return torch.empty(0, dtype=dtype, device=self.device).set_(storage, offset, shape, stride)

    def fetch(self, index: int) -> None:
        """Bring unit ``index``'s saved tensors back to the device (accounted), all at once."""
        if index in self._back or index not in self._home:
            return
        home = self._home[index]
        nbytes = sum(storage.nbytes() for storage in home)
        self.budget.take(nbytes, f"the saved activations of unit {index}")
        self._back[index] = [
            torch.empty(s.nbytes(), dtype=torch.uint8, device=self.device).untyped_storage()
            .copy_(s) for s in home]
        self._held[index] = nbytes
        self.bytes_in += nbytes

    def release(self, index: int) -> None:
        """Forget unit ``index``'s saved tensors (its backward is done)."""
        self._home.pop(index, None)
        if self._back.pop(index, None) is not None:
            self.budget.give(self._held.pop(index))


__all__ = ["ActivationSwap"]
