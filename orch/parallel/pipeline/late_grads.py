"""FSDP inside a pipeline stage: every unit kept gathered and unreduced until the step's end, and
weight gradients that arrive after FSDP's post-backward folded in as FSDP itself folds them.

torch's pipeline stage turns off reshard-after-backward and gradient sync for the step only when
the stage's module *is* an FSDP module, and reduces it once at the step's end (its
``REDUCE_GRAD`` action). When the dense layers have no data parallelism (pp x tp MoE plans,
``orch.parallel.data_parallel``) only the experts are FSDP units and the stage is not one: they
resharded in their post-backward during ``I``, so torch's ``W`` looked for gradients of the
sharded parameters rather than the gathered ones autograd used (``KeyError: <AccumulateGrad>``
in ``stage_backward_weight``), and kept gathered they still reduce-scattered at ``I``, before
``W``'s gradients arrived. :class:`LateGradsStage` treats every outermost FSDP unit of its stage
(:func:`fsdp_units`) as torch treats an FSDP stage.

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
parity test (tests/launch/test_bf16.py) holds it to torch's behaviour, and
tests/parallel/test_pipeline.py the expert units' reduction.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.pipelining import PipelineStage


def fsdp_units(module: nn.Module) -> list[FSDPModule]:
    """The outermost FSDP modules of ``module``: itself when it is one (its state covers the
    units inside it), else each unit no other unit of it holds (the experts' units when only
    they are sharded)."""
    if isinstance(module, FSDPModule):
        return [module]
    return [unit for child in module.children() for unit in fsdp_units(child)]


def fold_late_grads(module: nn.Module) -> None:
    """Move every bf16 gradient of ``module``'s FSDP parameters into its float32 accumulator
    (nothing to do outside FSDP or without a reduce dtype)."""
    for unit in fsdp_units(module):
        for state in fully_shard.state(unit)._state_ctx.all_states:
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


def reduce_unit(unit: FSDPModule) -> None:
    """The step's one reduction of ``unit``'s gradients, then its reshard: FSDP's post-backward
    with sync and reshard on, as torch's stage runs it for a stage that is an FSDP module."""
    unit.set_is_last_backward(True)
    unit.set_reshard_after_backward(True)
    unit.set_requires_gradient_sync(True)
    state = fully_shard.state(unit)
    for inner in state._state_ctx.all_states:
        for group in inner._fsdp_param_groups:
            group.post_backward()
    state._root_post_backward_final_callback()  # waits for the reduction, ends the backward


class LateGradsStage(PipelineStage):
    """A torch pipeline stage that keeps every FSDP unit of its module (:func:`fsdp_units`)
    gathered and unreduced over the step's backwards and reduces each at the step's end, and
    whose weight-gradient steps fold their gradients into FSDP's float32 accumulators
    (:func:`fold_late_grads`). Arguments as :class:`PipelineStage`."""

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict,
                                   last_backward: bool = False) -> Any:
        for unit in fsdp_units(self.submod):
            unit.set_is_last_backward(False)
            unit.set_reshard_after_backward(False)
            unit.set_requires_gradient_sync(False)
        return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        super().backward_weight_one_chunk(bwd_chunk_id, last_backward)
        fold_late_grads(self.submod)

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        """torch's step end for every FSDP unit of the stage, not only a stage that is one:
        late gradients folded, each unit reduced and resharded, then the gradients scaled."""
        for unit in fsdp_units(self.submod):
            fold_late_grads(unit)
            reduce_unit(unit)
        if grad_scale_factor != 1:
            self.scale_grads(grad_scale_factor)


__all__ = ["LateGradsStage", "fold_late_grads", "fsdp_units", "reduce_unit"]
