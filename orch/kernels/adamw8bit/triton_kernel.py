"""The fused AdamW8bit Triton kernel: one launch per tensor, one program per 256-element block.

Each program loads its block's codes, gradient and parameter, dequantizes both moments, updates
them and the parameter in fp32 (the operations and order of ``reference.adam_``), finds the
block's new absmax, and stores the nearest codes, found by a branch-free binary search over the
map's 255 midpoints (``torch.bucketize`` semantics, as the reference). The state format is the
reference's, so a run can move between the paths.

Under ``TRITON_INTERPRET=1`` the kernel's states equal the reference's bit for bit. Compiled for
a GPU, Triton may contract ``a * b + c`` into fused multiply-adds, so a value at a rounding
boundary can land one code away there; the tests state that tolerance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orch.kernels.adamw8bit.quant import BLOCK, blocks_per_row, tables
from orch.kernels.adamw8bit.reference import Hyper


@triton.jit
def _nearest_code(x, mids_ptr):
    """#{midpoints < x}: eight probes of the 256 thresholds (the last is +inf; the unsigned
    map's first is 0, so a positive second moment never gets code 0, as on the CPU path)."""
    index = tl.zeros(x.shape, dtype=tl.int32)
    for level in tl.static_range(8):
        step = 128 >> level
        probe = tl.load(mids_ptr + index + (step - 1))
        index = tl.where(probe < x, index + step, index)
    return index


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, q1_ptr, q2_ptr, a1_ptr, a2_ptr,
                      code1_ptr, code2_ptr, mids1_ptr, mids2_ptr,
                      rest, blocks, beta1, one_minus_beta1, beta2, one_minus_beta2,
                      decay, inv_bc2_sqrt, eps, neg_step, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // blocks
    cols = (pid % blocks) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < rest
    offs = row.to(tl.int64) * rest + cols

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(q1_ptr + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(q2_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(code1_ptr + c1) * tl.load(a1_ptr + pid)
    v = tl.load(code2_ptr + c2) * tl.load(a2_ptr + pid)

    m = m * beta1
    m = m + g * one_minus_beta1
    v = v * beta2
    v = v + (g * g) * one_minus_beta2
    p = p * decay
    denom = tl.sqrt_rn(v)
    denom = denom * inv_bc2_sqrt + eps
    p = p + tl.div_rn(m, denom) * neg_step
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

    absmax1 = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=0)
    absmax2 = tl.max(tl.where(mask, v, 0.0), axis=0)
    x1 = tl.div_rn(m, tl.where(absmax1 == 0.0, 1.0, absmax1))
    x2 = tl.div_rn(v, tl.where(absmax2 == 0.0, 1.0, absmax2))
    tl.store(q1_ptr + offs, _nearest_code(x1, mids1_ptr).to(tl.uint8), mask=mask)
    tl.store(q2_ptr + offs, _nearest_code(x2, mids2_ptr).to(tl.uint8), mask=mask)
    tl.store(a1_ptr + pid, absmax1)
    tl.store(a2_ptr + pid, absmax2)


def step_8bit_triton_(p: torch.Tensor, g: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor,
                      a1: torch.Tensor, a2: torch.Tensor, h: Hyper) -> None:
    """Same contract as ``reference.step_8bit_``: one kernel launch for the whole tensor."""
    if p.numel() == 0:
        return
    rows = p.shape[0]
    rest = p.numel() // rows
    blocks = blocks_per_row(rest)
    t1, t2 = tables(True, p.device), tables(False, p.device)
    _adamw8bit_kernel[(rows * blocks,)](
        p, g.contiguous(), q1, q2, a1, a2, t1.code, t2.code, t1.mids, t2.mids,
        rest, blocks, h.beta1, h.one_minus_beta1, h.beta2, h.one_minus_beta2,
        h.decay, h.inv_bc2_sqrt, h.eps, h.neg_step, BLOCK_SIZE=BLOCK,
    )
