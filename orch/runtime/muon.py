"""Muon for the blocks' matrices, AdamW for the rest: ``optimizer.name: muon``.

Muon (Jordan et al., 2024; Liu et al., "Muon is Scalable for LLM Training", 2025) steps a
matrix along the orthogonalized Nesterov momentum of its gradient: five Newton-Schulz
iterations take the momentum to roughly ``U V^T`` of its SVD, so every direction of the update
moves alike. Like those papers and Megatron-Core's ``--optimizer muon``, orch applies it to the
weights of two or more dimensions inside the decoder blocks (attention and MLP matrices, the
router, each expert's matrices of an expert stack); the token embedding, the output head and the
1-D norm gains keep AdamW (:func:`muon_groups` splits them). The update is scaled to AdamW's RMS
(Moonlight's ``0.2 * sqrt(max(rows, cols))``, torch's ``adjust_lr_fn="match_rms_adamw"``), so
both parts share ``train.lr`` and its schedule, and decoupled weight decay
``optimizer.weight_decay`` applies to both. A 2-D step equals ``torch.optim.Muon``'s with those
settings (tests/runtime/test_muon.py), the AdamW part ``torch.optim.AdamW``'s bit for bit.

The orthogonalization needs whole matrices. A sharded parameter (a DTensor: FSDP2's dim-0
shards, tensor parallelism's rows or columns) has its momentum-updated gradient gathered along
its matrices' dims only (an expert stack keeps its experts' dim sharded, each rank
orthogonalizing its own experts), every rank of the group orthogonalizes the same matrix to the
same result, and each keeps its own shard of it: as the single-process step, up to the
gradients' reduction order. That is Moonlight's "distributed Muon" without its split of the
iterations over the data-parallel ranks: each rank spends the iterations' FLOPs on every matrix
of its stage (``orch plan`` counts them, and the gather, in the step time).

The iterations run in ``ns_dtype``: bf16, as the reference implementations, on bf16 runs;
float32 on fp32 runs (the CPU), where bf16 rounding would part a sharded run from the
single-process one by more than float32's tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic Newton-Schulz iteration's coefficients (Jordan's, torch's defaults)."""
NS_EPS = 1e-7
"""Floor of the norm the momentum is divided by before the iterations (torch's default)."""


def newton_schulz(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """``update`` (a matrix, or a stack of them over its leading dims) orthogonalized by
    ``steps`` quintic Newton-Schulz iterations in ``dtype``, as ``torch.optim.Muon`` does for a
    matrix: scaled to a spectral norm of at most 1 (its Frobenius norm), iterated on the wide
    orientation (fewer rows than columns), returned in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype, copy=True)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    stacked = x.ndim > 2
    x.div_((x.norm(dim=(-2, -1), keepdim=True) if stacked else x.norm()).clamp(min=NS_EPS))
    multiply_add = torch.baddbmm if stacked else torch.addmm
    if stacked:
        x = x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(update.shape[:-2] + x.shape[-2:]) if stacked else x
    return x.mT if tall else x


def orthogonalized(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`newton_schulz` of ``update``, in its dtype and, for a DTensor, its placements:
    gathered along the matrix dims (the last two) where they are sharded, orthogonalized on
    every rank alike, and cut back to this rank's shard (a local slice, no communication). A
    split of a leading dim (an expert stack's, FSDP2's strided one over expert parallelism's
    included: torch's ``_StridedShard`` is no ``Shard``) stays."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps, dtype).to(update.dtype)
    matrix_dims = range(update.ndim - 2, update.ndim)
    kept = tuple(p if isinstance(p, Shard | _StridedShard) and p.dim not in matrix_dims
                 else Replicate() for p in update.placements)
    mesh = update.device_mesh
    whole = update.redistribute(mesh, kept).to_local()
    done = newton_schulz(whole, steps, dtype).to(update.dtype)
    return DTensor.from_local(done, mesh, kept, shape=update.shape,
                              stride=update.stride()).redistribute(mesh, update.placements)


def rms_matched_lr(lr: float, shape: torch.Size) -> float:
    """The step size of a Muon update of a parameter of ``shape`` (its matrices' last two
    dims) at AdamW's ``lr``: an orthogonalized ``rows x cols`` update has an RMS of about
    ``1 / sqrt(max(rows, cols))``, AdamW's about 0.2 (Liu et al.)."""
    return lr * 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon for the param groups marked ``muon: True``, AdamW for the others (see the module
    docstring). Each group takes ``lr``, ``weight_decay``, ``betas`` and ``eps`` (AdamW's),
    ``momentum`` and ``ns_steps`` (Muon's)."""

    def __init__(self, params: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float],
                 eps: float, momentum: float, ns_steps: int, ns_dtype: torch.dtype) -> None:
        defaults = {"lr": lr, "weight_decay": 0.0, "betas": betas, "eps": eps,
                    "momentum": momentum, "ns_steps": ns_steps, "muon": False}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in params:
            grad = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buffer = state["momentum_buffer"]
            buffer.lerp_(grad, 1 - momentum)
            update = orthogonalized(grad.lerp(buffer, momentum), group["ns_steps"],
                                    self.ns_dtype)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-rms_matched_lr(lr, p.shape))

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch's AdamW step (its functional form, its state), so the AdamW part of a Muon
        run is ``torch.optim.AdamW``'s."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def muon_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``model``'s trainable parameters as :class:`Muon`'s groups: the decoder blocks'
    (``layers.*``, whatever wraps them: DDP, compiled blocks, a pipeline rank's share) of two or
    more dimensions (Muon); the embedding's and output head's (AdamW with decay); the rest, 1-D
    (AdamW without decay, as orch's AdamW runs). Empty groups are left out: a pipeline rank
    holding neither the embedding nor the head (a middle stage, ZB-V's second rank) has none
    of the second, and torch's loader of name-keyed optimizer state reads each group's values
    from its first parameter (a resume failed with an IndexError)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    inside = [p for name, p in named if p.ndim >= 2 and "layers" in name.split(".")]
    taken = {id(p) for p in inside}
    groups = [
        {"params": inside, "weight_decay": weight_decay, "muon": True},
        {"params": [p for _, p in named if p.ndim >= 2 and id(p) not in taken],
         "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


__all__ = ["Muon", "muon_groups", "newton_schulz", "orthogonalized", "rms_matched_lr"]
