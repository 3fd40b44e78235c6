"""Reading a run's ``metrics.jsonl``: one JSON object per logged step, and one per held-out
evaluation (:func:`is_eval`).

A run killed while it writes (out of time, out of disk, a node lost) can leave its last line torn
(``{"step": 3, "loss": 4.``); a resume, which rewrites the file up to its checkpoint's step, and
``orch report`` must read past it rather than stop there, so a line that is not a step record is
skipped and counted.

A resume cuts the file at its checkpoint's step (:func:`move_records_after`) streaming, line by
line: a long run's file (thousands of records, each with every rank's device readings) is
gigabytes parsed, and holding it all before step 1 cost 31 s and 2.4 GB on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import IO, Any

_STEP_FIRST = re.compile(rb'\{"step": (\d+)[,}]')
"""How the runtime starts every record it writes (``json_line`` of ``StepMetrics``, whose first
field is ``step``): the step is read off a line's first bytes, without parsing the rest."""


def is_eval(record: dict[str, Any]) -> bool:
    """Whether a record is a held-out evaluation's (``EvalMetrics``: step, ``eval_loss``,
    ``eval_tokens``, ``eval_s``) rather than a training step's."""
    return "eval_loss" in record


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The step records in ``path`` (objects with an integer ``step``) and how many non-blank
    lines were not one."""
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if _step_of(record) is not None:
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _record_step(line: bytes) -> int | None:
    """The step of a whole record ``line``, or None for a line that is not one (blank, torn,
    another value). A line as the runtime writes it is read by its first bytes; any other is
    parsed (only it: one line at a time)."""
    if line.endswith(b"\n") and (match := _STEP_FIRST.match(line)):
        return int(match[1])
    try:
        return _step_of(json.loads(line))
    except ValueError:
        return None


def _step_of(record: object) -> int | None:
    """The step of a parsed line that is a step record (an object with an integer ``step``,
    not a boolean), else None: the one test of what a record is, for reading and for moving."""
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def move_records_after(path: Path, aside: Path, step: int | None) -> int:
    """Move the records of ``path`` after ``step`` (all of them when None) to the end of
    ``aside``, in their order; returns how many moved. Lines that are not records (a torn last
    line) are dropped, as :func:`read_records` skips them.

    Streaming: the records up to the cut, the first record after ``step`` or the first line that
    is not a record, stay where they are, read only for their step; the rest is copied line by
    line and the file cut there (no whole-file rewrite, memory bounded by one line). Only a file
    whose records are out of order (edited by hand) is rewritten, still line by line, through a
    side file and a rename. ``aside`` is made durable before ``path`` is cut: a crash between
    the two leaves the moved records in both, never in neither. The cut truncates ``path`` in
    place, so a reader holding it open (``tail -f``, an ``orch report`` reading it) sees it
    shrink, where a rename left such a reader the old file whole."""
    if not path.exists():
        return 0
    moved, out, rewrite = 0, None, None  # (aside and the side file: opened when needed)
    with path.open("rb") as file, contextlib.ExitStack() as opened:
        cut = _first_off_record(file, step)
        if cut is None:
            return 0
        for line in file:
            record_step = _record_step(line)
            if record_step is None:
                continue
            line = line if line.endswith(b"\n") else line + b"\n"
            if step is None or record_step > step:
                out = out or opened.enter_context(_appending(aside))
                out.write(line)
                moved += 1
            else:  # a kept record after the cut: out of order, the file is rewritten
                rewrite = rewrite or opened.enter_context(_head_copy(path, cut))
                rewrite.write(line)
        for written in (out, rewrite):  # aside first
            if written is not None:
                _durable(written)
    if rewrite is not None:
        os.replace(rewrite.name, path)
    else:
        with path.open("r+b") as file:
            file.truncate(cut)
            _durable(file)
    return moved


def _appending(path: Path) -> IO[bytes]:
    """``path`` opened to append whole lines: a newline first where it ends in a torn line (an
    earlier move that failed mid-write, a full disk), which the first appended record would
    otherwise continue, both then one unparseable line."""
    file = open(path, "a+b")  # noqa: SIM115 - the caller's; reads allowed, writes at the end
    try:
        end = file.seek(0, os.SEEK_END)
        if end:
            file.seek(end - 1)
            if file.read(1) != b"\n":
                file.write(b"\n")  # "a" mode: at the end, wherever the file was read
    except BaseException:
        file.close()
        raise
    return file


def _first_off_record(file: IO[bytes], step: int | None) -> int | None:
    """The byte offset of ``file``'s first line that is not a record of ``step`` or before,
    with ``file`` positioned there to read that line next; None when there is none (nothing
    moves and the file stays as it is)."""
    offset = 0
    while line := file.readline():
        record_step = _record_step(line)
        if step is None or record_step is None or record_step > step:
            file.seek(offset)
            return offset
        offset += len(line)
    return None


def _head_copy(path: Path, size: int) -> IO[bytes]:
    """A side file beside ``path`` holding its first ``size`` bytes, open for appending."""
    side = open(path.with_name(path.name + ".partial"), "wb")  # noqa: SIM115 - the caller's
    try:
        with path.open("rb") as source:
            while size > 0 and (chunk := source.read(min(size, 1 << 20))):
                side.write(chunk)
                size -= len(chunk)
    except BaseException:
        side.close()
        raise
    return side


def _durable(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())
