"""Tensor and sequence parallelism (``parallel.tp``, ``parallel.sequence_parallel``).

Megatron-style TP on torch's DTensor styles, laid out as torchtitan's Llama ``apply_tp``:

- attention ``wq/wk/wv`` are column-parallel (each rank computes ``heads/tp`` query heads and
  ``kv_heads/tp`` key/value heads; the model views projections as ``[b, s, -1, head_dim]`` and
  RoPE tables are per head, so local head counts need nothing else), ``wo`` is row-parallel;
- feed-forward ``w1/w3`` column-parallel, ``w2`` row-parallel;
- the embedding is vocabulary-parallel (row-parallel on ``[vocab, dim]`` with replicated token
  ids), the output head column-parallel with logits left sharded on the vocabulary (``Shard(-1)``)
  so the loss runs under :func:`torch.distributed.tensor.parallel.loss_parallel` and the full
  ``[batch, seq, vocab]`` logits never exist on one rank.

With sequence parallelism the activations between the parallel regions (residual stream, norms)
are sharded along the sequence (``Shard(1)``): the norms are :class:`SequenceParallel` (their
weights replicated DTensors), the row-parallel layers reduce-scatter instead of all-reduce, and
each attention/feed-forward input is all-gathered on entry. Without it those activations are
replicated plain tensors and the norm weights plain parameters.

QK-norm's weights (``model.qk_norm``) are replicated DTensors computing on the rank's heads
(``Shard(2)`` of ``[b, s, heads, head_dim]``, torchtitan's Qwen3 layout), sequence parallelism
or not: each rank's gradient covers its own heads, a partial sum reduced over the tp ranks.

MoE layers (``orch.models.moe``) need sequence parallelism (as in Megatron-Core): each TP rank
routes its own sequence shard, so no token is dispatched twice. The layer takes and returns
its rank's tokens as plain tensors; the router is replicated (a ``Replicate`` DTensor computing on
``Shard(0)`` tokens, so its gradient is a partial sum that is reduced over the tp ranks, as the
sequence-parallel norms' are) and its balancing loss passes ``1/tp`` of its gradient
(:attr:`MoEFeedForward.partial_grad_ranks`); the shared expert is split like the dense MLP, on
the all-gathered tokens. The routed experts are left alone: they follow the expert layout
(``parallel.ep``/``etp``), whose expert-data-parallel ranks include the tp ranks and sum their
gradients (parallel folding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from orch.errors import OrchError
from orch.models.moe import MoEFeedForward, moe_layers


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool
) -> None:
    """Shard ``model`` (an ``orch.models.llama.Transformer``) over the 1-D ``tp_mesh`` in place.

    Apply before activation checkpointing and data parallelism. Every TP rank must be given the
    same token ids (the batch stream is keyed by the dp rank, so it is). With ``loss_parallel``
    the model returns logits as a DTensor sharded on the vocabulary, for cross-entropy inside
    ``loss_parallel()`` (forward and backward); without it, plain full logits.
    """
    if tp_mesh.size() == 1:
        return
    if not sequence_parallel and any(moe_layers(model)):
        raise OrchError(
            f"parallel.tp: {tp_mesh.size()} with MoE layers needs sequence parallelism (each "
            "tp rank routes its own part of the sequence); fix: set "
            "parallel.sequence_parallel=true"
        )
    between = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
        "output": ColwiseParallel(
            input_layouts=between,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    # A pipeline stage may hold neither the embedding nor the head.
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items() if getattr(model, k)})
    if model.cfg.tie_embeddings:  # both shard the [vocab, dim] weight on dim 0: share it again
        model.output.weight = model.tok_embeddings.weight

    for block in model.layers.values():
        plan: dict[str, ParallelStyle] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between),
        }
        if block.attention.q_norm is not None:  # each rank normalizes its own heads (dim 2)
            plan |= {f"attention.{norm}": SequenceParallel(sequence_dim=2, use_local_output=True)
                     for norm in ("q_norm", "k_norm")}
        if isinstance(block.feed_forward, MoEFeedForward):
            plan |= _moe_plan(block.feed_forward)
            block.feed_forward.partial_grad_ranks = tp_mesh.size()
        else:
            plan |= _mlp_plan("feed_forward", between)
        if sequence_parallel:
            plan |= {
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # x arrives sequence-sharded; cos/sin are plain full-length tables.
                "attention": PrepareModuleInput(  # (x, cos, sin, documents)
                    input_layouts=(Shard(1), None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None),
                ),
            }
        parallelize_module(block, tp_mesh, plan)


def _mlp_plan(path: str, between: Placement) -> dict[str, ParallelStyle]:
    """A SwiGLU MLP at ``path`` whose input and output are laid out ``between`` its callers'
    regions: gathered on entry, ``w1``/``w3`` column- and ``w2`` row-parallel."""
    entry = {} if between == Replicate() else {
        path: PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),))
    }
    return entry | {
        f"{path}.w1": ColwiseParallel(),
        f"{path}.w3": ColwiseParallel(),
        f"{path}.w2": RowwiseParallel(output_layouts=between),
    }


def _moe_plan(layer: MoEFeedForward) -> dict[str, ParallelStyle]:
    """The MoE layer takes and returns its rank's tokens as plain tensors (the residual stream
    between the regions is plain local tensors, as the row-parallel outputs leave it); inside,
    tokens are flattened to ``[tokens, dim]``, so its replicated router and split shared expert
    shard dimension 0."""
    plan: dict[str, ParallelStyle] = {
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
        ),
        "feed_forward.router": SequenceParallel(sequence_dim=0, use_local_output=True),
    }
    if layer.shared_expert is not None:
        plan |= _mlp_plan("feed_forward.shared_expert", Shard(0))
    return plan


def vocab_shard(vocab: int, tp: int, rank: int) -> int:
    """The width of tp rank ``rank``'s vocabulary shard: ``torch.chunk``'s split, as DTensor's
    ``Shard`` makes it (ceil(vocab / tp) columns a rank, the last ones fewer, or none)."""
    chunk = -(-vocab // tp)
    return max(0, min(chunk, vocab - rank * chunk))


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor,
                        tp_mesh: DeviceMesh | None, vocab: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` ``[batch, seq, vocab]``, or of this rank's vocabulary
    shard of them as a plain tensor when ``tp_mesh`` is given (call inside ``loss_parallel()``:
    the full logits are never gathered). Returns a plain tensor, the same on every tp rank.

    ``vocab``: the whole vocabulary, which a shard's width times tp is not where tp does not
    divide it (251 over 2: shards of 126 and 125 made 252 and 250 columns, each rank's loss
    wrong); needed with ``tp_mesh``."""
    if tp_mesh is not None:
        if vocab is None:
            raise ValueError("vocab_parallel_loss: give vocab (the whole vocabulary) with tp_mesh")
        shape = (*logits.shape[:-1], vocab)
        logits = DTensor.from_local(logits, tp_mesh, [Shard(-1)], run_check=False, shape=shape,
                                    stride=torch.empty(shape, device="meta").stride())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    # to_local() is a view; torch's pipeline stage detaches its losses in place.
    return loss.to_local().clone() if isinstance(loss, DTensor) else loss
