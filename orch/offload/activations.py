"""Activation swapping: what a unit's forward saves for backward goes home to the CPU, and comes
back to the device, all of the unit's at once, when its backward begins.

The swap is a pair of saved-tensor hooks pushed around each unit's forward. Packing copies a
saved tensor home and keeps only a slot number; the unit's parameters and views of them (such as
``weight.t()``) are kept as they are: their storage is the engine's, freed on release and
refilled when the unit is fetched for its backward. :meth:`ActivationSwap.fetch` brings the
unit's tensors back in one go, accounted against the device budget, before the unit's backward;
:meth:`ActivationSwap.release` drops them once its gradients have left. Copies are exact, so the
numbers equal the run that kept activations on the device.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from orch.offload.budget import DeviceBudget

Packed = tuple[int, int] | torch.Tensor


class ActivationSwap:
    """Saved activations of the units it wraps, at home on the CPU between forward and backward."""

    def __init__(self, device: torch.device, budget: DeviceBudget) -> None:
        self.device, self.budget = device, budget
        self._home: dict[int, list[torch.Tensor]] = {}
        self._back: dict[int, list[torch.Tensor]] = {}
        self._held: dict[int, int] = {}
        self._active: dict[int, torch.autograd.graph.saved_tensors_hooks] = {}
        self.bytes_out = self.bytes_in = 0

    def enter(self, index: int, params: list[torch.Tensor]) -> None:
        """Start sending unit ``index``'s saved tensors home (the unit's forward begins);
        tensors on the storage of ``params`` (its device parameters) stay."""
        keep = {p.untyped_storage().data_ptr() for p in params}
        hooks = torch.autograd.graph.saved_tensors_hooks(partial(self._pack, index, keep),
                                                         self._unpack)
        hooks.__enter__()
        self._active[index] = hooks
        self._home.setdefault(index, [])

    def exit(self, index: int) -> None:
        """Stop (the unit's forward ended)."""
        hooks = self._active.pop(index, None)
        if hooks is not None:
            hooks.__exit__(None, None, None)

    def _pack(self, index: int, keep: set[int], tensor: torch.Tensor) -> Packed:
        if isinstance(tensor, nn.Parameter) or tensor.untyped_storage().data_ptr() in keep:
            return tensor
        home = self._home[index]
        home.append(tensor.to("cpu", copy=True))
        self.bytes_out += tensor.numel() * tensor.element_size()
        return index, len(home) - 1

    def _unpack(self, packed: Packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        index, slot = packed
        self.fetch(index)
        return self._back[index][slot]

    def fetch(self, index: int) -> None:
        """Bring unit ``index``'s saved tensors back to the device (accounted), all at once."""
        if index in self._back or index not in self._home:
            return
        home = self._home[index]
        nbytes = sum(t.numel() * t.element_size() for t in home)
        self.budget.take(nbytes, f"the saved activations of unit {index}")
        self._back[index] = [t.to(self.device, copy=True) for t in home]
        self._held[index] = nbytes
        self.bytes_in += nbytes

    def release(self, index: int) -> None:
        """Forget unit ``index``'s saved tensors (its backward is done)."""
        self._home.pop(index, None)
        if self._back.pop(index, None) is not None:
            self.budget.give(self._held.pop(index))


__all__ = ["ActivationSwap"]
