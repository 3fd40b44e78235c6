"""Triton kernels for the MoE dispatch ops, and the torch ops that run them.

Imported only when a kernel runs (``orch.kernels.moe`` picks the path), so importing orch never
imports triton. Three row kernels cover permute and unpermute both ways:

- ``_scatter_rows``: ``dst[row_map[t, k]] = w[t, k] * src[t]`` (permute forward, unpermute's
  gradient for ``expert_out``). Each program reads a token's slice once and writes its K copies.
- ``_gather_rows``: ``dst[t] = sum_k w[t, k] * src[row_map[t, k]]`` (unpermute forward, permute's
  gradient for ``tokens``). A fixed order over k, no atomics: deterministic.
- ``_row_dots``: ``dw[t, k] = <src[row_map[t, k]], g[t]>`` (unpermute's gradient for weights).

Dropped copies (row_map -1) are masked out. Sums run in float32 (float64 for float64 inputs).
Offsets are int64, so ``rows * hidden`` may pass 2**31.

``_grouped_mm`` runs every expert in one launch: program (i, j) takes the i-th M-tile of the
concatenated per-expert tiles (an expert of n rows owns ceil(n / BLOCK_M) of them) and finds its
expert by counting the cumulative tile ends below i, so the grid (ceil(M / BLOCK_M) + E tiles,
an upper bound) needs no host sync; spare programs return at once. ``_grouped_mm_dw`` gives
``dw[e] = x_e^T @ g_e`` with one program per (expert, output tile), looping over the expert's
rows; an empty expert stores zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed tile shapes (not autotuned: autotuning would also run every config in interpreter mode).
# Small BLOCK_M wastes less on the partial last tile of each expert when routing is uneven.
MM_BLOCKS = {  # dtype -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    torch.float32: (64, 64, 32, 4, 3),
    torch.float16: (64, 128, 64, 4, 3),
    torch.bfloat16: (64, 128, 64, 4, 3),
}
MM_DTYPES = tuple(MM_BLOCKS)


def _acc(*tensors: torch.Tensor | None):
    """float32 sums, float64 when an input is float64 (as the reference)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return tl.float64 if wide else tl.float32


def _block_h(hidden: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(hidden)))


@triton.jit
def _scatter_rows(src, dst, row_map, w, hidden, top_k, stride_src, stride_dst,
                  HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    x = tl.load(src + t * stride_src + cols, mask=cmask, other=0.0)
    for k in range(top_k):
        row = tl.load(row_map + t * top_k + k)
        if HAS_W:
            y = (x.to(ACC) * tl.load(w + t * top_k + k).to(ACC)).to(dst.dtype.element_ty)
        else:
            y = x
        # cols * 0 + row: a block, as the interpreter rejects a block & scalar mask
        tl.store(dst + row * stride_dst + cols, y, mask=cmask & (cols * 0 + row >= 0))


@triton.jit
def _gather_rows(src, dst, row_map, w, hidden, top_k, stride_src, stride_dst,
                 HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for k in range(top_k):
        row = tl.load(row_map + t * top_k + k)
        valid = cmask & (cols * 0 + row >= 0)
        x = tl.load(src + tl.maximum(row, 0) * stride_src + cols, mask=valid, other=0.0)
        x = x.to(ACC)
        if HAS_W:
            x = x * tl.load(w + t * top_k + k).to(ACC)
        acc += x
    tl.store(dst + t * stride_dst + cols, acc.to(dst.dtype.element_ty), mask=cmask)


@triton.jit
def _row_dots(src, grad, row_map, dw, hidden, top_k, stride_src, stride_grad,
              ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    row = tl.load(row_map + t * top_k + k)
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for h in range(0, hidden, BLOCK_H):
        cols = h + tl.arange(0, BLOCK_H)
        cmask = cols < hidden
        valid = cmask & (cols * 0 + row >= 0)
        x = tl.load(src + tl.maximum(row, 0) * stride_src + cols, mask=valid, other=0.0)
        g = tl.load(grad + t * stride_grad + cols, mask=cmask, other=0.0)
        acc += x.to(ACC) * g.to(ACC)
    tl.store(dw + t * top_k + k, tl.sum(acc).to(dw.dtype.element_ty))


@triton.jit
def _grouped_mm(x, w, out, offsets, tile_cum, num_experts, n, kdim,
                sxm, sxk, swe, swk, swn, som, son,
                E_POW2: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(tile_cum + num_experts):
        return
    es = tl.arange(0, E_POW2)
    ends = tl.load(tile_cum + 1 + es, mask=es < num_experts, other=2**30)
    e = tl.sum((ends <= pid_m).to(tl.int32))
    first_row = tl.load(offsets + e) + (pid_m - tl.load(tile_cum + e)) * BLOCK_M
    end_row = tl.load(offsets + e + 1)
    rows = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < end_row
    cmask = cols < n
    w_e = w + e.to(tl.int64) * swe
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, kdim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < kdim
        a = tl.load(x + rows[:, None] * sxm + ks[None, :] * sxk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_e + ks[:, None] * swk + cols[None, :] * swn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(out + rows[:, None] * som + cols[None, :] * son, acc.to(out.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_mm_dw(x, g, dw, offsets, kdim, n,
                   sxm, sxk, sgm, sgn, sde, sdk, sdn, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = ks < kdim
    cmask = cols < n
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < end
        a = tl.load(x + rows[None, :] * sxm + ks[:, None] * sxk,
                    mask=kmask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(g + rows[:, None] * sgm + cols[None, :] * sgn,
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(dw + e.to(tl.int64) * sde + ks[:, None] * sdk + cols[None, :] * sdn,
             acc.to(dw.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------- launchers


def scatter_rows(src: torch.Tensor, row_map: torch.Tensor, w: torch.Tensor | None, rows: int,
                 dtype: torch.dtype) -> torch.Tensor:
    src, row_map = src.contiguous(), row_map.contiguous()
    dst = torch.empty(rows, src.shape[1], dtype=dtype, device=src.device)
    tokens, top_k = row_map.shape
    if tokens and src.shape[1] and rows:
        block = _block_h(src.shape[1])
        grid = (tokens, triton.cdiv(src.shape[1], block))
        _scatter_rows[grid](src, dst, row_map, src if w is None else w.contiguous(),
                            src.shape[1], top_k, src.stride(0), dst.stride(0),
                            HAS_W=w is not None, ACC=_acc(src, w), BLOCK_H=block)
    return dst


def gather_rows(src: torch.Tensor, row_map: torch.Tensor, w: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    src, row_map = src.contiguous(), row_map.contiguous()
    tokens, top_k = row_map.shape
    dst = torch.empty(tokens, src.shape[1], dtype=dtype, device=src.device)
    if tokens and src.shape[1]:
        if src.shape[0] == 0:  # every copy dropped: nothing to read
            return dst.zero_()
        block = _block_h(src.shape[1])
        grid = (tokens, triton.cdiv(src.shape[1], block))
        _gather_rows[grid](src, dst, row_map, src if w is None else w.contiguous(),
                           src.shape[1], top_k, src.stride(0), dst.stride(0),
                           HAS_W=w is not None, ACC=_acc(src, w), BLOCK_H=block)
    return dst


def row_dots(src: torch.Tensor, grad: torch.Tensor, row_map: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    src, grad, row_map = src.contiguous(), grad.contiguous(), row_map.contiguous()
    dw = torch.zeros(row_map.shape, dtype=dtype, device=grad.device)
    if row_map.numel() and src.shape[0] and src.shape[1]:
        _row_dots[row_map.shape](src, grad, row_map, dw, src.shape[1], row_map.shape[1],
                                 src.stride(0), grad.stride(0), ACC=_acc(src, grad),
                                 BLOCK_H=min(_block_h(src.shape[1]), 256))
    return dw


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's default float32 matmul
    return "tf32"  # ignored for 16-bit inputs


def _offsets(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    zero = counts.new_zeros(1)
    offsets = torch.cat([zero, torch.cumsum(counts, 0)])
    tiles = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")
    return offsets, torch.cat([zero, torch.cumsum(tiles, 0)])


def grouped_mm_forward(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``out = x_e @ w[e]`` per expert; ``w`` may be any strided view (the backward passes
    ``w.transpose(1, 2)``)."""
    m, kdim = x.shape
    experts, _, n = w.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if kdim == 0:
        return out.zero_()
    block_m, block_n, block_k, warps, stages = MM_BLOCKS[x.dtype]
    offsets, tile_cum = _offsets(counts, block_m)
    grid = (triton.cdiv(m, block_m) + experts, triton.cdiv(n, block_n))
    _grouped_mm[grid](x, w, out, offsets, tile_cum, experts, n, kdim,
                      x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
                      out.stride(0), out.stride(1),
                      E_POW2=triton.next_power_of_2(experts), PRECISION=_precision(x.dtype),
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      num_warps=warps, num_stages=stages)
    return out


def grouped_mm_weight_grad(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor,
                           experts: int) -> torch.Tensor:
    """``dw[e] = x_e^T @ g_e``; zeros for an expert with no rows."""
    m, kdim = x.shape
    n = g.shape[1]
    dw = torch.empty(experts, kdim, n, dtype=x.dtype, device=x.device)
    if m == 0 or kdim == 0 or n == 0:
        return dw.zero_()
    block_m, block_n, block_k, warps, stages = MM_BLOCKS[x.dtype]
    offsets, _ = _offsets(counts, block_m)
    grid = (experts, triton.cdiv(kdim, block_k), triton.cdiv(n, block_n))
    _grouped_mm_dw[grid](x, g, dw, offsets, kdim, n, x.stride(0), x.stride(1),
                         g.stride(0), g.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
                         PRECISION=_precision(x.dtype),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         num_warps=warps, num_stages=stages)
    return dw


# ---------------------------------------------------------------------------- torch ops


# Every kernel runs as a torch custom op (``torch.ops.orch.*``), not inside an autograd.Function:
# selective recompute then sees each as one op (and keeps the grouped GEMM's output:
# ``orch.parallel.recompute`` names it; it is most of a MoE layer's compute, which a Function's
# Triton launches, invisible to the checkpoint, would run again in the backward), and
# ``torch.compile`` traces around them from their shape-only implementations.
#
# Permute is a row scatter and unpermute a row gather, each the other's gradient; the weights'
# gradient is a dot per routed copy (``row_dots``). Only what a gradient needs is saved: the
# rows themselves only when the weights want a gradient.


@torch.library.custom_op("orch::moe_scatter_rows", mutates_args=())
def scatter_op(src: torch.Tensor, row_map: torch.Tensor, w: torch.Tensor | None, rows: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``dst[row_map[t, k]] = w[t, k] * src[t]`` into ``rows`` rows (moe_permute's forward)."""
    return scatter_rows(src, row_map, w, rows, dtype)


@scatter_op.register_fake
def _scatter_shape(src: torch.Tensor, row_map: torch.Tensor, w: torch.Tensor | None, rows: int,
                   dtype: torch.dtype) -> torch.Tensor:
    return src.new_empty(rows, src.shape[1], dtype=dtype)


@torch.library.custom_op("orch::moe_gather_rows", mutates_args=())
def gather_op(src: torch.Tensor, row_map: torch.Tensor, w: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    """``dst[t] = sum_k w[t, k] * src[row_map[t, k]]`` (moe_unpermute's forward)."""
    return gather_rows(src, row_map, w, dtype)


@gather_op.register_fake
def _gather_shape(src: torch.Tensor, row_map: torch.Tensor, w: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    return src.new_empty(row_map.shape[0], src.shape[1], dtype=dtype)


@torch.library.custom_op("orch::moe_row_dots", mutates_args=())
def _row_dots_op(src: torch.Tensor, grad: torch.Tensor, row_map: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    return row_dots(src, grad, row_map, dtype)


@_row_dots_op.register_fake
def _row_dots_shape(src: torch.Tensor, grad: torch.Tensor, row_map: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    return grad.new_empty(row_map.shape, dtype=dtype)


def _keep_rows(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd API)
    src, row_map, w = inputs[:3]
    weights_grad = w is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(src if weights_grad else None, row_map, w)
    ctx.rows, ctx.dtype = src.shape[0], src.dtype


def _scatter_grads(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202 (autograd API)
    src, row_map, w = ctx.saved_tensors
    d_src = gather_op(grad, row_map, w, ctx.dtype) if ctx.needs_input_grad[0] else None
    d_w = None if src is None else _row_dots_op(grad, src, row_map, w.dtype)
    return d_src, None, d_w, None, None


def _gather_grads(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202 (autograd API)
    src, row_map, w = ctx.saved_tensors
    d_src = (scatter_op(grad, row_map, w, ctx.rows, ctx.dtype) if ctx.needs_input_grad[0]
             else None)
    d_w = None if src is None else _row_dots_op(src, grad, row_map, w.dtype)
    return d_src, None, d_w, None


scatter_op.register_autograd(_scatter_grads, setup_context=_keep_rows)
gather_op.register_autograd(_gather_grads, setup_context=_keep_rows)


@torch.library.custom_op("orch::grouped_mm", mutates_args=())
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_forward`` as an op; differentiable in ``x`` and ``w``."""
    return grouped_mm_forward(x, w, counts)


@grouped_mm_op.register_fake
def _grouped_mm_shape(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("orch::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor,
                    experts: int) -> torch.Tensor:
    return grouped_mm_weight_grad(x, g, counts, experts)


@_weight_grad_op.register_fake
def _weight_grad_shape(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor,
                       experts: int) -> torch.Tensor:
    return x.new_empty(experts, x.shape[1], g.shape[1])


def _keep_for_backward(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd API)
    ctx.save_for_backward(*inputs)


def _grouped_mm_grads(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202 (autograd API)
    x, w, counts = ctx.saved_tensors
    grad = grad.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = grouped_mm_op(grad, w.transpose(1, 2), counts)
    if ctx.needs_input_grad[1]:
        dw = _weight_grad_op(x, grad, counts, w.shape[0])
    return dx, dw, None


grouped_mm_op.register_autograd(_grouped_mm_grads, setup_context=_keep_for_backward)
