"""An offloaded model is built on the meta device and gets its first weights unit by unit,
straight into its homes (``orch.models.weights``, ``offload_transformer(..., weights)``): the
values the model built whole gets, and with NVMe homes no more than one unit's parameters in CPU
memory at any time while it is placed; units other replicas own are never allocated."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from orch.config import load_config
from orch.models.hf_load import HFCheckpoint
from orch.models.llama import Transformer
from orch.models.weights import SeededInit, WeightSource, meta_to_placeholders
from orch.offload.engine import OffloadEngine, offload_transformer, transformer_units


class Watched:
    """A weight source that records, at every fill, the bytes the model's parameters hold."""

    def __init__(self, source: WeightSource, model: nn.Module) -> None:
        self.source, self.model = source, model
        self.held: list[int] = []
        self.filled: list[str] = []

    def fill(self, name: str, into: torch.Tensor) -> None:
        self.held.append(sum(p.untyped_storage().nbytes() for p in self.model.parameters()))
        self.filled.append(name)
        self.source.fill(name, into)


def meta_model(config: str = "configs/tiny.yaml") -> Transformer:
    with torch.device("meta"):
        model = Transformer(load_config(config).model)
    model.init_buffers()
    return model


def offloaded(model: nn.Module, weights: WeightSource, params: str, tmp_path, rank: int = 0,
              replicas: int = 1) -> OffloadEngine:
    cfg = load_config("configs/tiny.yaml")
    off = dataclasses.replace(cfg.offload, params=params, optimizer=params,
                              nvme_path=str(tmp_path), shard_params=replicas > 1)
    return offload_transformer(model, torch.device("cpu"), 1 << 30, 1 << 26, off, rank, replicas,
                               weights)


def largest_unit_bytes(model: nn.Module) -> int:
    return max(unit.nbytes for unit in transformer_units(model))


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_a_meta_built_model_gets_the_seeded_weights_unit_by_unit(tmp_path, params):
    whole = Transformer(load_config("configs/tiny.yaml").model)
    whole.init_weights(5)
    model = meta_model()
    watched = Watched(SeededInit(model, 5), model)
    engine = offloaded(model, watched, params, tmp_path)
    assert watched.filled == [name for name, _ in whole.named_parameters()]
    if params == "nvme":  # only the unit being filled holds bytes
        assert max(watched.held) <= largest_unit_bytes(model) < sum(
            p.numel() * p.element_size() for p in whole.parameters()) / 3
    with engine.resident(None):
        for (name, ours), theirs in zip(model.named_parameters(), whole.parameters(),
                                        strict=True):
            assert torch.equal(ours, theirs), name
        assert torch.equal(model.rope.inv_freq, whole.rope.inv_freq)
    engine.close()


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_units_another_replica_owns_are_never_allocated_and_the_rest_keep_their_values(
        tmp_path, params):
    """``offload.shard_params`` on replica 1 of 2: the units replica 0 owns stay placeholders
    (their draws are taken and dropped, so the next unit's values are still the whole
    model's)."""
    whole = Transformer(load_config("configs/tiny.yaml").model)
    whole.init_weights(0)
    model = meta_model()
    watched = Watched(SeededInit(model, 0), model)
    engine = offloaded(model, watched, params, tmp_path, rank=1, replicas=2)
    away = engine.homes.elsewhere
    assert away and len(away) < len(engine.units)
    owned = [name for unit in engine.units if unit.index not in away
             for name in unit.param_names]
    assert watched.filled == owned
    with engine.resident(None):
        for unit in engine.units:
            for name, p in zip(unit.param_names, unit.params, strict=True):
                if unit.index in away:
                    assert p.untyped_storage().nbytes() == 0, name
                else:
                    assert torch.equal(p, whole.get_parameter(name)), name
    engine.close()


def write_hf_checkpoint(model: Transformer, path, shards: int = 3) -> None:
    """``model`` as a HuggingFace Llama directory in ``shards`` safetensors files (with the
    index ``save_pretrained`` writes)."""
    from safetensors.torch import save_file

    from orch.models.hf import hf_config, to_hf_state_dict

    path.mkdir()
    state = to_hf_state_dict(model.state_dict())
    keys = list(state)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, file in enumerate(files):
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: state[k].contiguous() for k in part}, str(path / file))
        weight_map |= dict.fromkeys(part, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg)))


def test_init_from_reads_a_checkpoint_unit_by_unit_into_nvme_homes(tmp_path):
    """``model.init_from`` with NVMe homes: every tensor read once, in the model's order, one
    unit in memory at a time; the values are the checkpoint's."""
    cfg = load_config("configs/tiny.yaml").model
    whole = Transformer(cfg)
    whole.init_weights(11)
    write_hf_checkpoint(whole, tmp_path / "hf")
    model = meta_model()
    source = HFCheckpoint(dataclasses.replace(cfg, init_from=str(tmp_path / "hf")), model)
    watched = Watched(source, model)
    engine = offloaded(model, watched, "nvme", tmp_path)
    source.close()
    assert source.read == len(list(whole.parameters()))
    assert max(watched.held) <= largest_unit_bytes(model)
    with engine.resident(None):
        for (name, ours), theirs in zip(model.named_parameters(), whole.parameters(),
                                        strict=True):
            assert torch.equal(ours, theirs), name
    engine.close()


def test_seeded_init_refuses_to_go_back_in_parameter_order():
    model = meta_model()
    init = SeededInit(model, 0)
    init.fill("layers.1.attention.wq.weight", torch.empty(model.get_parameter(
        "layers.1.attention.wq.weight").shape))
    with pytest.raises(ValueError, match="'layers.0.attention.wq.weight' is not a parameter "
                                         "after the ones already filled"):
        init.fill("layers.0.attention.wq.weight", torch.empty(1))


def test_meta_parameters_become_placeholders_and_ties_stay_tied():
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(load_config("configs/tiny.yaml").model,
                                                tie_embeddings=True))
    meta_to_placeholders(model)
    assert model.output.weight is model.tok_embeddings.weight
    assert all(p.device.type == "cpu" and p.untyped_storage().nbytes() == 0
               for p in model.parameters())


def test_a_meta_parameter_without_a_source_is_refused(tmp_path):
    model = meta_model()
    with pytest.raises(ValueError, match="tok_embeddings.weight is on the meta device and has "
                                         "no values: pass a weight source"):
        offloaded(model, None, "cpu", tmp_path)  # type: ignore[arg-type]
