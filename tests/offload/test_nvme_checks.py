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
    # the tiny model's AdamW moments: 3,033,344 parameters x 8 bytes
    assert (f"offload.nvme_path: '{tmp_path}' has 1,000 bytes free; the plan puts 24,266,752 "
            "bytes there (24,266,752 per rank, 1 on a node)") in text
