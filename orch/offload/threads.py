"""The offload engine's helper threads, named where the operating system shows them.

Python names a thread for itself only: ``top -H``, ``ps -L``, ``perf`` and
``/proc/<pid>/task/<tid>/comm`` show every thread of a training process as ``python``. The
engine's helpers (NVMe reads and writes, the CPU optimizer, activation swaps, parameters sent to
replicas) run beside the compute on the same cores, and which of them takes the CPU is the first
question about a slow offloaded step (benchmarks/results/offload_cpu.md measures it per thread).
So each helper also carries its name at the OS level: its Python name without the ``orch-``
prefix, cut to the 15 characters Linux keeps (``nvme-read_0``, ``cpu-optimizer``). Threads a
helper starts inherit its OS name (DeepSpeed's async I/O op starts its own for each helper's
handle), so their CPU shows under the helper's name too. Elsewhere than Linux, and where libc
cannot be loaded, the OS name is left alone.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orch.offload.host_memory import libc

PR_SET_NAME = 15
"""prctl(2) option that names the calling thread."""
OS_NAME_BYTES = 15
"""Linux keeps 16 bytes of a thread's name, the last one the terminating zero."""
PREFIX = "orch-"


def os_name(name: str) -> str:
    """What a helper called ``name`` in Python is called at the OS level."""
    return name.removeprefix(PREFIX).encode()[:OS_NAME_BYTES].decode(errors="ignore")


def name_this_thread() -> None:
    """Give the calling thread its Python name (see :func:`os_name`) at the OS level too."""
    if sys.platform.startswith("linux") and (c := libc()) is not None:
        c.prctl(PR_SET_NAME, os_name(threading.current_thread().name).encode(), 0, 0, 0)


def helper_pool(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads named ``name_0``, ``name_1``, ... in Python and the OS."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=name_this_thread)


def helper_thread(name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
    """A daemon thread (not started) that runs ``target(*args)`` under ``name``, named so in
    the OS as well."""

    def run() -> None:
        name_this_thread()
        target(*args)

    return threading.Thread(target=run, daemon=True, name=name)


__all__ = ["helper_pool", "helper_thread", "name_this_thread", "os_name"]
