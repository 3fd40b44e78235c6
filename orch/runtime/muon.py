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
shards, tensor parallelism's rows or columns) has its matrices split over some ranks; those
ranks share out the work (:func:`matrix_chunks`, :func:`orthogonalized`): the momentum-updated
gradients of one layout go in chunks of as many matrices as ranks split them, an all-to-all
hands each rank one whole matrix of a chunk, it orthogonalizes that one, and another all-to-all
sends every rank its shards of the results back, as modded-nanogpt's distributed Muon, Dion and
Essential AI's "Practical Efficiency of Muon" do. Each rank spends the iterations' FLOPs on one
matrix in ``ranks`` (Llama 3 70B under tp8 x fsdp128: 5 of its stage's 560) and moves
about a matrix's bytes per chunk, where Moonlight's "Distributed Muon" (and orch before this)
gathers every matrix whole on every rank of its group and orthogonalizes all of them there. An
expert stack keeps its experts' dim split (each rank orthogonalizes its own experts); replicas
(HSDP's, DDP's) each do their own share of the same work rather than gather over the slower
link. The same whole matrix goes through the same iterations as on one process, so a sharded
step equals the single-process one up to the gradients' reduction order
(tests/runtime/test_muon.py); ``orch plan`` prices the iterations and the all-to-alls.

The iterations run in ``ns_dtype``: bf16, as the reference implementations, on bf16 runs;
float32 on fp32 runs (the CPU), where bf16 rounding would part a sharded run from the
single-process one by more than float32's tolerance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
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


def split_mesh_dims(update: DTensor) -> tuple[int, ...]:
    """The mesh dims that split ``update``'s matrices (its last two dims): the ranks along them
    hold pieces of the same matrices, and share out their orthogonalization."""
    matrix_dims = (update.ndim - 2, update.ndim - 1)
    return tuple(i for i, p in enumerate(update.placements)
                 if isinstance(p, Shard | _StridedShard) and p.dim in matrix_dims)


def _shifted(placement: Placement, by: int, after: int = -1) -> Placement:
    """``placement`` with its tensor dim moved ``by`` where it is above ``after``."""
    if not isinstance(placement, Shard | _StridedShard) or placement.dim <= after:
        return placement
    if isinstance(placement, _StridedShard):
        return _StridedShard(placement.dim + by, split_factor=placement.split_factor)
    return Shard(placement.dim + by)


def _unstrided(update: DTensor) -> tuple[list[int], list[int], list[Placement]]:
    """``update``'s layout with FSDP2's strided split of a matrix dim made plain: its shape, its
    local shape and its placements on a view where such a dim is ``(split_factor, size /
    split_factor)``. ``_StridedShard(d, sf)`` followed by ``Shard(d)`` on later mesh dims (FSDP2
    over tensor parallelism) splits each of the ``sf`` blocks those make over its own mesh dim;
    on the view, the later ones split the blocks and it the rows inside them, each one dim,
    which DTensor moves by all-to-alls (it gathers a ``_StridedShard`` whole instead). Layouts
    of any other form are left as they are (DTensor redistributes them all the same, by
    gathers)."""
    shape, local = list(update.shape), list(update.to_local().shape)
    placements = list(update.placements)
    mesh = update.device_mesh
    for d in (update.ndim - 1, update.ndim - 2):  # the last first: the view keeps d - 1 in place
        on = [i for i, p in enumerate(placements) if isinstance(p, Shard | _StridedShard)
              and p.dim == d]
        if not on or not isinstance(placements[on[0]], _StridedShard):
            continue
        first, later = on[0], on[1:]
        blocks = placements[first].split_factor
        over = math.prod(mesh.size(i) for i in later)
        if (shape[d] % blocks or blocks % over
                or any(isinstance(placements[i], _StridedShard) for i in later)):
            continue
        shape[d:d + 1] = [blocks, shape[d] // blocks]
        local[d:d + 1] = [blocks // over, local[d] * over // blocks]
        placements = [_shifted(p, 1, d) for p in placements]
        placements[first] = Shard(d + 1)
        for i in later:
            placements[i] = Shard(d)
    return shape, local, placements


def matrix_chunks(params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` (with gradients) in the chunks :func:`orthogonalized` takes: those whose
    gradients are DTensors of one mesh, placements, shape and dtype, as many at a time as the
    ranks that split their matrices (:func:`split_mesh_dims`); plain ones one by one. Every
    rank of a group holds the same parameters in the same order, so each makes the same chunks
    and joins the same collectives."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        key = (g.device_mesh, g.placements, g.shape, g.dtype) if isinstance(g, DTensor) else id(p)
        buckets.setdefault(key, []).append(p)
    chunks = []
    for bucket in buckets.values():
        g = bucket[0].grad
        ranks = (math.prod(g.device_mesh.size(i) for i in split_mesh_dims(g))
                 if isinstance(g, DTensor) else 1)
        chunks += [bucket[i:i + ranks] for i in range(0, len(bucket), ranks)]
    return chunks


def orthogonalized(updates: Iterable[torch.Tensor], steps: int,
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """:func:`newton_schulz` of each of ``updates`` (the updates of a chunk of
    :func:`matrix_chunks`), in its dtype and, for a DTensor, its placements.

    A plain tensor is orthogonalized as it is. A chunk of DTensors is stacked, padded with
    zeros to as many matrices as ranks split them, on one new leading dim per splitting mesh
    dim (of that dim's size), and redistributed so that each splitting mesh dim splits its
    stack dim instead of the matrices: one all-to-all per splitting mesh dim, after which each
    rank holds one whole matrix, orthogonalizes it (unless it is padding) and the results
    travel back the same way. A split of a leading dim (an expert stack's, FSDP2's strided one
    over expert parallelism's included: torch's ``_StridedShard`` is no ``Shard``) stays, each
    rank orthogonalizing its own experts; a ``Replicate`` mesh dim (HSDP's replicas, DDP)
    orthogonalizes the same matrices on each of its ranks, where splitting them would add a
    gather over the slower link. The same whole matrix goes through the same
    :func:`newton_schulz` as on one process.

    ``updates`` is consumed (pass a generator): the updates are freed once stacked, so a rank
    holds the stack, not both, and neither beside its whole matrix's iterations."""
    updates = list(updates)
    head = updates[0]
    if not isinstance(head, DTensor):
        return [newton_schulz(u, steps, dtype).to(u.dtype) for u in updates]
    mesh, placements, shape, stride = (head.device_mesh, head.placements, head.shape,
                                       head.stride())
    split = split_mesh_dims(head)
    sizes = [mesh.size(i) for i in split]
    view, local_view, view_placements = _unstrided(head)
    stack = tuple(_shifted(p, len(split)) for p in view_placements)
    owned = tuple(Shard(split.index(i)) if i in split
                  else _shifted(p, len(split)) if isinstance(p, Shard | _StridedShard)
                  else Replicate() for i, p in enumerate(view_placements))
    stacked_shape = (*sizes, *view)
    stacked_stride = tuple(math.prod(stacked_shape[i + 1:]) for i in range(len(stacked_shape)))

    def stacked(local: torch.Tensor, layout: tuple[Placement, ...]) -> DTensor:
        return DTensor.from_local(local, mesh, layout, shape=stacked_shape,
                                  stride=stacked_stride, run_check=False)

    local_shape, count = head.to_local().shape, len(updates)
    local = head.to_local().new_empty((math.prod(sizes), *local_shape))
    torch.stack([u.to_local() for u in updates], out=local[:count])
    local[count:].zero_()
    del head
    updates.clear()
    mine = stacked(local.view(*sizes, *local_view), stack).redistribute(mesh, owned).to_local()
    del local
    # this rank's matrix of the chunk: the one at its coordinates on the splitting mesh dims
    index = sum(mesh.get_local_rank(i) * math.prod(sizes[n + 1:]) for n, i in enumerate(split))
    if index < count:  # the rest is padding (zeros, and zeros back)
        whole = mine.reshape(*mine.shape[len(split):len(split) + len(shape) - 2], *shape[-2:])
        mine = newton_schulz(whole, steps, dtype).to(mine.dtype).reshape(mine.shape)
    back = stacked(mine, owned).redistribute(mesh, stack).to_local()
    back = back.reshape(-1, *local_shape)
    return [DTensor.from_local(back[n], mesh, placements, shape=shape, stride=stride,
                               run_check=False) for n in range(count)]


def rms_matched_lr(lr: float, shape: torch.Size) -> float:
    """The step size of a Muon update of a parameter of ``shape`` (its matrices' last two
    dims) at AdamW's ``lr``: an orthogonalized ``rows x cols`` update has an RMS of about
    ``1 / sqrt(max(rows, cols))``, AdamW's about 0.2 (Liu et al.)."""
    return lr * 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class _NoGlooAllToAllWarning(logging.Filter):
    """Drops DTensor's warning that a CPU (gloo) mesh has no all-to-all: every rank of every
    Muon run on the CPU printed it once, though the exchange it stands an all-gather in for is
    the one :func:`orthogonalized` asks for, and on the CPU the iterations it shares out cost
    far more than the gather (a GPU's NCCL runs the all-to-all itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("CPU process group does not support alltoall")


_GLOO_ALL_TO_ALL = _NoGlooAllToAllWarning()


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
        logger = logging.getLogger("torch.distributed.tensor._collective_utils")
        if _GLOO_ALL_TO_ALL not in logger.filters:
            logger.addFilter(_GLOO_ALL_TO_ALL)

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
        for chunk in matrix_chunks(params):
            updates = orthogonalized((self._nesterov(p, momentum) for p in chunk),
                                     group["ns_steps"], self.ns_dtype)
            for p, update in zip(chunk, updates, strict=True):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-rms_matched_lr(lr, p.shape))

    def _nesterov(self, p: torch.Tensor, momentum: float) -> torch.Tensor:
        """``p``'s momentum buffer stepped by its gradient, and the Nesterov update from it."""
        grad, state = p.grad, self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)
        return grad.lerp(buffer, momentum)

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


__all__ = ["Muon", "matrix_chunks", "muon_groups", "newton_schulz", "orthogonalized",
           "rms_matched_lr", "split_mesh_dims"]
