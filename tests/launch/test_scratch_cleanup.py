"""An NVMe tier's scratch file (a whole tier's bytes) goes with the process when an error ends
it before the run's own cleanup: a named one was left on disk there, where only a later run on
the same rank removed it, if one ever came. The file has no name now, so nothing needs removing
(a kill's end: tests/offload/test_nvme_scratch.py)."""

from __future__ import annotations

import numpy as np
from launch_harness import launch, overrides


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
