"""``MetricsLog``: what a start does to ``metrics.jsonl`` and how writing it fails."""

from __future__ import annotations

import dataclasses
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
    pytest.param([_line(1), '{"step": true, "loss": 4.0}\n', _line(2), _line(3), _line(4)],
                 id="boolean step"),  # a record to the reader only, until they shared the test
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


def _records(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_run_resumed_from_another_runs_checkpoint_starts_its_metrics_over(tmp_path: Path):
    """Run A (6 steps) resumed from run B's step 4 kept A's own steps 1-4 in metrics.jsonl and
    appended steps 5-6 trained from B's weights: ``orch report`` drew one run of two histories
    (the checkpoint side already moved A's step 6 aside as an earlier history). Now every record
    of A moves aside, the launch says where the history came from, and the first record says
    which checkpoint it continues."""
    from orch.runtime.metrics import SUPERSEDED_METRICS

    run, other = tmp_path / "A", tmp_path / "B" / "checkpoints" / "step-00000004"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(_line(n) for n in range(1, 7)))
    out = io.StringIO()
    log = MetricsLog(run, True, out, resume_step=4, resumed_from=other)
    log.log(_metrics(5))
    log.log(_metrics(6))
    log.close()
    said = out.getvalue()
    assert (f"orch: resuming from {other}, another run's checkpoint: {run / 'metrics.jsonl'} "
            f"starts over at step 5 (the steps before are that run's); this run's 6 earlier "
            f"records moved to {run / SUPERSEDED_METRICS}") in said
    records = _records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 6]
    assert records[0]["resumed_from"] == str(other) and "resumed_from" not in records[1]
    assert [r["step"] for r in _records(run / SUPERSEDED_METRICS)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("own", [True, False])
def test_a_resume_from_this_runs_own_checkpoint_keeps_the_steps_before_it(tmp_path: Path,
                                                                          own: bool) -> None:
    """The same step of this run's own checkpoints (however the path is spelled) is this
    history: the records up to it stay, as without ``resumed_from``; a fresh start's first
    record says ``resumed_from: null``."""
    run = tmp_path / "A"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(_line(n) for n in range(1, 7)))
    ckpt = tmp_path / "A" / ".." / "A" / "checkpoints" / "step-00000004"
    log = MetricsLog(run, True, io.StringIO(), resume_step=4 if own else 0,
                     resumed_from=ckpt if own else None)
    log.log(_metrics(5 if own else 1))
    log.close()
    records = _records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == ([1, 2, 3, 4, 5] if own else [1])
    assert records[-1]["resumed_from"] == (str(ckpt) if own else None)


def test_tensorboard_of_another_history_is_moved_aside(tmp_path: Path) -> None:
    """TensorBoard reads every event file of ``tb``: A's own steps 1-4 would stand beside B's."""
    pytest.importorskip("tensorboard")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1").write_bytes(b"")
    MetricsLog(tmp_path, True, io.StringIO(), resume_step=4, tensorboard=True,
               resumed_from=tmp_path / "B" / "step-00000004").close()
    [aside] = tmp_path.glob("tb.superseded-*")
    assert (aside / "events.out.tfevents.1").exists()
    assert not (tmp_path / "tb" / "events.out.tfevents.1").exists()


def test_the_eta_counts_to_the_step_the_run_stops_at(tmp_path: Path) -> None:
    """Under ``run.stop_at_step: 5`` of 100 steps the ETA counted to step 100."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

        def status(self, text: str) -> None:
            self.write(text + "\n")

    out = Terminal()
    log = MetricsLog(tmp_path, True, out, last_step=5)
    log.log(dataclasses.replace(_metrics(1), steps=100, step_time_s=2.0))
    log.close()
    assert out.getvalue().startswith("step 1/100 | ") and out.getvalue().endswith("| ETA 8s\n")


def test_records_moved_aside_after_a_torn_line_there_start_on_a_line_of_their_own(
        tmp_path: Path) -> None:
    """``metrics.superseded.jsonl`` left ending in a torn line (an earlier move that failed
    mid-write) had the next move's first record appended onto it: one unparseable line, that
    record lost to ``orch report`` and to anyone reading the file."""
    from orch.runtime.records import move_records_after, read_records

    path, aside = tmp_path / "metrics.jsonl", tmp_path / "metrics.superseded.jsonl"
    path.write_text("".join(_line(n) for n in range(1, 6)))
    aside.write_text(_line(7) + '{"step": 8, "loss": 4.')
    assert move_records_after(path, aside, 2) == 3
    records, skipped = read_records(aside)
    assert [r["step"] for r in records] == [7, 3, 4, 5] and skipped == 1
    assert [r["step"] for r in read_records(path)[0]] == [1, 2]
    move_records_after(path, aside, 1)  # an aside that ends whole gets no blank line
    assert aside.read_text().endswith(_line(5) + _line(2))


def test_tensorboard_moved_aside_twice_within_a_second_keeps_both(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Two starts from another run's checkpoint within one second named their aside
    directories alike (``tb.superseded-STAMP``, to the second): the second rename onto the
    first's non-empty directory failed and ended the worker. Now the second gets ``-2``."""
    import time

    pytest.importorskip("tensorboard")
    monkeypatch.setattr(time, "strftime", lambda *args: "20260101T000000")  # the same second
    other = tmp_path / "B" / "step-00000004"
    for start in (1, 2):
        (tmp_path / "tb").mkdir(exist_ok=True)
        (tmp_path / "tb" / f"events.out.tfevents.{start}").write_bytes(b"")
        MetricsLog(tmp_path, True, io.StringIO(), resume_step=4, tensorboard=True,
                   resumed_from=other).close()
    first = tmp_path / "tb.superseded-20260101T000000"
    assert (first / "events.out.tfevents.1").exists()
    assert (first.with_name(first.name + "-2") / "events.out.tfevents.2").exists()


def test_a_full_disk_during_the_resume_cut_stops_before_step_one_and_says_why(
        tmp_path: Path, monkeypatch) -> None:
    """Moving the records after the resumed step aside failed as a raw OSError traceback on
    rank 0. Going on would append this start's records after ones of the history it replaces:
    it stops, naming the file, the error and the fix, with metrics.jsonl as it was."""
    import orch.runtime.metrics as metrics_module
    from orch.runtime.metrics import MetricsCutFailed

    (tmp_path / "metrics.jsonl").write_text("".join(_line(n) for n in range(1, 5)))
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_module, "move_records_after", full)
    with pytest.raises(MetricsCutFailed) as failed:
        MetricsLog(tmp_path, True, io.StringIO(), resume_step=2)
    assert failed.value.exit_code == 1
    text = str(failed.value)
    assert f"{tmp_path / 'metrics.jsonl'}: moving the records after step 2" in text
    assert "(OSError: No space left on device)" in text and "fix: free space" in text
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
