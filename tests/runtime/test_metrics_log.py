"""``MetricsLog``: what a start does to ``metrics.jsonl`` and how writing it fails."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from orch.runtime.metrics import MetricsLog, StepMetrics


def _metrics(step: int) -> StepMetrics:
    return StepMetrics(step=step, steps=4, loss=5.0, lr=1e-3, grad_norm=1.0, tokens=8,
                       step_time_s=1.0, tokens_per_s=8.0, tflops=0.1, mfu=0.01,
                       mem_bytes=1 << 20, mem_total_bytes=1 << 30)


class _FullDisk(io.StringIO):
    """A file on a full disk: every write and flush (and so close) raises ENOSPC."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.flush()


def test_a_full_disk_loses_metrics_records_not_the_run(tmp_path: Path, capsys) -> None:
    """A full disk while writing metrics.jsonl stopped the run with a chained traceback naming no
    file, and ``close`` in the worker's ``finally`` raised again; the rank log and a checkpoint
    save already said what failed. Now: one warning naming the file, the error and the fix, the
    progress line goes on, and ``close`` raises nothing."""
    out = io.StringIO()
    log = MetricsLog(tmp_path, True, out)
    log.file.close()
    log.file = _FullDisk()
    for step in (1, 2, 3):
        log.log(_metrics(step))
    log.close()
    err = capsys.readouterr().err
    assert err.count("orch: warning:") == 1
    assert (f"orch: warning: {tmp_path / 'metrics.jsonl'}: writing step 1's record failed "
            "(OSError: No space left on device); training goes on") in err
    assert f"fix: free space or fix permissions under {tmp_path}" in err
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == [
        "step 1/4", "step 2/4", "step 3/4"]


def test_closing_on_a_full_disk_warns_rather_than_raises(tmp_path: Path, capsys) -> None:
    """The last records still in the buffer fail at ``close``: said, not raised."""
    log = MetricsLog(tmp_path, True, io.StringIO())
    log.log(_metrics(1))
    log.file.close()
    log.file = _FullDisk()
    log.close()
    assert "writing the last records failed (OSError: No space left on device)" in (
        capsys.readouterr().err)
    assert log.file is None


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch) -> None:
    """``warn_once`` says a message once per process: each test sees its own."""
    import orch.errors

    monkeypatch.setattr(orch.errors, "_warned", set())
