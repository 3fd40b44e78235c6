"""An NVMe tier's scratch file (a whole tier's bytes) goes with the process however it ends:
SIGTERM (Slurm's cancel, torchrun stopping the workers after one failed) and a worker's error
before the run's own cleanup left it on disk, where only a later run on the same rank removed
it, if one ever came."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
from launch_harness import REPO, launch, overrides

CHILD = """
import os, signal, sys, time
from pathlib import Path
from orch.offload.nvme import scratch_file
path = scratch_file(Path(sys.argv[1]), 0)
path.write_bytes(b"x" * 4096)
print(path, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""


def test_sigterm_deletes_the_scratch_file_and_still_ends_by_the_signal(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stderr  # as torchrun reads a stopped worker
    assert done.stdout.strip().endswith(".swap") and not list(tmp_path.glob("*.swap"))


def test_a_worker_that_stops_on_bad_data_leaves_no_scratch_file(tmp_path):
    """Token ids past the vocabulary are found by the worker (the launcher does not scan a
    user's file), after the NVMe tier exists."""
    tokens = tmp_path / "ids.npy"
    np.save(tokens, np.full(4096, 1000, dtype=np.uint16))
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    done = launch("--nproc-per-node", "1", "configs/tiny.yaml", *overrides(
        tmp_path / "run", "offload.params=nvme", "offload.grads=nvme", "offload.optimizer=nvme",
        f"offload.nvme_path={nvme}", f"data.path={tokens}"))
    assert done.returncode == 2 and "contains token id 1000" in done.stderr, done.stderr[-2000:]
    assert not list(nvme.iterdir())
