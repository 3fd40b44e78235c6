"""DeepSpeed's I/O handles each take ``io_threads + 1`` kernel AIO contexts of
``io_queue_depth`` events, and the op does not check that it got them: past ``fs.aio-max-nr``
its first submit failed an assertion and killed the worker (SIGABRT, io_queue_depth=1000 with
io_threads=16). The launch refuses what the handles every rank opens at start cannot get, and a
handle opened later that would not get its contexts stops the run with the same problem. An odd
``io_threads`` (3: 'not divisible by intra op parallelism' before) works since transfers are
multiples of the threads times the alignment."""

from __future__ import annotations

import functools

import pytest
import torch

from orch.errors import PlanError
from orch.launch import launcher
from orch.launch.launcher import prepare
from orch.offload.blockio import AioEvents, AsyncIO, load_async_io
from orch.offload.nvme import NvmeTier, ScratchFile
from orch.offload.sizes import aio_events_problem


def _proc(tmp_path, most: int, used: int):
    (tmp_path / "aio-max-nr").write_text(f"{most}\n")
    (tmp_path / "aio-nr").write_text(f"{used}\n")
    return tmp_path


def test_handles_that_the_kernel_has_events_for_pass_and_others_are_named(tmp_path):
    proc = _proc(tmp_path, 65536, 1000)
    assert aio_events_problem(32, 2, 2, proc) is None
    assert aio_events_problem(1000, 16, 3, proc) is None  # 51,000 of 64,536
    problem = aio_events_problem(1000, 16, 4, proc)
    assert problem is not None and problem.where == "offload.io_queue_depth"
    assert ("1,000 with offload.io_threads=16: each of DeepSpeed's I/O handles takes 17 AIO "
            "contexts of 1,000 events (17,000), 4 of them 68,000, and the kernel has 64,536 left "
            "(fs.aio-max-nr=65,536, fs.aio-nr=1,000 in use)") in problem.message
    assert "sysctl -w fs.aio-max-nr" in problem.fix and "offload.io_threads" in problem.reads
    assert aio_events_problem(32, 2, 1, tmp_path / "absent") is None  # the kernel does not say


def _refused_launch(tmp_path, monkeypatch, *items: str) -> str:
    """What the launch says of a tiny run with ``items`` set, the kernel having 65,536 AIO
    events and none in use."""
    (tmp_path / "proc").mkdir()
    proc = _proc(tmp_path / "proc", 65536, 0)
    monkeypatch.setattr(launcher, "aio_events_problem",
                        functools.partial(aio_events_problem, proc=proc))
    argv = ["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path}/run"]
    for item in (f"offload.nvme_path={tmp_path}", *items):
        argv += ["--set", item]
    with pytest.raises(PlanError) as refused:
        prepare(argv)
    return str(refused.value)


def test_the_launch_refuses_a_queue_the_kernel_cannot_give_every_rank(tmp_path, monkeypatch):
    said = _refused_launch(tmp_path, monkeypatch, "offload.params=nvme", "offload.grads=cpu",
                           "offload.optimizer=nvme", "offload.io_queue_depth=5000",
                           "offload.io_threads=16")
    assert ("offload.io_queue_depth: 5,000 with offload.io_threads=16: each of DeepSpeed's I/O "
            "handles takes 17 AIO contexts of 5,000 events (85,000), 7 of them 595,000") in said


def test_the_launch_counts_the_handles_the_run_opens_not_only_its_first(tmp_path, monkeypatch):
    """Each thread that moves NVMe bytes keeps its own handle: with every group on NVMe about
    nine by the first step and one more at a checkpoint. The launch counted the first two and
    passed io_queue_depth=3000 (2 x 9,000 of 65,536), which stopped after step 1 (7 handles)."""
    from orch.offload.sizes import aio_handles

    assert aio_handles("nvme", "nvme", "nvme", "nvme") == 10
    assert aio_handles("nvme", "cpu", "cpu", "device") == 7
    assert aio_handles("cpu", "nvme", "cpu", "device") == 5
    said = _refused_launch(tmp_path, monkeypatch, "offload.params=nvme", "offload.grads=nvme",
                           "offload.optimizer=nvme", "offload.activations=nvme",
                           "offload.io_queue_depth=3000", "offload.cpu_adam=torch")
    assert "10 of them 90,000, and the kernel has 65,536 left" in said


def test_without_the_async_io_op_the_launch_does_not_count_aio_events(tmp_path, monkeypatch):
    """Where DeepSpeed's op cannot load (no libaio), the NVMe tier's O_DIRECT thread pool opens
    no AIO contexts: a queue the kernel's events could not give the op is not refused."""
    from orch.offload import sizes

    items = ("offload.params=nvme", "offload.grads=cpu", "offload.optimizer=nvme",
             "offload.io_queue_depth=5000", "offload.io_threads=16")
    monkeypatch.setattr(sizes.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(launcher, "aio_events_problem", functools.partial(
        aio_events_problem, proc=_proc(tmp_path, 65536, 0)))
    argv = ["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path}/run",
            "--set", f"offload.nvme_path={tmp_path}"]
    for item in items:
        argv += ["--set", item]
    prepare(argv)  # no PlanError
    monkeypatch.undo()
    (tmp_path / "op").mkdir()
    assert "AIO contexts" in _refused_launch(tmp_path / "op", monkeypatch, *items)


def test_the_async_io_op_may_load_only_with_what_its_check_compiles(monkeypatch):
    """DeepSpeed's loader compiles and links a call to io_submit every time: libaio's runtime
    library alone (libaio.so.1, no header or no compiler) leaves the O_DIRECT fallback, and the
    launch refused a queue for it."""
    from orch.offload import sizes

    monkeypatch.setattr(sizes.ctypes.util, "find_library", lambda name: "libaio.so.1")
    monkeypatch.setattr(sizes.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(sizes.shutil, "which", lambda name: "/usr/bin/cc")
    monkeypatch.setattr(sizes.Path, "is_file", lambda self: self.name == "libaio.h")
    assert sizes.async_io_may_load()
    monkeypatch.setattr(sizes.shutil, "which", lambda name: None)  # no compiler
    assert not sizes.async_io_may_load()
    monkeypatch.setattr(sizes.shutil, "which", lambda name: "/usr/bin/cc")
    monkeypatch.setattr(sizes.Path, "is_file", lambda self: False)  # no libaio-dev
    assert not sizes.async_io_may_load()


def _async_io_or_skip() -> None:
    try:
        load_async_io()
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.nvme
def test_a_handle_the_kernel_has_no_events_for_is_refused_before_it_is_made(tmp_path,
                                                                           monkeypatch):
    _async_io_or_skip()
    from orch.offload import blockio

    proc = _proc(tmp_path, 65536, 60000)
    monkeypatch.setattr(blockio, "aio_events_problem",
                        functools.partial(aio_events_problem, proc=proc))
    with pytest.raises(AioEvents, match="4 AIO contexts of 1,000 events"):
        AsyncIO(tmp_path / "f", 1 << 20, 1000, 3)
    io = AsyncIO(tmp_path / "f", 1 << 20, 32, 3)  # 2 handles of 128: room
    (tmp_path / "aio-nr").write_text("65500\n")
    with pytest.raises(AioEvents, match="1 of them 128, and the kernel has 36 left"):
        io.read(io.buffer(io.align), 0)  # a new thread's handle
    io.close()


@pytest.mark.nvme
def test_an_odd_number_of_io_threads_round_trips(tmp_path):
    _async_io_or_skip()
    file = ScratchFile(tmp_path)
    tier = NvmeTier(file, AsyncIO(file.path, 1 << 20, 32, 3), 1 << 24)
    values = torch.arange(100_003, dtype=torch.float32)
    tier.write("a", [values])
    tier._held.clear()
    (back,) = tier.read("a")
    assert torch.equal(back, values) and tier.nbytes("a") % (3 * 4096) == 0
    tier.done("a")
    tier.close()
