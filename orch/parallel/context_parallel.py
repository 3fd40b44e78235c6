"""Context parallelism: attention over a sequence split across the ``cp`` ranks.

**Ring attention** (``cp_kind: ring``). The sequence is cut into ``2 x cp`` chunks and rank ``r``
holds chunks ``r`` and ``2cp-1-r`` (the load-balanced "zigzag" split: under a causal mask every
rank then has the same amount of work). Key/value blocks travel around the ring by send/recv while
each rank attends its queries to the block it holds; partial results merge exactly through their
log-sum-exp. Backward recomputes the block scores from the saved log-sum-exp and sends the key/value
gradients around the ring with their blocks, so they arrive home complete after ``cp`` hops.
Which chunk pairs are visible follows from the zigzag: a query chunk sees a key chunk with a
lower index fully, its own chunk causally, higher ones not at all.

**Ulysses** (``cp_kind: ulysses``). Contiguous sequence shards; an all-to-all turns
(all heads, local tokens) into (local heads, all tokens), attention runs as usual, and a second
all-to-all turns the result back. Needs heads and kv_heads divisible by ``cp``.

Tensors are laid out ``(batch, heads, seq, head_dim)`` as the model's attention holds them; key
and value may have fewer heads (grouped-query attention) and are never expanded before sending.
Each block runs on orch's FlashAttention kernels where ``flash_attention`` would (CUDA tensors;
``orch.kernels.attention.kernel_takes``), else in plain torch (the specification, and the CPU
path), within documents too (the kernels take the chunks' document ids); Ulysses' local
attention is the model's (``causal_attention``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from orch.kernels.attention import Documents, autocast_inputs, causal_attention, kernel_takes
from orch.kernels.attention.checks import check_document_ids
from orch.kernels.attention.reference import finite_lse
from orch.parallel.comm import all_to_all
from orch.parallel.comm_stats import dimension

# --- which tokens a rank holds ------------------------------------------------------------------


def local_positions(seq_len: int, cp: int, rank: int, kind: str) -> torch.Tensor:
    """Global positions of the tokens rank ``rank`` of ``cp`` holds, in local order."""
    if cp == 1:
        return torch.arange(seq_len)
    if kind == "ulysses":
        size = seq_len // cp
        return torch.arange(rank * size, (rank + 1) * size)
    chunk = seq_len // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


# --- ring attention -----------------------------------------------------------------------------

_NONE, _DIAG, _FULL = 0, 1, 2


def _visibility(query_chunk: int, key_chunk: int) -> int:
    if query_chunk > key_chunk:
        return _FULL
    return _DIAG if query_chunk == key_chunk else _NONE


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, h, s, d) -> (b, kv_heads, h/kv_heads, s, d), so one key head serves its group."""
    b, h, s, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, s, d)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mode: int,
            documents: _Pair | None = None) -> torch.Tensor:
    """Block scores ``(b, kv_heads, group, q, k)``, -inf where hidden: above the diagonal of a
    ``_DIAG`` block, and across documents where ``documents`` (the query chunk's and the key
    chunk's ids, ``(b, q)`` and ``(b, k)``) are given."""
    scores = torch.einsum("bkgqd,bksd->bkgqs", q, k) * scale
    if mode == _DIAG:
        n = scores.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    if documents is not None:
        other = documents[0][:, :, None] != documents[1][:, None, :]
        scores = scores.masked_fill(other[:, None, None], float("-inf"))
    return scores


Tensor = torch.Tensor
_Pair = tuple[Tensor, Tensor]
_Triple = tuple[Tensor, Tensor, Tensor]


class _Blocks(NamedTuple):
    """Attention of one query chunk over one key chunk, tensors laid out (b, heads, seq,
    head_dim). ``forward(q, k, v, scale, mode, documents) -> (out, lse)`` in float32, for
    merging; ``backward(q, k, v, out, lse, dout, scale, mode, documents) -> (dq, dk, dv)``, where
    ``out`` and ``lse`` are the merged results over every key chunk (the block's share of the
    gradient needs the whole softmax), summed by the caller in float32. ``documents``: the
    query and key chunks' document ids, or None; a query whose document has no key in the
    block gets out 0 and lse -inf there, and no gradient from it."""

    forward: Callable[..., _Pair]
    backward: Callable[..., _Triple]


def _torch_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mode: int,
                   documents: _Pair | None = None) -> _Pair:
    kv_heads = k.shape[1]
    scores = _scores(_grouped(q.float(), kv_heads), k.float(), scale, mode, documents)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - finite_lse(lse).unsqueeze(-1))
    out = torch.einsum("bkgqs,bksd->bkgqd", probs, v.float())
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def _torch_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                    scale: float, mode: int, documents: _Pair | None = None) -> _Triple:
    kv_heads = k.shape[1]
    qg, outg, doutg = (_grouped(t.float(), kv_heads) for t in (q, out, dout))
    kf, vf = k.float(), v.float()
    scores = _scores(qg, kf, scale, mode, documents)
    probs = torch.exp(scores - lse.reshape(qg.shape[:-1]).unsqueeze(-1))
    delta = (doutg * outg).sum(-1, keepdim=True)
    dv = torch.einsum("bkgqs,bkgqd->bksd", probs, doutg)
    dscores = probs * (torch.einsum("bkgqd,bksd->bkgqs", doutg, vf) - delta) * scale
    dq = torch.einsum("bkgqs,bksd->bkgqd", dscores, kf).reshape(q.shape)
    dk = torch.einsum("bkgqs,bkgqd->bksd", dscores, qg)
    return dq, dk, dv


def _kernel_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mode: int,
                    documents: _Pair | None = None) -> _Pair:
    from orch.kernels.attention.kernels import default_config, forward

    config = default_config(q.shape[-1], q.dtype)
    out, lse = forward(*(t.transpose(1, 2) for t in (q, k, v)), mode == _DIAG, scale, config,
                       documents)
    return out.transpose(1, 2).float(), lse


def _kernel_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                     scale: float, mode: int, documents: _Pair | None = None) -> _Triple:
    from orch.kernels.attention.kernels import backward, default_config

    config = default_config(q.shape[-1], q.dtype)
    # ``out`` stays the float32 merge: the kernel reads it only for delta, in float32
    q, k, v, out, dout = (t.transpose(1, 2) for t in (q, k, v, out, dout))
    grads = backward(q, k, v, out, lse.contiguous(), dout, None, mode == _DIAG, scale, config,
                     documents)
    dq, dk, dv = (g.transpose(1, 2) for g in grads)
    return dq, dk, dv


_TORCH_BLOCKS = _Blocks(_torch_forward, _torch_backward)
_KERNEL_BLOCKS = _Blocks(_kernel_forward, _kernel_backward)
"""orch's FlashAttention kernels on the blocks: given the merged ``out`` and ``lse`` their
backward computes exactly a block's share (``delta`` from the merged output), so the ring needs
nothing beyond the kernels ``flash_attention`` runs; with documents they skip the key blocks of
documents the queries lack (a whole ring block, where the chunks share none)."""


def _merge(out, lse, block_out, block_lse):
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)  # -inf where neither saw a key (documents)
    keep = torch.exp(lse - finite_lse(new)).unsqueeze(-1)
    add = torch.exp(block_lse - finite_lse(new)).unsqueeze(-1)
    return out * keep + block_out * add, new


class _Ring:
    """Send/recv to the next and previous ranks of a context-parallel group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        ranks = dist.get_process_group_ranks(group)
        self.size, self.index = len(ranks), ranks.index(dist.get_rank())
        self.next = ranks[(self.index + 1) % self.size]
        self.prev = ranks[(self.index - 1) % self.size]
        self.group = group

    def shift(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``tensors`` to the next rank, return what the previous rank sent."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        with dimension("cp"):
            requests = dist.batch_isend_irecv(ops)
        for request in requests:
            request.wait()
        return received

    def chunks(self, source: int) -> tuple[int, int]:
        return source, 2 * self.size - 1 - source


# As torch custom ops, not an ``autograd.Function``: the dispatcher then sees the ring as one op,
# so selective recompute keeps its output (``orch.parallel.recompute`` names the forward) instead
# of running every block and every send and receive again in the backward (with a Function it
# saw the blocks' ops: on CPU it kept each block's score matrix, on CUDA nothing, and the ring ran
# twice), and ``torch.compile`` calls the ring instead of tracing its sends. The group travels by
# name.


def _chunk_documents(documents: Tensor | None, chunk: int, size: int) -> Tensor | None:
    """The document ids of zigzag chunk ``chunk`` (of ``size`` tokens) of the whole sequence's
    ``documents``: every rank has them all, so none travel around the ring."""
    return None if documents is None else documents[:, chunk * size:(chunk + 1) * size]


def _pair(documents: Tensor | None, query_chunk: int, key_chunk: int, size: int
          ) -> _Pair | None:
    if documents is None:
        return None
    return (_chunk_documents(documents, query_chunk, size),
            _chunk_documents(documents, key_chunk, size))


@torch.library.custom_op("orch::ring_attention_forward", mutates_args=())
def _ring_forward(q: Tensor, k: Tensor, v: Tensor, documents: Tensor | None, group: str,
                  scale: float) -> _Pair:
    """The merged float32 output and log-sum-exp of this rank's queries over the ring; with
    ``documents`` (the whole sequence's ids), within documents."""
    ring = _Ring(_resolve_process_group(group))
    blocks = _blocks(q, k, v)
    half = q.shape[2] // 2
    queries = (q[:, :, :half], q[:, :, half:])
    mine = ring.chunks(ring.index)
    acc = [[None, None], [None, None]]  # per local query chunk: (out, lse)
    block_k, block_v = k, v
    for step in range(ring.size):
        source = (ring.index - step) % ring.size
        keys = ring.chunks(source)
        for qi in range(2):
            for ki in range(2):
                mode = _visibility(mine[qi], keys[ki])
                if mode == _NONE:
                    continue
                ks = slice(ki * half, (ki + 1) * half)
                out, lse = blocks.forward(queries[qi], block_k[:, :, ks], block_v[:, :, ks],
                                          scale, mode, _pair(documents, mine[qi], keys[ki], half))
                acc[qi] = list(_merge(acc[qi][0], acc[qi][1], out, lse))
        if step < ring.size - 1:
            block_k, block_v = ring.shift([block_k, block_v])
    return (torch.cat([acc[0][0], acc[1][0]], dim=-2),
            torch.cat([acc[0][1], acc[1][1]], dim=-1))


@_ring_forward.register_fake
def _ring_forward_shapes(q: Tensor, k: Tensor, v: Tensor, documents: Tensor | None, group: str,
                         scale: float) -> _Pair:
    return (q.new_empty(q.shape, dtype=torch.float32),
            q.new_empty(q.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("orch::ring_attention_backward", mutates_args=())
def _ring_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   documents: Tensor | None, group: str, scale: float) -> _Triple:
    ring, blocks = _Ring(_resolve_process_group(group)), _blocks(q, k, v)
    half = q.shape[2] // 2
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    block_k, block_v = k, v
    mine = ring.chunks(ring.index)
    for step in range(ring.size):
        source = (ring.index - step) % ring.size
        keys = ring.chunks(source)
        for qi in range(2):
            qs = slice(qi * half, (qi + 1) * half)
            for ki in range(2):
                mode = _visibility(mine[qi], keys[ki])
                if mode == _NONE:
                    continue
                ks = slice(ki * half, (ki + 1) * half)
                gq, gk, gv = blocks.backward(
                    q[:, :, qs], block_k[:, :, ks], block_v[:, :, ks], out[:, :, qs],
                    lse[..., qs], grad_out[:, :, qs], scale, mode,
                    _pair(documents, mine[qi], keys[ki], half))
                dq[:, :, qs] += gq
                dk[:, :, ks] += gk
                dv[:, :, ks] += gv
        # Blocks and their gradients travel together; after ``size`` hops they are home.
        block_k, block_v, dk, dv = ring.shift([block_k, block_v, dk, dv])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_ring_backward.register_fake
def _ring_backward_shapes(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                          *rest: object) -> _Triple:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _blocks(q: Tensor, k: Tensor, v: Tensor) -> _Blocks:
    """orch's kernels where ``flash_attention`` would run them and they take the inputs
    (``kernel_takes``: CUDA tensors, or ``ORCH_KERNELS=triton``), with or without documents;
    the plain-torch blocks elsewhere."""
    return (_KERNEL_BLOCKS if kernel_takes(q, k, v, instead="plain-torch ring blocks")
            else _TORCH_BLOCKS)


def _keep_for_backward(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd API)
    q, k, v, documents, group, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, documents)
    ctx.group, ctx.scale = group, scale


def _gradients(ctx, grad_out, grad_lse):  # noqa: ANN001, ANN202 (autograd API)
    q, k, v, out, lse, documents = ctx.saved_tensors
    # the output reached the model in q's dtype: its gradient did too
    dq, dk, dv = _ring_backward(grad_out.to(q.dtype), q, k, v, out, lse, documents, ctx.group,
                                ctx.scale)
    return dq, dk, dv, None, None, None


_ring_forward.register_autograd(_gradients, setup_context=_keep_for_backward)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                   scale: float | None = None, documents: Documents | None = None
                   ) -> torch.Tensor:
    """Causal attention of this rank's zigzag queries over the whole sequence of ``group``;
    with ``documents`` (the whole sequence's document ids), within documents."""
    if q.shape[2] % 2:
        raise ValueError(f"ring attention needs two equal local chunks, got length {q.shape[2]}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = autocast_inputs(q, k, v)
    ids = None
    if documents is not None:  # the kernels read each chunk's ids: all of them must be there
        shape = (q.shape[0], q.shape[2] * dist.get_world_size(group))
        check_document_ids(documents.ids, "documents", shape, "the whole sequence",
                           "ring_attention")
        ids = documents.ids.to(q.device)
    out, _ = _ring_forward(q, k, v, ids, group.group_name, float(scale))
    return out.to(q.dtype)


# --- Ulysses ------------------------------------------------------------------------------------


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """(b, h, s/cp, d) sequence shard -> (b, h/cp, s, d) head shard, by one all-to-all."""
    b, h, s, d = x.shape
    send = x.reshape(b, cp, h // cp, s, d).transpose(0, 1).contiguous()
    received = all_to_all(send, group, dim="cp")
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """(b, h/cp, s, d) head shard -> (b, h, s/cp, d) sequence shard: the inverse all-to-all."""
    b, hl, s, d = x.shape
    send = x.reshape(b, hl, cp, s // cp, d).permute(2, 0, 1, 3, 4).contiguous()
    received = all_to_all(send, group, dim="cp")
    return received.transpose(0, 1).reshape(b, cp * hl, s // cp, d)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      group: dist.ProcessGroup, scale: float | None = None,
                      documents: Documents | None = None) -> torch.Tensor:
    """Causal attention of contiguous sequence shards via sequence<->head all-to-alls; with
    ``documents`` (the whole sequence's ids, the order the all-to-all puts it in), within
    documents."""
    cp = dist.get_world_size(group)
    # in autocast's dtype before they travel (what the attention would cast them to anyway)
    q, k, v = (_seq_to_heads(t, group, cp) for t in autocast_inputs(q, k, v))
    out = causal_attention(q, k, v, scale, documents)
    return _heads_to_seq(out, group, cp)


def apply_context_parallel(model: torch.nn.Module, group: dist.ProcessGroup, kind: str) -> None:
    """Make every attention of ``model`` (an ``orch.models.llama.Transformer``) attend across
    the ``cp`` ranks of ``group``. Apply after tensor parallelism, before recompute and FSDP;
    the trainer feeds each rank its ``local_positions`` of every sequence."""
    attention = ring_attention if kind == "ring" else ulysses_attention
    for block in model.layers.values():
        block.attention.attention_fn = functools.partial(attention, group=group)
