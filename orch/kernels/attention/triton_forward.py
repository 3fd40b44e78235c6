"""Triton forward kernel of flash attention (design in ``kernels``), and the tile load/store
helpers the backward kernels share."""

from __future__ import annotations

import triton
import triton.language as tl

# --- shared helpers -----------------------------------------------------------------------------


@triton.jit
def _load_tile(
    ptrs, rows, n_rows, cols, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr
):
    """Load a (rows, head_dim) tile; zero outside the sequence and the padded head_dim."""
    if CHECK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(
                ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0
            )
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, tile, rows, n_rows, cols, HEAD_DIM: tl.constexpr):
    tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _query_program(heads, group, BLOCK_M: tl.constexpr):
    """This program's query block: (first row, batch, head, its kv head, the block's rows).

    Grid axis 0 walks query blocks, axis 1 (batch x heads); a query head reads kv head
    ``h // group`` (grouped-query attention). Indices are int64 for large strides.
    """
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    kvh = (h // group).to(tl.int64)
    return start_m, b, h.to(tl.int64), kvh, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _fwd_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    sks,
    svs,
    rows,
    offs_n,
    cols,
    lo,
    hi,
    seq_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        k = _load_tile(
            k_base + keys[:, None] * sks + cols[None, :], keys, seq_k, cols, HEAD_DIM, MASK, EVEN_D
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            keep = keys[None, :] < seq_k
            if CAUSAL:
                keep = keep & (rows[:, None] >= keys[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(
            v_base + keys[:, None] * svs + cols[None, :], keys, seq_k, cols, HEAD_DIM, MASK, EVEN_D
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    svb,
    svs,
    svh,
    sob,
    sos,
    soh,
    seq_q,
    seq_k,
    heads,
    group,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    start_m, b, h, kvh, rows = _query_program(heads, group, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    q = _load_tile(
        Q + b * sqb + h * sqh + rows[:, None] * sqs + cols[None, :],
        rows,
        seq_q,
        cols,
        HEAD_DIM,
        True,
        EVEN_D,
    )
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if CAUSAL:  # seq_q == seq_k; keys before start_m are visible to every row of the block
        full_end = start_m
        hi = tl.minimum(start_m + BLOCK_M, seq_k)
    else:
        full_end = (seq_k // BLOCK_N) * BLOCK_N
        hi = seq_k
    acc, l_i, m_i = _fwd_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        sks,
        svs,
        rows,
        offs_n,
        cols,
        0,
        full_end,
        seq_k,
        qk_scale,
        HEAD_DIM,
        EVEN_D,
        BLOCK_N,
        CAUSAL,
        False,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        sks,
        svs,
        rows,
        offs_n,
        cols,
        full_end,
        hi,
        seq_k,
        qk_scale,
        HEAD_DIM,
        EVEN_D,
        BLOCK_N,
        CAUSAL,
        True,
        PRECISION,
    )
    out = acc / l_i[:, None]
    _store_tile(
        Out + b * sob + h * soh + rows[:, None] * sos + cols[None, :],
        out.to(Out.dtype.element_ty),
        rows,
        seq_q,
        cols,
        HEAD_DIM,
    )
    tl.store(
        LSE + (b * heads + h) * seq_q + rows,
        (m_i + tl.log2(l_i)) * 0.6931471805599453,
        mask=rows < seq_q,
    )
