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

MoE layers (``orch.models.moe``) are refused with tp > 1 (an :class:`OrchError`): their experts
are split by expert parallelism (``parallel.ep``/``etp``), and the router and shared expert
would need their gradients summed over the tp ranks, which is not built yet.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from orch.errors import OrchError
from orch.models.moe import MoEFeedForward


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
    if any(isinstance(block.feed_forward, MoEFeedForward) for block in model.layers):
        raise OrchError(
            f"parallel.tp: {tp_mesh.size()} with MoE layers is not supported yet; fix: set "
            "parallel.tp=1 for MoE models and split the experts with parallel.ep and "
            "parallel.etp, or use a dense model (model.experts: 0)"
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
    parallelize_module(model, tp_mesh, top)
    if model.cfg.tie_embeddings:  # both shard the [vocab, dim] weight on dim 0: share it again
        model.output.weight = model.tok_embeddings.weight

    for block in model.layers:
        plan: dict[str, ParallelStyle] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between),
        }
        if sequence_parallel:
            plan |= {
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # x arrives sequence-sharded; cos/sin are plain full-length tables.
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None),
                    desired_input_layouts=(Replicate(), None, None),
                ),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
            }
        parallelize_module(block, tp_mesh, plan)
