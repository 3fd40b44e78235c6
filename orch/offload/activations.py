"""Activation swapping: what a unit's forward saves for backward goes home to the CPU, and comes
back to the device, all of the unit's at once, when its backward begins.

The swap is a pair of saved-tensor hooks pushed around each unit's forward. Packing copies the
*storage* under a saved tensor home, once per storage (a block saves the same activation under
several views: ``x`` and its ``(batch * seq, dim)`` reshape for a matmul, the rotary tables in
every attention; copying per tensor sent 3.41 MB per tiny block where its storages are 2.61 MB),
and keeps a slot number and the view's offset, shape and strides; the unit's parameters and views
of them (such as ``weight.t()``) are kept as they are: their storage is the engine's, freed on
release and refilled when the unit is fetched for its backward (tensors already in host memory
stay too). :meth:`ActivationSwap.fetch` brings the unit's tensors back in one go, accounted
against the device budget, before the unit's backward (or earlier,
:meth:`ActivationSwap.prefetch`, while the unit after it computes its backward);
:meth:`ActivationSwap.release` drops them once its gradients have left. Copies are exact, so the
numbers equal the run that kept activations on the device.

On CUDA the copies run on the engine's side stream (:mod:`orch.offload.transfers`) into pinned
memory, so the forward does not wait for them: each is queued after the kernel that made its
tensor, whose memory is kept until the copy has read it (``record_stream``). Nothing writes a
saved tensor between its save and its backward: autograd refuses such a backward when no hooks
are set (with hooks it cannot check), so a model that trains with activations on the device
trains the same with them swapped. Copies back are queued on the same stream, so they follow the
copies home, and the compute stream waits for them at the unit's first unpack. The first forward
of each unit waits for its copies (after the device is idle) so that the seconds it measures, for
the automatic policy, are the copies' own.

With an NVMe tier (``offload.activations: nvme``) a unit's copies go on from the CPU to the
tier's file once its forward ends (a writer thread; the CPU copies are dropped when written, so
CPU memory holds a unit or two of activations, not the whole forward's), and come back through
CPU memory for its backward: :meth:`ActivationSwap.read_ahead` starts the read of the unit
backward reaches next while the current one computes. Those reads and writes use pageable
buffers, not the pinned staging pool: the pool is sized for parameters and optimizer states,
and an activation read holding pool buffers while a parameter fetch waits on the pool could
deadlock the backward.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from functools import partial

import torch
from torch import nn

from orch.offload.budget import DeviceBudget
from orch.offload.nvme import NvmeTier
from orch.offload.policy import WarmTimes
from orch.offload.threads import helper_pool
from orch.offload.transfers import CopyDone, HostTransfers

Packed = tuple[int, int, torch.dtype, int, tuple[int, ...], tuple[int, ...]] | torch.Tensor
"""A kept tensor, or (unit, slot, dtype, storage offset, shape, strides) of a swapped one."""


class ActivationSwap:
    """Saved activations of the units it wraps, at home on the CPU (or on ``nvme``) between
    forward and backward."""

    def __init__(self, device: torch.device, budget: DeviceBudget, transfers: HostTransfers,
                 nvme: NvmeTier | None = None) -> None:
        self.device, self.budget, self.transfers, self.nvme = device, budget, transfers, nvme
        self._io = helper_pool("orch-activation-io") if nvme else None
        """Writes to and reads from the NVMe tier, in the order they were asked for."""
        self._spilled: dict[int, Future[None]] = {}
        """Units whose copies are (being) written to the tier, by index: the write's future."""
        self._ahead: dict[int, Future[list[torch.Tensor]]] = {}
        """Reads from the tier started ahead of a unit's backward."""
        self._home: dict[int, list[torch.UntypedStorage]] = {}
        self._back: dict[int, list[torch.UntypedStorage]] = {}
        self._slots: dict[tuple[int, int], tuple[torch.UntypedStorage, int]] = {}
        """During a unit's forward: slot of each storage sent home, by address and version (the
        storage is referenced, so no new tensor can take its address before the forward ends;
        an in-place write in between makes a new version, copied again)."""
        self._held: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        """Per unit, the bytes its last forward sent home."""
        self._landed: dict[int, CopyDone] = {}
        """Per unit, the end of its last copy home (later copies on the stream follow it)."""
        self._arrived: dict[int, CopyDone] = {}
        """Per unit fetched, the end of its copies back, until the compute stream waits for it."""
        self._active: dict[int, torch.autograd.graph.saved_tensors_hooks] = {}
        self.bytes_out = self.bytes_in = 0
        self.measured: dict[int, tuple[int, float]] = {}
        """Per unit, the bytes its forward sends home and the seconds the copies took: the first
        forward's, and while ``timing`` the fastest after the first (what the automatic policy,
        :mod:`orch.offload.policy`, decides from)."""
        self.timing = False
        """Time every forward's copies (the automatic policy's measuring steps)."""
        self._copy_s = WarmTimes()
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
        self._bytes.setdefault(index, 0)

    def exit(self, index: int) -> None:
        """Stop (the unit's forward ended)."""
        hooks = self._active.pop(index, None)
        if hooks is not None:
            hooks.__exit__(None, None, None)
            if self.timing or index not in self.measured:
                self._copy_s.add(index, self._forward[1])
                self.measured[index] = (int(self._forward[0]), self._copy_s.seconds[index])
            if self._io is not None and self._home.get(index):
                self._spilled[index] = self._io.submit(self._spill, index, self._home[index],
                                                       self._landed.get(index))
        self._slots.clear()

    def _spill(self, index: int, storages: list[torch.UntypedStorage],
               landed: CopyDone) -> None:
        """Write unit ``index``'s CPU copies to the tier once they have landed, then drop them
        (writer thread)."""
        assert self.nvme is not None
        self.transfers.host_wait(landed)
        self.nvme.write(("activations", index),
                        [torch.empty(0, dtype=torch.uint8).set_(s) for s in storages])
        storages.clear()

    def read_ahead(self, index: int) -> None:
        """Start reading unit ``index``'s activations back from the tier (after its write),
        so its backward finds them in memory; nothing to do for units kept on the CPU."""
        if index in self._spilled and index not in self._ahead:
            assert self._io is not None and self.nvme is not None
            self._ahead[index] = self._io.submit(self.nvme.read, ("activations", index), False)

    def _pack(self, index: int, keep: set[int], tensor: torch.Tensor) -> Packed:
        storage = tensor.untyped_storage()
        if (isinstance(tensor, nn.Parameter) or storage.data_ptr() in keep
                or tensor.device != self.device):  # host tensors hold no device memory
            return tensor
        key = (storage.data_ptr(), tensor._version)
        if key not in self._slots:
            measuring = self.timing or index not in self.measured
            if measuring:  # the timer sees the copy alone, not the kernels queued before it
                self.transfers.drain()
            start = time.perf_counter()
            home = self._home[index]
            copy = self.transfers.host_empty(storage.nbytes())
            landed = self._landed[index] = self.transfers.to_home(copy, _bytes_of(storage))
            if measuring:
                self.transfers.host_wait(landed)
            home.append(copy.untyped_storage())
            self._slots[key] = (storage, len(home) - 1)
            self.bytes_out += storage.nbytes()
            self._bytes[index] += storage.nbytes()
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
        self.transfers.wait(self._arrived.pop(index, None))
        storage = self._back[index][slot]
        return torch.empty(0, dtype=dtype, device=self.device).set_(storage, offset, shape, stride)

    def prefetch(self, index: int, spare: int) -> None:
        """Start bringing unit ``index``'s saved tensors back if the budget has room for them
        and ``spare`` bytes more, and they need no wait for the disk (a unit on the NVMe tier
        whose read has not ended is left for its :meth:`fetch`)."""
        if index in self._back or index not in self._home:
            return
        ahead = self._ahead.get(index)
        if index in self._spilled and (ahead is None or not ahead.done()):
            return
        if self.budget.fits(self._bytes[index] + spare):
            self.fetch(index)

    def fetch(self, index: int) -> None:
        """Bring unit ``index``'s saved tensors back to the device (accounted), all at once."""
        if index in self._back or index not in self._home:
            return
        spilled = index in self._spilled
        if spilled:
            self.read_ahead(index)
            home = self._ahead.pop(index).result()
        else:
            home = [torch.empty(0, dtype=torch.uint8).set_(s) for s in self._home[index]]
        nbytes = sum(t.numel() for t in home)
        self.budget.take(nbytes, f"the saved activations of unit {index}")
        back = [torch.empty_like(t, device=self.device) for t in home]
        # the tier's read buffers are dropped below: their copies must have ended by then
        self._arrived[index] = self.transfers.to_device(back, home, host_waits=spilled)
        self._back[index] = [t.untyped_storage() for t in back]
        if self._spilled.pop(index, None) is not None:
            self.nvme.done(("activations", index))  # type: ignore[union-attr]
        self._held[index] = nbytes
        self.bytes_in += nbytes

    def release(self, index: int) -> None:
        """Forget unit ``index``'s saved tensors (its backward is done)."""
        self._home.pop(index, None)
        self._bytes.pop(index, None)
        self._landed.pop(index, None)
        # copies back that no unpack waited for end before their device memory is reused
        self.transfers.wait(self._arrived.pop(index, None))
        if self._back.pop(index, None) is not None:
            self.budget.give(self._held.pop(index))
        spilled, ahead = self._spilled.pop(index, None), self._ahead.pop(index, None)
        if spilled is not None:  # written, never fetched (the backward did not reach the unit)
            spilled.result()
            if ahead is not None:
                ahead.result()
                self.nvme.done(("activations", index))  # type: ignore[union-attr]

    def close(self) -> None:
        """Finish the tier's reads and writes (before the tier's file goes)."""
        if self._io is not None:
            self._io.shutdown()


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """``storage``'s bytes as a flat uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


__all__ = ["ActivationSwap"]
