"""Triton backward kernels of flash attention (design in ``kernels``): delta, dK/dV, dQ."""

from __future__ import annotations

import triton
import triton.language as tl

from orch.kernels.attention.triton_forward import (
    _document_blocks,
    _key_blocks,
    _keys_seen,
    _load_tile,
    _query_program,
    _store_tile,
)


@triton.jit
def _bwd_delta_kernel(
    Out,
    DO,
    DLSE,
    DELTA,
    sob,
    sos,
    soh,
    sdb,
    sds,
    sdh,
    seq_q,
    heads,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    o = _load_tile(
        Out + b * sob + h * soh + rows[:, None] * sos + cols[None, :],
        rows,
        seq_q,
        cols,
        HEAD_DIM,
        True,
        HEAD_DIM == D_PAD,
    )
    do = _load_tile(
        DO + b * sdb + h * sdh + rows[:, None] * sds + cols[None, :],
        rows,
        seq_q,
        cols,
        HEAD_DIM,
        True,
        HEAD_DIM == D_PAD,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs = (b * heads + h) * seq_q + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + offs, mask=rows < seq_q, other=0.0)
    tl.store(DELTA + offs, delta, mask=rows < seq_q)


@triton.jit
def _dkv_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    sqs,
    sds,
    keys,
    q_lo,
    q_hi,
    offs_m,
    cols,
    lo,
    hi,
    seq_q,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        q = _load_tile(
            q_base + rows[:, None] * sqs + cols[None, :], rows, seq_q, cols, HEAD_DIM, MASK, EVEN_D
        )
        do = _load_tile(
            do_base + rows[:, None] * sds + cols[None, :], rows, seq_q, cols, HEAD_DIM, MASK, EVEN_D
        )
        if MASK:
            lse = tl.load(lse_base + rows, mask=rows < seq_q, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (keys, rows)
        # a row that sees no key has lse -inf and pt inf here: masked to exactly 0 below
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        if MASK:
            if HAS_DOCS:  # the rows of each key's document (inside the sequence)
                keep = (rows[None, :] >= q_lo[:, None]) & (rows[None, :] < q_hi[:, None])
            else:
                keep = rows[None, :] < seq_q
            if CAUSAL:
                keep = keep & (rows[None, :] >= keys[:, None])
            pt = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    QLO,
    QHI,
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    svb,
    svs,
    svh,
    sdb,
    sds,
    sdh,
    seq_q,
    seq_k,
    heads,
    kv_heads,
    group,
    qk_scale,
    softmax_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    b64 = b.to(tl.int64)
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    k_ptrs = K + b64 * skb + kvh.to(tl.int64) * skh + keys[:, None] * sks + cols[None, :]
    v_ptrs = V + b64 * svb + kvh.to(tl.int64) * svh + keys[:, None] * svs + cols[None, :]
    k = _load_tile(k_ptrs, keys, seq_k, cols, HEAD_DIM, True, EVEN_D)
    v = _load_tile(v_ptrs, keys, seq_k, cols, HEAD_DIM, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    # query blocks in three loops: masked [lead, lead_end), unmasked [lo, full_q), masked
    # [tail, tail_end)
    q_lo, q_hi = keys, keys  # the ranges are read with documents only
    if HAS_DOCS:  # only the query blocks of the keys' documents; with causal, rows from start_n
        if CAUSAL:
            floor = start_n
            full_floor = start_n + BLOCK_N
        else:
            floor = 0
            full_floor = 0
        q_lo, q_hi, lead, lo, full_q, tail_end = _document_blocks(
            QLO + b64 * seq_k, QHI + b64 * seq_k, keys, seq_k, seq_q, floor, full_floor, seq_q,
            seq_q, BLOCK_M
        )
        lead_end = lo
        tail = full_q
    else:
        full_q = (seq_q // BLOCK_M) * BLOCK_M
        lead = start_n
        tail_end = seq_q
        if CAUSAL:  # rows start_n .. start_n + BLOCK_N straddle the diagonal; later rows see it
            lead_end = tl.minimum(start_n + BLOCK_N, seq_q)
            lo = start_n + BLOCK_N
        else:
            lead_end = 0
            lo = 0
        tail = tl.maximum(lo, full_q)
    for g in range(group):
        h = (kvh * group + g).to(tl.int64)
        q_base = Q + b64 * sqb + h * sqh
        do_base = DO + b64 * sdb + h * sdh
        row_base = (b64 * heads + h) * seq_q
        dk, dv = _dkv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            LSE + row_base,
            DELTA + row_base,
            sqs,
            sds,
            keys,
            q_lo,
            q_hi,
            offs_m,
            cols,
            lead,
            lead_end,
            seq_q,
            qk_scale,
            HEAD_DIM,
            EVEN_D,
            BLOCK_M,
            CAUSAL,
            True,
            PRECISION,
            HAS_DOCS,
        )
        dk, dv = _dkv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            LSE + row_base,
            DELTA + row_base,
            sqs,
            sds,
            keys,
            q_lo,
            q_hi,
            offs_m,
            cols,
            lo,
            full_q,
            seq_q,
            qk_scale,
            HEAD_DIM,
            EVEN_D,
            BLOCK_M,
            CAUSAL,
            False,
            PRECISION,
            HAS_DOCS,
        )
        dk, dv = _dkv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            LSE + row_base,
            DELTA + row_base,
            sqs,
            sds,
            keys,
            q_lo,
            q_hi,
            offs_m,
            cols,
            tail,
            tail_end,
            seq_q,
            qk_scale,
            HEAD_DIM,
            EVEN_D,
            BLOCK_M,
            CAUSAL,
            True,
            PRECISION,
            HAS_DOCS,
        )
    # DK/DV are contiguous (batch, seq_k, kv_heads, head_dim)
    out = (b64 * seq_k * kv_heads + kvh) * HEAD_DIM + keys[:, None] * (kv_heads * HEAD_DIM)
    _store_tile(
        DK + out + cols[None, :],
        (dk * softmax_scale).to(DK.dtype.element_ty),
        keys,
        seq_k,
        cols,
        HEAD_DIM,
    )
    _store_tile(DV + out + cols[None, :], dv.to(DV.dtype.element_ty), keys, seq_k, cols, HEAD_DIM)


@triton.jit
def _dq_blocks(
    dq,
    q,
    do,
    lse2,
    delta,
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
        v = _load_tile(
            v_base + keys[:, None] * svs + cols[None, :], keys, seq_k, cols, HEAD_DIM, MASK, EVEN_D
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])  # inf in a row that sees no key: masked to 0 below
        if MASK:
            p = tl.where(_keys_seen(rows, keys, k_lo, k_hi, seq_k, CAUSAL, HAS_DOCS), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
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
    sdb,
    sds,
    sdh,
    seq_q,
    seq_k,
    heads,
    group,
    qk_scale,
    softmax_scale,
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
    do = _load_tile(
        DO + b * sdb + h * sdh + rows[:, None] * sds + cols[None, :],
        rows,
        seq_q,
        cols,
        HEAD_DIM,
        True,
        EVEN_D,
    )
    row_offs = (b * heads + h) * seq_q + rows
    lse2 = tl.load(LSE + row_offs, mask=rows < seq_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_offs, mask=rows < seq_q, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    k_lo, k_hi, full_start = rows, rows, 0  # the ranges are read with documents only
    if HAS_DOCS:  # the forward's key blocks
        k_lo, k_hi, lo, full_start, full_end, hi = _key_blocks(
            KLO + b * seq_q, KHI + b * seq_q, rows, start_m, seq_q, seq_k, CAUSAL, BLOCK_M,
            BLOCK_N
        )
        dq = _dq_blocks(
            dq,
            q,
            do,
            lse2,
            delta,
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
    elif CAUSAL:
        full_end = start_m
        hi = tl.minimum(start_m + BLOCK_M, seq_k)
    else:
        full_end = (seq_k // BLOCK_N) * BLOCK_N
        hi = seq_k
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse2,
        delta,
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
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse2,
        delta,
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
    # DQ is contiguous (batch, seq_q, heads, head_dim)
    out = (b * seq_q * heads + h) * HEAD_DIM + rows[:, None] * (heads * HEAD_DIM) + cols[None, :]
    _store_tile(DQ + out, (dq * softmax_scale).to(DQ.dtype.element_ty), rows, seq_q, cols, HEAD_DIM)
