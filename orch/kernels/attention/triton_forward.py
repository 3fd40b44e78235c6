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
def _document_blocks(LO, HI, idx, n_idx, n_other, floor, full_floor, full_ceil, ceil,
                     BLOCK: tl.constexpr):
    """Which blocks of ``BLOCK`` positions of the other sequence a program's positions ``idx``
    (its query rows, or its keys) see within documents, given each one's visible range
    ``[LO[i], HI[i])`` there (the positions of its document; ``searchsorted`` on the host).

    Causality bounds them further: ``[floor, ceil)`` for any position of the program,
    ``[full_floor, full_ceil)`` for all of them. Returns the ranges (the masked blocks' mask;
    ``[n_other, 0)``, nothing, past ``n_idx``) and ``(start, full_lo, full_hi, end)``: blocks
    in ``[full_lo, full_hi)`` are inside every position's range and need no mask, those in
    ``[start, full_lo)`` and ``[full_hi, end)`` straddle a boundary, and none outside
    ``[start, end)`` is seen by any position (never loaded). ``start``, ``full_lo`` and
    ``full_hi`` are multiples of ``BLOCK``, so the three loops step over one grid of blocks.
    """
    valid = idx < n_idx
    lo = tl.load(LO + idx, mask=valid, other=n_other)
    hi = tl.load(HI + idx, mask=valid, other=0)
    start = tl.maximum(tl.min(lo, 0), floor) // BLOCK * BLOCK
    end = tl.minimum(tl.max(hi, 0), ceil)
    full_lo = tl.maximum(tl.max(tl.where(valid, lo, 0), 0), full_floor)
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK) * BLOCK, end)
    full_hi = tl.minimum(tl.min(tl.where(valid, hi, n_other), 0), full_ceil) // BLOCK * BLOCK
    return lo, hi, start, full_lo, tl.maximum(full_hi, full_lo), end


@triton.jit
def _key_blocks(KLO, KHI, rows, start_m, seq_q, seq_k, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_document_blocks`` of a query block (the forward's, dQ's): with ``causal`` (seq_q ==
    seq_k) its keys end at its last row, and every row sees those before ``start_m``."""
    if CAUSAL:
        full_ceil = start_m
        ceil = tl.minimum(start_m + BLOCK_M, seq_k)
    else:
        full_ceil = seq_k
        ceil = seq_k
    return _document_blocks(KLO, KHI, rows, seq_q, seq_k, 0, 0, full_ceil, ceil, BLOCK_N)


@triton.jit
def _keys_seen(rows, keys, k_lo, k_hi, seq_k, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The (rows, keys) mask of a block that straddles a boundary: keys inside the sequence,
    with documents inside each row's document's keys ``[k_lo, k_hi)`` (within the sequence
    too), and with ``causal`` at or before the row. For nondecreasing ids the range is the
    document mask ``q_doc == k_doc`` without loading a key's id per block."""
    if HAS_DOCS:
        keep = (keys[None, :] >= k_lo[:, None]) & (keys[None, :] < k_hi[:, None])
    else:
        keep = keys[None, :] < seq_k
    if CAUSAL:
        keep = keep & (rows[:, None] >= keys[None, :])
    return keep


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
    k_lo,
    k_hi,
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
    HAS_DOCS: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        k = _load_tile(
            k_base + keys[:, None] * sks + cols[None, :], keys, seq_k, cols, HEAD_DIM, MASK, EVEN_D
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            keep = _keys_seen(rows, keys, k_lo, k_hi, seq_k, CAUSAL, HAS_DOCS)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if MASK:
            if HAS_DOCS:  # a row that has seen no key yet: exp2(-inf - 0) = 0, not NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
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
    KLO,
    KHI,
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
    HAS_DOCS: tl.constexpr,
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
    k_lo, k_hi, full_start = rows, rows, 0  # the ranges are read with documents only
    if HAS_DOCS:  # only the key blocks the rows' documents hold; the leading ones straddle
        k_lo, k_hi, lo, full_start, full_end, hi = _key_blocks(
            KLO + b * seq_q, KHI + b * seq_q, rows, start_m, seq_q, seq_k, CAUSAL, BLOCK_M,
            BLOCK_N
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
            k_lo,
            k_hi,
            offs_n,
            cols,
            lo,
            full_start,
            seq_k,
            qk_scale,
            HEAD_DIM,
            EVEN_D,
            BLOCK_N,
            CAUSAL,
            True,
            PRECISION,
            HAS_DOCS,
        )
    elif CAUSAL:  # seq_q == seq_k; keys before start_m are visible to every row of the block
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
        k_lo,
        k_hi,
        offs_n,
        cols,
        full_start,
        full_end,
        seq_k,
        qk_scale,
        HEAD_DIM,
        EVEN_D,
        BLOCK_N,
        CAUSAL,
        False,
        PRECISION,
        HAS_DOCS,
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
        k_lo,
        k_hi,
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
        HAS_DOCS,
    )
    if HAS_DOCS:  # a row that saw no key (its document is not among them): out 0, lse -inf
        l_i = tl.where(l_i > 0, l_i, 1.0)
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
