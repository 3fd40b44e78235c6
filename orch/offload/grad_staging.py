"""Gradients on their way to NVMe: a unit's gradients gather in a locked buffer, written behind.

With ``offload.grads: nvme`` a unit's gradients are in memory only while a backward adds to them
(:mod:`orch.offload.grad_homes`). Their buffer was pageable memory, freed after each write and
grown again for the next backward, and it cost twice over: on CUDA a copy into pageable memory
is synchronous, so every gradient's way home stalled the backward on the host (the copies of the
other homes run beside the compute from pinned memory, :mod:`orch.offload.transfers`); and the
write to disk ran in the backward's thread, with a second pageable copy of the buffer for it.

Here the buffers are :data:`~orch.offload.sizes.NVME_GRAD_BUFFERS` locked ones of the largest
unit's gradient bytes, made once by the tier's I/O (aligned, so the disk reads and writes them
directly) and registered with CUDA: the backward's copies land in one asynchronously, its write
runs in a writer thread while the backward goes on to the next unit, whose gradients gather in
another, and the stored gradients of the unit after that (from an earlier micro-batch) are read
ahead into the third, in a reader thread. A unit's buffer is filled again only once its last
write is through (the two share the file's region). A read ahead takes only a buffer free at
the time (else the unit's own backward reads it); and when the backward holds every buffer
itself (a unit's last gradient can arrive after the next unit's first), a pageable one, for
that unit only, is made rather than waiting for a buffer only this thread could give back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from orch.offload.blockio import aligned
from orch.offload.nvme import NvmeTier
from orch.offload.sizes import NVME_GRAD_BUFFERS
from orch.offload.threads import helper_pool


class GradientStaging:
    """Locked buffers for the NVMe tier's gradient groups (``("grads", index)``), written behind
    (see the module docstring)."""

    def __init__(self, tier: NvmeTier, nbytes: int,
                 register: Callable[[torch.Tensor], Callable[[], None]]) -> None:
        """``nbytes``: the largest group's; ``register``: makes a buffer one the device copies
        to directly, returning the undo (:meth:`~orch.offload.transfers.HostTransfers.register`)."""
        self.tier = tier
        align = tier.io.align
        self._locked = [tier.io.buffer(aligned(max(nbytes, 1), align))
                        for _ in range(NVME_GRAD_BUFFERS)]
        self._unregister = [register(buffer) for buffer in self._locked]
        self._free = list(self._locked)
        self._writing = 0
        """Buffers out for a write (each comes back when its write ends)."""
        self._cond = threading.Condition()
        self._writer = helper_pool("orch-grads-write")
        self._writes: dict[object, Future[None]] = {}
        """The last write of each group, while it may be running."""
        self._reader = helper_pool("orch-grads-read")
        self._ahead: dict[object, Future[torch.Tensor]] = {}
        """Reads ahead of a :meth:`take`, by group."""

    def take(self, key: object, fill: bool) -> torch.Tensor:
        """Group ``key``'s one tensor in a buffer of its own until :meth:`put` or :meth:`drop`:
        its stored bytes read in with ``fill`` (or by a read ahead), else as the buffer held
        them."""
        if (ahead := self._ahead.pop(key, None)) is not None:
            return ahead.result()
        return self._read(key, self._buffer(self.tier.nbytes(key)), fill)

    def read_ahead(self, key: object) -> None:
        """Start reading group ``key``'s stored bytes for its :meth:`take`, in the background,
        if a locked buffer is free now."""
        if key in self._ahead:
            return
        with self._cond:
            if not self._free:
                return
            buffer = self._free.pop()
        self._ahead[key] = self._reader.submit(self._read, key, buffer, True)

    def cancel(self, key: object) -> None:
        """Give back what a read ahead of group ``key`` brought, if nobody took it."""
        if (ahead := self._ahead.pop(key, None)) is not None:
            self.drop(key, ahead.result())

    def put(self, key: object, flat: torch.Tensor) -> None:
        """Write ``flat`` (from :meth:`take`) to group ``key`` behind; its buffer comes back
        once the write has ended."""
        self.tier.stage(key, [flat])
        with self._cond:
            self._writing += 1
        self._writes[key] = self._writer.submit(self._flush, key, flat)

    def drop(self, key: object, flat: torch.Tensor) -> None:
        """Give back ``flat``'s buffer (from :meth:`take`) unwritten: the stored bytes stand."""
        self.tier.done(key)
        self._give(flat)

    def wait(self, key: object | None = None) -> None:
        """Block until group ``key``'s last write (every write: None) has ended; raises its
        error."""
        for k in [key] if key is not None else list(self._writes):
            if (done := self._writes.pop(k, None)) is not None:
                done.result()

    def close(self) -> None:
        """End the reads and writes and give the locked buffers back (before the tier
        closes)."""
        for key in list(self._ahead):
            self.cancel(key)
        self._reader.shutdown()
        self._writer.shutdown()
        self._writes.clear()
        for buffer, undo in zip(self._locked, self._unregister, strict=True):
            undo()
            self.tier.io.free(buffer)
        self._locked, self._unregister, self._free = [], [], []

    def _read(self, key: object, buffer: torch.Tensor, fill: bool) -> torch.Tensor:
        """Group ``key``'s one tensor at the start of ``buffer``, read in with ``fill``."""
        try:
            self.wait(key)  # its last write reads the region this read fills
            (flat,) = self.tier.read(key, fill=fill, into=buffer)
        except BaseException:
            self._give(buffer)
            raise
        return flat

    def _flush(self, key: object, flat: torch.Tensor) -> None:
        try:
            self.tier.flush(key)
        finally:
            with self._cond:
                self._writing -= 1
            self._give(flat)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A free locked buffer, waiting for a write to end if one is running; else (the
        backward holds every locked one) a pageable one of ``nbytes``."""
        with self._cond:
            while not self._free and self._writing:
                self._cond.wait()
            if self._free:
                return self._free.pop()
        return self.tier.io.buffer(aligned(nbytes, self.tier.io.align), False)

    def _give(self, flat: torch.Tensor) -> None:
        """``flat``'s buffer is free again (a pageable one is just let go)."""
        with self._cond:
            for buffer in self._locked:
                if buffer.data_ptr() == flat.data_ptr():  # the group's one tensor starts it
                    self._free.append(buffer)
                    self._cond.notify_all()
                    return


__all__ = ["GradientStaging"]
