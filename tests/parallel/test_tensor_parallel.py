"""Tensor (and sequence) parallelism on 2 gloo ranks equals the plain model on one process:
loss, logits and every parameter gradient, forward and backward, for each combination of
sequence parallelism, loss parallelism and tied embeddings; and an MoE model (router, shared
expert, balancing loss) under sequence parallelism, with its experts split over the same ranks
(ep2) or replicated on them (their gradients then summed as the expert-data-parallel FSDP
unit does). MoE models without sequence parallelism are refused.

One spawn of 2 processes runs every case (process start-up dominates). Spawn, not fork: a
child forked after the parent's OpenMP pool ran (earlier tests' matmuls) can hang in libgomp's
barrier on its first parallel op. Measured differences
(fp32, gloo): loss within 4.8e-7 (one ulp at ~4.2), logits within 1.2e-7, gradients within
6.7e-8; the tolerances are ~10x and ~17x above those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_harness import run_on_gloo
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from orch.config import ModelConfig
from orch.errors import OrchError
from orch.models.llama import Transformer
from orch.models.moe import moe_layers, set_sequence_group, take_aux_loss
from orch.parallel.expert_parallel import apply_expert_parallel
from orch.parallel.tensor_parallel import (
    apply_tensor_parallel,
    vocab_parallel_loss,
    vocab_shard,
)

pytestmark = pytest.mark.dist

TP = 2
LOSS_ATOL = 5e-6
ATOL = 2e-6
BASE = ModelConfig(vocab_size=64, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=48,
                   head_dim=12)  # heads wider than dim / heads (model.head_dim): 48-wide q
CASES = [  # (sequence_parallel, loss_parallel, tie_embeddings, qk_norm, qkv_bias)
    *itertools.product((False, True), (False, True), (False,), (True,), (False,)),
    (True, True, True, True, False),
    (True, True, False, False, False),
    (True, True, False, False, True),  # Qwen2's q/k/v biases, split with their projections
    (False, True, False, False, True),
]


UNEVEN = dataclasses.replace(BASE, vocab_size=BASE.vocab_size - 1)  # 63: shards of 32 and 31


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, BASE.vocab_size, (2, 17), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def moe_model() -> Transformer:
    """Every layer MoE: 4 experts (top 2, seeded routing is uneven) and a shared expert."""
    model = Transformer(dataclasses.replace(BASE, experts=4, top_k=2, moe_layer_interval=1,
                                            shared_experts=1, expert_ffn_dim=24))
    model.init_weights(3)
    return model


def forward_backward(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Loss, the MoE balancing loss (``aux``, whose gradient the MoE layers add in the same
    backward), full logits and full gradients, as plain tensors whatever the layout."""
    inputs, targets = batch()
    logits = model(inputs)
    sharded = isinstance(logits, DTensor)
    with loss_parallel() if sharded else contextlib.nullcontext():
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = loss.to_local() if isinstance(loss, DTensor) else loss  # replicated
        loss.backward()
    aux = take_aux_loss(model)

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    out = {"loss": full(loss), "logits": full(logits)}
    if aux is not None:
        out["aux"] = aux.detach().clone()
    out |= {f"grad.{name}": full(p.grad) for name, p in model.named_parameters()}
    return out


def biased(model: Transformer) -> Transformer:
    """``model`` with its q/k/v biases (initialized to zero) random, so that they show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def case_model(tie: bool, qk: bool, bias: bool) -> Transformer:
    return biased(Transformer(dataclasses.replace(BASE, tie_embeddings=tie, qk_norm=qk,
                                                  qkv_bias=bias)))


def reference(tie: bool, qk: bool, bias: bool) -> dict[str, torch.Tensor]:
    return forward_backward(case_model(tie, qk, bias))


def _run(rank: int, world: int, results) -> None:
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    for sp, lp, tie, qk, bias in CASES:
        model = case_model(tie, qk, bias)
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sp, loss_parallel=lp)
        out = forward_backward(model)
        out["dtensor_params"] = torch.tensor(
            sum(isinstance(p, DTensor) for p in model.parameters())
        )
        results[(sp, lp, tie, qk, bias, rank)] = out
    for ep in (1, 2):
        moe = moe_model()
        apply_tensor_parallel(moe, mesh["tp"], sequence_parallel=True, loss_parallel=True)
        set_sequence_group(moe, mesh.get_group("tp"), "tp")
        if ep > 1:
            apply_expert_parallel(moe, mesh["tp"])
        out = forward_backward(moe)
        for name, grad in out.items():  # replicated experts: what their edp FSDP unit sums
            if ep == 1 and name.startswith("grad.") and ".experts." in name:
                dist.all_reduce(grad)
        dist.all_reduce(out["aux"], op=dist.ReduceOp.AVG)
        results[("moe", ep, rank)] = out
    uneven = Transformer(UNEVEN)  # the pipeline's loss: a plain vocabulary shard wrapped again
    apply_tensor_parallel(uneven, mesh["tp"], sequence_parallel=True, loss_parallel=True)
    inputs, targets = (ids % UNEVEN.vocab_size for ids in batch())
    shard = uneven(inputs).to_local()
    with loss_parallel():
        loss = vocab_parallel_loss(shard, targets, mesh["tp"], UNEVEN.vocab_size)
    results[("uneven", rank)] = (loss.detach(), shard.shape[-1])
    try:
        apply_tensor_parallel(moe_model(), mesh["tp"], sequence_parallel=False,
                              loss_parallel=True)
    except OrchError as exc:
        results[("moe refused", rank)] = str(exc)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return run_on_gloo(_run, TP, tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("sp,lp,tie,qk,bias", CASES)
def test_equals_plain_model_forward_and_backward(sharded, sp, lp, tie, qk, bias):
    """``qk``: Qwen3's QK-norm, whose weights' gradients each rank computes from its own heads
    (summed over the tp ranks, as the plain model's cover every head); ``bias``: Qwen2's q/k/v
    biases, sharded as their projections' rows."""
    ref = reference(tie, qk, bias)
    for rank in range(TP):
        got = sharded[(sp, lp, tie, qk, bias, rank)]
        assert got.keys() - {"dtensor_params"} == ref.keys()
        for key, value in ref.items():
            atol = LOSS_ATOL if key == "loss" else ATOL
            torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=key)


def test_sharding_follows_sequence_parallel(sharded):
    # The block norms' weights are replicated DTensors only under sequence parallelism; the
    # QK-norm's always (they compute on the rank's heads)
    qk = dataclasses.replace(BASE, qk_norm=True)
    plain = sum(1 for name, _ in Transformer(qk).named_parameters() if name != "norm.weight"
                and not name.endswith(("attention_norm.weight", "ffn_norm.weight")))
    assert int(sharded[(False, True, False, True, False, 0)]["dtensor_params"]) == plain
    for case in ((True, True, False, True, False), (True, True, False, False, True)):
        everything = sum(1 for _ in case_model(*case[2:]).parameters())
        assert int(sharded[(*case, 0)]["dtensor_params"]) == everything


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_equals_plain_model_forward_and_backward(sharded, ep):
    model = moe_model()
    ref = forward_backward(model)
    loads = torch.stack([layer.expert_load for layer in moe_layers(model)])
    assert (loads.amax(1) > loads.amin(1)).all()  # uneven routing: ties would hide mistakes
    for rank in range(TP):
        got = sharded[("moe", ep, rank)]
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            atol = LOSS_ATOL if key in ("loss", "aux") else ATOL
            torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=key)


def test_moe_without_sequence_parallel_is_refused(sharded):
    message = sharded[("moe refused", 0)]
    assert "parallel.sequence_parallel" in message and "MoE" in message and "fix:" in message


def test_loss_of_a_vocabulary_shard_where_tp_does_not_divide_the_vocabulary(sharded):
    """The pipeline's last stage hands the loss its plain vocabulary shard: 63 columns over 2
    ranks are 32 and 31, which the loss took for 64 and 62 (each rank's loss wrong, so a
    pp x tp run's differed from one process's by 0.015 at step 1)."""
    inputs, targets = (ids % UNEVEN.vocab_size for ids in batch())
    ref = F.cross_entropy(Transformer(UNEVEN)(inputs).flatten(0, 1), targets.flatten())
    for rank in range(TP):
        loss, width = sharded[("uneven", rank)]
        assert width == vocab_shard(UNEVEN.vocab_size, TP, rank) == 32 - rank
        torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=LOSS_ATOL)
