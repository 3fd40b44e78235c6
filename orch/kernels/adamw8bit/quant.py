"""Block-wise dynamic 8-bit quantization (Dettmers et al. 2021), the plain-torch specification.

**The maps.** Dynamic quantization spends one byte per value as: a sign bit (signed map only),
then a run of zero bits whose length ``e`` is a base-10 exponent, then an indicator bit 1, and
the remaining bits as a linear fraction. With ``f`` fraction bits the ``2**f`` codes of
exponent ``e`` are the centres of ``2**f`` equal bins of ``[0.1, 1]``, scaled by ``10**-e``.
Seven bits after the sign give ``e`` in ``0..6`` with ``6 - e`` fraction bits; the all-zero
pattern is 0, and the one spare code is 1.0, so a block's largest positive value is exact. The
unsigned map (the second moment is never negative) turns the sign bit into one more fraction
bit: each exponent has twice the codes. Both maps are 256 sorted fp32 values; a code byte is an
index into its map.

**The blocks.** A tensor of two or more dimensions is seen as ``[rows, rest]`` (``rows`` its
first dimension). Blocks are runs of ``BLOCK`` elements *within a row* (the last block of a row
is shorter when ``rest`` is not a multiple of ``BLOCK``), and each block has one fp32 absmax, so
absmax has shape ``[rows, ceil(rest / BLOCK)]``. When ``rest`` is a multiple of ``BLOCK`` (every
common LLM width) this is exactly the paper's chunking of the flattened tensor. Keeping blocks
inside rows is what lets FSDP2's dim-0 shards own whole blocks: a shard quantizes precisely the
blocks the unsharded tensor would, and DCP can reshard the states.

**Rounding.** A value ``x`` normalised by its block's absmax becomes the index of the nearest
code: ``#{midpoints < x}`` over the 255 midpoints between neighbouring codes
(``torch.bucketize`` semantics; a tie goes to the lower code), except that the unsigned map
rounds every positive value up to at least its smallest nonzero code (see ``midpoints``: a
second moment stored as 0 beside a nonzero first moment is a step of ``lr * m / eps``).
``torch.bucketize`` costs ~40 ns per element on CPU, so the CPU path gets the same answer from a
table indexed by the bf16 rounding of ``x``: every bf16 value covers an interval of floats that
contains at most one midpoint (checked when the table is built), so the table's entry, the
number of midpoints below the interval and the one midpoint that may lie inside it, settles
``x`` with one comparison. The tests hold this equal to bucketize. Dequantizing reads two codes
at once from a table of code pairs. Both tables pack two fp32 values per fp64 slot, so one
gather fetches both.

The signed map has no code for -1.0 (its most negative is -0.99297): a block whose largest
magnitude is negative stores it 0.7% small, as in the paper's map.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 256
"""Elements per quantization block (one fp32 absmax each)."""


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 codes of the signed (first moment) or unsigned (second) dynamic map."""
    return _dynamic_map(signed).clone()


@functools.cache
def _dynamic_map(signed: bool) -> torch.Tensor:
    top_fraction_bits = 6 if signed else 7  # bits left after sign, exponent run and indicator
    values = [0.0, 1.0]
    for e in range(7):
        k = 2 ** (top_fraction_bits - e)
        for j in range(k):
            magnitude = 10.0**-e * (0.1 + 0.9 * (j + 0.5) / k)
            values.append(magnitude)
            if signed:
                values.append(-magnitude)
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


def zero_code(signed: bool) -> int:
    """The code byte of 0.0 (what a zero moment quantizes to)."""
    return int((_dynamic_map(signed) == 0).nonzero()[0, 0])


def midpoints(signed: bool) -> torch.Tensor:
    """256 fp32 thresholds: the 255 midpoints between neighbouring codes, then +inf; the
    unsigned map's first is 0, so that a positive second moment never rounds to code 0.

    An element whose gradient is under ~4e-4 of its block's largest has ``v`` under the first
    midpoint (1.6e-7 of the block's absmax), while its first moment, ~4e-4 of its block's, is
    far above the signed map's smallest code (5.5e-7): rounded to the nearest code, ``v`` was
    stored as 0 and ``m`` was not, and a step with a zero gradient moved it by ``lr * m / eps``
    (weights of 0.02 jumped by 8 at lr 1e-4: an MoE expert that got no tokens, embedding rows
    of absent tokens). Rounded up, ``v`` is stored too large, never too small, so such an
    element steps less than AdamW would, never more."""
    code = _dynamic_map(signed)
    mids = (code[1:] + code[:-1]) / 2
    if not signed:
        mids[0] = 0.0
    return torch.cat([mids, torch.tensor([float("inf")])])


@dataclass(frozen=True)
class Tables:
    """Everything quantization needs on one device for one map. The two 65,536-entry tables
    hold pairs of fp32 values in one fp64 slot, so one gather fetches both; None where the
    platform does not allow them (big-endian, or a bf16 conversion that is not
    round-to-nearest-even), and the plain 256-entry lookup and bucketize run instead."""

    code: torch.Tensor  # [256] fp32
    mids: torch.Tensor  # [256] fp32, the last +inf
    pairs: torch.Tensor | None  # [65536] (code[lo byte], code[hi byte]) for two codes at once
    buckets: torch.Tensor | None  # [65536] (midpoint, midpoints below) per bf16 bit pattern


@functools.cache
def tables(signed: bool, device: torch.device) -> Tables:
    code = _dynamic_map(signed)
    little = sys.byteorder == "little"
    pairs = torch.stack([code.repeat(256), code.repeat_interleave(256)], dim=1) if little else None
    buckets = _bf16_buckets(signed)

    def packed(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.contiguous().view(torch.float64).view(-1).to(device)

    return Tables(code.to(device), midpoints(signed).to(device), packed(pairs), packed(buckets))


@functools.cache
def _bf16_buckets(signed: bool) -> torch.Tensor | None:
    """[65536, 2] fp32 by bf16 bit pattern (read as unsigned): the one midpoint that may lie in
    the interval of floats rounding to that bf16 value, and the number of midpoints below the
    interval. None where this torch's fp32 -> bf16 conversion is not round-to-nearest-even."""
    if not _bf16_rounds_to_nearest_even():
        return None
    mids = midpoints(signed)[:-1].double().numpy()
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    values = torch.from_numpy(patterns.view(np.int16).copy()).view(torch.bfloat16).double().numpy()
    finite = np.isfinite(values)
    grid = np.unique(values[finite])  # sorted; +0 and -0 collapse
    at = np.searchsorted(grid, values[finite])
    prev = grid[np.maximum(at - 1, 0)]
    nxt = grid[np.minimum(at + 1, len(grid) - 1)]
    lo = (prev + values[finite]) / 2  # every float that rounds to this bf16 value is in [lo, hi]
    hi = (values[finite] + nxt) / 2
    below = np.zeros(65536, dtype=np.int64)
    below[finite] = np.searchsorted(mids, lo, side="left")
    inside = np.searchsorted(mids, hi, side="right") - below[finite]
    relevant = np.abs(values[finite]) <= 2.0  # normalised values lie in [-1, 1]
    assert (inside[relevant] <= 1).all(), "a bf16 interval holds two midpoints"
    padded = np.append(mids, np.inf).astype(np.float32)
    return torch.from_numpy(np.stack([padded[np.minimum(below, 255)],
                                      below.astype(np.float32)], axis=1))


def _bf16_rounds_to_nearest_even() -> bool:
    one, ulp = 1.0, 2.0**-7  # bf16 spacing in [1, 2)
    # two ties (to even: down, then up), then just above a tie and just above a bf16 value
    probes = torch.tensor([one + ulp / 2, one + 1.5 * ulp, one + ulp / 2 + 2.0**-20,
                           one + 2.0**-20])
    want = torch.tensor([one, one + 2 * ulp, one + ulp, one])
    # long enough for the vectorized conversion too
    got = probes.repeat(64).to(torch.bfloat16).float().view(64, 4)
    return bool((got == want).all())


# ---------------------------------------------------------------------------------------------
# Block views and the spec-level functions


def blocks_per_row(rest: int) -> int:
    return -(-rest // BLOCK)


def segments(x2d: torch.Tensor, absmax: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views ``(values [R, nb, len], absmax [R, nb, 1])`` for the full blocks and the short
    last block of every row of ``x2d`` ``[R, rest]``, so block ops broadcast without copies."""
    rest = x2d.shape[1]
    full = rest // BLOCK
    out = []
    if full:
        out.append((x2d[:, : full * BLOCK].unflatten(1, (full, BLOCK)), absmax[:, :full, None]))
    if rest > full * BLOCK:
        out.append((x2d[:, full * BLOCK :].unsqueeze(1), absmax[:, full:, None]))
    return out


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (contiguous, two or more dims) as its ``[rows, rest]`` view."""
    return x.view(x.shape[0], -1)


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, shape of ``x``) and per-block absmax (fp32 ``[rows, blocks per row]``)."""
    x2d = as_rows(x.detach().float().contiguous()).clone()
    t = tables(signed, x.device)
    absmax = torch.empty(x2d.shape[0], blocks_per_row(x2d.shape[1]), device=x.device)
    codes = torch.empty(x2d.shape, dtype=torch.uint8, device=x.device)
    normalize_(x2d, absmax, signed)
    codes_into(x2d.view(-1), codes.view(-1), t, Scratch(x2d.numel(), x.device))
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of ``codes`` (any shape of two or more dims) scaled by their blocks' absmax."""
    out = torch.empty(codes.shape, device=codes.device)
    values_into(as_rows(codes).reshape(-1), absmax, out.view(codes.shape[0], -1),
                tables(signed, codes.device), Scratch(codes.numel(), codes.device))
    return out


# ---------------------------------------------------------------------------------------------
# Chunk-level building blocks (the CPU optimizer step runs these on row chunks)


class Scratch:
    """Preallocated work buffers for chunks of up to ``size`` elements on one device."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.m = torch.empty(size, device=device)
        self.v = torch.empty(size, device=device)
        self.t = torch.empty(size, device=device)
        self.index = torch.empty(size, dtype=torch.int32, device=device)
        self.bf16 = torch.empty(size, dtype=torch.bfloat16, device=device)
        self.pair = torch.empty(size, dtype=torch.float64, device=device)


def values_into(codes: torch.Tensor, absmax: torch.Tensor, out2d: torch.Tensor, t: Tables,
                s: Scratch) -> None:
    """Dequantize flat ``codes`` into ``out2d`` ``[R, rest]`` (contiguous) with ``absmax``."""
    n = codes.numel()
    out = out2d.view(-1)
    even = n - n % 2
    pairs = _as_uint16(codes[:even]) if t.pairs is not None and even else None
    if pairs is not None and t.pairs is not None and out.storage_offset() % 2 == 0:
        index = s.index[: even // 2]
        index.copy_(pairs)  # two codes as one 16-bit table index
        torch.index_select(t.pairs, 0, index, out=out[:even].view(torch.float64))
        if n > even:
            out[even:] = t.code[codes[even:].long()]
    else:
        index = s.index[:n]
        index.copy_(codes)
        torch.index_select(t.code, 0, index, out=out)
    for values, scale in segments(out2d, absmax):
        values.mul_(scale)


def _as_uint16(codes: torch.Tensor) -> torch.Tensor | None:
    try:
        return codes.view(torch.uint16)
    except RuntimeError:  # an odd byte offset
        return None


def normalize_(x2d: torch.Tensor, absmax: torch.Tensor, signed: bool,
               work: torch.Tensor | None = None) -> None:
    """Set ``absmax`` to each block's largest magnitude and divide the block by it in place
    (a block of zeros divides by 1). ``work``: a flat buffer for the magnitudes, if given."""
    magnitude = x2d  # the second moment is never negative
    if signed:
        magnitude = torch.abs(x2d, out=work.view(x2d.shape)) if work is not None else x2d.abs()
    for (values, scale), (mags, _) in zip(segments(x2d, absmax), segments(magnitude, absmax),
                                          strict=True):
        torch.amax(mags, dim=-1, keepdim=True, out=scale)
        values.div_(torch.where(scale == 0, 1.0, scale))


def codes_into(x: torch.Tensor, codes: torch.Tensor, t: Tables, s: Scratch) -> None:
    """Nearest-code bytes of normalised flat ``x`` into flat ``codes`` (bucketize semantics)."""
    n = x.numel()
    if t.buckets is None:
        torch.bucketize(x, t.mids[:-1], out_int32=True, out=s.index[:n])
        codes.copy_(s.index[:n])
        return
    half, index, pair, d = s.bf16[:n], s.index[:n], s.pair[:n], s.t[:n]
    half.copy_(x)  # round to nearest even: picks the interval of floats x lies in
    index.copy_(half.view(torch.uint16))  # its 16-bit pattern is the table index
    torch.index_select(t.buckets, 0, index, out=pair)
    mid, below = pair.view(torch.float32).view(n, 2).unbind(1)
    # x - mid has the exact sign (fp32 subtraction is 0 only for equal values, with gradual
    # underflow); its sign, not a scaling of it: the unsigned map's threshold 0 shares the bf16
    # zero's interval with positive x down to 1e-45, which no fp32 factor saturates to 1
    torch.sub(x, mid, out=d)
    d.sign_().clamp_(0, 1)  # 1 where x > midpoint, else 0
    d.add_(below)
    codes.copy_(d)
