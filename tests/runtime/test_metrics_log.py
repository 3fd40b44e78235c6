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


def _line(step: int, **extra: object) -> str:
    import json

    return json.dumps({"step": step, "steps": 9, "loss": 5.0 - step / 10, **extra}) + "\n"


@pytest.mark.parametrize("lines", [
    pytest.param([_line(n) for n in range(1, 7)], id="in order"),
    pytest.param([*(_line(n) for n in range(1, 6)), '{"step": 6, "loss": 4.'], id="torn last"),
    pytest.param([_line(1), _line(2), "[1, 2]\n", _line(3), _line(4), _line(5)], id="garbage"),
    pytest.param([_line(1), _line(4), _line(2), _line(5), _line(3)], id="out of order"),
    pytest.param([_line(1), '{"loss": 4.7, "step": 2}\n', _line(3), '{"loss": 4.6, "step": 4}\n',
                  _line(5)], id="step not first"),
    pytest.param([_line(1), _line(2), _line(3)], id="nothing after"),
    pytest.param([], id="empty"),
])
@pytest.mark.parametrize("step", [3, 0])
def test_a_resume_keeps_and_moves_the_records_it_did_when_it_read_them_all(tmp_path: Path,
                                                                           lines, step) -> None:
    """The cut is found streaming now; what stays and what moves is as when the whole file was
    parsed (``read_records``): the records up to ``step`` stay, the later ones move, in order,
    and lines that are not records are dropped."""
    import json

    from orch.runtime.metrics import SUPERSEDED_METRICS
    from orch.runtime.records import read_records

    path, aside = tmp_path / "metrics.jsonl", tmp_path / SUPERSEDED_METRICS
    path.write_text("".join(lines))
    records = read_records(path)[0]
    MetricsLog(tmp_path, True, io.StringIO(), resume_step=step).close()
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    moved = [json.loads(line) for line in aside.read_text().splitlines()] if aside.exists() else []
    assert kept == [r for r in records if r["step"] <= step]
    assert moved == [r for r in records if r["step"] > step]
    assert path.read_text().endswith("\n") or not kept


def test_a_resume_streams_metrics_jsonl_and_leaves_the_kept_records_in_place(
        tmp_path: Path) -> None:
    """Rank 0 parsed the whole file before step 1 (31 s and 2.4 GB for 2,000 records of 1,024
    device readings): now no more than a line is held at once, and the records that stay are
    not rewritten."""
    import os
    import tracemalloc

    from orch.runtime.metrics import SUPERSEDED_METRICS

    path = tmp_path / "metrics.jsonl"
    devices = [{"rank": r, "rss_bytes": 123_456_789 + r} for r in range(1024)]
    with path.open("w") as file:
        for step in range(1, 101):
            file.write(_line(step, devices=devices))
    size, inode = path.stat().st_size, path.stat().st_ino
    head = path.read_bytes()[: size // 2]
    tracemalloc.start()
    try:
        MetricsLog(tmp_path, True, io.StringIO(), resume_step=50).close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 3_000_000 and peak < size / 8, (peak, size)
    assert os.stat(path).st_ino == inode and path.read_bytes() == head[: len(path.read_bytes())]
    assert (tmp_path / SUPERSEDED_METRICS).read_text().count("\n") == 50
    assert path.read_text().count("\n") == 50
