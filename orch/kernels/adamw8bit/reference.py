"""The AdamW8bit update of one tensor in plain torch: the specification and the CPU path.

The CPU path is the one offloaded training runs every step, so it is written for speed: it walks
the tensor in chunks of whole rows (so blocks never straddle a chunk), reuses preallocated
buffers, does every pass in place, and replaces the 256-entry lookups and the nearest-code
search by gathers from 65,536-entry tables (``quant``), the one costly kind of pass left.

The update is, per element, in this order (the Triton kernel does the same operations in the
same order)::

    m = code1[q1] * absmax1              v = code2[q2] * absmax2          (dequantize)
    m = m * b1 + g * (1 - b1)            v = v * b2 + (g * g) * (1 - b2)
    p = p * (1 - lr * wd)                                                (decoupled decay)
    p = p + (m / (sqrt(v) * (1 / sqrt(1 - b2^t)) + eps)) * (-lr / (1 - b1^t))
    q1, absmax1 = quantize(m)            q2, absmax2 = quantize(v)      (new block absmax)

The parameter moves with the fresh fp32 moments; only what is stored is quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from orch.kernels.adamw8bit.quant import Scratch, codes_into, normalize_, tables, values_into

CHUNK = 1 << 20
"""Elements per chunk of the CPU path (whole rows; ~26 MiB of buffers). Larger chunks cost
fewer Python-level ops per element; measured here: 2^16 -> 91 ms, 2^18 -> 65, 2^20 -> 60 ms
for 10M parameters."""


@dataclass(frozen=True)
class Hyper:
    """One step's scalars, computed once in Python (fp64) and used as fp32 by every path."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float
    inv_bc2_sqrt: float
    eps: float
    neg_step: float

    @classmethod
    def at(cls, step: int, lr: float, beta1: float, beta2: float, eps: float,
           weight_decay: float) -> Hyper:
        return cls(beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2,
                   one_minus_beta2=1 - beta2, decay=1 - lr * weight_decay,
                   inv_bc2_sqrt=1 / math.sqrt(1 - beta2**step), eps=eps,
                   neg_step=-lr / (1 - beta1**step))


def adam_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
          h: Hyper) -> None:
    """The fp32 moment and parameter update on equal-length tensors; ``t`` is scratch."""
    m.mul_(h.beta1)
    torch.mul(g, h.one_minus_beta1, out=t)
    m.add_(t)
    v.mul_(h.beta2)
    torch.mul(g, g, out=t)
    t.mul_(h.one_minus_beta2)
    v.add_(t)
    if h.decay != 1.0:
        p.mul_(h.decay)
    torch.sqrt(v, out=t)
    t.mul_(h.inv_bc2_sqrt)
    t.add_(h.eps)
    torch.div(m, t, out=t)
    t.mul_(h.neg_step)
    p.add_(t)


def step_fp32_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
               h: Hyper) -> None:
    """Small tensors: fp32 moments, same arithmetic."""
    p32 = p if p.dtype == torch.float32 else p.float()
    adam_(p32, g.float(), m, v, torch.empty_like(m), h)
    if p32 is not p:
        p.copy_(p32)


class ScratchPool:
    """One ``Scratch`` per device, grown to the largest chunk seen."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, Scratch] = {}

    def get(self, size: int, device: torch.device) -> Scratch:
        s = self._by_device.get(device)
        if s is None or s.size < size:
            s = self._by_device[device] = Scratch(max(size, CHUNK), device)
        return s


def step_8bit_(p: torch.Tensor, g: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor,
               a1: torch.Tensor, a2: torch.Tensor, h: Hyper, pool: ScratchPool) -> None:
    """Update contiguous ``p`` (two or more dims, fp32 or lower) and its 8-bit states in place.

    ``q1``/``q2`` are uint8 codes shaped like ``p``; ``a1``/``a2`` fp32 ``[rows, blocks]``.
    """
    rows = p.shape[0]
    if p.numel() == 0:
        return
    rest = p.numel() // rows
    per_chunk = max(1, CHUNK // rest)
    if rest % 2 and per_chunk > 1:
        per_chunk -= per_chunk % 2  # chunks start at even bytes: codes are read in pairs
    s = pool.get(per_chunk * rest, p.device)
    t1, t2 = tables(True, p.device), tables(False, p.device)
    p2d, g2d = p.view(rows, rest), g.reshape(rows, rest)
    q1f, q2f = q1.view(rows, rest), q2.view(rows, rest)
    for r0 in range(0, rows, per_chunk):
        r1 = min(rows, r0 + per_chunk)
        n = (r1 - r0) * rest
        m, v, t = s.m[:n], s.v[:n], s.t[:n]
        values_into(q1f[r0:r1].reshape(-1), a1[r0:r1], m.view(-1, rest), t1, s)
        values_into(q2f[r0:r1].reshape(-1), a2[r0:r1], v.view(-1, rest), t2, s)
        pc = p2d[r0:r1].reshape(-1)
        p32 = pc if pc.dtype == torch.float32 else pc.float()
        adam_(p32, g2d[r0:r1].reshape(-1).float(), m, v, t, h)
        if p32 is not pc:
            pc.copy_(p32)
        normalize_(m.view(-1, rest), a1[r0:r1], signed=True, work=t)
        codes_into(m, q1f[r0:r1].reshape(-1), t1, s)
        normalize_(v.view(-1, rest), a2[r0:r1], signed=False)
        codes_into(v, q2f[r0:r1].reshape(-1), t2, s)
