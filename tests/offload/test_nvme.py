"""The NVMe tier: block I/O (DeepSpeed's async I/O op and the O_DIRECT fallback), groups of
tensors in one file, and the offload engine training the plain run's numbers with parameters
and optimizer states resting on disk.

Tests that need DeepSpeed's op are marked ``nvme`` and skip, saying why, where it cannot be
built (``make setup`` installs libaio-dev and builds it once)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from offload_harness import BUDGET, train

from orch.offload.blockio import ALIGN, AsyncIO, DirectIO, aligned, load_async_io
from orch.offload.nvme import NvmeTier, PinnedPool, ScratchFile, placeholder


def _async_io_or_skip() -> None:
    try:
        load_async_io()
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _io(kind: str, path):
    if kind == "async":
        _async_io_or_skip()
        return AsyncIO(path, block_size=ALIGN * 4, queue_depth=4, threads=2)
    return DirectIO(path, block_size=ALIGN * 4, threads=2)


def _tier(tmp_path, kind: str, pinned_limit: int) -> NvmeTier:
    file = ScratchFile(tmp_path)
    return NvmeTier(file, _io(kind, file.path), pinned_limit)


def _held_files(directory) -> list[str]:
    """What this process's descriptors hold in ``directory`` (unnamed files too: their space
    is free once none does)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed
            continue
        if target.startswith(f"{directory}/"):
            held.append(target)
    return held


BACKENDS = [pytest.param("async", marks=pytest.mark.nvme), "direct"]


@pytest.mark.parametrize("kind", BACKENDS)
def test_block_io_round_trips_buffers_at_offsets(tmp_path, kind):
    io = _io(kind, tmp_path / "swap")
    gen = torch.Generator().manual_seed(0)
    written, unit = {}, io.align  # a page times the op's threads (each moves an equal part)
    for offset, nbytes in [(0, unit * 5), (unit * 5, unit), (unit * 6, unit * 17)]:
        buf = io.buffer(nbytes)
        buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
        io.write(buf, offset)
        written[offset] = buf.clone()
    for offset, expected in reversed(written.items()):
        buf = io.buffer(expected.numel())
        io.read(buf, offset)
        assert torch.equal(buf, expected), offset
    assert (tmp_path / "swap").stat().st_size == unit * 23
    io.close()


def test_a_group_comes_back_as_views_of_one_buffer_and_moves_when_it_outgrows_its_region(tmp_path):
    tier = _tier(tmp_path, "direct", pinned_limit=1 << 20)
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(1000)]
    tier.write("a", tensors)
    views = tier.read("a")
    for view, tensor in zip(views, tensors, strict=True):
        assert torch.equal(view, tensor) and view.dtype == tensor.dtype
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    views[2].add_(1)  # changed in place, written back without a copy
    tier.write("a", views)
    assert torch.equal(tier.read("a")[2], tensors[2] + 1)
    tier.done("a")
    first_end = tier.file_bytes
    tier.write("a", [torch.zeros(2)])  # a new layout that fits stays in place
    assert tier.file_bytes == first_end and torch.equal(tier.read("a")[0], torch.zeros(2))
    tier.done("a")
    tier.write("a", [torch.ones(5000)])  # one that does not gets a new region
    assert tier.file_bytes > first_end and torch.equal(tier.read("a")[0], torch.ones(5000))
    tier.done("a")
    tier.close()
    assert not list(tmp_path.iterdir()) and not _held_files(tmp_path)


def _stepped(tier: NvmeTier, key: str, due: tuple[int, int] = (1, 0)) -> None:
    """Read ``key``, add one in place and stage it for writing, kept until ``due`` (an
    update's steps)."""
    views = tier.read(key)
    views[0].add_(1)
    tier.stage(key, views, keep=due)


def test_a_group_being_written_is_read_from_memory_and_kept_for_one_read(tmp_path):
    tier = _tier(tmp_path, "direct", pinned_limit=ALIGN * 4)
    tier.write("a", [torch.zeros(1000)])
    _stepped(tier, "a")
    read, written = tier.bytes_read, tier.bytes_written
    assert torch.equal(tier.read("a")[0], torch.ones(1000))  # before its write: from memory
    tier.done("a")
    tier.flush("a")
    assert (tier.bytes_read, tier.bytes_written) == (read, written + ALIGN)
    _stepped(tier, "a")
    tier.flush("a")  # written, and kept: the next read takes it without the disk
    assert torch.equal(tier.read("a")[0], torch.full((1000,), 2.0))
    tier.done("a")
    assert tier.bytes_read == read + ALIGN  # only _stepped's own read of the disk
    assert torch.equal(tier.read("a")[0], torch.full((1000,), 2.0))  # taken: from disk again
    tier.done("a", keep=(2, 0))  # through, unchanged, kept for a later read
    assert torch.equal(tier.read("a")[0], torch.full((1000,), 2.0))
    tier.done("a")
    assert tier.bytes_read == read + 2 * ALIGN
    tier.close()


def test_a_request_waiting_for_room_takes_a_kept_copy_once_its_write_ends(tmp_path):
    """The pool is full: one buffer read, one being written and kept. A request waits (the kept
    copy cannot go while it is written) and is served once the write ends (no lost wake-up)."""
    tier = _tier(tmp_path, "direct", pinned_limit=ALIGN * 2)
    for key in "abc":
        tier.write(key, [torch.zeros(1000)])
    _stepped(tier, "a")  # staged, kept, its write not yet run
    tier.read("b")
    served: list[torch.Tensor] = []
    waiting = threading.Thread(target=lambda: served.append(tier.read("c")[0]), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert not served
    tier.flush("a")  # written: the kept copy may now make room
    waiting.join(10)
    assert served and torch.equal(served[0], torch.zeros(1000))
    tier.done("b")
    tier.done("c")
    tier.close()


@pytest.mark.parametrize("dues,given_up", [
    ({"a": (1, 0), "b": (1, 1)}, "b"),  # same pass: the later place
    ({"a": (2, 0), "b": (1, 5)}, "a"),  # a later pass first, whatever the place
])
def test_kept_copies_give_way_due_last_first_when_the_pool_is_short(tmp_path, dues, given_up):
    tier = _tier(tmp_path, "direct", pinned_limit=ALIGN * 2)
    for key in "abc":
        tier.write(key, [torch.zeros(1000)])
    for key, due in dues.items():
        _stepped(tier, key, due)
        tier.flush(key)
    assert tier.pool.peak == 2 * ALIGN  # both kept: the pool is full
    tier.read("c")  # the copy due last makes room
    tier.done("c")
    for key in sorted(dues, key=lambda key: key != given_up):  # the given-up one first
        read = tier.bytes_read
        assert torch.equal(tier.read(key)[0], torch.ones(1000))
        assert tier.bytes_read == read + (ALIGN if key == given_up else 0), key
        tier.done(key)
    tier.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_pool_locks_one_arena_and_merges_the_ranges_given_back(tmp_path, kind):
    io = _io(kind, tmp_path / "swap")
    made = []
    buffer = io.buffer
    io.buffer = lambda nbytes, locked=True: made.append(nbytes) or buffer(nbytes, locked)
    pool = PinnedPool(io, ALIGN * 4 + 100)  # rounded down to whole pages
    a, b, c = pool.take(ALIGN), pool.take(ALIGN * 2), pool.take(ALIGN)
    base = a.data_ptr()
    assert [t.data_ptr() - base for t in (a, b, c)] == [0, ALIGN, ALIGN * 3]
    pool.give(c)
    pool.give(a)  # free: [0, 1) and [3, 4) pages, apart
    taken: list[torch.Tensor] = []
    waiting = threading.Thread(target=lambda: taken.append(pool.take(ALIGN * 3)), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert not taken  # three pages free, but not in one range
    pool.give(b)  # [0, 4) merged: the request fits from the start
    waiting.join(10)
    assert taken[0].data_ptr() == base and taken[0].numel() == ALIGN * 3
    assert made == [ALIGN * 4] and pool.peak == ALIGN * 4
    pool.close()
    io.close()


def test_ranges_taken_by_threads_at_once_never_overlap_and_all_come_back(tmp_path):
    """Four threads take and give back buffers of 1-3 pages from an arena of 8: each fills its
    buffer with its own byte and finds it intact before giving it back (no two ranges overlap),
    and at the end the arena is one free range again (a request for all of it is served)."""
    pool = PinnedPool(_io("direct", tmp_path / "swap"), ALIGN * 8)
    errors: list[str] = []

    def churn(mark: int) -> None:
        gen = torch.Generator().manual_seed(mark)
        for _ in range(200):
            buffer = pool.take(ALIGN * int(torch.randint(1, 4, (1,), generator=gen)))
            buffer.fill_(mark)
            time.sleep(0.0002)
            if not bool((buffer == mark).all()):
                errors.append(f"thread {mark}: its buffer was written by another")
            pool.give(buffer)

    threads = [threading.Thread(target=churn, args=(mark,), daemon=True) for mark in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(thread.is_alive() for thread in threads)
    whole: list[torch.Tensor] = []
    taker = threading.Thread(target=lambda: whole.append(pool.take(ALIGN * 8)), daemon=True)
    taker.start()
    taker.join(10)
    assert whole and whole[0].data_ptr() == pool.arena.data_ptr()
    pool.close()


@pytest.mark.parametrize("made_first", [False, True])
def test_the_arena_is_registered_once_and_let_go_before_it_is_freed(tmp_path, made_first):
    """On CUDA the engine registers the arena with the driver (HostTransfers.register), so
    copies from staging buffers are DMA; the undo runs before the memory goes."""
    pool = PinnedPool(_io("direct", tmp_path / "swap"), ALIGN * 2)
    calls = []

    def register(buffer):
        calls.append(("register", buffer.data_ptr(), buffer.numel()))
        return lambda: calls.append(("undo", buffer.data_ptr()))

    if made_first:  # a tier used before the engine was built
        pool.give(pool.take(ALIGN))
    pool.register_with(register)
    pool.give(pool.take(ALIGN))
    pool.give(pool.take(ALIGN * 2))
    arena = pool.arena
    assert arena is not None
    assert calls == [("register", arena.data_ptr(), ALIGN * 2)]
    pool.close()
    assert calls[1:] == [("undo", arena.data_ptr())] and pool.arena is None


def test_a_deepspeed_that_takes_views_for_pageable_memory_is_named_once(monkeypatch, capsys):
    """The staging arena hands out views of one locked buffer; a DeepSpeed that matches only a
    buffer's start address would bounce every transfer, which the log then says once."""
    from orch.offload import blockio

    class ExactStartOnly:
        freed: list[torch.Tensor] = []

        def new_cpu_locked_tensor(self, nbytes, example):
            return torch.empty(nbytes, dtype=torch.uint8)

        def is_pinned(self, buffer):
            return False

        def free_cpu_locked_tensor(self, buffer):
            self.freed.append(buffer)

    monkeypatch.setattr(blockio, "_said_views", False)
    for _ in range(2):
        blockio._check_views_locked(ExactStartOnly())
    assert capsys.readouterr().err.count("every NVMe transfer goes through a bounce buffer") == 1
    assert len(ExactStartOnly.freed) == 2  # the probe is given back


def test_op_builders_get_a_real_stderr_where_sys_stderr_has_no_descriptor(capsys):
    """DeepSpeed's compile check redirects stderr's descriptor; under pytest's capsys (or in a
    notebook) sys.stderr has none, and the check used to fail as if libaio were missing."""
    from orch.offload.cpu_adam import stderr_with_descriptor

    def compile_check() -> bool:  # what DeepSpeed's has_function does with stderr, reduced
        try:
            return sys.stderr.fileno() >= 0
        except Exception:  # DeepSpeed returns False on any exception
            return False

    captured = sys.stderr
    assert not compile_check()
    with stderr_with_descriptor():
        assert compile_check()
    assert sys.stderr is captured  # put back


@pytest.mark.nvme
def test_the_async_io_op_loads_under_captured_stderr_where_it_loads_at_all(monkeypatch, capsys):
    from orch.offload import blockio

    plain = subprocess.run([sys.executable, "-c", "from orch.offload.blockio import "
                            "load_async_io; load_async_io()"], capture_output=True, text=True)
    if plain.returncode:
        pytest.skip(f"the op does not load here: {plain.stderr.strip().splitlines()[-1]}")
    monkeypatch.setattr(blockio, "_op_error", None)  # a failure would be remembered
    assert blockio.load_async_io() is not None


def test_a_staging_buffer_over_the_pinned_budget_names_the_setting(tmp_path):
    tier = _tier(tmp_path, "direct", pinned_limit=ALIGN)
    tier.write("big", [torch.zeros(2048)])  # a write of new tensors stages outside the pool
    with pytest.raises(ValueError, match="8,192 bytes is over offload.pinned_budget"):
        tier.read("big")


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_file_is_allocated_as_it_grows_and_a_full_disk_is_an_error(tmp_path, kind,
                                                                       monkeypatch):
    """On a full disk DeepSpeed's op counted each failed write as done: the run trained on,
    and checkpointed, what the reads then found (weights off by 11.8 after 4 steps of the tiny
    model), or died on the op's assertion when a read passed the file's end. Each region's
    blocks are now allocated before it is written, and a disk that has none left says so."""
    import errno

    from orch.offload import nvme

    tier = _tier(tmp_path, kind, pinned_limit=1 << 20)
    tier.write("a", [torch.arange(3000.0)])
    end = aligned(12000, tier.io.align)  # 12,288, or 16,384 for the op's 2 threads
    assert os.fstat(tier.file.fd).st_size == tier.file_bytes == end
    assert os.fstat(tier.file.fd).st_blocks * 512 >= end  # on disk, not a hole

    def full(fd: int, offset: int, nbytes: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nvme.os, "posix_fallocate", full)
    with pytest.raises(nvme.NvmeFull) as refused:
        tier.write("b", [torch.zeros(10)])
    text = str(refused.value)
    grow = tier.io.align
    assert (f"the NVMe tier's file in {tmp_path} cannot grow by {grow:,} bytes to "
            f"{end + grow:,}") in text
    assert "No space left on device" in text and "fix: free space" in text
    assert torch.equal(tier.read("a")[0], torch.arange(3000.0))  # what was written stays
    tier.done("a")


def test_the_plan_counts_every_byte_the_tier_writes(tmp_path):
    """With every group on NVMe the plan said 87,484,416 bytes where the file of a run of the
    tiny model reached 90,329,088, so a disk that passed the launcher's free-space check could
    fill mid-run: each region's padding, the composite norm's extra tensor (a CPU build) and the
    rotary tables each swapped unit copies were not counted."""
    from offload_harness import tiny_cfg

    from orch.plan import build_plan

    homes = ("params", "grads", "optimizer")
    tier = _tier(tmp_path, "direct", pinned_limit=64 << 20)
    train(True, activations="nvme", nvme=tier, on_nvme=homes, budget=10**9)
    cfg = tiny_cfg("train.micro_batch=2", "offload.activations=nvme",
                   f"offload.nvme_path={tmp_path}", *(f"offload.{g}=nvme" for g in homes))
    planned = build_plan(cfg, 1, 1, "cpu").memory.nvme
    assert tier.file_bytes <= planned < 1.1 * tier.file_bytes, (tier.file_bytes, planned)


def test_placeholders_keep_shape_and_dtype_but_hold_no_bytes():
    empty = placeholder(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert empty.shape == (4, 8) and empty.dtype == torch.bfloat16
    assert empty.untyped_storage().nbytes() == 0


@pytest.fixture(scope="module")
def plain():
    return train(offload=False)


@pytest.mark.parametrize("on_nvme,kind", [
    (("params",), "direct"),
    (("optimizer",), "direct"),
    pytest.param(("params", "optimizer"), "async", marks=pytest.mark.nvme),
    (("params", "optimizer"), "direct"),
    (("grads",), "direct"),
    (("params", "grads", "optimizer"), "direct"),
])
def test_training_with_homes_on_nvme_equals_the_plain_run(plain, tmp_path, on_nvme, kind):
    """Parameters, gradients (between backwards: read, added to and written per micro-batch,
    clipped by the deferred norm) and optimizer states rest on disk between uses; the numbers
    are the plain run's bit for bit, and what rests on disk holds no CPU memory after the
    step."""
    # the least the tier stages at once (a block fetched, another block and its AdamW moments
    # updated: 11.6 MB), so a checkpoint-style read of every unit must not use the pool
    tier = _tier(tmp_path, kind, pinned_limit=12 << 20)
    losses, norms, params, peaks, engine, records, opt, *_ = train(True, nvme=tier,
                                                                 on_nvme=on_nvme)
    ref_losses, ref_norms, ref_params, *_ = plain
    assert losses == ref_losses and norms == ref_norms
    for name, tensor in ref_params.items():
        assert torch.equal(params[name], tensor), name
    engine.wait_updates()
    for unit in engine.units:
        for p in unit.params:
            resting = p.data.untyped_storage().nbytes()
            assert (resting == 0) == ("params" in on_nvme), unit.name
            for value in opt.state[p].values():
                if value.dim() > 0:  # the moments; the step count stays in memory
                    assert (value.untyped_storage().nbytes() == 0) == ("optimizer" in on_nvme)
    for flat in engine.grads._flat:  # gradients on disk: no buffer holds bytes
        assert (flat.untyped_storage().nbytes() == 0) == ("grads" in on_nvme)
    read = sum(r["nvme_read_bytes"] for r in records)
    assert read > 0 and records[-1]["nvme_written_bytes"] > 0
    engine.close()
    assert not list(tmp_path.iterdir()) and not _held_files(tmp_path)



def test_with_room_in_the_pool_each_parameter_is_read_from_disk_once(plain, tmp_path):
    """Kept copies carry the parameters from each use to the next: the forward's to the
    backward, the backward's to the update, the update's to the next forward; with a pinned
    budget that holds them all, only the first forward and the optimizer states read the
    disk. Each record holds its step's forward and backward and the previous step's update."""
    tier = _tier(tmp_path, "direct", pinned_limit=64 << 20)
    run = train(True, nvme=tier, on_nvme=("params", "optimizer"))
    assert run.losses == plain.losses
    indices = range(len(run.engine.units))
    params = sum(tier.nbytes(("params", index)) for index in indices)
    states = sum(tier.nbytes(("optimizer", index)) for index in indices)
    # step 1: the placed parameters; step 2: step 1's update made the states, read nothing
    assert [r["nvme_read_bytes"] for r in run.records] == [params, 0, states]
    # from memory, per step of two micro-batches: each backward's fetches (all but the head's,
    # fetched from its forward to its backward), the forwards' but step 1's first, and from
    # step 2 the previous update's
    head = tier.nbytes(("params", indices[-1]))
    first = (params - head) + params + (params - head)
    assert [r["nvme_from_memory_bytes"] for r in run.records] == [
        first, params + first + params, params + first + params]
    run.engine.close()


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_activations_swapped_to_nvme_train_the_plain_numbers(plain, tmp_path, recompute):
    """Each block's saved activations go from the device to CPU memory to the tier's file when
    its forward ends, and come back (read ahead by one block) for its backward."""
    tier = _tier(tmp_path, "direct", pinned_limit=1 << 20)
    run = train(True, recompute, activations="nvme", nvme=tier)
    assert run.losses == plain.losses and run.norms == plain.norms
    for name, tensor in plain.params.items():
        assert torch.equal(run.params[name], tensor), name
    for record in run.records:
        sent = record["activations_to_home_bytes"]
        assert sent == record["activations_to_device_bytes"] > 0
        # every swapped byte crossed the disk both ways (regions round up to 4 KiB)
        assert sent <= record["nvme_written_bytes"] < sent + 16 * 4096 * 2
        assert sent <= record["nvme_read_bytes"] < sent + 16 * 4096 * 2
    assert all(peak <= BUDGET for peak in run.peaks)
    run.engine.close()
    assert not list(tmp_path.iterdir()) and not _held_files(tmp_path)


@pytest.mark.parametrize("on_nvme", [False, True], ids=["cpu", "nvme"])
def test_units_resting_on_other_replicas_are_never_held_or_written_here(tmp_path, on_nvme):
    """``offload.shard_params``: the units other replicas own are let go from the start (their
    parameters placeholders, nothing of them in the tier's file), and a checkpoint's gather of
    this replica's homes leaves them out."""
    from torch import nn

    from orch.offload.homes import Homes

    units = [[nn.Parameter(torch.full((256,), float(index)))] for index in range(3)]
    tier = _tier(tmp_path, "direct", pinned_limit=1 << 20)
    homes = Homes(units, tier, params_on_nvme=on_nvme, elsewhere=frozenset({1}))
    for index in range(3):
        homes.place(index)
    assert units[1][0].untyped_storage().nbytes() == 0
    assert [tier.has(("params", index)) for index in range(3)] == [on_nvme, False, on_nvme]
    with homes.params_to_copy(2) as (home,):
        assert torch.equal(home, torch.full((256,), 2.0))
    with homes.all_in_memory(None):
        assert [unit[0].untyped_storage().nbytes() > 0 for unit in units] == [True, False, True]
    homes.close()


def test_a_read_ahead_takes_only_spare_room_and_holds_nothing_when_there_is_none(tmp_path):
    """A read ahead that waited for room held the pool from the transfers it was waiting on
    (a run at the least pinned budget hung): ``wait=False`` gives up at once instead."""
    tier = _tier(tmp_path, "direct", pinned_limit=ALIGN * 2)
    tier.write("a", [torch.ones(1024)])
    tier.write("b", [torch.arange(2048.0)])
    (held,) = tier.read("a")
    assert tier.pool.take(ALIGN * 2, wait=False) is None
    assert tier.read("b", wait=False) is None and tier.pool.peak == ALIGN
    tier.done("a")
    (back,) = tier.read("b", wait=False)
    assert torch.equal(back, torch.arange(2048.0))
    tier.done("b")
    tier.close()
