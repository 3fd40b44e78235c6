"""Activation checkpointing (``train.recompute``), applied to each decoder block.

``full`` keeps only a block's input and reruns its forward in backward. ``selective`` is op-level
selective checkpointing (torchtitan's): matmul and attention outputs are saved, the cheap
elementwise ops between them (norms, RoPE, SiLU, products) are recomputed, which frees most of the
per-block activations for a few percent of extra time.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Wrap every block of ``model.layers`` in place; ``none`` leaves the model untouched."""
    if mode == "none":
        return
    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            context = partial(create_selective_checkpoint_contexts, _policy)
            wrapped = checkpoint_wrapper(block, context_fn=context, preserve_rng_state=False)
        model.layers[name] = wrapped
