"""The NVMe tier's scratch file has no name, so it goes with its process however that ends: a
SIGKILL (or an OOM kill, Slurm's cancel, a SIGTERM orch does not handle) left a named file with
a whole tier's bytes on the disk until the next start on the same rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from orch.offload import nvme
from orch.offload.blockio import DirectIO, load_async_io
from orch.offload.nvme import NvmeTier, ScratchFile, scratch_file

WRITTEN = 64 << 20

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from orch.offload.blockio import open_block_io
    from orch.offload.nvme import NvmeTier, scratch_file

    file = scratch_file(Path(sys.argv[1]), 0)
    io = open_block_io(file.path, 1 << 20, 8, 1, prefer=sys.argv[2])
    tier = NvmeTier(file, io, 1 << 20)
    tier.write("states", [torch.ones({numel})])
    print("tier", file.fd, os.fstat(file.fd).st_blocks * 512, flush=True)
    time.sleep(600)
""").format(numel=WRITTEN // 4)


def _free(directory: Path) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


@pytest.mark.parametrize("kind", [pytest.param("async", marks=pytest.mark.nvme), "direct"])
def test_a_killed_process_leaves_no_scratch_file_and_its_space_is_free(tmp_path, kind):
    """A process writes 64 MiB to its tier and is SIGKILLed: nothing is left in nvme_path and
    the disk has the space back (the kernel closed its descriptors)."""
    if kind == "async":
        try:
            load_async_io()
        except RuntimeError as exc:
            pytest.skip(str(exc))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), kind],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while not line.startswith("tier "):  # DeepSpeed's warnings come on stdout too
            line = child.stdout.readline()
            assert line, child.stderr.read()[-2000:]
        fd, held = map(int, line.split()[1:])
        # the tier's bytes are on the disk, in a file of nvme_path that has no name
        assert held >= WRITTEN
        target = os.readlink(f"/proc/{child.pid}/fd/{fd}")
        assert target.startswith(f"{tmp_path}/") and target.endswith(" (deleted)"), target
        assert not list(tmp_path.iterdir())
        before = _free(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not list(tmp_path.iterdir())
    # other jobs write to this disk too: most of the 64 MiB, not all of it exactly
    assert _free(tmp_path) - before > WRITTEN // 2, (before, _free(tmp_path))


def test_without_o_tmpfile_the_file_is_named_only_until_it_is_open(tmp_path, monkeypatch):
    """Where the file system refuses O_TMPFILE the file is created by name and unlinked at
    once; the tier works through its descriptor all the same."""
    monkeypatch.setattr(nvme, "_TMPFILE", 0)
    file = ScratchFile(tmp_path, 3)
    assert not list(tmp_path.iterdir())
    assert os.readlink(file.path) == f"{tmp_path}/orch-rank3-{os.getpid()}.swap (deleted)"
    tier = NvmeTier(file, DirectIO(file.path, 1 << 20, 2), 1 << 20)
    tier.write("a", [torch.arange(5000.0)])
    assert torch.equal(tier.read("a")[0], torch.arange(5000.0))
    tier.done("a")
    tier.close()
    assert file.fd == -1 and not list(tmp_path.iterdir())


def test_an_older_versions_scratch_file_of_a_killed_run_is_removed_at_start(tmp_path, capsys):
    """orch versions before this one named their files until the process ended: a killed
    run's (its process gone) is removed when the rank starts again; a live process's and
    another rank's stay."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"orch-rank0-{gone}.swap"
    stale.write_bytes(b"\0" * 8192)
    live = tmp_path / f"orch-rank0-{os.getppid()}.swap"
    live.write_bytes(b"")
    other = tmp_path / f"orch-rank1-{gone}.swap"
    other.write_bytes(b"")
    file = scratch_file(tmp_path, 0)
    assert sorted(tmp_path.iterdir()) == sorted([live, other])
    said = capsys.readouterr().out
    assert f"orch: removed {stale}, the NVMe scratch file of a killed run" in said
    file.close()


@pytest.mark.nvme
def test_async_io_after_close_is_refused_before_it_makes_a_handle(tmp_path):
    """After close a /proc/self/fd/N path may name whatever file took that descriptor: the
    I/O is refused, and before a new aio handle (with its I/O threads) is made for it."""
    from orch.offload.blockio import AsyncIO

    try:
        load_async_io()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    file = ScratchFile(tmp_path)
    io = AsyncIO(file.path, 1 << 20, 8, 1)
    buffer = io.buffer(1 << 20)
    io.write(buffer, 0)
    io.close()
    for step in (io.read, io.write):
        with pytest.raises(ValueError, match="after close"):
            step(buffer, 0)
    assert not hasattr(io._local, "handle")
    io.free(buffer)
    file.close()
