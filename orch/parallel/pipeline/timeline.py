"""Measured pipeline timelines: what each rank's compute actions really took in one step.

The executor records every compute action's start and end (``time.perf_counter``, relative to
the rank's start of the step, which follows a barrier over the pipeline ranks, so ranks on one
host share a clock up to the barrier's release skew). Rank 0 gathers them into the simulator's
:class:`~orch.parallel.schedules.simulate.Timeline`, so the measured step draws with the same
PNG renderer as ``orch schedule`` and gives the same figures (idle fraction per rank, peak
activations), and writes a chrome trace (``chrome://tracing`` or Perfetto) beside it.

Transfers are not clocked where they happen (torch's runtime sends and receives inside its
step), so :func:`exposed_transfers` reads them off the timeline: a rank's idle time is either
waiting for another stage's compute (the bubble) or for the bytes to arrive once it is done.
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


_PRODUCER = {"F": (("F",), -1), "B": (("B", "I"), 1), "I": (("B", "I"), 1)}
"""What a compute action waits for: F of stage s the forward of stage s-1; a backward (B or
I) of stage s the input gradient from the backward of stage s+1. W needs nothing sent."""


def exposed_transfers(timeline: Timeline) -> list[float]:
    """Each rank's seconds in a measured step spent waiting for a transfer: the send, the wire
    and the receive of another rank's output, with no compute on either side in them.

    For every compute action whose input comes from another rank and that found its rank
    idle since before that input's producer finished (the rank had nothing else to run), the
    time from the producer's end to its start. Transfers that arrive while the rank computes
    are hidden and count nothing; what remains of a rank's idle time is the bubble.
    """
    ends, ranks = {}, {}
    for rank, spans in enumerate(timeline.spans):
        for span in spans:
            a = span.action
            ends[(a.kind, a.stage, a.microbatch)] = span.end
            ranks[a.stage] = rank
    waited = []
    for rank, spans in enumerate(timeline.spans):
        seconds, free_since = 0.0, 0.0
        for span in spans:
            a = span.action
            kinds, step = _PRODUCER.get(a.kind, ((), 0))
            source = a.stage + step
            ready = [ends[(k, source, a.microbatch)] for k in kinds
                     if (k, source, a.microbatch) in ends]
            if ready and ranks[source] != rank and free_since <= ready[0]:
                seconds += max(0.0, span.start - ready[0])
            free_since = span.end
        waited.append(seconds)
    return waited


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


TIMELINE_PNG = "pipeline_timeline.png"
"""The drawn timeline's file name in the run directory (``orch report`` copies it)."""


def write_timeline(timeline: Timeline, directory: Path, step: int) -> None:
    """``pipeline_timeline.png`` and ``pipeline_trace.json`` of ``step`` in ``directory``
    (the latest logged step replaces the previous one)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_png(timeline, directory / TIMELINE_PNG, step=step)
    trace = chrome_trace(timeline) | {"otherData": {"step": step}}
    (directory / "pipeline_trace.json").write_text(json.dumps(trace) + "\n")


__all__ = ["Record", "chrome_trace", "exposed_transfers", "measured_timeline", "write_timeline"]
