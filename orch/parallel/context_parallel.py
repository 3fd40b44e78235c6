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
The block math here is plain torch (the specification, and the CPU path).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mode: int) -> torch.Tensor:
    scores = torch.einsum("bkgqd,bksd->bkgqs", q, k) * scale
    if mode == _DIAG:
        n = scores.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


def _block_forward(q, k, v, scale, mode):
    scores = _scores(q, k, scale, mode)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bkgqs,bksd->bkgqd", torch.exp(scores - lse.unsqueeze(-1)), v)
    return out, lse


def _merge(out, lse, block_out, block_lse):
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    keep, add = torch.exp(lse - new).unsqueeze(-1), torch.exp(block_lse - new).unsqueeze(-1)
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


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale):  # noqa: ANN001, ANN205 (autograd signature)
        ring = _Ring(group)
        kv_heads, half = k.shape[1], q.shape[2] // 2
        qg = _grouped(q.float(), kv_heads)
        queries = (qg[..., :half, :], qg[..., half:, :])
        mine = ring.chunks(ring.index)
        acc = [[None, None], [None, None]]  # per local query chunk: (out, lse)
        block_k, block_v = k.float(), v.float()
        for step in range(ring.size):
            source = (ring.index - step) % ring.size
            keys = ring.chunks(source)
            for qi in range(2):
                for ki in range(2):
                    mode = _visibility(mine[qi], keys[ki])
                    if mode == _NONE:
                        continue
                    ks = slice(ki * half, (ki + 1) * half)
                    out, lse = _block_forward(queries[qi], block_k[:, :, ks], block_v[:, :, ks],
                                              scale, mode)
                    acc[qi] = list(_merge(acc[qi][0], acc[qi][1], out, lse))
            if step < ring.size - 1:
                block_k, block_v = ring.shift([block_k, block_v])
        out = torch.cat([acc[0][0], acc[1][0]], dim=-2)
        lse = torch.cat([acc[0][1], acc[1][1]], dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        b, h, s, d = q.shape
        return out.reshape(b, h, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = _Ring(ctx.group), ctx.scale
        kv_heads, half = k.shape[1], q.shape[2] // 2
        qg = _grouped(q.float(), kv_heads)
        dout = _grouped(grad_out.float(), kv_heads)
        delta = (dout * out).sum(-1)
        dq = torch.zeros_like(qg)
        block_k, block_v = k.float(), v.float()
        dk, dv = torch.zeros_like(block_k), torch.zeros_like(block_v)
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
                    kb, vb = block_k[:, :, ks], block_v[:, :, ks]
                    scores = _scores(qg[..., qs, :], kb, scale, mode)
                    probs = torch.exp(scores - lse[..., qs].unsqueeze(-1))
                    dv[:, :, ks] += torch.einsum("bkgqs,bkgqd->bksd", probs, dout[..., qs, :])
                    dprobs = torch.einsum("bkgqd,bksd->bkgqs", dout[..., qs, :], vb)
                    dscores = probs * (dprobs - delta[..., qs].unsqueeze(-1)) * scale
                    dq[..., qs, :] += torch.einsum("bkgqs,bksd->bkgqd", dscores, kb)
                    dk[:, :, ks] += torch.einsum("bkgqs,bkgqd->bksd", dscores, qg[..., qs, :])
            # Blocks and their gradients travel together; after ``size`` hops they are home.
            block_k, block_v, dk, dv = ring.shift([block_k, block_v, dk, dv])
        b, h, s, d = q.shape
        return (dq.reshape(b, h, s, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's zigzag queries over the whole sequence of ``group``."""
    if q.shape[2] % 2:
        raise ValueError(f"ring attention needs two equal local chunks, got length {q.shape[2]}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _RingAttention.apply(q, k, v, group, scale)


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
                      group: dist.ProcessGroup, scale: float | None = None) -> torch.Tensor:
    """Causal attention of contiguous sequence shards via sequence<->head all-to-alls."""
    cp = dist.get_world_size(group)
    q, k, v = (_seq_to_heads(t, group, cp) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return _heads_to_seq(out, group, cp)


def apply_context_parallel(model: torch.nn.Module, group: dist.ProcessGroup, kind: str) -> None:
    """Make every attention of ``model`` (an ``orch.models.llama.Transformer``) attend across
    the ``cp`` ranks of ``group``. Apply after tensor parallelism, before recompute and FSDP;
    the trainer feeds each rank its ``local_positions`` of every sequence."""
    attention = ring_attention if kind == "ring" else ulysses_attention
    for block in model.layers.values():
        block.attention.attention_fn = functools.partial(attention, group=group)
