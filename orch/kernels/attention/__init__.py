"""Attention with its log-sum-exp: ``flash_attention(q, k, v, causal, softmax_scale, return_lse,
documents)``.

Layout ``(batch, seq, heads, head_dim)`` for q, k and v (the layout a linear projection produces,
before any transpose); k and v may have fewer heads than q (grouped-query attention: query head
``h`` reads key/value head ``h // (heads // kv_heads)``).

Two implementations compute the same function (``orch.kernels.dispatch`` picks):

- ``reference.attention_reference``: plain torch, exact, materializes the scores; the
  specification and the CPU path. Autograd differentiates it, through ``lse`` too.
- ``kernels``: FlashAttention-2 in Triton (tiled online-softmax forward, atomic-free dK/dV and dQ
  backward kernels), used on CUDA tensors. It also back-propagates a gradient on ``lse`` (it
  folds into the backward's ``delta`` term), so it never falls back to the reference for that.

**causal, and blocks for ring attention.** ``causal=True`` means query ``i`` sees keys ``0..i``
and is defined only for ``seq_q == seq_k`` (the top-left and bottom-right alignments coincide
there). ``causal=False`` lets every query see every key and allows ``seq_q != seq_k``. Ring
attention needs nothing else: the blocks it computes are either fully visible (keys all before
the queries: ``causal=False``) or the diagonal block of equal lengths (``causal=True``); blocks
that are fully hidden are skipped by the caller. Partial results over disjoint key sets merge
exactly through their log-sum-exps: ``lse = logaddexp(lse1, lse2)``,
``out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)`` (lse is (batch, heads, seq_q); move
it to (batch, seq_q, heads, 1) before weighting ``out``).

**documents.** Packed sequences hold several documents (``train.document_mask``): with
``documents`` (one id per token, nondecreasing along the sequence) a query sees only keys of
its own document, on top of ``causal``. Self-attention takes one ``(batch, seq)`` tensor; a
block of ring attention the pair ``(query_documents, key_documents)``, where a query whose
document has no key in the block sees nothing: its ``out`` is 0 and its ``lse`` -inf (no NaN,
zero gradients), which the merge above weighs by 0. The kernels skip every key block that no
query of a block can see, the saving packed documents are there for (as FlashAttention's varlen
kernels and torchtitan's flex-attention document masks do), and no ``(seq, seq)`` mask exists;
torch's SDPA, where the kernels do not run, takes a dense mask (:class:`Documents`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orch.kernels.attention.checks import (
    AttentionInputError,
    check_document_ids,
    check_documents,
    check_inputs,
    check_kernel_inputs,
    kernel_problem,
)
from orch.kernels.attention.reference import attention_reference
from orch.kernels.dispatch import use_triton, warn_once

__all__ = [
    "AttentionInputError",
    "Documents",
    "attention_reference",
    "causal_attention",
    "document_mask",
    "flash_attention",
    "kernel_takes",
]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    documents: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over k, v; differentiable in q, k and v.

    Args:
        q: (batch, seq_q, heads, head_dim).
        k, v: (batch, seq_k, kv_heads, head_dim), ``heads % kv_heads == 0``; same dtype and
            device as q.
        causal: query ``i`` sees keys ``0..i``; needs ``seq_q == seq_k`` (see the module doc).
        softmax_scale: multiplies ``q . k``; default ``1 / sqrt(head_dim)``.
        return_lse: also return the log-sum-exp.
        documents: attention within documents (see the module doc): document ids (int64,
            int32, int16, int8 or uint8), nondecreasing along each row, ``(batch, seq)`` for
            self-attention (seq_q == seq_k), or a pair ``((batch, seq_q), (batch, seq_k))`` of
            the queries' and the keys' ids.
            Their order is checked for CPU tensors outside ``torch.compile`` only (on a GPU
            the check would cost a sync, under compile a graph break): unordered ids there go
            unnoticed, and the kernels, which find each document by binary search, mask by
            wrong ranges.

    Returns:
        ``out`` (batch, seq_q, heads, head_dim) in q's dtype, or ``(out, lse)`` with ``lse``
        (batch, heads, seq_q) float32 (float64 on the reference path for float64 inputs): the
        natural log of ``sum_j exp(softmax_scale * q_i . k_j)`` over the keys ``i`` sees
        (-inf, and ``out`` 0, where it sees none). Gradients flow through both.

    The Triton kernel runs on CUDA tensors (or anywhere with ``ORCH_KERNELS=triton``) and takes
    float16, bfloat16 or float32 with head_dim a multiple of 16 up to 128; other inputs on that
    path raise. Everything else runs the reference.

    Raises:
        AttentionInputError (a ``ValueError``): bad shapes (an empty batch or sequence too,
        where torch's SDPA returns an empty result), dtypes, devices, head counts, ``causal``
        with ``seq_q != seq_k``, a ``softmax_scale`` that is not a finite number, ``documents``
        of the wrong type, dtype, shape or device, or inputs the selected kernel cannot take;
        the message names the argument and the fix. Double backward runs on the reference
        path only.
    """
    check_inputs(q, k, v, causal, softmax_scale)
    pair = check_documents(documents, q, k)
    if use_triton("flash_attention", q, k, v):
        check_kernel_inputs(q)
        from orch.kernels.attention.kernels import flash_attention_triton

        out, lse = flash_attention_triton(q, k, v, causal, softmax_scale, documents=pair)
    else:
        out, lse = attention_reference(q, k, v, causal, softmax_scale, pair)
    return (out, lse) if return_lse else out


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v in autocast's dtype where autocast is on for their device, else unchanged.

    Autocast casts the inputs of torch's SDPA, but orch's kernels are custom ops it does not
    know, and the model hands attention mixed dtypes under autocast: q and k come out of RoPE in
    float32 (its tables follow the float32 residual stream) while v leaves its projection in
    bfloat16. Attention that may run the kernels casts here first, as autocast would."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, instead: str) -> bool:
    """Whether orch's Triton kernels run this attention of ``(batch, heads, seq, head_dim)``
    tensors: where ``flash_attention`` would pick them (CUDA tensors, or ``ORCH_KERNELS=triton``)
    and they can take the inputs (see ``kernel_problem``); when they cannot, the log says once
    that ``instead`` runs."""
    if not use_triton("flash_attention", q, k, v):
        return False
    if (problem := kernel_problem(q.transpose(1, 2), k.dtype, v.dtype)) is not None:
        warn_once("flash_attention", str(problem), instead=instead)
        return False
    return True


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """The block-causal mask of ``documents`` (``(batch, seq)`` document ids, one per token):
    ``(batch, 1, seq, seq)``, True where query ``i`` may see key ``j``: ``j <= i`` in the same
    document. Every query sees itself, so no row is empty."""
    same = documents[:, :, None] == documents[:, None, :]
    n = documents.shape[1]
    return (same & torch.ones(n, n, dtype=torch.bool, device=documents.device).tril())[:, None]


class Documents:
    """One forward pass's document ids (``ids``: ``(batch, seq)``, the whole sequence,
    nondecreasing along it; the attention checks them: ``check_document_ids``) and,
    where torch's SDPA runs instead of orch's kernels (which take the ids themselves and build
    no mask), the additive block-causal mask it takes, built once and shared by every layer: a
    boolean mask SDPA turns into a float one of its own, which each layer kept for its backward
    (8 GiB at 8,192 tokens over 32 layers); one float mask in the attention's dtype is kept
    once."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self._masks: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def additive(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """0 where a query sees a key, -inf elsewhere, ``(batch, 1, seq, seq)``."""
        if (dtype, device) not in self._masks:
            visible = document_mask(self.ids.to(device))
            self._masks[dtype, device] = torch.zeros(visible.shape, dtype=dtype, device=device
                                                     ).masked_fill(~visible, float("-inf"))
        return self._masks[dtype, device]


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
    documents: Documents | None = None,
) -> torch.Tensor:
    """Causal self-attention laid out as the model holds its heads, ``(batch, heads, seq,
    head_dim)`` (k and v may have fewer heads): the attention of orch's model and of Ulysses
    context parallelism. With ``documents``, block-causal: a token sees the earlier tokens of
    its own document only (:class:`Documents`).

    orch's Triton kernels run it where they can (:func:`kernel_takes`), through transposed views
    (no copy), with the document ids as they are (no mask is built); elsewhere torch's
    ``scaled_dot_product_attention``, the same function, runs instead of the reference, whose
    scores matrix made attention 2.4-3.5x slower on CPU at the tiny model's shape and 6.1-6.3x
    at 1,024 tokens (forward and backward; benchmarks/results/attention-cpu.md), with the
    documents' additive mask, and without one except for a ``softmax_scale <= 0``, for which
    torch's CPU SDPA returns NaN: the reference runs it.
    """
    q, k, v = autocast_inputs(q, k, v)
    instead = "torch's scaled_dot_product_attention"
    if documents is not None:  # a metadata check, and on CPU ids an O(seq) one: every layer
        check_document_ids(documents.ids, "documents", (q.shape[0], q.shape[2]), "q",
                           "causal_attention")
        instead += " with the block-causal mask"
    if kernel_takes(q, k, v, instead=instead):
        # kernel_takes has dispatched and checked: straight to the kernel's op, not through
        # flash_attention's dispatch and checks a second time on every layer's call
        from orch.kernels.attention.kernels import flash_attention_triton

        ids = None if documents is None else documents.ids.to(q.device)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out, _ = flash_attention_triton(q, k, v, causal=True, softmax_scale=softmax_scale,
                                        documents=None if ids is None else (ids, ids))
        return out.transpose(1, 2)
    if documents is not None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=documents.additive(q.dtype, q.device), scale=softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1])
    if softmax_scale is not None and softmax_scale <= 0:
        # torch's CPU SDPA with is_causal returns all NaN for a scale <= 0 (torch 2.13; with
        # an explicit mask, or without causal, it does not); the reference is exact for any
        out, _ = attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), True, softmax_scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
    )
