"""Checkpoints of an offloaded run with NVMe homes (``orch.offload.checkpoint_homes``): ordinary
DCP checkpoints holding every parameter and optimizer state as they rest on disk, written one
tensor at a time and loaded one unit at a time, so the whole model and its states are never in
CPU memory at once (before, a save and a load brought every unit in)."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from offload_harness import tiny_cfg, train
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import orch.offload.checkpoint_homes as checkpoint_homes
import orch.runtime.checkpoint.bounded_files as bounded_files
from orch.kernels.adamw8bit.quant import zero_code
from orch.models.llama import Transformer
from orch.models.weights import SeededInit
from orch.offload.blockio import open_block_io
from orch.offload.engine import OffloadEngine, offload_transformer
from orch.offload.nvme import NvmeTier, ScratchFile
from orch.runtime.checkpoint import CheckpointManager
from orch.runtime.optim import build_optimizer
from orch.runtime.train_state import TrainState


def held(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the model's parameters and the optimizer's states hold in memory now (a unit in
    memory is views of one buffer: each storage counts once)."""
    tensors = list(model.parameters()) + [value for state in optimizer.state.values()
                                          for value in state.values()
                                          if isinstance(value, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer,
             engine: OffloadEngine) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer state by name, read with everything in memory."""
    out = {}
    with engine.resident(optimizer):
        for name, p in model.named_parameters():
            out[name] = p.detach().clone()
            for key, value in optimizer.state[p].items():
                out[f"{name}.{key}"] = value.detach().clone()
    return out


def orphan_second_moments(model: nn.Module, optimizer: torch.optim.Optimizer,
                          engine: OffloadEngine) -> dict[str, torch.Tensor]:
    """Turn AdamW8bit's states, in place, into the form older versions saved: second-moment code
    0 beside a nonzero first-moment code (here every third such element). Returns what a load
    must make of those codes: the smallest nonzero code there, by state name."""
    repaired = {}
    with engine.resident(optimizer):
        for name, p in model.named_parameters():
            state = optimizer.state[p]
            if "exp_avg_absmax" not in state:
                continue
            q1, q2 = state["exp_avg"], state["exp_avg_sq"]
            every_third = (torch.arange(q2.numel()) % 3 == 0).view(q2.shape)
            orphans = every_third & (q1 != zero_code(True))
            q2.masked_fill_(orphans, 0)
            repaired[f"{name}.exp_avg_sq"] = torch.where(orphans, 1, q2).to(torch.uint8)
    assert repaired
    return repaired


def resuming(tmp_path, optimizer: str, on_nvme: tuple[str, ...]):
    """A fresh offloaded run to resume into: built on the meta device with other weights than
    the saved ones, its optimizer without states, its homes in a tier of its own."""
    cfg = tiny_cfg(f"optimizer.name={optimizer}")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.init_buffers()
    (tmp_path / "resuming").mkdir()
    off = dataclasses.replace(cfg.offload, params="nvme" if "params" in on_nvme else "cpu",
                              optimizer="nvme", nvme_path=str(tmp_path / "resuming"))
    engine = offload_transformer(model, torch.device("cpu"), 1 << 30, 12 << 20, off,
                                 weights=SeededInit(model, 7))
    return model, build_optimizer(model, cfg), engine


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("on_nvme", [("params", "optimizer"), ("optimizer",)])
def test_nvme_homes_are_saved_a_tensor_and_loaded_a_unit_at_a_time(tmp_path, monkeypatch,
                                                                   optimizer, on_nvme):
    """Save after 3 offloaded steps: each tensor resting on NVMe is read alone as DCP writes
    it (nothing else comes into memory), and the checkpoint holds the trained values. Load
    into a fresh run: its optimizer states are made unit by unit, then each unit's entries are
    read with only that unit in memory, and the tier is written once and never read; afterwards
    every parameter and state (AdamW8bit's quantized moments included: torch's loader would
    cast them) equals the saved run's, except AdamW8bit's second moments saved as code 0 beside
    a nonzero first moment (as older versions saved them), which these loads, past the
    optimizer's loader, repair too."""
    file = ScratchFile(tmp_path)
    tier = NvmeTier(file, open_block_io(file.path, 1 << 20, 8, 1, prefer="direct"), 12 << 20)
    run = train(True, nvme=tier, on_nvme=on_nvme, optimizer=optimizer)
    repaired = {}
    if optimizer == "adamw8bit":  # as an older version saved them: repaired as they load
        repaired = orphan_second_moments(run.model, run.optimizer, run.engine)
    saved = snapshot(run.model, run.optimizer, run.engine)
    units = run.engine.units
    unit_bytes = max(u.nbytes for u in units) * 3  # parameters and two AdamW moments
    assert unit_bytes < sum(u.nbytes for u in units) * 3 / 2  # well under the whole
    checkpoints = CheckpointManager(tmp_path / "run", tiny_cfg(f"optimizer.name={optimizer}"), {})

    before = held(run.model, run.optimizer)
    reads: list[int] = []
    alive: list[int] = []
    copies: list[weakref.ref] = []
    stored = run.engine.homes.stored

    def watched_stored(*args):
        reads.append(held(run.model, run.optimizer))
        alive.append(sum(s.nbytes() for ref in copies if (s := ref()) is not None))
        tensor = stored(*args)
        copies.append(weakref.ref(tensor.untyped_storage()))  # the storage: DCP detaches
        return tensor

    monkeypatch.setattr(run.engine.homes, "stored", watched_stored)
    monkeypatch.setattr(bounded_files, "FILE_BYTES", 1 << 20)
    path = TrainState(run.model, run.optimizer, run.engine).save(checkpoints, 3, {})
    params = list(run.model.parameters())
    on_disk = sum(value.dim() > 0 for p in params for value in run.optimizer.state[p].values())
    on_disk += len(params) if "params" in on_nvme else 0
    assert len(reads) == on_disk and max(reads) == before  # one tensor at a time, each once
    # torch's writer keeps a file's tensors until the file closes: files of 1 MB keep it there
    largest = max(t.numel() * t.element_size() for t in saved.values())
    assert max(alive) <= (1 << 20) + largest < sum(u.nbytes for u in units)
    assert len(list(path.glob("*.distcp"))) > 3
    dcp_to_torch_save(path, tmp_path / "saved.pt")
    written = torch.load(tmp_path / "saved.pt", weights_only=True)
    for name, p in run.model.named_parameters():
        assert torch.equal(written["model"][name], saved[name]), name
        for key in run.optimizer.state[p]:
            assert torch.equal(written["optim"][f"state.{name}.{key}"], saved[f"{name}.{key}"])
    with run.engine.resident(None):  # the parameters alone (it once read the states: failed)
        for name, p in run.model.named_parameters():
            assert torch.equal(p, saved[name]), name
    run.engine.close()

    model, opt, engine = resuming(tmp_path, optimizer, on_nvme)
    start = held(model, opt)
    zero_steps, loads = [], []
    zero_step = checkpoint_homes.zero_step

    def watched_zero_step(optimizer, params):
        zero_step(optimizer, params)
        zero_steps.append(held(model, opt))

    read_into = checkpoints.read_into

    def watched_read_into(at, state):
        loads.append(held(model, opt))
        read_into(at, state)

    monkeypatch.setattr(checkpoint_homes, "zero_step", watched_zero_step)
    monkeypatch.setattr(checkpoints, "read_into", watched_read_into)
    tier = engine.homes.tier
    read, written = tier.bytes_read, tier.bytes_written
    TrainState(model, opt, engine).load(checkpoints, path)
    # nothing read from the tier, each region written once (the checkpoint's values)
    assert tier.bytes_read == read and tier.bytes_written - written == tier.file_bytes
    assert len(zero_steps) == len(loads) == len(units)
    slack = 1 << 16  # the step counts (one scalar per parameter) and the regions' alignment
    assert max(zero_steps + loads) <= start + unit_bytes + slack
    got = snapshot(model, opt, engine)
    assert got.keys() == saved.keys()
    for key, value in {**saved, **repaired}.items():
        assert torch.equal(got[key], value), key
    engine.close()
