"""Input validation for ``flash_attention``, shared by the reference and the Triton path.

A wrong shape deep inside a model is easy to make (``(batch, heads, seq, head_dim)`` instead of
``(batch, seq, heads, head_dim)``, a key with the wrong head count), so every rule names the
argument, the value it got and the fix, and raises before any kernel launches.
"""

from __future__ import annotations

import math
import numbers

import torch

from orch.errors import OrchError, Problem

#: dtypes the Triton kernels take; the reference takes any floating dtype.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: largest head_dim the Triton kernels take (it must also be a multiple of 16).
KERNEL_MAX_HEAD_DIM = 128
#: most (batch, head) pairs per launch: the kernels' second grid axis, which CUDA caps.
KERNEL_MAX_BATCH_HEADS = 65_535
#: dtypes of document ids: the integers torch compares and binary-searches (``searchsorted``)
#: on every device; its unsigned 16- to 64-bit ones have neither on the CPU.
DOCUMENT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class AttentionInputError(OrchError, ValueError):
    """Bad arguments to ``flash_attention`` (or to ``function``, another attention entry point
    of orch's): a ``ValueError`` and a user error (``OrchError``)."""

    def __init__(self, where: str, message: str, fix: str,
                 function: str = "flash_attention") -> None:
        self.where = where
        super().__init__(str(Problem(f"{function}({where})", message, fix)))


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float | None
) -> None:
    """Raise ``AttentionInputError`` unless q, k, v form a valid attention call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(
                name,
                f"expected a torch.Tensor, got {type(t).__name__}",
                "pass tensors laid out (batch, seq, heads, head_dim)",
            )
        if t.dim() != 4:
            raise AttentionInputError(
                name,
                f"expected 4 dims (batch, seq, heads, head_dim), got shape {_shape(t)}",
                "add the missing dims (e.g. unsqueeze(0) for batch 1); a tensor laid out "
                "(batch, heads, seq, head_dim) needs .transpose(1, 2)",
            )
        if not t.is_floating_point():
            raise AttentionInputError(
                name,
                f"expected a floating dtype, got {t.dtype}",
                "cast to float16, bfloat16 or float32",
            )
        if 0 in t.shape:
            raise AttentionInputError(
                name,
                f"has an empty dim: shape {_shape(t)}",
                "every dim (batch, seq, heads, head_dim) must be >= 1",
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise AttentionInputError(
                name,
                f"dtype {t.dtype} differs from q's {q.dtype}",
                f"cast q, k and v to one dtype (e.g. {name}.to(q.dtype))",
            )
        if t.device != q.device:
            raise AttentionInputError(
                name,
                f"is on {t.device} but q is on {q.device}",
                f"move q, k and v to one device ({name}.to(q.device))",
            )
        if t.shape[0] != q.shape[0]:
            raise AttentionInputError(
                name,
                f"batch {t.shape[0]} differs from q's {q.shape[0]} "
                f"(shapes q {_shape(q)}, {name} {_shape(t)})",
                "q, k and v need the same batch size (dim 0)",
            )
        if t.shape[3] != q.shape[3]:
            raise AttentionInputError(
                name,
                f"head_dim {t.shape[3]} differs from q's {q.shape[3]} "
                f"(shapes q {_shape(q)}, {name} {_shape(t)})",
                "q, k and v need the same head_dim (dim 3); check the "
                "layout is (batch, seq, heads, head_dim)",
            )
    if k.shape[1:3] != v.shape[1:3]:
        raise AttentionInputError(
            "v",
            f"shape {_shape(v)} does not match k's {_shape(k)} in (seq, kv_heads)",
            "k and v need the same seq length and heads",
        )
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise AttentionInputError(
            "k",
            f"q has {heads} heads, not a multiple of k/v's {kv_heads} heads",
            "grouped-query attention needs heads % kv_heads == 0; check the layout is "
            "(batch, seq, heads, head_dim) and the model's n_heads / n_kv_heads",
        )
    if not isinstance(causal, bool):
        raise AttentionInputError(  # the reference took any truthy value; the kernel raised
            "causal",
            f"must be True or False, got {causal!r}",
            "pass causal=True for a causal mask, causal=False for none",
        )
    if causal and q.shape[1] != k.shape[1]:
        raise AttentionInputError(
            "causal",
            f"causal=True needs seq_q == seq_k, got {q.shape[1]} and {k.shape[1]}",
            "for a block whose keys all precede the queries pass causal=False; causal=True "
            "is the top-left-aligned diagonal block of equal lengths",
        )
    if softmax_scale is not None and (
            isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
            or not math.isfinite(softmax_scale)):
        raise AttentionInputError(  # a string passed float() here, then failed in the matmul
            "softmax_scale",
            f"must be a finite number, got {softmax_scale!r}",
            "pass None for 1/sqrt(head_dim)",
        )


def check_documents(documents: object, q: torch.Tensor, k: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (query, key) document ids of a valid ``documents`` argument, or None without one;
    raise ``AttentionInputError`` for a bad one. A single tensor serves self-attention (seq_q
    == seq_k) as both. Ids must be nondecreasing along each row (how packed documents are
    numbered: the kernels find each document's range by binary search); that is checked only
    where it costs no device sync and no graph break (``check_document_ids``)."""
    if documents is None:
        return None
    if isinstance(documents, torch.Tensor):
        if q.shape[1] != k.shape[1]:
            raise AttentionInputError(
                "documents",
                f"one tensor of ids is for self-attention, but seq_q {q.shape[1]} != seq_k "
                f"{k.shape[1]}",
                "pass a pair (query_documents, key_documents)",
            )
        pair = (documents, documents)
    elif isinstance(documents, (tuple, list)) and len(documents) == 2:
        pair = tuple(documents)
    else:
        raise AttentionInputError(
            "documents",
            f"expected a (batch, seq) tensor of document ids or a pair of them, got "
            f"{type(documents).__name__}",
            "pass the ids of every token, or (query_documents, key_documents)",
        )
    for index, (side, of) in enumerate((("q", q), ("k", k))):
        ids = pair[index]
        name = "documents" if pair[0] is pair[1] else f"documents[{index}]"
        check_document_ids(ids, name, (of.shape[0], of.shape[1]), side)
        if ids.device != q.device:
            raise AttentionInputError(name, f"is on {ids.device} but q is on {q.device}",
                                      f"move the ids to q's device ({name}.to(q.device))")
    return pair


def check_document_ids(ids: object, name: str, shape: tuple[int, int], side: str,
                       function: str = "flash_attention") -> None:
    """Raise ``AttentionInputError`` unless ``ids`` are document ids of ``side``'s tokens:
    a tensor of ``shape`` (batch, seq) in one of ``DOCUMENT_DTYPES``, nondecreasing along each
    row where that costs no device sync (CPU tensors) and no graph break (not while
    ``torch.compile`` traces: a compiled decoder block would split in three around it, every
    layer). Every entry point that hands ids to the kernels checks them (``function`` names
    it): the kernels read one range per token and find it by binary search, so wrong shapes
    read past the ids and unordered ids mask wrong."""
    if not isinstance(ids, torch.Tensor):
        raise AttentionInputError(name, f"expected a torch.Tensor, got {type(ids).__name__}",
                                  "pass (batch, seq) integer document ids", function)
    if ids.dtype not in DOCUMENT_DTYPES:
        raise AttentionInputError(
            name, f"expected integer ids of dtype int64, int32, int16, int8 or uint8, got "
            f"{ids.dtype}", f"pass int64 ids ({name}.long(); orch.runtime.data.document_ids "
            "makes them)", function)
    if tuple(ids.shape) != shape:
        raise AttentionInputError(
            name, f"shape {_shape(ids)} is not {side}'s (batch, seq) ({shape[0]}, {shape[1]})",
            f"give one id per token of {side}, laid out (batch, seq)", function)
    if (ids.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool((ids[:, 1:] < ids[:, :-1]).any())):
        raise AttentionInputError(
            name,
            "ids decrease along a row",
            "number documents in order along the sequence (a cumulative sum over document "
            "ends, as orch.runtime.data.document_ids does)",
            function,
        )


def kernel_problem(q: torch.Tensor, k_dtype: torch.dtype | None = None,
                   v_dtype: torch.dtype | None = None) -> AttentionInputError | None:
    """Why the Triton kernels cannot take these (valid) inputs, or None when they can; k's and
    v's dtypes, where given, must be q's (the kernels' matmuls take one dtype)."""
    for name, dtype in (("k", k_dtype), ("v", v_dtype)):
        if dtype is not None and dtype != q.dtype:
            return AttentionInputError(
                name,
                f"the Triton kernel takes q, k and v in one dtype, got q {q.dtype}, {name} {dtype}",
                f"cast q, k and v to one dtype (e.g. {name}.to(q.dtype))",
            )
    if q.shape[0] * q.shape[2] > KERNEL_MAX_BATCH_HEADS:
        return AttentionInputError(
            "q",
            f"the Triton kernels launch one program row per (batch, head) pair, at most "
            f"{KERNEL_MAX_BATCH_HEADS:,} (CUDA's grid limit); got batch {q.shape[0]} x heads "
            f"{q.shape[2]}",
            "split the batch into smaller micro-batches",
        )
    head_dim = q.shape[3]
    if head_dim > KERNEL_MAX_HEAD_DIM:  # padding cannot help: say so (it said "pad to 16")
        return AttentionInputError(
            "head_dim",
            f"the Triton kernel takes head_dim up to {KERNEL_MAX_HEAD_DIM} (a multiple of 16), "
            f"got {head_dim}",
            f"use heads of at most {KERNEL_MAX_HEAD_DIM} (more heads for the same width), or "
            "run the reference with ORCH_KERNELS=reference",
        )
    if head_dim % 16:
        return AttentionInputError(
            "head_dim",
            f"the Triton kernel takes head_dim a multiple of 16 up to "
            f"{KERNEL_MAX_HEAD_DIM}, got {head_dim}",
            "pad head_dim to a multiple of 16 (zero columns in q/k/v), or run the reference "
            "with ORCH_KERNELS=reference",
        )
    if q.dtype not in KERNEL_DTYPES:
        return AttentionInputError(
            "q",
            f"the Triton kernel takes float16, bfloat16 or float32, got {q.dtype}",
            "cast to one of those, or run the reference with ORCH_KERNELS=reference",
        )
    return None


def check_kernel_inputs(q: torch.Tensor) -> None:
    """Raise ``AttentionInputError`` if the Triton kernels cannot take these (valid) inputs."""
    if (problem := kernel_problem(q)) is not None:
        raise problem
