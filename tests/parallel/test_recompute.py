"""Activation checkpointing changes memory, never the numbers."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from orch.config import load_config
from orch.models.llama import Transformer
from orch.parallel.recompute import apply_recompute, recompute_once


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_the_same_loss_and_gradients(mode):
    cfg = load_config("configs/tiny-moe.yaml").model
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in ("none", mode):
        model = Transformer(cfg)
        apply_recompute(model, recompute)
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1),
                                                 tokens[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), grads, list(model.state_dict())))
    (loss_a, grads_a, keys_a), (loss_b, grads_b, keys_b) = results
    assert keys_a == keys_b  # checkpoints stay interchangeable across recompute settings
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-6)


def test_every_block_is_checkpointed():
    model = Transformer(load_config("configs/tiny.yaml").model)
    apply_recompute(model, "full")
    forwards = [b.__dict__.get("forward") for b in model.layers.values()]
    assert all(isinstance(f, partial) and f.func is recompute_once for f in forwards)


@pytest.mark.parametrize("mode, runs", [("selective", 1), ("full", 2)])
def test_selective_recompute_keeps_the_attention_kernels_output(monkeypatch, mode, runs):
    """On orch's attention kernel (``ORCH_KERNELS=triton``: Triton's interpreter here, CUDA's
    path) selective recompute saves the kernel's output, so its forward runs once per block and
    micro-batch, as without recompute; full recompute runs it again in the backward."""
    pytest.importorskip("triton")
    from orch.kernels.attention import kernels

    monkeypatch.setenv("ORCH_KERNELS", "triton")
    launches = []
    launch = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *args: launches.append(1) or launch(*args))
    cfg = load_config("configs/tiny.yaml").model
    tokens = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(0))
    model = Transformer(cfg)
    apply_recompute(model, mode)
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1),
                                      tokens[:, 1:].flatten()).backward()
    assert len(launches) == runs * cfg.layers
