"""Sizes the offload tiers fix and the plan and config checks need too, importable without
torch (``orch plan`` does not load it)."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import shutil
from pathlib import Path

from orch.errors import Problem

ALIGN = 4096
"""The least O_DIRECT alignment of offsets, sizes and buffer addresses the NVMe tier uses (a
page; covers 512-byte and 4096-byte sectors): NVMe I/O blocks are multiples of it. A transfer
of DeepSpeed's op is cut into ``offload.io_threads`` equal parts, each of which must be aligned
on its own, so the tier's regions and buffers are multiples of :func:`io_align`
(:mod:`orch.offload.blockio`)."""


def io_align(threads: int, sector: int = ALIGN) -> int:
    """What every NVMe region, staging buffer and transfer is a multiple of with ``threads``
    I/O threads on a disk of ``sector``-byte logical blocks: DeepSpeed's op splits each
    transfer into ``threads`` equal parts, each at least sector-aligned in size, file offset and
    address (its own ``get_alignment()`` is the same product with 4096)."""
    return max(ALIGN, sector) * max(1, threads)

CONVERSION_STAGING_ELEMENTS = 1 << 24
"""The most elements a copy that changes dtype stages at once on the device (64 MiB of float32;
:class:`orch.offload.transfers.HostTransfers`): one such buffer is on the device tier under
bf16, which the plan counts too."""

NVME_GRAD_BUFFERS = 3
"""Locked host buffers of a unit's gradients each with ``offload.grads: nvme``: one gathering a
unit's gradients while another is written and a third read ahead for the next unit
(:mod:`orch.offload.grad_staging`)."""

TENSOR_ALIGN = 64
"""Where each tensor of an NVMe region starts: a multiple of it, so views of any dtype line up
(:mod:`orch.offload.nvme`)."""

REGION_TENSORS = 64
"""At least as many tensors as one unit's region of the NVMe tier holds (a MoE block's 13
parameters, four 8-bit AdamW states each, or its saved activations' storages): with
:data:`ALIGN` and :data:`TENSOR_ALIGN`, what bounds a region's padding for the plan."""

def region_padding(threads: int) -> int:
    """The most one unit's NVMe region holds beyond its tensors' bytes with ``threads`` I/O
    threads (on disks of sectors up to :data:`ALIGN`): its end rounded up to :func:`io_align`,
    each tensor's start to :data:`TENSOR_ALIGN`."""
    return io_align(threads) + REGION_TENSORS * TENSOR_ALIGN


AIO_HANDLES_AT_START = 2
"""DeepSpeed I/O handles a rank opens with its NVMe tier before anything else: the one whose
locked buffers the tier stages through and the opening thread's (its read-back check); each
thread that moves NVMe bytes later opens one more (:func:`aio_handles`)."""


def aio_handles(params: str, grads: str, optimizer: str, activations: str) -> int:
    """The most DeepSpeed I/O handles one rank's NVMe tier opens over a run with these homes:
    one per thread that moves NVMe bytes (each keeps its own), beyond the
    :data:`AIO_HANDLES_AT_START`: the parameter and state homes' reader, reader ahead for the
    update, and writer, and the CPU optimizer's thread (parameters or optimizer on NVMe); the
    gradients' reader and writer; the activation swapper; a checkpoint's writer (every tier:
    it reads what rests on NVMe as it saves). Ten with every group on NVMe; counting only the
    first two let the launch pass queues that stopped the run after its first step."""
    handles = AIO_HANDLES_AT_START + 1
    if "nvme" in (params, optimizer):
        handles += 4
    if grads == "nvme":
        handles += 2
    if activations == "nvme":
        handles += 1
    return handles


def async_io_may_load() -> bool:
    """Whether DeepSpeed's async I/O op may load on this machine: DeepSpeed installed, libaio
    on the library path, its header and a C compiler (the op's compatibility check, which its
    loader runs every time, compiles and links a call to ``io_submit``; without any of these
    it fails). Otherwise the NVMe tier takes its O_DIRECT thread pool, which opens no AIO
    contexts, so the kernel's AIO events do not bound its queue (:func:`aio_events_problem`
    is for the op's handles only). Cheap: finds, imports and compiles nothing."""
    header = any(Path(folder, "libaio.h").is_file()
                 for folder in ("/usr/include", "/usr/local/include"))
    compiler = shutil.which(os.environ.get("CC", "cc")) is not None
    return header and compiler and importlib.util.find_spec("deepspeed") is not None \
        and ctypes.util.find_library("aio") is not None


def aio_events_problem(queue_depth: int, threads: int, handles: int = 1,
                       proc: Path = Path("/proc/sys/fs")) -> Problem | None:
    """The problem with opening ``handles`` more DeepSpeed I/O handles of ``threads`` threads
    and ``queue_depth`` requests each, where the kernel's AIO events left (``fs.aio-max-nr``
    less ``fs.aio-nr``, read under ``proc``) cannot cover them: each handle sets up
    ``threads + 1`` AIO contexts of ``queue_depth`` events, and the op does not check that
    they were made (its first submit then fails an assertion and kills the process). None
    where they fit, or where the kernel does not say."""
    try:
        most = int((proc / "aio-max-nr").read_text())
        used = int((proc / "aio-nr").read_text())
    except (OSError, ValueError):
        return None
    per_handle = (threads + 1) * queue_depth
    if handles * per_handle <= most - used:
        return None
    return Problem(
        "offload.io_queue_depth",
        f"{queue_depth:,} with offload.io_threads={threads}: each of DeepSpeed's I/O handles "
        f"takes {threads + 1} AIO contexts of {queue_depth:,} events ({per_handle:,}), "
        f"{handles} of them {handles * per_handle:,}, and the kernel has {max(most - used, 0):,} "
        f"left (fs.aio-max-nr={most:,}, fs.aio-nr={used:,} in use)",
        "lower offload.io_queue_depth or offload.io_threads (32 and 2 are the defaults; a "
        "rank opens up to 10 handles, one per thread moving NVMe bytes), or raise the "
        "kernel's limit (sysctl -w fs.aio-max-nr=1048576)", ("offload.io_threads",))
