"""Sizes the offload tiers fix and the plan and config checks need too, importable without
torch (``orch plan`` does not load it)."""

from __future__ import annotations

ALIGN = 4096
"""O_DIRECT's alignment of offsets, sizes and buffer addresses (a page; covers 512-byte
sectors too): NVMe I/O blocks are multiples of it (:mod:`orch.offload.blockio`)."""

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

REGION_PADDING = ALIGN + REGION_TENSORS * TENSOR_ALIGN
"""The most one unit's NVMe region holds beyond its tensors' bytes: its end rounded up to
:data:`ALIGN`, each tensor's start to :data:`TENSOR_ALIGN`."""
