"""Deferred weight-gradient GEMMs (``orch.parallel.pipeline.weight_grads``): a backward pass under
a store's ``collect`` leaves the linear layers' weight gradients to the store's weight step, and
backward + weight step give the gradients of a plain backward (fp32 and bf16 autocast; with bias
and without; several passes accumulated); outside ``collect`` a deferring layer is an ordinary
linear layer. The pipeline tests (test_pipeline.py) run every schedule on such stages."""

from __future__ import annotations

import copy

import torch
from torch import nn

from orch.parallel.pipeline.weight_grads import WeightGradStore, defer_linear_weight_grads


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.up = nn.Linear(8, 24)
        self.norm = nn.LayerNorm(24)
        self.down = nn.Linear(24, 8, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(self.embed(tokens)))))


def _pair() -> tuple[_Net, _Net]:
    torch.manual_seed(0)
    plain = _Net()
    deferring = copy.deepcopy(plain)
    defer_linear_weight_grads(deferring)
    return plain, deferring


def _batches(count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 16, (3, 5), generator=gen) for _ in range(count)]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


def test_backward_plus_weight_step_equals_a_plain_backward():
    plain, deferring = _pair()
    store = WeightGradStore()
    steps = []
    for tokens in _batches(3):
        plain(tokens).square().mean().backward()
        with store.collect():
            deferring(tokens).square().mean().backward()
        steps.append(store.take())
    # The passes left the linear weights alone and the rest at once.
    assert deferring.up.weight.grad is None and deferring.up.bias.grad is None
    assert deferring.down.weight.grad is None
    assert deferring.embed.weight.grad is not None and deferring.norm.weight.grad is not None
    for step in reversed(steps):  # weight steps in any order, as a schedule may defer them
        step()
    assert not any(p.grad.requires_grad for p in deferring.parameters())  # no graph built
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(deferring)[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_a_weight_step_runs_its_gemms_once():
    _, deferring = _pair()
    store = WeightGradStore()
    with store.collect():
        deferring(_batches(1)[0]).sum().backward()
    step = store.take()
    step()
    once = deferring.down.weight.grad.clone()
    step()
    torch.testing.assert_close(deferring.down.weight.grad, once, rtol=0, atol=0)
    store.take()()  # nothing was deferred since
    torch.testing.assert_close(deferring.down.weight.grad, once, rtol=0, atol=0)


def test_outside_collect_a_deferring_layer_is_a_plain_linear_layer():
    plain, deferring = _pair()
    defer_linear_weight_grads(deferring)  # a second call changes nothing
    tokens = _batches(1)[0]
    plain(tokens).square().mean().backward()
    deferring(tokens).square().mean().backward()
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(deferring)[name], grad, rtol=0, atol=0, msg=name)


def test_bf16_autocast_casts_as_a_plain_linear_layer_does():
    plain, deferring = _pair()
    store = WeightGradStore()
    tokens = _batches(1)[0]
    with torch.autocast("cpu", torch.bfloat16):
        out_plain = plain(tokens)
        out_deferring = deferring(tokens)
    assert out_deferring.dtype == out_plain.dtype == torch.bfloat16
    torch.testing.assert_close(out_deferring, out_plain, rtol=0, atol=0)
    out_plain.float().square().mean().backward()
    with store.collect():
        out_deferring.float().square().mean().backward()
    store.take()()
    for name, grad in _grads(plain).items():
        got = _grads(deferring)[name]
        assert got.dtype == torch.float32, name  # accumulated in the parameter's dtype
        torch.testing.assert_close(got, grad, rtol=1e-2, atol=1e-3, msg=name)
