"""Measured pipeline timelines: what each rank's compute actions really took in one step.

The executor records every compute action's start and end (``time.perf_counter``, relative to
the rank's start of the step, which follows a barrier over the pipeline ranks, so ranks on one
host share a clock up to the barrier's release skew). Rank 0 gathers them into the simulator's
:class:`~orch.parallel.schedules.simulate.Timeline`, so the measured step draws with the same
PNG renderer as ``orch schedule`` and gives the same figures (idle fraction per rank, peak
activations), and writes a chrome trace (``chrome://tracing`` or Perfetto) beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from orch.parallel.schedules.actions import Action
from orch.parallel.schedules.render import write_png
from orch.parallel.schedules.simulate import Span, Timeline, peak_activations

Record = tuple[str, float, float]
"""``(action text such as "1I3", start s, end s)``: one compute action of one rank."""


def measured_timeline(records: list[list[Record]]) -> Timeline:
    """The timeline of one step from every pipeline rank's records (``records[rank]``)."""
    spans = [[Span(Action.parse(text), start, end) for text, start, end in rank]
             for rank in records]
    makespan = max((span.end for rank in spans for span in rank), default=0.0)
    idle = [1.0 - sum(s.end - s.start for s in rank) / makespan if makespan else 0.0
            for rank in spans]
    peaks = [peak_activations([s.action for s in rank]) for rank in spans]
    return Timeline(spans, makespan, idle, peaks)


def chrome_trace(timeline: Timeline) -> dict:
    """The timeline as Chrome trace events: one thread per pipeline rank, times in µs."""
    events = [
        {"name": str(span.action), "cat": span.action.kind, "ph": "X", "pid": 0, "tid": rank,
         "ts": round(span.start * 1e6, 1), "dur": round((span.end - span.start) * 1e6, 1),
         "args": {"stage": span.action.stage, "microbatch": span.action.microbatch}}
        for rank, spans in enumerate(timeline.spans) for span in spans
    ]
    names = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
              "args": {"name": f"pipeline rank {rank}"}} for rank in range(len(timeline.spans))]
    return {"traceEvents": names + events, "displayTimeUnit": "ms"}


def write_timeline(timeline: Timeline, directory: Path, step: int) -> None:
    """``pipeline_timeline.png`` and ``pipeline_trace.json`` of ``step`` in ``directory``
    (the latest logged step replaces the previous one)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_png(timeline, directory / "pipeline_timeline.png")
    trace = chrome_trace(timeline) | {"otherData": {"step": step}}
    (directory / "pipeline_trace.json").write_text(json.dumps(trace) + "\n")


__all__ = ["Record", "chrome_trace", "measured_timeline", "write_timeline"]
