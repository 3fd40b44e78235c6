"""Each rank's own log file, and its error record for the launcher's failure summary.

Every worker copies what it prints to ``RUN_DIR/logs/rank-<rank>.log`` (appended, one header
line per start, so restarts and resumes stay in one file; each line with the time, the rank and
the step), and a fatal signal's Python stack (``faulthandler``) goes there too. The terminal gets
rank 0's output and every rank's errors. When a worker fails, ``record_failure`` writes the error to
the file torchrun names in ``TORCHELASTIC_ERROR_FILE``; the launcher reads it back to say which
rank failed and why (``orch.launch.failures``).
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

LOGS = "logs"


def rank_log_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / LOGS / f"rank-{rank}.log"


_step = "-"  # the training step this process is in ("-" before the first)


def at_step(step: int) -> None:
    """Tell the rank log which step the lines that follow belong to (the trainer calls it)."""
    global _step
    _step = str(step)


class _Tee(io.TextIOBase):
    """A text stream that writes to the original stream (unless ``quiet``) and to the rank's
    log file, each line of the file starting with the time, the rank and the step."""

    def __init__(self, stream: Any, file: IO[str], rank: int, quiet: bool) -> None:
        self.stream = stream
        self.file: IO[str] | None = file
        self.rank = rank
        self.quiet = quiet
        self._line_start = True
        self._status: str | None = None  # the progress line kept last on a terminal
        self._status_shown = False

    def write(self, text: str) -> int:
        if not self.quiet:
            if self._status_shown and text:  # clear the status line, write, redraw it below
                self.stream.write("\r\033[K")
                self._status_shown = False
            self.stream.write(text)
            if self._status is not None and text.endswith("\n"):
                self.stream.write(self._status)
                self._status_shown = True
        self._to_file(text)
        return len(text)

    def status(self, text: str) -> None:
        """Show ``text`` as the terminal's last line, redrawn in place (the log file gets it
        as a line); other output goes above it."""
        if not self.quiet:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._status, self._status_shown = text, True
        self._to_file(text + "\n")

    def end_status(self) -> None:
        """Leave the status line where it is and go on below it."""
        if self._status_shown:
            self.stream.write("\n")
            self.stream.flush()
        self._status, self._status_shown = None, False

    def _to_file(self, text: str) -> None:
        if self.file is not None and text:
            try:
                self.file.write(self._prefixed(text))
            except OSError:  # a full or vanished disk must not stop training: terminal only
                self.file = None

    def _prefixed(self, text: str) -> str:
        prefix = f"{time.strftime('%H:%M:%S')} rank {self.rank} step {_step} | "
        lines = text.split("\n")
        out = [(prefix if self._line_start else "") + lines[0]]
        out += [prefix + line if line else line for line in lines[1:]]
        self._line_start = text.endswith("\n")
        return "\n".join(out)

    def flush(self) -> None:
        if not self.quiet:
            self.stream.flush()
        if self.file is not None:
            try:
                self.file.flush()
            except OSError:
                self.file = None

    def to_log_only(self, text: str) -> None:
        """Write ``text`` to the rank log, not the terminal."""
        self._to_file(text)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def log_to_file(run_dir: str | Path, rank: int, world: int) -> Path | None:
    """From now on, copy this process's stdout and stderr into its rank log, and keep the
    terminal for rank 0's output and every rank's errors (stderr); the log's path, or None
    (with a note on stderr) when it cannot be opened: training goes on without it."""
    path = rank_log_path(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's lifetime
    except OSError as exc:
        print(f"orch: no rank log at {path} ({exc.strerror})", file=sys.stderr, flush=True)
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) + 1
    file.write(f"== rank {rank} of {world}, attempt {attempt}, pid {os.getpid()}, "
               f"{socket.gethostname()}, {time.strftime('%Y-%m-%dT%H:%M:%S')} ==\n")
    sys.stdout = _Tee(sys.stdout, file, rank, quiet=rank != 0)
    sys.stderr = _Tee(sys.stderr, file, rank, quiet=False)
    faulthandler.enable(file)
    return path


def report_crash(exc: BaseException) -> None:
    """Say why this worker stops on ``exc`` (a bug, or torch's error): its traceback, or, when
    it only lost a peer or timed out waiting in a collective (another rank failed or hung
    first, and the launcher's summary names that one) or was interrupted (the launcher's Ctrl-C,
    passed on by torchrun), one line on the terminal and the traceback in the rank log (each
    surviving rank printed some 25 lines of gloo's "Connection reset by peer" above the
    summary, 40 of a timeout, or 50 of KeyboardInterrupt)."""
    from orch.launch.failures import comm_timeout, lost_peer

    text, said = "".join(traceback.format_exception(exc)), f"{type(exc).__name__}: {exc}"
    if isinstance(sys.stderr, _Tee) and isinstance(exc, KeyboardInterrupt):
        sys.stderr.to_log_only(text)  # torchrun passed on the launcher's Ctrl-C
        print("orch worker: stopped by SIGINT; traceback in the rank log", file=sys.stderr,
              flush=True)
    elif isinstance(sys.stderr, _Tee) and (lost_peer(said) or comm_timeout(said)):
        sys.stderr.to_log_only(text)
        why = "a peer is gone" if lost_peer(said) else "timed out waiting for a peer"
        print(f"orch worker: stopped, {why} ({_first_sentences(said, 200)}); traceback in "
              "the rank log", file=sys.stderr, flush=True)
    else:
        print(text, end="", file=sys.stderr, flush=True)


def _first_sentences(text: str, limit: int) -> str:
    """``text``'s first line cut to its whole sentences within ``limit`` characters (gloo's
    errors run on: a cut at the limit ended one at "Check the logs of"), or to the limit with
    "..." where its first sentence is longer."""
    line = text.splitlines()[0] if text else ""
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    return line[:end + 1] if end > 0 else line[:limit - 3] + "..."


def record_failure(exc: BaseException) -> None:
    """Write ``exc`` where torchrun's agent reads a worker's error (its error-file format).

    Written to a side file and renamed into place: when a peer dies, the agent sends SIGTERM to the
    other workers while they may be recording their own error, and a half-written file makes the
    agent itself crash on the JSON instead of restarting the workers (torch's ErrorHandler writes in
    place). A rename leaves either no file (the summary then says so) or a whole one.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": f"{type(exc).__name__}: {exc}", "extraInfo": {
        "py_callstack": "".join(traceback.format_exception(exc)),
        "timestamp": str(int(time.time()))}}}
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as file:
            json.dump(record, file)
        os.replace(partial, path)
    except OSError:
        pass  # the summary then says there is no recorded error; the log still has it


__all__ = ["LOGS", "at_step", "log_to_file", "rank_log_path", "record_failure"]
