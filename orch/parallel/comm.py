"""Differentiable collectives shared by the parallelisms.

``all_to_all`` is ``all_to_all_single`` with optional uneven splits whose backward is the reverse
exchange. ``torch.distributed.nn.functional.all_to_all_single`` does the same but is deprecated
in torch 2.13 and warns on every call; expert dispatch and Ulysses call this one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from orch.parallel.comm_stats import dimension


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, dim):  # type: ignore[override]
        ctx.splits, ctx.group, ctx.dim = (out_splits, in_splits), group, dim
        rows = sum(out_splits) if out_splits is not None else x.shape[0]
        out = x.new_empty((rows, *x.shape[1:]))
        with dimension(dim) if dim else contextlib.nullcontext():
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        back = _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group, ctx.dim)
        return back, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
    dim: str | None = None,
) -> torch.Tensor:
    """Rows of ``x`` exchanged over ``group`` (``in_splits`` rows to each rank, ``out_splits``
    from each; equal splits when None), differentiable; ``dim`` names the parallel dimension
    the traffic is counted under, forward and backward (``orch.parallel.comm_stats``)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, dim)
