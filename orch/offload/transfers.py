"""Host-device copies that overlap compute: on CUDA, a stream of their own.

A unit's fetch copies its parameters' home bytes into the unit's device tensors. On a CUDA
device the copy runs on a side stream, queued after the work the compute stream holds so far
(the device tensors were just allocated again on the compute stream, and the caching allocator
may hand back a block whose last kernels are still queued there); the compute stream waits for
the copy only where the unit is used (its forward or backward begins) or released. So a
prefetched unit's copy runs beside the compute of the units before it, and the host thread,
which queues that compute, does not wait for it: with a plain ``copy_`` the copy would queue
behind all the compute already launched and block the host until it ran.

Copies are asynchronous only from page-locked memory: CPU homes are pinned on CUDA
(:meth:`HostTransfers.pin`), and the NVMe tier's staging arena, locked by DeepSpeed's op (which CUDA
does not know of), is registered with CUDA once (:meth:`HostTransfers.register`), else the driver
would copy it through bounce buffers of its own. From an NVMe staging buffer, which goes back to the
pool once the fetch is through, the host waits for the copy itself before giving the buffer back
(one DMA at the host link's speed, not the compute queued before it). Elsewhere (a CPU device: the
tests, CPU runs) copies are plain and synchronous, and nothing here changes them.

Gradients go home the same way (:meth:`HostTransfers.to_home`): the copy, on the side stream
after the compute that produced the gradient, lands in the unit's pinned gradient home while the
backward goes on; the gradient's device memory is kept for the copy (``record_stream``) and the
engine waits for the copies that land in a unit's home before anything on the host reads it (the
average over replicas, the clip, the optimizer step, the next micro-batch's addition). A later
micro-batch's gradient, which is added to its home rather than copied into it, travels the same
way into a pinned buffer of its own (:meth:`HostTransfers.to_host`).
:meth:`HostTransfers.synchronize` ends every copy before the optimizer step writes the homes.
Swapped activations use the same stream both ways (:mod:`orch.offload.activations`).

Under bf16 the device copies of parameters and their gradients are bf16 while their homes stay
float32 (:class:`~orch.offload.engine.OffloadEngine`'s ``param_dtype``). A cross-device
``copy_`` that changes the dtype converts on the host, into pageable memory the copy then waits
for; here the conversion runs on the device side instead, a chunk at a time through one staging
buffer of the host's dtype (:meth:`HostTransfers.stage_conversions`), all on the side stream,
whose order keeps each chunk's two copies apart from the next's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from orch.offload.sizes import CONVERSION_STAGING_ELEMENTS

CopyDone = torch.cuda.Event | None
"""The end of a copy on the side stream; None where the copy has already ended."""


class HostTransfers:
    """Copies between the homes and ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.staging: torch.Tensor | None = None
        """Device memory through which copies that change dtype convert (see the module)."""

    def stage_conversions(self, largest: int, dtype: torch.dtype) -> int:
        """Allocate the staging buffer for copies between ``dtype`` homes and device tensors of
        another dtype, of at most ``largest`` elements each; returns its bytes (device memory
        the caller accounts)."""
        self.staging = torch.empty(min(largest, CONVERSION_STAGING_ELEMENTS), dtype=dtype,
                                   device=self.device)
        return self.staging.numel() * self.staging.element_size()

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in page-locked memory where copies from it can be asynchronous (CUDA)."""
        return tensor.pin_memory() if self.stream is not None else tensor

    def register(self, buffer: torch.Tensor) -> Callable[[], None]:
        """Make ``buffer`` (CPU memory that stays put) page-locked memory CUDA copies from
        directly, where copies can be asynchronous; returns the undo, to call before the
        memory is freed."""
        if self.stream is None:
            return lambda: None
        cudart, ptr = torch.cuda.cudart(), buffer.data_ptr()
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, buffer.numel() * buffer.element_size(),
                                                       0))
        return lambda: torch.cuda.check_error(cudart.cudaHostUnregister(ptr))

    def host_empty(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of CPU memory for copies home, pinned where they can be asynchronous."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.stream is not None)

    def to_device(self, copies: list[torch.Tensor], homes: list[torch.Tensor],
                  host_waits: bool) -> CopyDone:
        """Copy ``homes`` into the device tensors ``copies``; the event the compute stream must
        wait for before using them (:meth:`wait`), None where the copy is already done.
        ``host_waits``: return only once the copy has ended (``homes`` are reused after)."""
        done = self._copy(list(zip(copies, homes, strict=True)), to_device=True)
        if host_waits:
            self.host_wait(done)
            return None
        return done

    def to_home(self, home: torch.Tensor, source: torch.Tensor) -> CopyDone:
        """Copy the device tensor ``source`` (a gradient, a saved activation's bytes) into
        ``home`` (CPU); the event it ends with, None where it has ended (not CUDA). ``source``
        may be dropped at once: its memory is kept until the copy has read it."""
        done = self._copy([(home, source)], to_device=False)
        if self.stream is not None:
            source.record_stream(self.stream)
        return done

    def to_host(self, source: torch.Tensor) -> tuple[CopyDone, torch.Tensor]:
        """``source`` (a device tensor) in CPU memory: on CUDA a pinned copy made on the side
        stream (the event it ends with; read it only after), else ``source`` itself (None)."""
        if self.stream is None:
            return None, source.cpu()
        host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        done = self._copy([(host, source)], to_device=False)
        source.record_stream(self.stream)
        return done, host

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], to_device: bool
              ) -> CopyDone:
        """Copy each (target, source): on the side stream after the compute queued so far (the
        event it ends with), else at once (None)."""
        if self.stream is None:
            for target, source in pairs:
                self._copy_one(target, source, to_device)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for target, source in pairs:
                self._copy_one(target, source, to_device)
        done = torch.cuda.Event()
        done.record(self.stream)
        return done

    def _copy_one(self, target: torch.Tensor, source: torch.Tensor, to_device: bool) -> None:
        """``target.copy_(source)``; between dtypes, converted on the device side a chunk at a
        time through :attr:`staging` (also on a CPU device, where it is a plain copy, so that
        the chunking runs in the CPU tests)."""
        asynchronous = self.stream is not None
        if target.dtype == source.dtype:
            target.copy_(source, non_blocking=asynchronous)
            return
        staging = self.staging
        assert staging is not None, "stage_conversions() before copies that change dtype"
        assert target.is_contiguous() and source.is_contiguous()
        flat_target, flat_source = target.view(-1), source.view(-1)
        step = staging.numel()
        for start in range(0, flat_target.numel(), step):
            into, out_of = flat_target[start:start + step], flat_source[start:start + step]
            chunk = staging[:into.numel()]
            if to_device:  # the host's bytes as they are, converted on the device
                chunk.copy_(out_of, non_blocking=asynchronous)
                into.copy_(chunk)
            else:  # converted on the device, then the host's dtype's bytes travel
                chunk.copy_(out_of)
                into.copy_(chunk, non_blocking=asynchronous)

    def wait(self, done: CopyDone) -> None:
        """The compute stream waits for the copy ``done`` before what it runs next."""
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    @staticmethod
    def host_wait(done: CopyDone) -> None:
        """Block (this thread) until the copy ``done`` has ended: before its home is read."""
        if done is not None:
            done.synchronize()

    def drain(self) -> None:
        """Block until the device has run everything queued (before timing a copy alone)."""
        if self.stream is not None:
            torch.cuda.synchronize(self.device)

    def synchronize(self) -> None:
        """Block until every copy issued so far has ended (before the homes change)."""
        if self.stream is not None:
            self.stream.synchronize()


__all__ = ["HostTransfers"]
