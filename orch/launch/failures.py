"""What the launcher says when workers fail: which rank, on which node, why, and its log.

torchrun's own report names a rank and an exit code, and for a signal little else. Here each
failed worker of this node gets one line: its rank (and local rank, pid), the node, and the
reason read from what it left: a signal (SIGKILL is told apart as the kernel's out-of-memory
killer when this cgroup's ``oom_kill`` count rose during the run), or the error its worker
recorded (``orch.runtime.rank_log.record_failure``), classed as out of memory, a communication
timeout, a lost peer, bad input, or a Python error with its first line; then where its log is.
A worker torchrun had to SIGKILL because it did not stop within the grace period after
SIGTERM is told apart as hung (``ForcedKills`` reads torchrun's log for them); one the launcher
stopped while the others timed out in a collective, as likely hung. The likely cause comes
first: a rank that was killed, hung or raised on its own before ranks that only lost a peer or
timed out waiting because of it.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orch.runtime.rank_log import rank_log_path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def oom_counters(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> list[Path]:
    """The files that count OOM kills for this process's cgroup, then the root's as a fallback.

    ``proc_cgroup`` (``/proc/self/cgroup``) names the cgroup: cgroup v2's ``0::P`` counts in
    ``root/P/memory.events``, v1's ``N:memory:P`` (or a controller list with ``memory``) in
    ``root/memory/P/memory.oom_control``. Reading the root's alone missed a job's own cgroup
    (a Slurm step, a systemd unit, a container without a cgroup namespace), whose OOM kills
    are not counted there."""
    own: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.strip().lstrip("/")
        if number == "0" and controllers == "":
            own.append(root / relative / "memory.events")
        elif "memory" in controllers.split(","):
            own.append(root / "memory" / relative / "memory.oom_control")
    fallback = [root / "memory.events", root / "memory" / "memory.oom_control"]
    return own + [path for path in fallback if path not in own]


def oom_kills(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's cgroup (the
    root's where its own has no counter), if it says."""
    for path in oom_counters(proc_cgroup, root):
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


CONSEQUENCES = ("lost peer", "stopped", "communication timeout")
"""Kinds of failure that usually follow another rank's (its peers wait, then give up)."""


@dataclass(frozen=True)
class WorkerFailure:
    rank: int
    local_rank: int
    pid: int
    exitcode: int
    kind: str
    """killed, hung, likely hung, out of memory, communication timeout, lost peer, bad input,
    error, stopped."""
    reason: str
    log: Path | None

    @property
    def primary(self) -> bool:
        """A cause rather than a consequence of another rank's failure."""
        return self.kind not in CONSEQUENCES


_OOM = re.compile(r"out of memory|OutOfMemoryError|MemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
                  r"can't allocate memory|Cannot allocate memory|ENOMEM", re.I)
"""Out of memory on the device or the host: torch's CPU allocator raises a plain RuntimeError
("DefaultCPUAllocator: can't allocate memory ... Error code 12 (Cannot allocate memory)")."""
_TIMEOUT = re.compile(r"timed? ?out|Timeout|watchdog", re.I)
_PEER = re.compile(r"Connection (closed|reset) by peer|Broken pipe|peer.*(closed|died)|"
                   r"ProcessGroupGloo|NCCL (communicator was aborted|error)", re.I)


def lost_peer(message: str) -> bool:
    """``message`` (an error's ``Type: text``) says a collective lost its peer: the consequence
    of another rank's failure, not a failure of this one."""
    return bool(_PEER.search(message))


def comm_timeout(message: str) -> bool:
    """``message`` (an error's ``Type: text``) says a collective (or the store) timed out
    waiting: usually for a rank that failed or hung first. gloo's "Application timeout caused
    pair closure" names no backend: it is what every pair of a rank says once one of its
    collectives timed out."""
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return bool(_TIMEOUT.search(first) and re.search(
        r"Dist|gloo|nccl|collective|barrier|store|pair closure", message, re.I))


class ForcedKills(logging.Filter):
    """Records the pids torchrun SIGKILLed because they did not stop within its grace period
    after SIGTERM (30 s when a worker failed), from the warning it logs then.

    Their exit code says SIGKILL alone, which read as kill -9 from outside or an out-of-memory
    killer, while torchrun itself had killed a hung worker (stopped, or stuck in I/O) after the
    other ranks timed out waiting for it. Added to torchrun's
    ``torch.distributed.elastic.multiprocessing.api`` logger; lets every record through."""

    _FORCED = "Unable to shutdown process %s via %s, forcefully exiting via %s"

    def __init__(self) -> None:
        super().__init__()
        self.pids: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self._FORCED and isinstance(record.args, tuple) and record.args:
            try:
                self.pids.add(int(record.args[0]))
            except (TypeError, ValueError):
                pass
        return True


def classify(exitcode: int, message: str, oom_rose: bool, forced: bool = False
             ) -> tuple[str, str]:
    """``(kind, reason)`` of one worker's exit code and recorded error message; ``forced``:
    torchrun SIGKILLed it after it outlived the grace period after SIGTERM (``ForcedKills``)."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGKILL" and forced:
            return "hung", ("hung (stuck in a collective, in I/O, or stopped): it did not stop "
                            "within torchrun's grace period after SIGTERM, so torchrun killed it "
                            "with SIGKILL")
        if name == "SIGKILL" and oom_rose:
            return "out of memory", ("killed by the kernel's out-of-memory killer (SIGKILL; "
                                     "this cgroup's oom_kill count rose)")
        if name == "SIGKILL":
            return "killed", ("killed by SIGKILL (kill -9, the scheduler, or an out-of-memory "
                              "killer outside this cgroup: see dmesg)")
        if name in ("SIGTERM", "SIGINT", "SIGHUP"):
            return "stopped", (f"stopped by {name} (the scheduler, or the launcher stopping the "
                               "other workers after one failed)")
        if name == "SIGBUS":  # a read of a mapped page that is no longer there
            return "killed", ("crashed with SIGBUS: a memory-mapped file shrank or its disk "
                              "failed under the run (a .bin/.npy data.path rewritten, a "
                              "safetensors shard of model.init_from, an NVMe scratch file)")
        return "killed", f"crashed with {name}"
    if exitcode == 2:  # an OrchError: the worker printed the whole message already
        return "bad input", "stopped on bad input (the worker's message is above)"
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if not first:
        return "error", f"exit code {exitcode}, no error recorded (see its log)"
    if _OOM.search(message):
        return "out of memory", f"out of memory: {first}"
    if comm_timeout(message):
        return "communication timeout", f"communication timeout: {first}"
    if lost_peer(message):
        return "lost peer", f"lost a peer (another rank or node failed): {first}"
    return "error", f"error: {first}"


def _message(failure: Any) -> str:
    """The error a worker recorded (torchrun's ProcessFailure.message: text or a record)."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "")
    return "" if text.startswith(("To enable traceback", "Signal ")) else text


def worker_failures(failures: dict[int, Any], run_dir: Path, oom_rose: bool,
                    forced: Collection[int] = ()) -> list[WorkerFailure]:
    """One ``WorkerFailure`` per entry of torchrun's ``ChildFailedError.failures``, likely
    causes first, then by the time torchrun saw them; ``forced``: the pids torchrun SIGKILLed
    after its grace period (``ForcedKills.pids``)."""
    out = []
    for rank, failure in failures.items():
        kind, reason = classify(failure.exitcode, _message(failure), oom_rose,
                                failure.pid in forced)
        log = rank_log_path(run_dir, rank)
        out.append((failure.timestamp, WorkerFailure(
            rank, failure.local_rank, failure.pid, failure.exitcode, kind, reason,
            log if log.exists() else None)))
    found = _blame_the_stopped([item[1] for item in sorted(out, key=lambda item: item[0])])
    return sorted(found, key=lambda f: not f.primary)  # stable: by time within each


def _blame_the_stopped(failures: list[WorkerFailure]) -> list[WorkerFailure]:
    """``failures``, with the ranks only stopped by the launcher called likely hung when
    others timed out in a collective and none failed on its own.

    Ranks wait in a collective until a peer that never comes makes them time out; the launcher
    then stops the rest with SIGTERM, and a hung rank that dies of it (asleep, in a loop, in
    I/O that a signal ends) looked like one more stopped peer, leaving no rank blamed. Ranks
    that were about to time out too are stopped alike, so every such rank is named."""
    if any(f.primary for f in failures) or not any(
            f.kind == "communication timeout" for f in failures):
        return failures
    return [replace(f, kind="likely hung", reason=(
        f"likely hung: still running when the others timed out waiting in a collective, and "
        f"then stopped by {signal.Signals(-f.exitcode).name} from the launcher"))
        if f.kind == "stopped" else f for f in failures]


def summary(failures: list[WorkerFailure], headline: str, node: str, nodes: int) -> str:
    """The launcher's report of failed workers on this node, one of ``nodes`` (only with other
    nodes can the cause be on another node), under ``headline``: the run failed, or this
    attempt did and torchrun restarts it."""
    lines = [headline]
    for f in failures:
        lines.append(f"  rank {f.rank} (local rank {f.local_rank}, pid {f.pid}) on {node}: "
                     f"{f.reason}")
        lines.append(f"      log: {f.log}" if f.log else "      log: none written (it failed "
                     "before opening one)")
    first = failures[0]
    hung = [f.rank for f in failures if f.kind == "likely hung"]
    elsewhere = " or at the other nodes' launchers" if nodes > 1 else ""
    if len(hung) > 1:
        lines.append(f"  look first at ranks {', '.join(map(str, hung))} (stopped while the "
                     f"others timed out: one of them likely hung){elsewhere}")
    elif hung:
        lines.append(f"  look first at rank {first.rank} (likely hung){elsewhere}")
    elif not first.primary and nodes > 1:
        lines.append(f"  look first at rank {first.rank} (no rank here failed on its own: look "
                     "at the other nodes' launchers)")
    elif len(failures) > 1 or not first.primary:
        lines.append(f"  look first at rank {first.rank}")
    return "\n".join(lines)


__all__ = ["ForcedKills", "WorkerFailure", "classify", "oom_kills", "summary", "worker_failures"]
