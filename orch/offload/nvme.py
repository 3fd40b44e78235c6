"""The NVMe tier: named groups of tensors kept in one file while they are not in use.

A group (a unit's parameters, a unit's optimizer states) gets a region of the file the first
time it is written: its tensors packed one after another (each at a 64-byte boundary, so views
of any dtype line up), the region a multiple of the I/O's alignment (``io.align``: the disk's
logical block size times ``offload.io_threads``, :mod:`orch.offload.blockio`). Reading a
group fills a staging buffer from its region and hands back views of the buffer shaped like the
tensors; writing writes that buffer back when the tensors are its views (the steady state: read,
stepped in place, written), else copies the tensors into a pageable buffer of its own (the first
spill, fresh optimizer states), so a write never waits for the pool it gives buffers back to.
Staging buffers are ranges of one arena of ``pinned_budget`` bytes, the
:class:`~orch.offload.blockio.BlockIO`'s own (page-locked when DeepSpeed's op is there), locked
once and handed out again and again.

A group's buffer is *held* under its key while anyone reads its views or while it is being
written, and a read in that time shares it instead of going to disk: so a group written behind
(a unit's parameters just stepped, on their way to disk in a writer thread) can be read at once,
before its write ends. A write, or a read that is through, may also *keep* the staging buffer
as the group's fresh copy until the next read takes it, saying when that read is due (a
:data:`Due`): the stepped parameters wait in memory for the next forward's fetch, the last
blocks' parameters from their forward for their backward, the first blocks' from their
backward for their update, and those reads then take nothing from disk. Kept copies only use
room the pool has spare: when a request finds none, the copy due last goes first (what an
optimal cache gives up: the one needed furthest in the future).

The file's disk blocks are allocated as regions are added (``posix_fallocate``), before any
write lands there: a full disk stops the run with :class:`NvmeFull` naming the numbers, where
DeepSpeed's op counted the failed writes as done and the run went on with garbage.

The file has no name (:class:`ScratchFile`), so it goes with its process however that ends.

When the tier opens it writes a few aligned blocks of a pattern and reads them back
(:func:`check_round_trip`): a layout the disk refuses (DeepSpeed's op counts a refused request
as done, and the read leaves the buffer as it was) stops the run before training, naming the
disk, its block size and ``offload.io_threads``, instead of training on zeros.

Between uses the owners keep *placeholders*: tensors with the right shape and dtype whose
storage holds no bytes, so a parameter's ``data`` or an optimizer state entry costs no memory
while its bytes are on disk.
"""

from __future__ import annotations

import bisect
import errno
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from orch.errors import Problem, ProblemsError
from orch.models.weights import placeholder
from orch.offload.blockio import BlockIO, aligned
from orch.offload.sizes import TENSOR_ALIGN
from orch.offload.stale_scratch import scratch_name, stale_scratch_files

Due = tuple[int, int]
"""When a kept copy will be read next, as an order: (pass over the units, place in that pass);
:meth:`~orch.offload.homes.Homes.next_pass` numbers the passes."""


def scratch_file(directory: Path, rank: int) -> ScratchFile:
    """This process's scratch file in ``directory`` (``offload.nvme_path``), after removing the
    named ones of ``rank`` that older orch versions' killed processes left there
    (:func:`stale_scratch_files`: a glob, cheap; this version's file has no name to leave)."""
    for stale in stale_scratch_files(directory, rank):
        stale.unlink(missing_ok=True)
        print(f"orch: removed {stale}, the NVMe scratch file of a killed run", flush=True)
    return ScratchFile(directory, rank)


class ScratchFile:
    """A file in ``directory`` with no name: its space goes back to the disk when the last
    descriptor on it closes, which the kernel does however the process ends (SIGKILL, an OOM
    kill, Slurm's cancel, a SIGTERM, which orch leaves unhandled: a Python handler waits while
    the main thread is blocked in a collective, and torchrun then reads the rank as hung).
    Named files were deleted by the tier's close and the worker's error exit, and a signal's
    end left a whole tier's bytes (hundreds of GB) until the next start on the same rank.

    Made with ``O_TMPFILE`` (ext4, xfs, btrfs, tmpfs), or where the file system refuses it
    created as ``orch-rank<rank>-<pid>.swap`` and unlinked at once (a kill in between leaves an
    empty file that :func:`scratch_file` removes later). Held by :attr:`fd`; the block I/O
    (DeepSpeed's op opens a file name per transfer, with O_DIRECT) reaches the same file
    through :attr:`path`, ``/proc/self/fd/<fd>``, which reopens the unnamed inode on Linux.
    ``df`` counts its blocks, ``du`` cannot; ``ls -l /proc/PID/fd`` shows it ``(deleted)``."""

    def __init__(self, directory: Path, rank: int = 0) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise ProblemsError([Problem(
                "offload.nvme_path", "the NVMe tier reaches its unnamed scratch file through "
                "/proc/self/fd, which this system does not have", "run on Linux with /proc")])
        self.directory = Path(directory)
        self.fd = _open_unnamed(self.directory, rank)
        self.path = Path(f"/proc/self/fd/{self.fd}")

    def close(self) -> None:
        """Close the descriptor: the file's blocks are free once the I/O's own are closed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_TMPFILE = getattr(os, "O_TMPFILE", 0)


def _open_unnamed(directory: Path, rank: int) -> int:
    if _TMPFILE:
        try:
            return os.open(directory, _TMPFILE | os.O_RDWR, 0o600)
        except OSError as exc:  # a file system without it; else the named file fails too
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    # The name holds this process's id: one there already is a dead process's.
    path = directory / scratch_name(rank)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd


class NvmeFull(ProblemsError):
    """The NVMe tier's file could not grow: the disk is full (or refused the space)."""

    title = "the NVMe tier cannot grow"


def _reserve(file: ScratchFile, offset: int, nbytes: int) -> None:
    """Allocate ``nbytes`` of ``file``'s disk blocks at ``offset`` before the tier writes
    there. DeepSpeed's async I/O op counts a write that failed for want of space as done, so
    on a full disk the run trained on, and checkpointed, garbage; allocating first turns that
    into this error (``posix_fallocate`` writes zeros where a file system cannot allocate)."""
    try:
        os.posix_fallocate(file.fd, offset, nbytes)
    except OSError as exc:
        directory = file.directory
        raise NvmeFull([Problem(
            "offload.nvme_path", f"the NVMe tier's file in {directory} cannot grow by "
            f"{nbytes:,} bytes to {offset + nbytes:,} ({exc.strerror}; "
            f"{shutil.disk_usage(directory).free:,} bytes free in {directory})",
            "free space, choose a larger disk, or keep more groups on cpu")]) from exc


class NvmeLayout(ProblemsError):
    """The NVMe tier's disk did not give back what was written in the tier's layout."""

    title = "the NVMe tier's disk does not take its I/O layout"


def check_round_trip(file: ScratchFile, io: BlockIO) -> None:
    """Write a pattern in the tier's layout at the start of ``file`` and read it back, through a
    locked buffer and a pageable one, of sizes an odd and an even multiple of ``io.align`` (the
    regions and staging buffers' unit); raise :class:`NvmeLayout` naming the numbers when the
    bytes differ. The file is empty again after."""
    align, offset = io.align, 0
    sizes = [(3 * align, True), (2 * align, False)]
    _reserve(file, 0, sum(nbytes for nbytes, _ in sizes))
    for nbytes, locked in sizes:
        out, back = io.buffer(nbytes, locked), io.buffer(nbytes, locked)
        try:
            out.copy_((torch.arange(nbytes, dtype=torch.int32) % 251 + 1).to(torch.uint8))
            back.zero_()
            try:
                io.write(out, offset)
                io.read(back, offset)
                wrong = int((out != back).sum())
                failed = ""
            except OSError as exc:
                wrong, failed = nbytes, f" ({exc})"
        finally:
            io.free(out)
            io.free(back)
        if wrong:
            raise NvmeLayout([Problem(
                "offload.nvme_path", f"{wrong:,} of {nbytes:,} bytes written at offset "
                f"{offset:,} of the tier's file in {file.directory} came back different"
                f"{failed}: its disk ({io.sector:,}-byte logical blocks as found) does not take "
                f"transfers of {align:,}-byte multiples split over offload.io_threads="
                f"{io.threads} ({type(io).__name__})",
                "set offload.io_threads to 1, or choose an offload.nvme_path on another disk "
                "(a local NVMe drive with an ext4 or xfs file system)", ("offload.io_threads",))])
        offset += nbytes
    os.ftruncate(file.fd, 0)  # the tier's regions start from an empty file


@dataclass(frozen=True)
class _Region:
    offset: int
    nbytes: int
    """Aligned size on disk, and of the staging buffer."""
    layout: tuple[tuple[int, torch.Size, torch.dtype], ...]
    """Per tensor: byte offset in the region, shape, dtype."""

    @staticmethod
    def describe(tensors: list[torch.Tensor]) -> tuple[tuple[int, torch.Size, torch.dtype], ...]:
        layout, at = [], 0
        for t in tensors:
            layout.append((at, t.shape, t.dtype))
            at += -(-t.numel() * t.element_size() // TENSOR_ALIGN) * TENSOR_ALIGN
        return tuple(layout)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for at, shape, dtype in self.layout:
            nbytes = shape.numel() * dtype.itemsize
            out.append(buffer[at:at + nbytes].view(dtype).view(shape))
        return out


class PinnedPool:
    """Staging buffers of the tier's I/O: ranges of one arena of ``limit`` bytes, page-locked
    once, on first use. Locking memory is slow (the pages are faulted in and zeroed; CUDA's
    registration of host memory slower still), and buffers of one size each were freed and
    locked again whenever a request of another size met a full pool: a unit's parameters and
    its optimizer states alternate sizes all through the update (``py-spy`` found the update's
    reader in it for 2.2 s of an 8-step run of the 128M model in
    ``benchmarks/offload_cpu.py``). A request takes the first free
    range that fits; given-back ranges merge with their free neighbours; a request that finds
    none gives up kept copies (``reclaim``), then waits for a buffer to come back."""

    def __init__(self, io: BlockIO, limit: int,
                 reclaim: Callable[[], torch.Tensor | None] = lambda: None) -> None:
        self.io, self.limit, self.reclaim = io, limit, reclaim
        self._arena: torch.Tensor | None = None
        self._free: list[tuple[int, int]] = []
        """Free ranges of the arena, ``(offset, nbytes)`` by offset, none adjacent."""
        self._allocated = 0
        self._cond = threading.Condition()
        self.peak = 0
        self._register: Callable[[torch.Tensor], Callable[[], None]] | None = None
        self._unregister: Callable[[], None] | None = None

    @property
    def arena(self) -> torch.Tensor | None:
        """The buffer the staging ranges are cut from (None before the first request)."""
        return self._arena

    def register_with(self, register: Callable[[torch.Tensor], Callable[[], None]]) -> None:
        """Have the arena registered by ``register`` (which returns its undo), now or when it
        is made: the device's copies read the staging buffers (CUDA:
        :meth:`~orch.offload.transfers.HostTransfers.register`)."""
        with self._cond:
            self._register = register
            if self._arena is not None and self._unregister is None:
                self._unregister = register(self._arena)

    def take(self, nbytes: int, wait: bool = True) -> torch.Tensor | None:
        """A range of ``nbytes``; without room (after giving up kept copies), wait for one to
        come back, or with ``wait=False`` return None (a read ahead: the budget's minimum
        covers the transfers that must happen, not those that would only start early)."""
        if nbytes > self.limit // self.io.align * self.io.align:
            raise ValueError(f"a staging buffer of {nbytes:,} bytes is over offload.pinned_budget "
                             f"({self.limit:,}); raise offload.pinned_budget")
        with self._cond:
            if self._arena is None:
                self._arena = self.io.buffer(self.limit // self.io.align * self.io.align)
                self._free = [(0, self._arena.numel())]
                if self._register is not None:
                    self._unregister = self._register(self._arena)
            while True:
                for position, (at, size) in enumerate(self._free):
                    if size >= nbytes:
                        if size == nbytes:
                            del self._free[position]
                        else:
                            self._free[position] = (at + nbytes, size - nbytes)
                        self._allocated += nbytes
                        self.peak = max(self.peak, self._allocated)
                        return self._arena[at:at + nbytes]
                if (freed := self.reclaim()) is not None:
                    self._put(freed)
                    continue
                if not wait:
                    return None
                self._cond.wait()

    def give(self, buffer: torch.Tensor) -> None:
        with self._cond:
            self._put(buffer)
            self._cond.notify_all()

    def wake(self) -> None:
        """Requests waiting for room try again (a kept copy has become free to give up)."""
        with self._cond:
            self._cond.notify_all()

    def _put(self, buffer: torch.Tensor) -> None:
        """(Under the lock.) Return ``buffer``'s range to the free list, merged."""
        assert self._arena is not None
        at, size = buffer.data_ptr() - self._arena.data_ptr(), buffer.numel()
        self._allocated -= size
        position = bisect.bisect(self._free, (at, size))
        if position < len(self._free) and self._free[position][0] == at + size:
            size += self._free.pop(position)[1]
        if position and sum(self._free[position - 1]) == at:
            at, size = self._free[position - 1][0], self._free[position - 1][1] + size
            position -= 1
            del self._free[position]
        self._free.insert(position, (at, size))

    def close(self) -> None:
        """Unlock and free the arena (nothing may use its buffers any more)."""
        if self._arena is not None:
            if self._unregister is not None:
                self._unregister()
            self.io.free(self._arena)
            self._arena, self._free, self._unregister = None, [], None


@dataclass(eq=False)
class _Held:
    """A group's buffer while it is read, written, or kept (module docstring)."""

    buffer: torch.Tensor
    staged: bool
    """From the pool (else the reader's own: pageable, freed with its last reference, or the
    caller's ``into``)."""
    users: int = 0
    """Reads whose views are in use (:meth:`NvmeTier.read` until its write or done)."""
    writing: bool = False
    due: Due | None = None
    """Kept: stays after its users and its write are through, until a read takes it (due
    then)."""

    @property
    def idle(self) -> bool:
        return not self.users and not self.writing


class NvmeTier:
    """Groups of tensors, by key, in ``file``, which ``io`` reads and writes through its
    ``path`` (see the module docstring); the tier closes both."""

    def __init__(self, file: ScratchFile, io: BlockIO, pinned_limit: int) -> None:
        self.file, self.io = file, io
        self.pool = PinnedPool(io, pinned_limit, self._reclaim)
        self._regions: dict[object, _Region] = {}
        self._held: dict[object, _Held] = {}
        """Buffers of groups being read, written or kept, by key."""
        self._end = 0
        self._lock = threading.Lock()
        self.bytes_read = self.bytes_written = 0
        self.bytes_from_memory = 0
        """What reads found in a held buffer (kept, or being written) instead of the disk."""
        try:
            check_round_trip(file, io)
        except BaseException:
            self.io.close()
            self.file.close()
            raise

    def has(self, key: object) -> bool:
        return key in self._regions

    def nbytes(self, key: object) -> int:
        """What a read of group ``key`` from disk moves: its region's bytes."""
        return self._regions[key].nbytes

    def read(self, key: object, staged: bool = True, fill: bool = True,
             into: torch.Tensor | None = None, wait: bool = True) -> list[torch.Tensor] | None:
        """The group's tensors, as views of a buffer held until :meth:`write` or :meth:`done`
        for the same key: the group's held buffer if it has one (no disk read), else a staging
        buffer of the pool, or with ``staged=False`` a pageable one of its own (for reads that
        hold many groups at once, which the pinned budget is not sized for), or the start of
        the caller's ``into`` (an ``io.buffer`` of at least :meth:`nbytes`; the caller's
        again once the write or done is through). ``fill=False`` leaves a new buffer as it
        comes, for a caller that overwrites every tensor (a checkpoint load, a first
        gradient). ``wait=False`` (a read ahead): None, holding nothing, where a staging buffer
        would have to wait for room."""
        region = self._regions[key]
        with self._lock:
            if (held := self._held.get(key)) is not None:
                held.users += 1
                held.due = None  # taken: given back once its users and its write are through
                self.bytes_from_memory += region.nbytes
                return region.views(held.buffer)
        if into is not None:
            buffer, staged = into[:region.nbytes], False
        elif staged:
            if (taken := self.pool.take(region.nbytes, wait)) is None:
                return None
            buffer = taken
        else:
            buffer = self.io.buffer(region.nbytes, False)
        if fill:
            self.io.read(buffer, region.offset)
            self.bytes_read += region.nbytes
        with self._lock:
            self._held[key] = _Held(buffer, staged, users=1)
        return region.views(buffer)

    def reserve(self, key: object, tensors: list[torch.Tensor]) -> None:
        """Give group ``key`` its region for tensors shaped like ``tensors``, writing nothing:
        its bytes mean nothing until a write (a checkpoint load writes them next)."""
        self._region_for(key, tensors)

    def read_one(self, key: object, position: int) -> torch.Tensor:
        """Tensor ``position`` of group ``key``, in pageable memory of its own: copied from the
        group's held buffer if it has one, else read from disk (the aligned blocks around it
        only). A checkpoint save reads one tensor at a time this way, so a group never comes
        into memory whole for it."""
        region = self._regions[key]
        at, shape, dtype = region.layout[position]
        with self._lock:
            if (held := self._held.get(key)) is not None:
                return region.views(held.buffer)[position].clone()
        nbytes, align = shape.numel() * dtype.itemsize, self.io.align
        start = (region.offset + at) // align * align
        buffer = self.io.buffer(aligned(region.offset + at + nbytes, align) - start, False)
        self.io.read(buffer, start)
        self.bytes_read += buffer.numel()
        skip = region.offset + at - start
        return buffer[skip:skip + nbytes].view(dtype).view(shape).clone()

    def done(self, key: object, keep: Due | None = None) -> None:
        """The read of ``key`` is through and its tensors did not change; ``keep``: the buffer
        stays as the group's fresh copy (staging buffers only), next read then."""
        with self._lock:
            held = self._held[key]
            held.users -= 1
            if keep is not None and held.staged:
                held.due = keep
            ended = self._use_ended(key, held)
        self._hand_back(*ended)

    def write(self, key: object, tensors: list[torch.Tensor], keep: Due | None = None) -> None:
        """Store ``tensors`` as the group ``key``: :meth:`stage` then :meth:`flush`."""
        self.stage(key, tensors, keep)
        self.flush(key)

    def stage(self, key: object, tensors: list[torch.Tensor], keep: Due | None = None) -> None:
        """Make ``tensors`` the group's held bytes, to be written by :meth:`flush` (another
        thread may flush; reads of ``key`` meanwhile share the buffer). The buffer is the
        group's read buffer when ``tensors`` are that read's views (the steady state, no copy;
        the read's hold ends here), else a pageable one of its own, so a write never waits for
        the pool it gives buffers back to (the first spill, fresh optimizer states, a new
        layout). A region is placed the first time, or anew when the layout no longer fits.
        ``keep``: the buffer stays after the write while the pool has room for it, as the
        group's fresh copy for the next read, due then (staging buffers only)."""
        region = self._region_for(key, tensors)
        freed = None
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                held.users -= 1
            if held is None or held.buffer.numel() != region.nbytes:
                if held is not None:
                    held.due = None  # the new bytes make a kept copy of the old layout stale
                    freed, _ = self._use_ended(key, held)
                held = self._held[key] = _Held(self.io.buffer(region.nbytes, False), False)
            held.writing, held.due = True, keep if held.staged else None
        self._hand_back(freed, False)
        for view, tensor in zip(region.views(held.buffer), tensors, strict=True):
            if view.data_ptr() != tensor.data_ptr():
                view.copy_(tensor)

    def flush(self, key: object) -> None:
        """Write the bytes :meth:`stage` gave group ``key`` to its region."""
        region, held = self._regions[key], self._held[key]
        try:
            self.io.write(held.buffer, region.offset)
        finally:
            with self._lock:
                held.writing = False
                ended = self._use_ended(key, held)
            self._hand_back(*ended)
        self.bytes_written += region.nbytes

    def _use_ended(self, key: object, held: _Held) -> tuple[torch.Tensor | None, bool]:
        """(Under the lock.) A read or write of ``key`` ended. Forget ``held`` if nobody needs
        it now, returning its buffer if it is the pool's; else say whether it is now a kept
        copy free to give up. Both are for :meth:`_hand_back`, outside the lock (the pool's
        lock is taken before the tier's)."""
        if not held.idle:
            return None, False
        if held.due is not None:
            return None, True
        if self._held.get(key) is held:
            del self._held[key]
        return (held.buffer if held.staged else None), False

    def _hand_back(self, freed: torch.Tensor | None, reclaimable: bool) -> None:
        """Give ``freed`` back to the pool; or, when a kept copy became free to give up, wake
        the requests waiting for room (one only that copy can serve would otherwise sleep with
        room there to reclaim)."""
        if freed is not None:
            self.pool.give(freed)
        elif reclaimable:
            self.pool.wake()

    def _reclaim(self) -> torch.Tensor | None:
        """(The pool, under its lock.) Give up the kept copy nobody is using that is due last,
        if any."""
        with self._lock:
            kept = [(held.due, key) for key, held in self._held.items()
                    if held.due is not None and held.idle]
            if not kept:
                return None
            _, key = max(kept, key=lambda entry: entry[0])
            return self._held.pop(key).buffer

    def _region_for(self, key: object, tensors: list[torch.Tensor]) -> _Region:
        layout = _Region.describe(tensors)
        region = self._regions.get(key)
        if region is not None and region.layout == layout:
            return region
        end = layout[-1][0] + tensors[-1].numel() * tensors[-1].element_size() if layout else 0
        nbytes = aligned(max(end, 1), self.io.align)
        if region is not None and nbytes <= region.nbytes:  # a new layout that fits: same place
            region = _Region(region.offset, nbytes, layout)
        else:
            with self._lock:
                _reserve(self.file, self._end, nbytes)
                region = _Region(self._end, nbytes, layout)
                self._end += nbytes
        self._regions[key] = region
        return region

    @property
    def file_bytes(self) -> int:
        return self._end

    def close(self) -> None:
        """Close the I/O and the file, which gives its space back (it is scratch:
        checkpoints hold the state)."""
        self._held.clear()
        self.pool.close()
        self.io.close()
        self.file.close()


__all__ = ["Due", "NvmeLayout", "NvmeTier", "PinnedPool", "ScratchFile", "check_round_trip",
           "placeholder", "scratch_file"]
