"""Activation checkpointing (``train.recompute``), applied to each decoder block.

``full`` keeps only a block's input and reruns its forward in backward. ``selective`` is op-level
selective checkpointing (torchtitan's): matmul and attention outputs are saved (orch's attention
kernel and MoE grouped GEMM among them), the cheap elementwise ops between them (norms, RoPE, SiLU,
products) are recomputed, which frees most of the per-block activations for a few percent of
extra time.

The checkpoint is orch's own, built on saved-tensor hooks, because torch's split backward (used
by the pipeline under tensor parallelism; orch's own split is one autograd pass) runs a
micro-batch's backward as two autograd passes (input gradients, later weight gradients,
``orch.parallel.pipeline``): torch's checkpoint recomputes the block in
*every* pass that unpacks its tensors (per graph task), and the weight pass runs one autograd
call per parameter group, so it recomputed the forward up to ten times per micro-batch (measured:
44 block calls instead of 8 for 4 micro-batches). Here a block is recomputed at most once: the
first pass that needs its tensors recomputes them, and they stay with the autograd graph until
the graph is freed (after the weight pass), which is the activation memory 2BP's deferral bound
already accounts for. Selective recompute reuses torch's caching dispatch modes
(``create_selective_checkpoint_contexts``) for which ops to save. Blocks keep their class and
parameter names (the block's ``forward`` is replaced), so checkpoints do not depend on it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

# Selective recompute replays each op by its call count, and profiler annotations are ops too:
# FSDP2's hooks on a nested unit inside a block (an MoE layer's experts under expert
# parallelism) open record_function scopes a different number of times in the forward and in
# the recompute, so the first backward failed ("profiler._record_function_enter_new.default
# invocation index 2 ... not found in storage"; torchtitan issue 3427). They compute nothing:
# pass them through, as torch itself does from pytorch PR 196862 on (the set is public).
SAC_IGNORED_OPS.update({torch.ops.profiler._record_function_enter_new.default,
                        torch.ops.profiler._record_function_exit._RecordFunction})

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
_SAVED_ORCH_OPS = {"orch::flash_attention_forward", "orch::grouped_mm",
                   "orch::ring_attention_forward"}
"""orch's attention kernel and MoE grouped GEMM (``orch.kernels``), by name: they are registered
only once the kernels are imported, which needs triton; and context parallelism's ring
attention (``orch.parallel.context_parallel``), kept whole: its sends are not run again."""


def _policy(ctx: object, op: torch._ops.OpOverload, *args: object, **kwargs: object
            ) -> CheckpointPolicy:
    saved = op in _SAVED_OPS or op.name() in _SAVED_ORCH_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


selective_contexts = partial(create_selective_checkpoint_contexts, _policy)
"""The context pair of op-level selective recompute, for :func:`recompute_once`."""


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Checkpoint every block of ``model.layers`` in place; ``none`` leaves the model untouched."""
    if mode == "none":
        return
    for block in model.layers.values():
        recompute_block(block, mode)


def recompute_block(block: nn.Module, mode: str) -> None:
    """Checkpoint one block in place (``full`` or ``selective``); the offload engine's
    activation policy picks blocks one by one."""
    block.forward = partial(recompute_once, block.forward,
                            selective_contexts if mode == "selective" else None)


ContextFn = Callable[[], tuple[contextlib.AbstractContextManager[object],
                               contextlib.AbstractContextManager[object]]]
"""Selective recompute: (forward mode caching the saved ops, recompute mode replaying them)."""


def recompute_once(fn: Callable[..., torch.Tensor], context_fn: ContextFn | None,
                   *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` keeping only ``args`` and what ``context_fn``'s forward mode caches; the
    tensors autograd saves are recomputed on first use and shared by every later backward
    pass over the same graph."""
    forward_context, recompute_context = (
        context_fn() if context_fn is not None else (contextlib.nullcontext(),) * 2)
    frame = _Frame(fn, args, recompute_context)
    counter = itertools.count()
    with torch.autograd.graph.saved_tensors_hooks(lambda _: (frame, next(counter)),
                                                  _unpack), forward_context:
        return fn(*args)


def _unpack(handle: tuple[_Frame, int]) -> torch.Tensor:
    frame, index = handle
    return frame.saved(index)


class _Frame:
    """One checkpointed call: its inputs, and its saved tensors once recomputed."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...],
                 context: contextlib.AbstractContextManager) -> None:
        self.fn, self.context = fn, context
        self.args = tuple(a.detach().requires_grad_(a.requires_grad)
                          if isinstance(a, torch.Tensor) else a for a in args)
        self.tensors: list[torch.Tensor] | None = None
        # The forward's autocast, for the recompute: the backward may run outside it (the
        # trainer's does; bf16 without FSDP then recomputed in float32 and failed)
        devices = {"cpu"} | {a.device.type for a in args if isinstance(a, torch.Tensor)}
        self.autocast = [(device, torch.is_autocast_enabled(device),
                          torch.get_autocast_dtype(device)) for device in sorted(devices)]
        self.autocast_cache = torch.is_autocast_cache_enabled()

    def saved(self, index: int) -> torch.Tensor:
        if self.tensors is None:
            self.tensors = self._recompute()
        return self.tensors[index]

    def _recompute(self) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []

        def pack(tensor: torch.Tensor) -> int:
            saved.append(tensor.detach())
            return len(saved) - 1

        with contextlib.ExitStack() as stack:
            for device, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype, enabled,
                                                   cache_enabled=self.autocast_cache))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack,
                                                                         saved.__getitem__))
            stack.enter_context(self.context)
            self.fn(*self.args)
        return saved
