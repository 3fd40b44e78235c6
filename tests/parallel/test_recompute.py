"""Activation checkpointing changes memory, never the numbers."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch

from orch.config import load_config
from orch.models.llama import Transformer
from orch.parallel.recompute import apply_recompute, recompute_once


def _step(config: str, recompute: str, autocast: bool = False):
    """One forward (under bf16 autocast, the backward outside it, as the trainer runs one
    process) and backward of ``config``'s model: the loss, gradients and state-dict keys."""
    cfg = load_config(config).model
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    model = Transformer(cfg)
    apply_recompute(model, recompute)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                             tokens[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, list(model.state_dict())


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_the_same_loss_and_gradients(mode):
    (loss_a, grads_a, keys_a), (loss_b, grads_b, keys_b) = (
        _step("configs/tiny-moe.yaml", recompute) for recompute in ("none", mode))
    assert keys_a == keys_b  # checkpoints stay interchangeable across recompute settings
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_under_autocast_with_the_backward_outside_it(mode):
    """The trainer runs one process's (or DDP's) bf16 forward under autocast and its backward
    outside it: the recompute ran in float32 and failed ("expected m1 and m2 to have the same
    dtype", SDPA's "query, key, and value to have the same dtype"). It recomputes under the
    forward's autocast, to the same gradients as no recompute."""
    (_, grads_a, _), (_, grads_b, _) = (_step("configs/tiny.yaml", recompute, autocast=True)
                                        for recompute in ("none", mode))
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=0, msg=name)


def test_every_block_is_checkpointed():
    model = Transformer(load_config("configs/tiny.yaml").model)
    apply_recompute(model, "full")
    forwards = [b.__dict__.get("forward") for b in model.layers.values()]
    assert all(isinstance(f, partial) and f.func is recompute_once for f in forwards)


def test_selective_recompute_keeps_the_kernels_outputs(monkeypatch, count_calls):
    """On orch's kernels (``ORCH_KERNELS=triton``: Triton's interpreter here, CUDA's path)
    selective recompute saves the attention kernel's and the MoE grouped GEMM's outputs, so they
    run as often as without recompute (attention: once per block; grouped GEMM: three forwards
    and three input gradients per MoE block); full recompute runs their forwards again."""
    pytest.importorskip("triton")
    from orch.kernels.attention import kernels
    from orch.kernels.moe import triton_moe

    monkeypatch.setenv("ORCH_KERNELS", "triton")
    runs = {"attention": count_calls(kernels, "forward"),
            "grouped GEMM": count_calls(triton_moe, "grouped_mm_forward")}
    cfg = dataclasses.replace(load_config("configs/tiny-moe.yaml").model, dim=64, heads=4,
                              kv_heads=2, ffn_dim=64, expert_ffn_dim=32, layers=2)
    tokens = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(0))
    counts = {}
    for mode in ("none", "selective", "full"):
        for calls in runs.values():
            calls.clear()
        model = Transformer(cfg)
        apply_recompute(model, mode)
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1),
                                          tokens[:, 1:].flatten()).backward()
        counts[mode] = {name: len(calls) for name, calls in runs.items()}
    blocks = cfg.layers
    assert counts["none"] == {"attention": blocks, "grouped GEMM": 6 * blocks}
    assert counts["selective"] == counts["none"]
    assert counts["full"] == {"attention": 2 * blocks, "grouped GEMM": 9 * blocks}
