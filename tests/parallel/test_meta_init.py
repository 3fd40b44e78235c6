"""A model built on the meta device, pruned to a pipeline rank's stages or sharded by tensor or
expert parallelism or FSDP, and only then given memory and values
(``orch.models.weights.materialize``, what ``orch launch`` does): every parameter equals the
model initialized whole on one process, and each rank allocates only its share (2 gloo ranks,
one spawn for every case); read from a HuggingFace checkpoint of that model, each rank reads
only its share too (and on 4 ranks, FSDP's strided shards over tensor parallelism)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from gloo_harness import run_on_gloo
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from orch.config import ModelConfig
from orch.models.hf import hf_config, hf_family, to_hf_state_dict
from orch.models.hf_load import HFCheckpoint
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
SOURCES = ("seeded", "hf")


def whole(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(SEED)
    return model


def saved(cfg: ModelConfig, where: Path) -> ModelConfig:
    """``cfg`` with ``model.init_from`` at a HuggingFace checkpoint of :func:`whole`'s weights
    written into ``where`` (Llama's, or Mixtral's for the MoE model)."""
    from safetensors.torch import save_file

    where.mkdir()
    (where / "config.json").write_text(json.dumps({"model_type": hf_family(cfg)[1],
                                                   **hf_config(cfg)}))
    state = {k: t.contiguous() for k, t in to_hf_state_dict(whole(cfg).state_dict()).items()}
    save_file(state, str(where / "model.safetensors"), metadata={"format": "pt"})
    return dataclasses.replace(cfg, init_from=str(where))


def sharded(case: str, rank: int, hf: dict[str, ModelConfig] | None = None
            ) -> tuple[Transformer, int]:
    """The case's model on this rank, built on meta, sharded or pruned, then materialized from
    orch's init or (``hf``: the checkpoints by model) from its HuggingFace checkpoint; and the
    bytes that source read (0 for orch's init)."""
    cfg = MOE if case == "ep2" else DENSE
    if hf is not None:
        cfg = hf["moe" if case == "ep2" else "dense"]
    with torch.device("meta"):
        model = Transformer(cfg)
    # the whole model's order, before any pruning
    source = SeededInit(model, SEED) if hf is None else HFCheckpoint(cfg, model, checked=True)
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
    return model, getattr(source, "bytes_read", 0)


def _run(rank: int, world: int, results, hf: dict[str, ModelConfig]) -> None:
    for case, source in [(case, source) for case in CASES for source in SOURCES]:
        model, read = sharded(case, rank, hf if source == "hf" else None)
        params, local_bytes = {}, 0
        for name, p in model.named_parameters():
            data = p.data
            local = data.to_local() if isinstance(data, DTensor) else data
            local_bytes += local.untyped_storage().nbytes()
            params[name] = (data.full_tensor() if isinstance(data, DTensor) else data).clone()
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        results[case, source, rank] = (params, local_bytes, buffers, read)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, ModelConfig]:
    where = tmp_path_factory.mktemp("hf")
    return {"dense": saved(DENSE, where / "dense"), "moe": saved(MOE, where / "moe")}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoints):
    return run_on_gloo(_run, 2, tmp_path_factory.mktemp("meta"), checkpoints)


def _bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", CASES)
def test_every_parameter_equals_the_whole_init_and_each_rank_holds_its_share(ranks, case,
                                                                            source):
    reference = whole(MOE if case == "ep2" else DENSE)
    expected = dict(reference.named_parameters())
    held = []
    for rank in range(2):
        params, local_bytes, buffers, read = ranks[case, source, rank]
        held.append(local_bytes)
        # a checkpoint's reads are the rank's share, not every tensor whole (a pipeline
        # stage's own tensors are whole: a tied or an untied head, and half the layers)
        assert read == (local_bytes if source == "hf" else 0), (case, rank, read)
        if case != "pp2":
            assert params.keys() == expected.keys()
        for name, value in params.items():
            assert torch.equal(value, expected[name]), (case, rank, name)
        for name, value in buffers.items():
            assert torch.equal(value, reference.get_buffer(name)), (case, rank, name)
    if case == "pp2":  # each stage: its two layers, plus the embedding or the head
        assert sorted([*ranks[case, source, 0][0], *ranks[case, source, 1][0]]) == \
            sorted(expected)
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


def _strided(rank: int, world: int, results, hf: dict[str, ModelConfig]) -> None:
    """Tensor parallelism inside FSDP on 4 ranks: FSDP2 shards the TP shards' rows again, a
    strided shard of the whole (``_StridedShard``), each rank's rows in two runs."""
    from torch.distributed.tensor.placement_types import _StridedShard

    cfg = hf["dense"]
    with torch.device("meta"):
        model = Transformer(cfg)
    source = HFCheckpoint(cfg, model, checked=True)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    apply_tensor_parallel(model, mesh["tp"], True, loss_parallel=True)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    materialize(model, torch.device("cpu"), source)
    strided = [name for name, p in model.named_parameters()
               if any(isinstance(x, _StridedShard) for x in p.data.placements)]
    local = sum(p.data.to_local().untyped_storage().nbytes() for p in model.parameters())
    results[rank] = ({name: p.data.full_tensor() for name, p in model.named_parameters()},
                     strided, local, source.bytes_read)


def test_strided_shards_read_only_their_rows(tmp_path_factory, checkpoints):
    ranks = run_on_gloo(_strided, 4, tmp_path_factory.mktemp("strided"), checkpoints)
    expected = dict(whole(DENSE).named_parameters())
    for rank in range(4):
        params, strided, local, read = ranks[rank]
        assert "layers.0.attention.wq.weight" in strided, strided  # the case under test
        assert read == local, (rank, read, local)
        for name, value in params.items():
            assert torch.equal(value, expected[name]), (rank, name)
