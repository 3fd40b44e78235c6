"""MoE token dispatch ops: permute tokens into expert order, grouped GEMM, unpermute and combine.

The steps of a Megatron-Core style dispatcher (route -> permute -> all-to-all -> expert compute ->
all-to-all -> unpermute) that touch every token:

``moe_permute(tokens, expert_ids, num_experts, capacity=None)`` copies each token once per chosen
expert into expert-contiguous order and returns ``(permuted, row_map, tokens_per_expert)``.

``row_map`` is an int64 tensor ``[T, K]``, the same shape as ``expert_ids``: ``row_map[t, k]`` is
the row of ``permuted`` holding token ``t``'s copy for slot ``k`` (expert ``expert_ids[t, k]``),
or -1 when that copy was dropped by the capacity. Rows are ordered by expert, then token index,
then ``k``, so expert ``e`` owns rows ``[sum(counts[:e]), sum(counts[:e + 1]))``.

Capacity: expert ``e`` keeps at most ``capacity`` copies, the ones with the lowest token index
(then lowest ``k``); the rest are dropped (-1 in row_map, not counted, no row). ``permuted`` then
has ``tokens_per_expert.sum()`` rows, a size read with one host sync. Without a capacity nothing
is dropped and ``permuted`` has ``T * K`` rows.

``moe_unpermute(expert_out, row_map, weights, num_tokens)`` inverts it:
``out[t] = sum_k weights[t, k] * expert_out[row_map[t, k]]`` over kept copies (a dropped copy
contributes zero), summed in float32, returned in ``expert_out``'s dtype.

``grouped_mm(x, w, tokens_per_expert)``: rows of expert ``e`` (contiguous, counts may be 0) times
``w[e]``; one kernel launch for all experts.

All three are differentiable (permute: tokens; unpermute: expert_out and weights; grouped_mm: x
and w). Each has a plain-torch reference in ``reference.py`` (the specification and the CPU path)
and a Triton kernel in ``triton_moe.py`` chosen by ``orch.kernels.dispatch.use_triton``. Bad
arguments raise :class:`MoEInputError`, a ValueError (and an OrchError) naming the argument and
the fix. Value checks cost one small host read per call; ``check=False`` skips them.
"""

from __future__ import annotations

import torch

from orch.kernels.dispatch import use_triton
from orch.kernels.moe import checks
from orch.kernels.moe.checks import MoEInputError
from orch.kernels.moe.reference import (
    grouped_mm_reference,
    permute_reference,
    routing,
    unpermute_reference,
)

__all__ = [
    "MoEInputError",
    "grouped_mm",
    "grouped_mm_reference",
    "moe_permute",
    "moe_unpermute",
    "permute_reference",
    "routing",
    "unpermute_reference",
]


def moe_permute(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy ``tokens [T, H]`` into expert order: ``(permuted [rows, H], row_map [T, K] int64,
    tokens_per_expert [num_experts] int64)``; see the module docstring for the layout.

    ``expert_ids [T, K]`` is any integer dtype with values in ``[0, num_experts)``; duplicates in
    a row are allowed (the token is copied twice). The gradient of ``permuted`` is summed back
    into ``tokens``; dropped copies get none.
    """
    checks.check_permute(tokens, expert_ids, num_experts, capacity)
    if check:
        checks.expert_id_range(expert_ids, num_experts, None)
    row_map, counts, kept = routing(expert_ids, num_experts, capacity)
    if use_triton("moe_permute", tokens, expert_ids):
        from orch.kernels.moe.triton_moe import scatter_op

        permuted = scatter_op(tokens, row_map, None, kept, tokens.dtype)
    else:
        permuted = permute_reference(tokens, row_map, kept)
    return permuted, row_map, counts


def moe_unpermute(
    expert_out: torch.Tensor,
    row_map: torch.Tensor,
    weights: torch.Tensor | None,
    num_tokens: int,
    *,
    check: bool = True,
) -> torch.Tensor:
    """``out [num_tokens, H]``: each token's kept copies in ``expert_out [rows, H]`` (in
    moe_permute's row order), times ``weights [T, K]`` (None: all ones), summed over ``K``.

    Gradients flow to ``expert_out`` and ``weights`` (``weights`` may be float32 while
    ``expert_out`` is bf16, as routers usually are; its gradient keeps its dtype).
    """
    checks.check_unpermute(expert_out, row_map, weights, num_tokens, check)
    operands = (expert_out, row_map) if weights is None else (expert_out, row_map, weights)
    if use_triton("moe_unpermute", *operands):
        from orch.kernels.moe.triton_moe import gather_op

        return gather_op(expert_out, row_map, weights, expert_out.dtype)
    return unpermute_reference(expert_out, row_map, weights, num_tokens)


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    *,
    check: bool = True,
) -> torch.Tensor:
    """``out [M, H_out]``: rows ``[offset_e, offset_e + tokens_per_expert[e])`` of ``x [M, H_in]``
    times ``w[e]`` (``w [E, H_in, H_out]``), for every expert in one launch.

    ``x`` and ``w`` share a dtype; the kernel takes float16, bfloat16 and float32 (float32 with
    tf32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set) and accumulates in float32;
    float64 runs the reference. ``tokens_per_expert`` may live on the CPU or on ``x``'s device.
    """
    checks.check_grouped_mm(x, w, tokens_per_expert, check)
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32) and use_triton(
        "grouped_mm", x, w
    ):
        from orch.kernels.moe.triton_moe import grouped_mm_op

        counts = tokens_per_expert.to(device=x.device, dtype=torch.int64)
        return grouped_mm_op(x, w, counts)
    return grouped_mm_reference(x, w, tokens_per_expert)
