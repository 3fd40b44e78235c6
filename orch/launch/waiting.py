"""Ctrl-C and SIGTERM while a launcher waits for the other nodes: one line, and out at once.

Until torchrun starts the workers (and installs its own handlers, which stop them and raise
``SignalException``), nothing has started, so a signal should end the launcher at once. But
waiting for the other nodes, a static rendezvous holds the main thread in C++ (TCPStore), and
Python runs a signal's handler in the main thread between bytecodes: a Python handler waited
15 minutes (the rendezvous timeout) to run. The default action ended the process at once but
silently (exit 143 on Slurm's SIGTERM, no line). Python's own C-level handler writes the
signal's number to the wakeup fd as the signal arrives, though, and a thread reading that fd
runs while the main thread waits in C++ (the store releases the GIL): it says so and ends the
process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stopping = threading.Lock()


def _stop(number: int, frame: FrameType | None = None) -> None:
    """End this process as the signal ``number`` would, after one line (the run lock goes with
    the process: flock). Once: the Python handler (the main thread, where it runs Python) and
    the watcher thread can both take one signal, and both wrote the line."""
    if not _stopping.acquire(blocking=False):
        threading.Event().wait()  # the other is ending the process
    name = signal.Signals(number).name
    sys.stderr.write(f"orch launch: stopped by {name} while waiting for the other nodes: no "
                     "worker had started\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(128 + number)


def _watch(wakeup: int) -> None:
    """Read signal numbers from the wakeup fd until it closes; stop on one of ours while our
    handler is still the one installed (once torchrun's replaces it, torchrun stops the run)."""
    while chunk := os.read(wakeup, 64):
        for number in chunk:
            if number in STOP_SIGNALS and signal.getsignal(number) is _stop:
                _stop(number)


@contextmanager
def stopped_at_once() -> Iterator[None]:
    """Inside the block, SIGINT or SIGTERM ends this process at once with one line, until
    torchrun installs its own handlers; the previous handlers are back after it. Only the main
    thread can install handlers: elsewhere (a launch in a thread) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wakeup, write = os.pipe()
    os.set_blocking(write, False)  # as set_wakeup_fd requires
    previous = {number: signal.signal(number, _stop) for number in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(wakeup,), name="orch-stop-watch",
                               daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for number, handler in previous.items():
            signal.signal(number, handler)
        os.close(write)  # the watcher reads the end of the pipe and returns
        watcher.join()
        os.close(wakeup)


__all__ = ["stopped_at_once"]
