"""Block I/O for the NVMe tier: whole aligned buffers read from and written to one file.

Two ways to move the bytes, same contract (an aligned CPU buffer whose size is a multiple of
the I/O's :attr:`~BlockIO.align`, a file offset that is one too, the whole buffer in one call
that returns when the bytes are there).
Both reach the file by a path, which for the NVMe tier is ``/proc/self/fd/<N>``: its file has
no name (:class:`~orch.offload.nvme.ScratchFile`), and opening that path reopens the unnamed
inode, with the flags of the new open (O_DIRECT here):

- :class:`AsyncIO`, DeepSpeed's async I/O op (libaio, O_DIRECT, ``io_threads`` workers each
  keeping ``io_queue_depth`` requests of ``io_block_size`` in flight). Each transfer opens the
  path with O_DIRECT itself (its reads take a file name only; a descriptor, only its async
  write). Its buffers come from the op's ``new_cpu_locked_tensor``: page-locked and aligned,
  which a CPU-only torch cannot give (``pin_memory=True`` raises there); they were about twice
  as fast as ordinary tensors.
- :class:`DirectIO`, the fallback when the op cannot be built (no libaio, no compiler): a thread
  pool of ``os.preadv``/``os.pwritev`` calls on an O_DIRECT descriptor of its own (opened once),
  ``io_block_size`` bytes each, into page-aligned anonymous mappings.

:func:`open_block_io` picks the first that works and says once, on stderr, when it falls back
and why. Locked buffers (the staging arena) of either sit on transparent huge pages where the
kernel allows (``orch.offload.host_memory``: O_DIRECT reads into them ran 1.8x as fast here),
said once when it does not. Each calling thread gets its own DeepSpeed handle (a handle is one
request queue, not meant to be shared between threads: the trainer's thread reads parameters
while the optimizer's thread reads and writes its states).

Alignment: O_DIRECT needs each request's size, file offset and address to be multiples of the
disk's logical block size (:func:`logical_block_size`: 512 or 4096 bytes). DeepSpeed's op cuts
a transfer into ``io_threads`` equal parts, one per thread, so the whole must be a multiple of
``io_threads`` times that (:func:`~orch.offload.sizes.io_align`): a transfer of 65 pages on a
4096-byte-sector disk with 2 threads made two parts of 32.5 pages, each refused by the kernel,
and the op, which never looks at a request's result, counted them done (the reads left zeros:
a run trained an all-zero model and saved it). Each I/O says its :attr:`~BlockIO.align` and
refuses a transfer that is not a multiple of it; the NVMe tier sizes everything by it, and
checks a write and read-back when it opens (:class:`~orch.offload.nvme.NvmeTier`).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Protocol

import torch

from orch.errors import ProblemsError
from orch.offload.cpu_adam import stderr_with_descriptor, use_venv_extension_cache
from orch.offload.host_memory import onto_huge_pages
from orch.offload.sizes import AIO_HANDLES_AT_START, ALIGN, aio_events_problem, io_align
from orch.offload.threads import helper_pool


def aligned(nbytes: int, align: int = ALIGN) -> int:
    """``nbytes`` rounded up to a multiple of ``align``."""
    return -(-nbytes // align) * align


def logical_block_size(path: Path | str) -> int | None:
    """The logical block size of the disk holding ``path`` (what O_DIRECT aligns to), from
    sysfs; None where the file system has no one block device (tmpfs, overlay, btrfs) or sysfs
    does not say."""
    try:
        device = os.stat(path).st_dev
    except OSError:
        return None
    if os.major(device) == 0:
        return None
    node = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    try:
        node = node.resolve(strict=True)
    except OSError:
        return None
    for queue in (node / "queue", node.parent / "queue"):  # a partition's is its disk's
        try:
            return int((queue / "logical_block_size").read_text())
        except (OSError, ValueError):
            continue
    return None


def _check_layout(io: BlockIO, buffer: torch.Tensor, offset: int, what: str) -> None:
    """A transfer of a size or at an offset that is not a multiple of ``io.align`` would fail in
    the kernel, and DeepSpeed's op would count it done: refuse it here (a bug of the caller)."""
    if buffer.numel() % io.align or offset % io.align:
        raise ValueError(f"NVMe {what} of {buffer.numel():,} bytes at offset {offset:,}: not "
                         f"multiples of the I/O's alignment {io.align:,}")


class BlockIO(Protocol):
    """Moves whole aligned buffers between CPU memory and one file."""

    align: int
    """What every transfer's size and file offset must be a multiple of (module docstring)."""
    sector: int
    """The disk's logical block size as found (:data:`ALIGN` where it could not be)."""
    threads: int

    def buffer(self, nbytes: int, locked: bool = True) -> torch.Tensor:
        """A new uint8 CPU buffer of ``nbytes`` (a multiple of :attr:`align`) this I/O can use;
        ``locked=False`` for large one-off reads (a checkpoint's), which stay pageable."""
        ...

    def free(self, buffer: torch.Tensor) -> None:
        """Give back a locked buffer from :meth:`buffer` (pageable ones go with their last
        reference)."""
        ...

    def read(self, buffer: torch.Tensor, offset: int) -> None:
        """Fill ``buffer`` from the file at ``offset``."""
        ...

    def write(self, buffer: torch.Tensor, offset: int) -> None:
        """Write ``buffer`` to the file at ``offset``."""
        ...

    def close(self) -> None: ...


class AsyncIO:
    """DeepSpeed's async I/O op (see the module docstring)."""

    def __init__(self, path: Path, block_size: int, queue_depth: int, threads: int,
                 sector: int | None = None) -> None:
        """``sector``: the disk's logical block size (else :func:`logical_block_size`)."""
        self.path = str(path)
        self._op = load_async_io()
        Path(path).touch()
        self.sector = max(sector or logical_block_size(path) or ALIGN, 1)
        self.threads = threads
        self.align = io_align(threads, self.sector)
        block_size = aligned(block_size, max(ALIGN, self.sector))
        self._args = (block_size, queue_depth, False, True, threads)
        _check_aio_events(self._args, AIO_HANDLES_AT_START)
        self._local = threading.local()
        self._closed = False
        self._allocator = self._op.aio_handle(*self._args)
        """Owns the locked buffers (they are freed with the handle that made them)."""
        _check_views_locked(self._allocator)

    def _handle(self):
        handle = getattr(self._local, "handle", None)
        if handle is None:
            _check_aio_events(self._args, 1)
            handle = self._local.handle = self._op.aio_handle(*self._args)
        return handle

    def buffer(self, nbytes: int, locked: bool = True) -> torch.Tensor:
        if not locked:  # the op bounces pageable memory through its own locked buffers
            return torch.empty(nbytes, dtype=torch.uint8)
        return _on_huge_pages(
            self._allocator.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8)))

    def free(self, buffer: torch.Tensor) -> None:
        if self._allocator.is_pinned(buffer):
            self._allocator.free_cpu_locked_tensor(buffer)

    def read(self, buffer: torch.Tensor, offset: int) -> None:
        path = self._open_path()  # first: after close, no new handle (and its threads)
        _check_layout(self, buffer, offset, "read")
        self._check(self._handle().sync_pread(buffer, path, offset), "read", offset)

    def write(self, buffer: torch.Tensor, offset: int) -> None:
        path = self._open_path()
        _check_layout(self, buffer, offset, "write")
        self._check(self._handle().sync_pwrite(buffer, path, offset), "write", offset)

    def _open_path(self) -> str:
        # After close a ``/proc/self/fd/<N>`` path may name whatever file took descriptor N.
        if self._closed:
            raise ValueError(f"async I/O on {self.path} after close")
        return self.path

    def _check(self, result: int, what: str, offset: int) -> None:
        # Only whole-call failures (an open, a size the op refuses) come back: the op never
        # looks at a request's own result, so a refused request reads as done (hence
        # _check_layout, and the tier's read-back check when it opens).
        if result < 0:
            raise OSError(f"async I/O {what} of {self.path} at offset {offset} failed ({result})")

    def close(self) -> None:
        self._local = threading.local()
        self._closed = True


class AioEvents(ProblemsError):
    """The kernel has too few AIO events left for another of DeepSpeed's I/O handles."""

    title = "the NVMe tier cannot open its async I/O"


def _check_aio_events(args: tuple, handles: int) -> None:
    """Raise :class:`AioEvents` where ``handles`` more handles made with ``args`` would not get
    their AIO contexts (the op would die on an assertion at its first submit)."""
    _, queue_depth, _, _, threads = args
    if (problem := aio_events_problem(queue_depth, threads, handles)) is not None:
        raise AioEvents([problem])


_said_views = False


def _check_views_locked(handle) -> None:
    """Say once when this DeepSpeed does not count a view of its locked buffers as locked:
    the NVMe tier stages through ranges of one locked arena, and the op then bounces each
    transfer through a locked buffer of its own (allocated per call). Older releases matched
    a buffer's exact start address."""
    global _said_views
    probe = handle.new_cpu_locked_tensor(2 * ALIGN, torch.empty(0, dtype=torch.uint8))
    try:
        if not handle.is_pinned(probe[ALIGN:]) and not _said_views:
            import deepspeed

            print(f"orch: deepspeed {deepspeed.__version__} takes views of its locked buffers for "
                  "pageable memory: every NVMe transfer goes through a bounce buffer; a newer "
                  "deepspeed avoids it", file=sys.stderr, flush=True)
            _said_views = True
    finally:
        handle.free_cpu_locked_tensor(probe)


class DirectIO:
    """A thread pool of O_DIRECT ``preadv``/``pwritev`` calls (see the module docstring)."""

    def __init__(self, path: Path, block_size: int, threads: int,
                 sector: int | None = None) -> None:
        """``sector``: the disk's logical block size (else :func:`logical_block_size`)."""
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        self.sector = max(sector or logical_block_size(path) or ALIGN, 1)
        self.threads = threads
        self.align = io_align(1, self.sector)  # each request is a whole block or the buffer's end
        self.block = aligned(block_size, self.align)
        self.pool = helper_pool("orch-direct-io", max(1, threads))

    def buffer(self, nbytes: int, locked: bool = True) -> torch.Tensor:
        # Anonymous mappings are page-aligned, as O_DIRECT needs; the tensor keeps its mapping
        # alive. Nothing here can lock pages without the op, so ``locked`` only asks for huge
        # pages (a private mapping: a shared one would be shmem, outside that advice).
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer = torch.frombuffer(mapping, dtype=torch.uint8)
        return _on_huge_pages(buffer) if locked else buffer

    def free(self, buffer: torch.Tensor) -> None:
        pass

    def _blocks(self, buffer: torch.Tensor, offset: int):
        view = memoryview(buffer.numpy()).cast("B")
        for start in range(0, len(view), self.block):
            yield view[start:start + self.block], offset + start

    def read(self, buffer: torch.Tensor, offset: int) -> None:
        self._run(os.preadv, buffer, offset, "read")

    def write(self, buffer: torch.Tensor, offset: int) -> None:
        self._run(os.pwritev, buffer, offset, "write")

    def _run(self, call, buffer: torch.Tensor, offset: int, what: str) -> None:
        _check_layout(self, buffer, offset, what)
        jobs = [self.pool.submit(call, self.fd, [chunk], at)
                for chunk, at in self._blocks(buffer, offset)]
        for job, (chunk, at) in zip(jobs, self._blocks(buffer, offset), strict=True):
            if (got := job.result()) != len(chunk):
                raise OSError(f"short {what} at offset {at}: {got} of {len(chunk)} bytes")

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)


_said_small_pages = False


def _on_huge_pages(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer`` (a new staging buffer) on huge pages where the kernel allows
    (:func:`orch.offload.host_memory.onto_huge_pages`); said once when it does not."""
    global _said_small_pages
    if (why := onto_huge_pages(buffer)) is not None and not _said_small_pages:
        print(f"orch: NVMe staging buffers stay on 4 KiB pages ({why}); O_DIRECT reads into "
              "them ran at 0.55x the speed of 2 MiB pages on the virtual disk orch was measured "
              "on", file=sys.stderr, flush=True)
        _said_small_pages = True
    return buffer


_op_error: str | None = None


def load_async_io():
    """DeepSpeed's async I/O op, built on first use (minutes) and cached by torch's extension
    loader in the environment (``make setup`` builds it once; ``make clean`` removes it with the
    .venv); raises :class:`RuntimeError` saying why when it cannot be built."""
    global _op_error
    if _op_error is not None:
        raise RuntimeError(_op_error)
    use_venv_extension_cache()
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        with stderr_with_descriptor():
            if not builder.is_compatible(verbose=False):
                raise RuntimeError("libaio is missing (Debian: apt-get install libaio-dev)")
            return builder.load(verbose=False)
    except Exception as exc:  # ImportError, a failed compile, a missing library
        _op_error = f"DeepSpeed's async I/O op is unavailable: {exc}"
        raise RuntimeError(_op_error) from exc


_said_fallback = False


def open_block_io(path: Path, block_size: int, queue_depth: int, threads: int,
                  prefer: str = "auto") -> BlockIO:
    """Block I/O on the file ``path``: DeepSpeed's async I/O op, or the O_DIRECT thread pool
    when the op cannot be built (said once) or ``prefer`` is ``"direct"``."""
    global _said_fallback
    if prefer != "direct":
        try:
            return AsyncIO(path, block_size, queue_depth, threads)
        except RuntimeError as exc:
            if not _said_fallback:
                print(f"orch: {exc}; NVMe I/O uses an O_DIRECT thread pool instead",
                      file=sys.stderr, flush=True)
                _said_fallback = True
    return DirectIO(path, block_size, threads)


__all__ = ["ALIGN", "AsyncIO", "BlockIO", "DirectIO", "aligned", "load_async_io",
           "logical_block_size", "open_block_io"]
