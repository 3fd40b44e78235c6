"""Gradients on their way to NVMe (``orch.offload.grad_staging``): they gather in locked buffers
the device copies into directly, and are written behind, off the backward's thread."""

from __future__ import annotations

import threading

import pytest
import torch
from offload_harness import STEPS, train

from orch.offload.blockio import ALIGN, DirectIO
from orch.offload.grad_staging import GradientStaging
from orch.offload.nvme import NvmeTier, ScratchFile
from orch.offload.sizes import NVME_GRAD_BUFFERS
from orch.offload.transfers import HostTransfers


def _tier(tmp_path, pinned: int = 1 << 20) -> NvmeTier:
    file = ScratchFile(tmp_path)
    return NvmeTier(file, DirectIO(file.path, ALIGN * 4, 2), pinned)


def _staging(tier: NvmeTier, keys: int, numel: int = 3000) -> GradientStaging:
    for key in range(keys):
        tier.reserve(key, [torch.empty(numel)])
    return GradientStaging(tier, numel * 4, lambda buffer: lambda: None)


def test_training_gathers_gradients_in_the_locked_buffers_and_writes_them_behind(
        tmp_path, monkeypatch):
    """Every unit's gradients land in one of the registered locked buffers (never a pageable
    one: the backward releases each unit before the next needs a buffer), every write of a
    gradient group runs in the writer thread, not the trainer's, and the second micro-batch
    finds units' earlier sums read ahead, in the reader thread."""
    registered, unregistered, locked_takes, writers, readers = [], [], [], set(), []
    ahead = []
    real_register, real_take, real_flush, real_read = (
        HostTransfers.register, GradientStaging.take, NvmeTier.flush, NvmeTier.read)

    def register(self, buffer):
        registered.append(buffer.data_ptr())
        undo = real_register(self, buffer)
        return lambda: (unregistered.append(buffer.data_ptr()), undo())

    def take(self, key, fill):
        ahead.append(key in self._ahead)
        flat = real_take(self, key, fill)
        locked_takes.append(flat.data_ptr() in {b.data_ptr() for b in self._locked})
        return flat

    def flush(self, key):
        if key[0] == "grads":
            writers.add(threading.current_thread().name)
        real_flush(self, key)

    def read(self, key, *args, **kwargs):
        if key[0] == "grads" and kwargs.get("fill", True):
            readers.append(threading.current_thread().name)
        return real_read(self, key, *args, **kwargs)

    monkeypatch.setattr(HostTransfers, "register", register)
    monkeypatch.setattr(GradientStaging, "take", take)
    monkeypatch.setattr(NvmeTier, "flush", flush)
    monkeypatch.setattr(NvmeTier, "read", read)
    engine = train(True, nvme=_tier(tmp_path, 12 << 20), on_nvme=("grads",)).engine
    assert len(registered) == NVME_GRAD_BUFFERS
    assert locked_takes and all(locked_takes)
    assert writers and all(name.startswith("orch-grads-write") for name in writers), writers
    # the first micro-batch's units are fresh (nothing to read); of the second's, all but the
    # first one the backward reaches were read ahead (the units between the embedding and the
    # head are each read while the unit after them runs)
    assert sum(ahead) >= len(engine.units) - 2, ahead
    # the backward reads the first unit it reaches itself (the optimizer's reads are its own),
    # and any whose read ahead found no free buffer at the time (timing: one did, under load);
    # most are read ahead
    main = readers.count("MainThread")
    assert STEPS <= main <= readers.count("orch-grads-read_0"), readers
    engine.close()
    assert sorted(unregistered) == sorted(registered)


def test_a_unit_beyond_the_locked_buffers_gets_a_pageable_one_instead_of_waiting(tmp_path):
    """With every locked buffer held by the backward itself and no write running, nothing would
    give one back: one more unit gets a pageable buffer, which is not kept after."""
    tier = _tier(tmp_path)
    units = NVME_GRAD_BUFFERS + 1
    staging = _staging(tier, units)
    flats = [staging.take(key, fill=False) for key in range(units)]
    locked = {b.data_ptr() for b in staging._locked}
    assert [flat.data_ptr() in locked for flat in flats] == [True] * (units - 1) + [False]
    for key, flat in enumerate(flats):
        flat.fill_(key + 1)
        staging.put(key, flat)
    staging.wait()
    assert len(staging._free) == NVME_GRAD_BUFFERS
    for key in range(units):
        again = staging.take(key, fill=True)
        assert torch.equal(again, torch.full((3000,), key + 1.0))
        staging.drop(key, again)
    staging.close()
    tier.close()


def test_a_unit_taken_again_waits_for_its_write_and_reads_what_it_wrote(tmp_path, monkeypatch):
    """The write of a unit's gradients may still run when its next backward takes it in: the
    read waits for it, so the sum goes on from the written bytes (a slow disk here)."""
    tier = _tier(tmp_path)
    staging = _staging(tier, 1)
    release = threading.Event()
    real_write = tier.io.write

    def slow_write(buffer, offset):
        release.wait(10)
        real_write(buffer, offset)

    monkeypatch.setattr(tier.io, "write", slow_write)
    flat = staging.take(0, fill=False)
    flat.fill_(7.0)
    staging.put(0, flat)
    threading.Timer(0.2, release.set).start()
    again = staging.take(0, fill=True)
    assert release.is_set() and torch.equal(again, torch.full((3000,), 7.0))
    staging.drop(0, again)
    staging.close()
    tier.close()


def test_a_failed_write_is_raised_where_the_gradients_are_needed(tmp_path, monkeypatch):
    tier = _tier(tmp_path)
    staging = _staging(tier, 1)

    def full_disk(buffer, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tier.io, "write", full_disk)
    flat = staging.take(0, fill=False)
    staging.put(0, flat)
    with pytest.raises(OSError, match="No space left"):
        staging.wait()
    assert len(staging._free) == NVME_GRAD_BUFFERS  # the buffer came back all the same
    staging.close()
    tier.close()
