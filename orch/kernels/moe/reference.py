"""The plain-torch specification of the MoE dispatch ops, and their CPU path.

Everything here is differentiable through ordinary autograd (index_select, index_add, matmul) and
works for any float dtype, float64 included, so tests can gradcheck it. The Triton kernels in
``orch.kernels.moe.triton_moe`` must compute the same values.

``routing`` (expert ids -> row_map and counts) is shared by both paths: it is a handful of torch
ops (a stable sort and a prefix sum) that run on the GPU without a host sync when no capacity is
set, so there is nothing for a kernel to win; the kernels move the H-wide rows.
"""

from __future__ import annotations

import torch


def routing(
    expert_ids: torch.Tensor, num_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each (token, slot) copy goes: ``(row_map [T, K] int64, tokens_per_expert [E], kept)``.

    Copies are laid out expert by expert; within an expert by token index, then slot ``k``
    (a stable sort of the flattened ids). With ``capacity``, each expert keeps its first
    ``capacity`` copies in that order, so the lowest token indices are kept, and the rest are
    dropped: their ``row_map`` entry is -1 and they are not counted. ``kept`` is the number of
    rows (``T * K`` without capacity; with it, the sum of the counts, read with one host sync).
    """
    num_tokens, top_k = expert_ids.shape
    device = expert_ids.device
    flat = expert_ids.reshape(-1).long()
    total = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    order = torch.argsort(flat, stable=True)  # dropless row r holds copy order[r] (= t * K + k)
    rows = torch.arange(total, dtype=torch.int64, device=device)
    if capacity is None:
        row_map = torch.empty(total, dtype=torch.int64, device=device)
        row_map[order] = rows
        return row_map.view(num_tokens, top_k), counts, total
    starts = torch.cumsum(counts, 0) - counts
    expert_of_row = flat[order]
    position = rows - starts[expert_of_row]  # rank of the copy within its expert
    kept_counts = counts.clamp(max=capacity)
    kept_starts = torch.cumsum(kept_counts, 0) - kept_counts
    new_row = torch.where(position < capacity, kept_starts[expert_of_row] + position, -1)
    row_map = torch.empty(total, dtype=torch.int64, device=device)
    row_map[order] = new_row
    return row_map.view(num_tokens, top_k), kept_counts, int(kept_counts.sum())


def _sources(row_map: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``row_map``: for each kept row, its token and its flat (t * K + k) index."""
    flat = row_map.reshape(-1)
    copies = torch.nonzero(flat >= 0).squeeze(1)
    order = torch.empty(kept, dtype=torch.int64, device=row_map.device)
    order[flat[copies]] = copies
    return torch.div(order, row_map.shape[1], rounding_mode="floor"), order


def permute_reference(tokens: torch.Tensor, row_map: torch.Tensor, kept: int) -> torch.Tensor:
    """``permuted[row_map[t, k]] = tokens[t]`` for every kept copy; ``[kept, H]``."""
    token_of_row, _ = _sources(row_map, kept)
    return tokens.index_select(0, token_of_row)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def unpermute_reference(
    expert_out: torch.Tensor,
    row_map: torch.Tensor,
    weights: torch.Tensor | None,
    num_tokens: int,
) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * expert_out[row_map[t, k]]`` over kept copies.

    Dropped copies (``row_map == -1``) contribute zero. The sum runs in float32 (float64 when an
    input is float64) and the result has ``expert_out``'s dtype. ``weights=None`` means all ones.
    """
    wdt = () if weights is None else (weights.dtype,)
    compute = _compute_dtype(expert_out.dtype, *wdt)
    token_of_row, copy_of_row = _sources(row_map, expert_out.shape[0])
    contrib = expert_out.to(compute)
    if weights is not None:
        contrib = contrib * weights.reshape(-1).index_select(0, copy_of_row).to(compute)[:, None]
    out = torch.zeros(num_tokens, expert_out.shape[1], dtype=compute, device=expert_out.device)
    return out.index_add(0, token_of_row, contrib).to(expert_out.dtype)


def grouped_mm_reference(
    x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """Rows ``[offset_e, offset_e + count_e)`` of ``x`` times ``w[e]``, expert by expert.

    A loop over experts, not ``torch._grouped_mm``: that private op exists on CPU in torch 2.13
    but takes no float64 (so no gradcheck) and needs 16-byte-aligned strides.
    """
    counts = tokens_per_expert.tolist()
    parts = [xe @ w[e] for e, xe in enumerate(torch.split(x, counts, dim=0))]
    if not parts:
        return x.new_zeros(x.shape[0], w.shape[2])
    return torch.cat(parts, dim=0)
