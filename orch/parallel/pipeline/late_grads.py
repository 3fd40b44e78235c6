"""Weight gradients that arrive after FSDP's post-backward, folded in as FSDP itself folds them.

Under FSDP2 with a mixed-precision policy (bf16 compute, float32 reduction), the post-backward
that ends each micro-batch's backward pass while gradient sync is off moves the bf16 gradients it
finds into float32 accumulators, and the final reduce-scatter takes the accumulators. A pipeline's
split backward computes the weight gradients later (``W``: orch's deferred GEMMs, or torch's second
autograd pass), after that post-backward: they land in ``.grad`` in bf16 beside float32
accumulators, W's that run back to back would add up in bf16, and the reduce-scatter refuses the
mix ("FSDP reduce-scatter expects uniform gradient dtype", found running ZB-V on pp2 x fsdp2 in
bf16 on CPU; fp32 runs have nothing to fold). :class:`LateGradsStage` does after each ``W``, and
before the final reduce, what FSDP does after a backward pass: adds each bf16 ``.grad`` into the
parameter's float32 accumulator, making one where there is none.

This reads FSDP2's per-parameter state (``FSDPParam``: ``_unsharded_param``,
``unsharded_accumulated_grad``, ``reduce_dtype``), which is private to torch; the bf16 pipeline
parity test (tests/launch/test_bf16.py) holds it to torch's behaviour.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.pipelining import PipelineStage


def fold_late_grads(module: nn.Module) -> None:
    """Move every bf16 gradient of ``module``'s FSDP parameters into its float32 accumulator
    (nothing to do outside FSDP or without a reduce dtype)."""
    if not isinstance(module, FSDPModule):
        return
    for state in fully_shard.state(module)._state_ctx.all_states:
        for group in state._fsdp_param_groups:
            for param in group.fsdp_params:
                unsharded = getattr(param, "_unsharded_param", None)
                grad = None if unsharded is None else unsharded.grad
                if grad is None or param.reduce_dtype in (None, grad.dtype):
                    continue
                if param.unsharded_accumulated_grad is None:
                    param.unsharded_accumulated_grad = grad.to(param.reduce_dtype)
                else:
                    param.unsharded_accumulated_grad += grad
                unsharded.grad = None


class LateGradsStage(PipelineStage):
    """A torch pipeline stage whose weight-gradient steps fold their gradients into FSDP's
    float32 accumulators (:func:`fold_late_grads`). Arguments as :class:`PipelineStage`."""

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        super().backward_weight_one_chunk(bwd_chunk_id, last_backward)
        fold_late_grads(self.submod)

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        fold_late_grads(self.submod)
        super().perform_reduce_grad(grad_scale_factor)


__all__ = ["LateGradsStage", "fold_late_grads"]
