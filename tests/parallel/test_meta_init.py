"""A model built on the meta device, pruned to a pipeline rank's stages or sharded by tensor or
expert parallelism or FSDP, and only then given memory and values
(``orch.models.weights.materialize``, what ``orch launch`` does): every parameter equals the
model initialized whole on one process, and each rank allocates only its share (2 gloo ranks,
one spawn for every case)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gloo_harness import run_on_gloo
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from orch.config import ModelConfig
from orch.models.llama import Transformer
from orch.models.weights import SeededInit, materialize
from orch.parallel.expert_parallel import apply_expert_parallel
from orch.parallel.pipeline.stages import prune_to_rank, stage_layers
from orch.parallel.tensor_parallel import apply_tensor_parallel

pytestmark = pytest.mark.dist

SEED = 4
DENSE = ModelConfig(vocab_size=64, dim=32, layers=4, heads=4, kv_heads=2, ffn_dim=48)
MOE = dataclasses.replace(DENSE, experts=4, top_k=2, moe_layer_interval=1, expert_ffn_dim=24)
CASES = ("tp2", "ep2", "pp2", "fsdp2")


def whole(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(SEED)
    return model


def sharded(case: str, rank: int) -> Transformer:
    """The case's model on this rank, built on meta, sharded or pruned, then materialized."""
    with torch.device("meta"):
        model = Transformer(MOE if case == "ep2" else DENSE)
    source = SeededInit(model, SEED)  # the whole model's order, before any pruning
    if case == "tp2":
        apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)),
                              True, loss_parallel=True)
    elif case == "ep2":
        apply_expert_parallel(model, None)
    elif case == "pp2":
        prune_to_rank(model, stage_layers([2, 2]), [rank])
    else:  # FSDP2 shards the meta parameters; memory comes after (torchtitan's order)
        mesh = init_device_mesh("cpu", (2,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    materialize(model, torch.device("cpu"), source)
    return model


def _run(rank: int, world: int, results) -> None:
    for case in CASES:
        model = sharded(case, rank)
        params, local_bytes = {}, 0
        for name, p in model.named_parameters():
            data = p.data
            local = data.to_local() if isinstance(data, DTensor) else data
            local_bytes += local.untyped_storage().nbytes()
            params[name] = (data.full_tensor() if isinstance(data, DTensor) else data).clone()
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        results[case, rank] = (params, local_bytes, buffers)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_gloo(_run, 2, tmp_path_factory.mktemp("meta"))


def _bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_equals_the_whole_init_and_each_rank_holds_its_share(ranks, case):
    reference = whole(MOE if case == "ep2" else DENSE)
    expected = dict(reference.named_parameters())
    held = []
    for rank in range(2):
        params, local_bytes, buffers = ranks[case, rank]
        held.append(local_bytes)
        if case != "pp2":
            assert params.keys() == expected.keys()
        for name, value in params.items():
            assert torch.equal(value, expected[name]), (case, rank, name)
        for name, value in buffers.items():
            assert torch.equal(value, reference.get_buffer(name)), (case, rank, name)
    if case == "pp2":  # each stage: its two layers, plus the embedding or the head
        assert sorted([*ranks[case, 0][0], *ranks[case, 1][0]]) == sorted(expected)
    if case == "ep2":  # the experts are split, the rest replicated
        experts = sum(p.numel() * p.element_size() for n, p in reference.named_parameters()
                      if ".experts." in n)
        assert held == [_bytes(reference) - experts // 2] * 2
    elif case == "pp2":
        assert sum(held) == _bytes(reference)
    else:  # everything split but the norms
        assert max(held) < 0.6 * _bytes(reference)


def test_tied_embeddings_stay_tied_through_materialize():
    """Moving a meta parameter to a device gives each module holding it a parameter of its
    own; the tie is made again, and the values are the whole init's."""
    cfg = dataclasses.replace(DENSE, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    materialize(model, torch.device("cpu"), SeededInit(model, SEED))
    assert model.output.weight is model.tok_embeddings.weight
    for (name, ours), theirs in zip(model.named_parameters(), whole(cfg).parameters(),
                                    strict=True):
        assert torch.equal(ours, theirs), name
