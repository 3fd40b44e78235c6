"""An NVMe tier's directory is checked before any process starts: it must exist, be writable
and have room for what the plan puts there; every problem is reported at once."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from orch.errors import PlanError
from orch.launch.launcher import prepare

Usage = namedtuple("Usage", "total used free")


def _problems(tmp_path, nvme_path: str) -> str:
    argv = ["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path}/run",
            "--set", "offload.optimizer=nvme", "--set", f"offload.nvme_path={nvme_path}"]
    with pytest.raises(PlanError) as info:
        prepare(argv)
    return str(info.value)


def test_missing_directory_is_refused(tmp_path):
    text = _problems(tmp_path, f"{tmp_path}/absent")
    assert f"offload.nvme_path: '{tmp_path}/absent' is not a directory" in text
    for group in ("params", "grads"):  # homes this version does not run: said too, each
        assert f"offload.{group}: device, with optimizer=nvme: once anything is offloaded" in text


def test_a_disk_without_room_is_refused_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    text = _problems(tmp_path, str(tmp_path))
    # the tiny model's AdamW moments: 3,033,344 parameters x 8 bytes, and 8,192 bytes of
    # padding at most in each of its 6 units' regions
    assert (f"offload.nvme_path: '{tmp_path}' has 1,000 bytes free; the plan puts 24,340,480 "
            "bytes there (24,340,480 per rank, 1 on a node)") in text


def test_a_killed_runs_scratch_file_counts_as_free(tmp_path, monkeypatch):
    """After a kill -9 the relaunch refused: its free-space check counted the killed worker's
    scratch file, which that relaunch's workers remove before they write, as used. Only the
    files of ranks the run has count (those its workers remove), by the blocks they hold.
    (This version's files have no name and go with their process; an older version's killed
    run can still have left named ones.)"""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"orch-rank0-{gone}.swap"
    stale.write_bytes(b"\0" * 30_000_000)
    live = tmp_path / f"orch-rank1-{__import__('os').getpid()}.swap"  # a running process's
    live.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    text = _problems(tmp_path, str(tmp_path))
    assert "offload.nvme_path" not in text  # 30,001,000 free with the stale file: room
    stale.write_bytes(b"\0" * 1000)
    held = stale.stat().st_blocks * 512  # what removing it frees
    text = _problems(tmp_path, str(tmp_path))
    assert (f"'{tmp_path}' has {1000 + held:,} bytes free (with {held:,} of a killed run's "
            "scratch files, removed at start); the plan puts 24,340,480 bytes there") in text
    other = tmp_path / f"orch-rank3-{gone}.swap"  # a rank this one-process run does not have
    other.write_bytes(b"\0" * 30_000_000)  # (its workers would not remove it)
    assert f"has {1000 + held:,} bytes free" in _problems(tmp_path, str(tmp_path))
