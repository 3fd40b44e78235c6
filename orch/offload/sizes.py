"""Sizes the offload tiers fix and the plan and config checks need too, importable without
torch (``orch plan`` does not load it)."""

from __future__ import annotations

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
