"""Reading a run's ``metrics.jsonl``: one JSON object per logged step.

A run killed while it writes (out of time, out of disk, a node lost) can leave its last line torn
(``{"step": 3, "loss": 4.``); a resume, which rewrites the file up to its checkpoint's step, and
``orch report`` must read past it rather than stop there, so a line that is not a step record is
skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped += 1
    return records, skipped
