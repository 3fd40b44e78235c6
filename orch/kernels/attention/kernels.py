"""FlashAttention-2 in Triton: tiled forward with an online softmax, and an atomic-free backward.

Forward: one program per (query block, batch x head). It walks the key blocks its rows can see,
keeping a running row max ``m``, row sum ``l`` and output accumulator in float32 (softmax in base
2: scores are pre-multiplied by ``softmax_scale * log2(e)``), and writes ``out = acc / l`` and
``lse = (m + log2 l) * ln 2``. No (seq_q, seq_k) matrix exists anywhere.

Backward, three launches:

1. ``delta = rowsum(dO * O) - dlse`` per query row (``dlse`` is the gradient reaching the
   log-sum-exp; since d lse / d score = P, it folds into delta and costs nothing more).
2. dK/dV: one program per (key block, batch x kv head). It loops over the query heads of its
   group and over the query blocks that can see it, recomputing ``P = exp(S - lse)``; dK and dV
   of the whole group accumulate in registers and are written once, so no atomics.
3. dQ: one program per (query block, batch x head), looping over key blocks.
   ``dS = P * (dP - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, ``dV = P^T dO``.

Masking: each loop runs in two phases, blocks that need no mask (fully inside the sequence and,
with ``causal``, fully below the diagonal) and the few that do (the diagonal, the ragged end),
so masks cost nothing on most blocks. This needs ``fwd_m % fwd_n == 0``, ``dq_m % dq_n == 0``
and ``dkv_n % dkv_m == 0``. head_dim is padded to a power of two inside the kernel (a multiple
of 16 up to 128 is accepted). Tensors may have any strides (a (batch, heads, seq, head_dim)
tensor's transpose goes in without a copy) as long as head_dim is contiguous; others are copied.

Documents (packed sequences; ``HAS_DOCS``): the host finds, by binary search over the
nondecreasing ids, each query's document's keys ``[k_lo, k_hi)`` and each key's document's
queries ``[q_lo, q_hi)`` (``document_ranges``). Since ids only grow, a query block's rows see
keys only from its first row's ``k_lo`` to its last row's ``k_hi``, so a program walks those key
blocks alone (the dK/dV program likewise the query blocks of its keys' documents): blocks of
other documents are never loaded, which is where packed documents save their time, as in
FlashAttention's varlen kernels and torchtitan's flex-attention document masks. Of the blocks
walked, those inside every row's range (and the causal bound) still run unmasked; only those
that straddle a boundary get a mask (the trailing masked phase, or a third, leading one that
documents add), which compares positions with the ranges the program has already loaded (no id
is loaded per block). A row
that sees no key at all (a ring block whose keys lack its document) gets out 0 and lse -inf,
and its P is exactly 0 in the backward (``where``, never ``0 * inf``). Without documents the
kernels compile to what they were: the flag is a ``constexpr``, and the range pointers are
stand-ins that are never read.

The kernels live in ``triton_forward`` and ``triton_backward``; this module holds the tiles, the
launchers and the op torch sees (forward and backward, with autograd).

Every matmul accumulates in float32. With float16/bfloat16 inputs, P and dS are rounded to the
input dtype before their matmuls (as FlashAttention does); float32 inputs use IEEE float32
matmuls unless ``torch.set_float32_matmul_precision`` allows TF32.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch
import triton

from orch.kernels.attention.triton_backward import (
    _bwd_delta_kernel,
    _bwd_dkv_kernel,
    _bwd_dq_kernel,
)
from orch.kernels.attention.triton_forward import _fwd_kernel

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options. ``fwd_*``: forward (query block m, key block n);
    ``dkv_*``: the dK/dV kernel; ``dq_*``: the dQ kernel."""

    fwd_m: int = 128
    fwd_n: int = 64
    dkv_m: int = 32
    dkv_n: int = 128
    dq_m: int = 128
    dq_n: int = 32
    warps: int = 4
    stages: int = 3

    def validate(self) -> None:
        for name in ("fwd_m", "fwd_n", "dkv_m", "dkv_n", "dq_m", "dq_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockConfig.{name} must be a power of two >= 16, got {size}")
        if self.fwd_m % self.fwd_n or self.dq_m % self.dq_n or self.dkv_n % self.dkv_m:
            raise ValueError(
                f"BlockConfig needs fwd_m % fwd_n == dq_m % dq_n == dkv_n % dkv_m == 0, got {self}"
            )


def default_config(head_dim: int, dtype: torch.dtype) -> BlockConfig:
    """Tiles for a GPU: a starting point that ``benchmarks/attention.py --sweep`` measures
    against others. No kernel spills registers at the 16-bit tiles, compiled for sm_90
    (``python -m orch.kernels.resources``; the tests hold it): with 4 warps the dK/dV kernel,
    whose program keeps a key block's dK and dV for a whole group of query heads in
    registers, spilled 464 bytes per thread at head_dim 64, and at 128 it spilled 80 bytes
    even with 8 warps until its query block went to 16 rows (the smallest change that stopped
    every spill; benchmarks/results/kernel_resources.md)."""
    if dtype == torch.float32:  # twice the bytes per tile: halve the tiles to fit shared memory
        return BlockConfig(64, 32, 16, 64, 64, 16, warps=4, stages=2)
    if head_dim <= 64:
        return BlockConfig(128, 64, 32, 128, 128, 32, warps=8, stages=3)
    return BlockConfig(128, 64, 16, 64, 64, 32, warps=8, stages=2)


# --- launchers ----------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides; the head_dim stride must be 1 (callers make it so)."""
    return t.stride(0), t.stride(1), t.stride(2)


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def document_ranges(ids: torch.Tensor, of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``, int32 ``of``'s shape: the positions ``[lo[b, i], hi[b, i])`` of ``ids``
    (``(batch, seq)``, nondecreasing along each row) that hold the id ``of[b, i]``, e.g. the
    keys of each query's document. The kernels read these to skip the blocks of other
    documents and to mask those that straddle a boundary. Two batched binary searches, next to
    nothing beside the attention: made at each launch rather than kept, so the op keeps only
    the ids for its backward. Both go to their common dtype: cast to a narrower one of
    ``ids``, another document's id could wrap onto one of its (int64 300 is int8 44)."""
    common = torch.promote_types(ids.dtype, of.dtype)
    ids, of = ids.to(common).contiguous(), of.to(common).contiguous()
    return (torch.searchsorted(ids, of, out_int32=True),
            torch.searchsorted(ids, of, right=True, out_int32=True))


def forward(q, k, v, causal: bool, scale: float, config: BlockConfig, documents=None):
    """out (b, sq, h, d) in q's dtype and lse (b, h, sq) float32, for valid inputs;
    ``documents``: None, or the queries' and the keys' document ids, ``(b, sq)`` and
    ``(b, sk)``: attention within documents."""
    q, k, v = (_inner_contiguous(t) for t in (q, k, v))
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    # without documents the kernel reads no ranges: any pointer stands in
    k_lo, k_hi = document_ranges(documents[1], documents[0]) if documents else (lse, lse)
    grid = (triton.cdiv(seq_q, config.fwd_m), batch * heads)
    _fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        k_lo,
        k_hi,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        seq_q,
        seq_k,
        heads,
        heads // kv_heads,
        scale * LOG2E,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        CAUSAL=causal,
        BLOCK_M=config.fwd_m,
        BLOCK_N=config.fwd_n,
        PRECISION=_precision(q.dtype),
        HAS_DOCS=documents is not None,
        num_warps=config.warps,
        num_stages=config.stages,
    )
    return out, lse


def backward(q, k, v, out, lse, dout, dlse, causal: bool, scale: float, config: BlockConfig,
             documents=None):
    """dq, dk, dv for the gradients ``dout`` (of out) and ``dlse`` (of lse; may be None);
    ``documents`` as in ``forward``."""
    q, k, v, out, dout = (_inner_contiguous(t) for t in (q, k, v, out, dout))
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    precision = _precision(q.dtype)
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else delta
    _bwd_delta_kernel[(triton.cdiv(seq_q, 64), batch * heads)](
        out,
        dout,
        dlse,
        delta,
        *_strides(out),
        *_strides(dout),
        seq_q,
        heads,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_M=64,
        HAS_DLSE=has_dlse,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    common = dict(
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        CAUSAL=causal,
        PRECISION=precision,
        HAS_DOCS=documents is not None,
        num_warps=config.warps,
        num_stages=config.stages,
    )
    k_lo, k_hi = document_ranges(documents[1], documents[0]) if documents else (delta, delta)
    q_lo, q_hi = (
        (k_lo, k_hi) if not documents or documents[0] is documents[1]  # self-attention: the same
        else document_ranges(documents[0], documents[1])
    )
    _bwd_dkv_kernel[(triton.cdiv(seq_k, config.dkv_n), batch * kv_heads)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        q_lo,
        q_hi,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dout),
        seq_q,
        seq_k,
        heads,
        kv_heads,
        group,
        scale * LOG2E,
        scale,
        BLOCK_M=config.dkv_m,
        BLOCK_N=config.dkv_n,
        **common,
    )
    _bwd_dq_kernel[(triton.cdiv(seq_q, config.dq_m), batch * heads)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        k_lo,
        k_hi,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dout),
        seq_q,
        seq_k,
        heads,
        group,
        scale * LOG2E,
        scale,
        BLOCK_M=config.dq_m,
        BLOCK_N=config.dq_n,
        **common,
    )
    return dq, dk, dv


# --- the op: one forward and one backward, registered with torch ---------------------------------
#
# As torch custom ops (``torch.ops.orch.flash_attention_forward`` / ``_backward``), not an
# ``autograd.Function``: the dispatcher then sees the attention as one op, so selective activation
# checkpointing can keep its output (``orch.parallel.recompute`` names the forward; the Triton
# launches inside a Function are invisible to it, and the attention would run again in the
# backward), and ``torch.compile`` traces around it from its fake (shape-only) implementation
# instead of into the launcher. Tiles travel as the integers of a ``BlockConfig``.


@torch.library.custom_op("orch::flash_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    tiles: list[int], q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, v, causal, scale, BlockConfig(*tiles), _documents(q_doc, k_doc))


@_forward_op.register_fake
def _forward_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs' shapes: q's, and (batch, heads, seq_q) (the rest play no part)."""
    batch, seq_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_q), dtype=torch.float32)


@torch.library.custom_op("orch::flash_attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    tiles: list[int],
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(q, k, v, out, lse, dout, dlse, causal, scale, BlockConfig(*tiles),
                    _documents(q_doc, k_doc))


@_backward_op.register_fake
def _backward_shapes(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, *rest: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients' shapes: those of q, k and v (the rest of the arguments play no part)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _documents(q_doc: torch.Tensor | None, k_doc: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The launchers' ``documents`` from the ops' two optional tensors (both or neither)."""
    return None if q_doc is None or k_doc is None else (q_doc, k_doc)


def _keep_for_backward(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd API)
    q, k, v, causal, scale, tiles, q_doc, k_doc = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_doc, k_doc)
    ctx.causal, ctx.scale, ctx.tiles = causal, scale, tiles
    ctx.set_materialize_grads(False)  # no gradient on lse: the backward skips its term


def _gradients(ctx, dout, dlse):  # noqa: ANN001, ANN202 (autograd API)
    if dout is None and dlse is None:
        return (None,) * 8
    q, k, v, out, lse, q_doc, k_doc = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _backward_op(dout, dlse, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.tiles,
                              q_doc, k_doc)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_gradients, setup_context=_keep_for_backward)


def flash_attention_triton(
    q,
    k,
    v,
    causal: bool = False,
    softmax_scale: float | None = None,
    config: BlockConfig | None = None,
    documents: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """The Triton path without dispatch or input checks: (out, lse), differentiable;
    ``documents``: None, or the (query, key) document ids (``forward``)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    config = config or default_config(q.shape[-1], q.dtype)
    config.validate()
    q_doc, k_doc = documents if documents is not None else (None, None)
    return _forward_op(q, k, v, causal, float(scale), list(astuple(config)), q_doc, k_doc)
