"""Per-step metrics: the progress line on rank 0 and ``RUN_DIR/metrics.jsonl``.

On a terminal the progress line is one line redrawn in place, with an ETA from the smoothed step
time (``rank_log``'s stream keeps other output above it); otherwise one plain line per logged
step.

The progress line has the same fields on every backend (DESIGN.md):
``step 120/1000 | loss 3.412 | 48.2k tok/s | 412 TFLOP/s | MFU 41.7% | mem 61.2/80.0 GiB |
0.41 s/step``; the JSON line holds the same values unrounded. Throughput figures are per step
(tokens of the whole global batch over the step's wall time); TFLOP/s and MFU are per device,
from the plan's model FLOPs per token, so they compare across plans and with other frameworks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from orch.errors import OrchError, warn_once
from orch.runtime.checkpoint.files import of_run, superseded_path
from orch.runtime.records import move_records_after
from orch.runtime.telemetry import memory_in_use

GIB = 2**30


@dataclass(frozen=True)
class StepMetrics:
    step: int
    steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    step_time_s: float
    tokens_per_s: float
    tflops: float
    """Model TFLOP/s per device."""
    mfu: float
    mem_bytes: int
    mem_total_bytes: int
    aux_loss: float | None = None
    """MoE models: the weighted load-balancing term added to ``loss`` for backward (``loss``
    itself is the language-model loss alone)."""
    expert_load: list[list[int]] | None = None
    """MoE models: tokens routed to each expert in the step, per MoE layer, over all ranks."""
    comm_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes rank 0 handed to collectives in the step, per parallel dimension (dp, tp, cp, pp,
    ep, etp, other; ``orch.parallel.comm_stats``)."""
    pipeline_idle: list[float] | None = None
    """Pipeline runs: each pipeline rank's idle fraction of the step's forward and backward,
    measured (``pipeline_timeline.png`` and ``pipeline_trace.json`` in the run directory)."""
    pipeline_transfer_s: list[float] | None = None
    """Pipeline runs: each pipeline rank's seconds of the step spent waiting for a transfer
    whose producer had finished (``orch.parallel.pipeline.timeline.exposed_transfers``); the
    rest of its idle time is the bubble, and with FSDP stages their parameter gathers waited for
    and gradient reductions (run between the timed actions)."""
    offload: dict[str, int] | None = None
    """Offloaded runs: the step's accounted device peak (``device_peak_bytes``, never over
    ``offload.device_budget``) and bytes moved to the device and back home."""
    devices: list[dict] | None = None
    """Each rank's device reading at this step, by rank (``orch.runtime.telemetry``): GPU
    memory used/total, utilization, power, temperature by UUID; on CPU the resident set."""

    def line(self) -> str:
        return (
            f"step {self.step}/{self.steps} | loss {self.loss:.3f} | "
            f"{token_rate(self.tokens_per_s)} tok/s | "
            f"{self.tflops:.3g} TFLOP/s | MFU {self.mfu * 100:.1f}% | "
            f"mem {self.mem_bytes / GIB:.1f}/{self.mem_total_bytes / GIB:.1f} GiB | "
            f"{self.step_time_s:.2f} s/step"
        )


@dataclass(frozen=True)
class EvalMetrics:
    """One held-out evaluation (``eval:``), a record of its own in ``metrics.jsonl`` beside the
    step records (``step`` first, as theirs; told apart by ``eval_loss``:
    :func:`~orch.runtime.records.is_eval`)."""

    step: int
    """The optimizer steps taken before it: the weights it evaluated."""
    eval_loss: float
    """The mean token cross-entropy over every eval token of every rank."""
    eval_tokens: int
    eval_s: float

    def line(self) -> str:
        perplexity = math.exp(self.eval_loss) if self.eval_loss < 700 else math.inf
        return (f"eval step {self.step}: loss {self.eval_loss:.3f} (ppl {perplexity:.4g}) over "
                f"{self.eval_tokens:,} tokens in {self.eval_s:.2f} s")


def token_rate(tokens_per_s: float) -> str:
    """Tokens/s as the progress line says it: ``4.2``, ``42``, ``48.2k``, ``1.25M``.

    Plain below a thousand: offloaded fine-tuning of a large model runs at tens of tokens/s,
    which a fixed ``k`` said as ``0.0k``. Each unit ends where its rounding would carry into
    the next (999.96k read ``1000.0k``)."""
    if tokens_per_s < 9.95:
        return f"{tokens_per_s:.1f}"
    if tokens_per_s < 999.5:
        return f"{tokens_per_s:.0f}"
    if tokens_per_s < 999_950:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s / 1e6:.2f}M"


def memory_bytes(device: torch.device) -> tuple[int, int]:
    """(peak bytes in use so far, bytes the device has): CUDA's allocator peak, or on the CPU
    this process's peak resident set (``ru_maxrss``), the figure offload is judged by."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return torch.cuda.max_memory_allocated(device), total
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total


SUPERSEDED_METRICS = "metrics.superseded.jsonl"
"""Where a resumed run keeps the records of the steps it redoes (appended, oldest first)."""


class MetricsCutFailed(OrchError):
    """A start could not move the records it does not continue out of ``metrics.jsonl`` (a full
    disk): it stops before its first step, where going on would append its records after ones
    of another history. Exit 1, as a failed checkpoint save: nothing in the input to fix."""

    exit_code = 1


class MetricsLog:
    """Writes metrics on rank 0: a line to ``out`` and a JSON object to ``metrics.jsonl``.

    A resumed run first moves the records after ``resume_step`` (steps it will redo) to
    ``metrics.superseded.jsonl`` (appended, oldest first), so the file reads as the run since
    that checkpoint and nothing logged is deleted. They are not put back: when this run dies
    before its first checkpoint and the next resumes from a later one, the records of the steps
    in between are in that file, not in ``metrics.jsonl``. A run resumed from another run
    directory's checkpoint (``resumed_from``) moves every record: none of them is of the history
    it continues (the checkpoints of this directory's own history are moved aside likewise when
    it saves their steps again).

    The first record of each start says where it started from, ``resumed_from``: the
    checkpoint, or null on a fresh start (``orch report`` leaves each start's first step, with
    its warm-up, out of its medians).
    """

    def __init__(self, run_dir: Path, enabled: bool, out: IO[str], resume_step: int = 0,
                 tensorboard: bool = False, resumed_from: Path | None = None,
                 last_step: int | None = None) -> None:
        """``last_step``: the step this start ends at, where not ``train.steps`` (a
        ``run.stop_at_step``): the ETA counts to it."""
        self.enabled, self.out, self.file = enabled, out, None
        self.last_step = last_step
        self.path = run_dir / "metrics.jsonl"
        self._step_s: float | None = None  # smoothed seconds per step, for the ETA
        self._board: Any = None
        self._start: str | None = None if resumed_from is None else str(resumed_from)
        self._first = True  # the next record is this start's first
        if not enabled:
            return
        foreign = resumed_from is not None and not of_run(resumed_from, run_dir)
        if foreign and tensorboard:
            _move_aside(run_dir / "tb", out)
        if tensorboard:  # the launcher checked that the package is there
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)
        try:
            self._cut(resume_step, resumed_from if foreign else None)
        except OSError as exc:
            raise MetricsCutFailed(
                f"{self.path}: moving the records after step {resume_step} to "
                f"{self.path.with_name(SUPERSEDED_METRICS)} failed before step "
                f"{resume_step + 1} ({type(exc).__name__}: {exc.strerror or exc}); nothing was "
                f"lost (the records are in one file or in both)\n    fix: free space or fix "
                f"permissions under {self.path.parent}, then run the same command again"
            ) from None
        self.file = self.path.open("a")

    def _cut(self, resume_step: int, foreign: Path | None) -> None:
        """Move the records this start does not continue to ``metrics.superseded.jsonl``: those
        after ``resume_step``, or all of them when it resumes from ``foreign``, another run
        directory's checkpoint; say so."""
        aside = self.path.with_name(SUPERSEDED_METRICS)
        moved = move_records_after(self.path, aside, None if foreign else resume_step)
        if foreign is not None:
            gone = f"; this run's {moved} earlier records moved to {aside}" if moved else ""
            print(f"orch: resuming from {foreign}, another run's checkpoint: {self.path} starts "
                  f"over at step {resume_step + 1} (the steps before are that run's){gone}",
                  file=self.out, flush=True)
        elif moved:
            print(f"orch: {moved} metrics records after step {resume_step} moved to {aside}",
                  file=self.out, flush=True)

    def log(self, metrics: StepMetrics) -> None:
        if not self.enabled:
            return
        status = getattr(self.out, "status", None)
        if status is not None and self.out.isatty():  # one line, redrawn in place, with ETA
            self._step_s = metrics.step_time_s if self._step_s is None else (
                0.8 * self._step_s + 0.2 * metrics.step_time_s)
            left = (self.last_step or metrics.steps) - metrics.step
            status(f"{metrics.line()} | ETA {eta(self._step_s * left)}")
        else:
            print(metrics.line(), file=self.out, flush=True)
        self._append(metrics)
        if self._board is not None:
            try:
                self._scalars(metrics)
            except OSError as exc:
                self._drop_board(exc)

    def log_eval(self, metrics: EvalMetrics) -> None:
        """An evaluation's line (above a redrawn progress line) and record."""
        if not self.enabled:
            return
        print(metrics.line(), file=self.out, flush=True)
        self._append(metrics)
        if self._board is not None:
            try:
                self._board.add_scalar("eval/loss", metrics.eval_loss, metrics.step)
                self._board.flush()
            except OSError as exc:
                self._drop_board(exc)

    def _append(self, metrics: StepMetrics | EvalMetrics) -> None:
        """Append ``metrics``' record to ``metrics.jsonl``. A failed write (a full disk, a file
        system gone read-only) loses the records, not the run: warned once, and nothing more is
        written to the file in this start (as the rank log does), so a torn record can only be
        its last line, which the next start's cut and ``orch report`` pass over."""
        if self.file is None:
            return
        record = asdict(metrics)
        if self._first and isinstance(metrics, StepMetrics):  # a start's first step
            record["resumed_from"], self._first = self._start, False
        try:
            self.file.write(json_line(record))
            self.file.flush()
        except OSError as exc:
            self._give_up(exc, f"writing step {metrics.step}'s record")

    def _give_up(self, exc: OSError, doing: str) -> None:
        """Stop writing ``metrics.jsonl`` after ``exc``; say so once, naming the file, the
        error and the fix."""
        file, self.file = self.file, None
        if file is not None:
            with contextlib.suppress(OSError):  # its buffered rest fails the same way
                file.close()
        warn_once(f"{self.path}: {doing} failed ({type(exc).__name__}: {exc.strerror or exc}); "
                  "training goes on, with no more records written to it in this run's start "
                  "(the progress line and the rank logs go on); fix: free space or fix "
                  f"permissions under {self.path.parent}")

    def _scalars(self, m: StepMetrics) -> None:
        """The same values as TensorBoard scalars (``RUN_DIR/tb``), memory per rank too."""
        board, step = self._board, m.step
        for name in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "step_time_s"):
            board.add_scalar(f"train/{name}", getattr(m, name), step)
        if m.aux_loss is not None:
            board.add_scalar("train/aux_loss", m.aux_loss, step)
        for reading in m.devices or []:
            board.add_scalar(f"memory_gib/rank{reading['rank']}", memory_in_use(reading) / GIB,
                             step)
        board.flush()

    def _drop_board(self, exc: OSError) -> None:
        """Stop writing TensorBoard scalars after ``exc``, as ``metrics.jsonl`` stops."""
        board, self._board = self._board, None
        with contextlib.suppress(OSError):
            board.close()
        warn_once(f"{self.path.parent / 'tb'}: writing TensorBoard scalars failed "
                  f"({type(exc).__name__}: {exc.strerror or exc}); training goes on without "
                  f"them; fix: free space or fix permissions under {self.path.parent}")

    def close(self) -> None:
        """Close the files. Called in the worker's ``finally``: a failed write is said, never
        raised over the error that got there (a full disk's traceback hid the run's own)."""
        if self._board is not None:
            try:
                self._board.close()
            except OSError as exc:
                self._drop_board(exc)
        if (end := getattr(self.out, "end_status", None)) is not None:
            end()
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self._give_up(exc, "writing the last records")


def _move_aside(path: Path, out: IO[str]) -> None:
    """Rename ``path``, when there, to ``NAME.superseded-STAMP`` beside it (``superseded_path``):
    kept, not mixed into what a new history writes there (TensorBoard reads every event file of
    a directory)."""
    if path.exists():
        aside = superseded_path(path)
        os.replace(path, aside)
        print(f"orch: {path} is of another history: moved aside to {aside.name}", file=out,
              flush=True)


def json_line(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: a value that is not finite (a diverged loss or
    gradient norm) is written ``null``, since ``NaN`` is not JSON and strict readers (jq, a
    browser, most JSON libraries outside Python) refuse the line."""
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def eta(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else (
        f"{secs}s")
