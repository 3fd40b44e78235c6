"""Deferred weight-gradient GEMMs: the split backward of 2BP and the zero-bubble schedules in one
autograd pass.

torch's pipeline stage splits a micro-batch's backward into two autograd passes: ``I`` asks
autograd for the stage input's gradient and keeps the graph, ``W`` later asks for the weights'
gradients through the kept graph (two traversals, intermediate gradients kept at the parameter
boundaries); on the first stage, whose input is token ids, ``I`` computes nothing and ``W`` is the
whole backward, so deferring ``W`` there defers all of that rank's backward.

Here the split is made where the work is, as in the zero-bubble paper's implementation and
Megatron's weight-gradient store: one ordinary backward pass per micro-batch (``I``), in which
every ``nn.Linear`` computes its input gradient and hands its weight-gradient GEMM (saved input
and output gradient) to the stage's :class:`WeightGradStore` instead of running it; ``W`` runs
those GEMMs and accumulates into ``.grad``. ``I + W`` is then the same work as a fused backward
in one autograd pass, and the first stage's ``I`` does its real share (everything but the
GEMMs). Measured (benchmarks/results/pipeline.md, one CPU core): where GEMMs dominate both splits
cost about 2% over a fused backward; where per-layer overhead matters (d = 64 to 128) orch's costs
1.06-1.45x a fused one against torch's 1.15-1.94x. Other parameters (norms, embeddings,
experts' grouped GEMMs) get their gradients in ``I``, as in a fused backward. A deferred GEMM
keeps its input and output gradient until ``W``: the activation memory that 2BP's bound on
waiting weight steps already counts.

torch's stage takes such a split as its ``dw_builder``: after each backward pass it asks the
builder for the pass's weight step and runs it at once (``B``) or keeps it for ``W``.
:class:`SplitBackwardStage` is that stage. Layers whose weight is a DTensor in the forward
(tensor parallelism) compute as usual; the executor keeps torch's own split for such stages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from orch.parallel.pipeline.late_grads import LateGradsStage

_collecting: WeightGradStore | None = None
"""The store of the stage whose backward pass runs now (a rank runs one at a time)."""

_Deferred = tuple[nn.Parameter, nn.Parameter | None, torch.Tensor, torch.Tensor]
"""One held-back GEMM: (weight, bias or None, layer input, output gradient)."""


class WeightGradStore:
    """The weight-gradient GEMMs held back by one stage's ``nn.Linear`` layers during a
    backward pass, handed out per pass (:meth:`take`)."""

    def __init__(self) -> None:
        self._pending: list[_Deferred] = []

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Defer to this store the GEMMs of the backward passes run inside. Outside any
        ``collect``, layers compute their weight gradients at once, so any other backward
        stays correct."""
        global _collecting
        _collecting = self
        try:
            yield
        finally:
            _collecting = None

    def defer(self, item: _Deferred) -> None:
        self._pending.append(item)

    def take(self) -> Callable[[], None]:
        """The weight step of the GEMMs deferred since the last call: a callable that runs them
        (once) and accumulates into the parameters' ``.grad``."""
        taken, self._pending = self._pending, []

        @torch.no_grad()  # the saved inputs are part of the forward's graph
        def weight_step() -> None:
            while taken:
                weight, bias, inputs, grad = taken.pop()
                grad_weight, grad_bias = _weight_grads(inputs, grad, bias is not None)
                _accumulate(weight, grad_weight)
                if bias is not None:
                    assert grad_bias is not None
                    _accumulate(bias, grad_bias)

        return weight_step


def _weight_grads(inputs: torch.Tensor, grad: torch.Tensor,
                  bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dL/dW = grad^T inputs`` over every leading dimension (and ``dL/db`` the sum)."""
    grad_2d = grad.reshape(-1, grad.shape[-1])
    grad_weight = grad_2d.t().mm(inputs.reshape(-1, inputs.shape[-1]))
    return grad_weight, grad_2d.sum(0) if bias else None


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    """What autograd's accumulation does for a leaf: set or add, in the parameter's dtype."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _LinearDeferredWeight(torch.autograd.Function):
    """``F.linear`` whose backward hands the weight GEMM to the collecting store, if any."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None,
                params: tuple[nn.Parameter, nn.Parameter | None]) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.params, ctx.has_bias = params, bias is not None
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inputs, weight = ctx.saved_tensors
        grad_input = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return grad_input, None, None, None
        if _collecting is not None:
            weight_param, bias_param = ctx.params
            _collecting.defer((weight_param, bias_param if ctx.has_bias else None, inputs, grad))
            return grad_input, None, None, None
        grad_weight, grad_bias = _weight_grads(inputs, grad, ctx.has_bias)
        return grad_input, grad_weight, grad_bias, None


def _deferring_forward(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    weight, bias = layer.weight, layer.bias
    if isinstance(weight, DTensor) or not weight.requires_grad:
        return F.linear(inputs, weight, bias)
    params = (weight, bias)
    device = inputs.device.type
    if not torch.is_autocast_enabled(device):
        return _LinearDeferredWeight.apply(inputs, weight, bias, params)
    dtype = torch.get_autocast_dtype(device)  # what autocast does to F.linear
    inputs, weight = inputs.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False):
        return _LinearDeferredWeight.apply(inputs, weight, bias, params)


def defer_linear_weight_grads(module: nn.Module) -> None:
    """Make every ``nn.Linear`` in ``module`` hand its weight GEMM to the store collecting
    (:meth:`WeightGradStore.collect`) when its backward runs. Parameters and class stay (only
    the instance's ``forward`` is replaced), so state dicts and wrappers see no change; a layer
    already deferring is left as it is."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and not _defers(layer):
            layer.forward = partial(_deferring_forward, layer)  # type: ignore[method-assign]


def _defers(layer: nn.Linear) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is _deferring_forward


class SplitBackwardStage(LateGradsStage):
    """A torch pipeline stage whose split backward is one backward pass (``I``) plus the
    deferred weight GEMMs of its ``nn.Linear`` layers (``W``); a full backward (``B``) runs
    both at once. Arguments as :class:`PipelineStage`; under FSDP's mixed precision the
    ``W`` gradients join FSDP's float32 accumulators (:mod:`.late_grads`)."""

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int,
                 device: torch.device, **kwargs: object) -> None:
        self.weight_grads = WeightGradStore()
        super().__init__(submodule, stage_index, num_stages, device,
                         dw_builder=self.weight_grads.take, **kwargs)  # type: ignore[arg-type]
        defer_linear_weight_grads(submodule)

    def backward_one_chunk(self, bwd_chunk_id: int, loss: torch.Tensor | None = None,
                           full_backward: bool = True, last_backward: bool = False) -> None:
        with self.weight_grads.collect():
            super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)


__all__ = ["SplitBackwardStage", "WeightGradStore", "defer_linear_weight_grads"]
