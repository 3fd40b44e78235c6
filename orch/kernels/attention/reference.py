"""The specification of ``flash_attention``, in plain torch: the CPU path, and what tests check
the Triton kernels against.

It materializes the (seq_q, seq_k) score matrix per head, so its memory is quadratic in the
sequence; the Triton kernels compute the same values without it. Every step is an ordinary
differentiable torch op, so autograd gives gradients through both outputs: the attention output
and the log-sum-exp (ring attention's backward needs the latter).
"""

from __future__ import annotations

import math

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    documents: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with its log-sum-exp; inputs are assumed valid (see ``checks``).

    q (batch, seq_q, heads, head_dim); k, v (batch, seq_k, kv_heads, head_dim), query head ``h``
    reading key/value head ``h // (heads // kv_heads)``. Scores are ``softmax_scale * q . k``
    (default ``1/sqrt(head_dim)``); with ``causal`` (seq_q == seq_k) query ``i`` sees keys
    ``0..i``; with ``documents`` (the queries' and the keys' ids, (batch, seq_q) and (batch,
    seq_k)) only the keys of its own document too. Accumulates in float32 (float64 for float64
    inputs).

    Returns ``out`` (batch, seq_q, heads, head_dim) in q's dtype and ``lse`` (batch, heads,
    seq_q), the natural log of the sum over visible keys of ``exp(score)``, in float32 (float64
    for float64 inputs). A query that sees no key (its document absent from the keys: a block
    of ring attention) gets ``out`` 0 and ``lse`` -inf, and zero gradients, never NaN: merging
    by log-sum-exp then weighs the block by 0.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k.shape[2]
    qf = q.transpose(1, 2).to(compute)  # (b, h, sq, d)
    kf = k.transpose(1, 2).to(compute)
    vf = v.transpose(1, 2).to(compute)
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    hidden = None
    if causal:
        n = scores.shape[-1]
        hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    if documents is not None:
        other = (documents[0][:, :, None] != documents[1][:, None, :])[:, None]
        hidden = other if hidden is None else hidden | other
    if hidden is not None:  # one fill: its backward zeroes every hidden score's gradient
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    shift = lse if documents is None else finite_lse(lse)
    probs = torch.exp(scores - shift.unsqueeze(-1))
    out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
    return out, lse


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with the -inf of rows that see no key (their document has none among the keys)
    as 0, so ``exp(scores - lse)`` is ``exp(-inf - 0) = 0`` there, not the NaN of
    ``-inf - -inf``; also how ring attention merges such rows' blocks."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
