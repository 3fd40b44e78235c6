"""The launcher's failure summary (orch.launch.failures): how each way a worker dies is told."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orch.launch.attempts import Attempts
from orch.launch.failures import ForcedKills, classify, oom_kills, summary, worker_failures

CASES = [  # (exit code, recorded message, oom killer seen) -> kind, words in the reason
    (-signal.SIGKILL, "", True, "out of memory", "out-of-memory killer"),
    (-signal.SIGKILL, "", False, "killed", "killed by SIGKILL"),
    (-signal.SIGSEGV, "", False, "killed", "crashed with SIGSEGV"),
    (-signal.SIGBUS, "", False, "killed", "crashed with SIGBUS: a memory-mapped file shrank"),
    (-signal.SIGTERM, "", False, "stopped", "stopped by SIGTERM"),
    (1, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", False,
     "out of memory", "out of memory: OutOfMemoryError: CUDA out of memory"),
    (1, "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
     "allocate memory: you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate "
     "memory)", False, "out of memory", "out of memory: RuntimeError: [enforce fail"),  # host
    (1, "DistBackendError: [../gloo/transport/tcp/pair.cc:534] Read error: Connection reset by "
     "peer", False, "lost peer", "lost a peer"),
    (1, "DistBackendError: Timed out waiting 1800000ms for recv operation to complete (gloo)",
     False, "communication timeout", "communication timeout: DistBackendError: Timed out"),
    (1, "RuntimeError: Application timeout caused pair closure", False,  # gloo, no backend named
     "communication timeout", "communication timeout: RuntimeError: Application timeout"),
    (1, "ValueError: bad shape\nmore lines", False, "error", "error: ValueError: bad shape"),
    (2, "ConfigError: train.lr: -1 must be positive", False, "bad input",
     "stopped on bad input (the worker's message is above)"),
    (1, "", False, "error", "exit code 1, no error recorded"),
]


@pytest.mark.parametrize(("code", "message", "oom", "kind", "words"), CASES)
def test_classify(code, message, oom, kind, words):
    got_kind, reason = classify(code, message, oom)
    assert got_kind == kind and words in reason


def failure(rank: int, code: int, message: object, when: int) -> SimpleNamespace:
    return SimpleNamespace(local_rank=rank, pid=100 + rank, exitcode=code, message=message,
                           timestamp=when)


def test_the_killed_rank_comes_first_and_logs_are_named(tmp_path: Path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank-1.log").write_text("...")
    failures = {  # rank 0 lost its peer and reported first; rank 1 was killed
        0: failure(0, 1, {"message": "RuntimeError: Connection closed by peer"}, 10),
        1: failure(1, -signal.SIGKILL, "Signal 9 (SIGKILL) received by PID 101", 12),
    }
    found = worker_failures(failures, tmp_path, oom_rose=False)
    assert [f.rank for f in found] == [1, 0]
    attempts = Attempts(tmp_path, "node-a", nodes=1, max_restarts=2)
    attempts.restarts = 2
    assert attempts.final(failures) == 1
    text = capsys.readouterr().err
    assert text.splitlines()[0] == "orch launch: training failed on node node-a after 3 attempts"
    assert "rank 1 (local rank 1, pid 101) on node-a: killed by SIGKILL" in text
    assert f"log: {tmp_path / 'logs' / 'rank-1.log'}" in text
    assert "log: none written" in text  # rank 0 has no log here
    assert "look first at rank 1" in text


def test_a_worker_torchrun_had_to_sigkill_is_called_hung_and_named_first(tmp_path: Path):
    """A worker stopped with SIGSTOP (or stuck in I/O) outlives torchrun's SIGTERM, and torchrun
    SIGKILLs it after its grace period: that read as kill -9 from outside or an out-of-memory
    killer, beside the rank that only timed out waiting for it."""
    import logging

    forced = ForcedKills()
    torch_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    torch_log.addFilter(forced)
    try:  # what torchrun logs as it stops the workers (its words: the next test)
        torch_log.warning("Sending process %s closing signal %s", 101, "SIGTERM")
        torch_log.warning("Unable to shutdown process %s via %s, forcefully exiting via %s",
                          101, signal.SIGTERM, signal.SIGKILL)
    finally:
        torch_log.removeFilter(forced)
    assert forced.pids == {101}
    failures = {  # rank 0 timed out first; rank 1 was stopped, then killed by torchrun
        0: failure(0, 1, "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                   "waiting 5000ms for recv operation to complete", 10),
        1: failure(1, -signal.SIGKILL, "Signal 9 (SIGKILL) received by PID 101", 40),
    }
    found = worker_failures(failures, tmp_path, oom_rose=True, forced=forced.pids)
    assert [(f.rank, f.kind) for f in found] == [(1, "hung"), (0, "communication timeout")]
    text = summary(found, "orch launch: failed", "node-a", nodes=1)
    assert ("rank 1 (local rank 1, pid 101) on node-a: hung (stuck in a collective, in I/O, or "
            "stopped): it did not stop within torchrun's grace period after SIGTERM") in text
    assert "killed by SIGKILL" not in text and "out-of-memory" not in text
    assert text.splitlines()[-1] == "  look first at rank 1"


TIMED_OUT = ("RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
             "for recv operation to complete")


def test_ranks_stopped_while_the_others_timed_out_are_named_likely_hung(tmp_path: Path):
    """A hung rank that dies of torchrun's SIGTERM looked like one more stopped peer: nobody
    was blamed, and a one-node run was told to look at the other nodes' launchers."""
    failures = {0: failure(0, 1, TIMED_OUT, 10),
                1: failure(1, -signal.SIGTERM, "Signal 15 (SIGTERM) received by PID 101", 11)}
    found = worker_failures(failures, tmp_path, oom_rose=False)
    assert [(f.rank, f.kind) for f in found] == [(1, "likely hung"), (0, "communication timeout")]
    assert found[0].reason == ("likely hung: still running when the others timed out waiting in "
                               "a collective, and then stopped by SIGTERM from the launcher")
    text = summary(found, "orch launch: failed", "node-a", nodes=1)
    assert text.splitlines()[-1] == "  look first at rank 1 (likely hung)"
    assert "other nodes" not in text
    assert summary(found, "orch launch: failed", "node-a", nodes=2).splitlines()[-1] == (
        "  look first at rank 1 (likely hung) or at the other nodes' launchers")
    failures[2] = failure(2, -signal.SIGTERM, "", 11)  # waiting too, its timeout not yet come
    found = worker_failures(failures, tmp_path, oom_rose=False)
    assert summary(found, "orch launch: failed", "node-a", nodes=1).splitlines()[-1] == (
        "  look first at ranks 1, 2 (stopped while the others timed out: one of them likely "
        "hung)")


@pytest.mark.parametrize(("first", "nodes", "last"), [
    ((1, TIMED_OUT), 2, "  look first at rank 0 (no rank here failed on its own: look at the "
                        "other nodes' launchers)"),
    ((1, TIMED_OUT), 1, "  look first at rank 0"),
    ((1, "ValueError: bad"), 1, "  look first at rank 0"),  # the stopped rank is its peer
    ((1, "RuntimeError: Connection closed by peer"), 2, "  look first at rank 0 (no rank here "
                                                        "failed on its own: look at the other "
                                                        "nodes' launchers)")])
def test_only_timeouts_with_no_cause_blame_the_stopped_ranks(tmp_path: Path, first, nodes, last):
    failures = {0: failure(0, *first, 10), 1: failure(1, -signal.SIGTERM, "", 11)}
    if first[1] == TIMED_OUT:  # every rank here timed out: the hung one is elsewhere
        failures[1] = failure(1, 1, TIMED_OUT, 11)
    found = worker_failures(failures, tmp_path, oom_rose=False)
    assert all(f.kind != "likely hung" for f in found)
    assert summary(found, "orch launch: failed", "node-a", nodes=nodes).splitlines()[-1] == last


@pytest.mark.dist
def _wait_for_pending(pid: int, signum: int, timeout_s: float = 60) -> None:
    """Return once ``signum`` is pending for the (stopped) process ``pid``: its bit in the
    process-wide or thread-shared pending masks of /proc/PID/status."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        masks = [int(line.split()[1], 16) for line in status
                 if line.startswith(("ShdPnd:", "SigPnd:"))]
        if any(mask & bit for mask in masks):
            return
        time.sleep(0.05)
    raise AssertionError(f"signal {signum} never reached process {pid}")


def test_a_rank_hung_until_sigterm_is_named_by_a_real_launch(tmp_path: Path):
    """Rank 1 stopped (SIGSTOP) after step 2: rank 0 times out in the next collective
    (run.comm_timeout_s), and rank 1, let go once torchrun has sent it SIGTERM, dies of it;
    the one-node summary names rank 1 likely hung, first, and no other node."""
    import re

    from launch_harness import ORCH, REPO, overrides

    run_dir = tmp_path / "run"
    run = subprocess.Popen(
        [str(ORCH), "launch", "--nproc-per-node", "2", "configs/tiny.yaml",
         *overrides(run_dir, "train.steps=1000", "run.comm_timeout_s=5")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pid = 0
    try:
        assert run.stdout is not None and run.stderr is not None
        for line in run.stdout:
            if line.startswith("step 2/"):
                break
        header = (run_dir / "logs" / "rank-1.log").read_text()
        pid = int(re.findall(r"== rank 1 of 2, attempt 1, pid (\d+)", header)[-1])
        os.kill(pid, signal.SIGSTOP)
        seen = []
        for line in run.stderr:
            seen.append(line)
            if f"Sending process {pid} closing signal SIGTERM" in line:
                break
        # torchrun logs that line before it sends the signal: let rank 1 go only once SIGTERM
        # waits for it, else (seen under load) it ran on, found its collective timed out, and
        # exited with that error before the signal came
        _wait_for_pending(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
        _, err = run.communicate(timeout=120)
        err = "".join(seen) + err
    finally:
        run.kill()
        run.wait()
        if pid:  # on a failure before torchrun's SIGKILL, the stopped worker must not stay
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert run.returncode == 1, err
    assert f"rank 1 (local rank 1, pid {pid}) on " in err and ": likely hung: still running" in err
    assert re.search(r"rank 0 \(.*\) on .*: communication timeout", err), err
    assert err.rstrip().splitlines()[-2] == "  look first at rank 1 (likely hung)", err


def test_forced_kills_reads_the_pid_torchrun_sigkilled_after_its_grace_period(tmp_path: Path):
    """The warning is torchrun's own (a worker that stopped itself outlives SIGTERM), so a
    change of its words in torch is caught here, in a second, not only by a 30 s hang."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes

    stop_self = "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)"
    context = start_processes("stopped", sys.executable, {0: ("-c", stop_self)}, {0: {}},
                              DefaultLogsSpecs(log_dir=str(tmp_path)))
    pid = context.pids()[0]
    forced = ForcedKills()
    torch_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    torch_log.addFilter(forced)
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}/stat").read_text().split()[2] != "T":
            assert time.monotonic() < deadline, "the child did not stop itself"
            time.sleep(0.05)
        context.close(timeout=1)
    finally:
        torch_log.removeFilter(forced)
    assert forced.pids == {pid}


def test_torchruns_log_keeps_no_filter_of_a_finished_launch(tmp_path: Path, monkeypatch):
    """The filter that drops torchrun's line for a re-partition exit was added on every launch
    and never removed: each in-process launch left one more on torchrun's logger."""
    import logging

    import torch.distributed.run

    from orch.launch.launcher import launch

    monkeypatch.setattr(torch.distributed.run, "run", lambda args: None)  # workers "done"
    log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    before = list(log.filters)
    assert launch(["--nproc-per-node", "1", "configs/tiny.yaml", "--set",
                   f"run.dir={tmp_path / 'run'}"]) == 0
    assert log.filters == before


def test_the_rank_that_raised_comes_before_a_gloo_pair_closure(tmp_path: Path):
    """gloo's "Application timeout caused pair closure", on a peer of the rank that raised, was
    an error of its own, reported first and named as the place to look."""
    failures = {0: failure(0, 1, "RuntimeError: Application timeout caused pair closure", 10),
                1: failure(1, 1, "ValueError: FT injected failure", 11)}
    found = worker_failures(failures, tmp_path, oom_rose=False)
    assert [(f.rank, f.kind) for f in found] == [(1, "error"), (0, "communication timeout")]
    assert summary(found, "orch launch: failed", "node-a", nodes=1).splitlines()[-1] == (
        "  look first at rank 1")


def test_oom_counter_is_read_from_cgroup_v2_or_v1(tmp_path):
    proc, root = tmp_path / "cgroup", tmp_path / "sys"
    v2, v1 = root / "memory.events", root / "memory" / "memory.oom_control"
    v1.parent.mkdir(parents=True)
    assert oom_kills(proc, root) is None  # neither file: unknown, so SIGKILL is not called an OOM
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert oom_kills(proc, root) == 3
    v2.write_text("low 0\nhigh 0\nmax 2\noom 2\noom_kill 5\n")
    assert oom_kills(proc, root) == 5


def test_oom_counter_is_read_from_this_process_cgroup_not_the_root(tmp_path):
    """The OOM kills of a job's own cgroup (a Slurm step, a systemd unit) are counted there,
    not at the root: /proc/self/cgroup names it, for cgroup v2 and v1; the root's counter is
    the fallback where the own cgroup's file is missing."""
    proc, root = tmp_path / "cgroup", tmp_path / "sys"
    (root / "memory").mkdir(parents=True)
    (root / "memory.events").write_text("oom_kill 1\n")
    (root / "memory" / "memory.oom_control").write_text("oom_kill 2\n")
    own_v2 = root / "system.slice" / "job.scope" / "memory.events"
    own_v2.parent.mkdir(parents=True)
    own_v2.write_text("oom 7\noom_kill 7\n")
    proc.write_text("0::/system.slice/job.scope\n")
    assert oom_kills(proc, root) == 7
    own_v1 = root / "memory" / "slurm" / "job_4" / "memory.oom_control"
    own_v1.parent.mkdir(parents=True)
    own_v1.write_text("under_oom 0\noom_kill 9\n")
    proc.write_text("12:pids:/slurm/job_4\n4:memory:/slurm/job_4\n1:name=systemd:/x\n")
    assert oom_kills(proc, root) == 9
    proc.write_text("3:cpu,memory:/slurm/job_4\n")  # a controller list holding memory
    assert oom_kills(proc, root) == 9
    proc.write_text("0::/gone.scope\n")  # its file missing: the root's counter
    assert oom_kills(proc, root) == 1


@pytest.mark.parametrize("text", ["kill rank=1", "kill rank=1 step=0", "stop rank=1 step=3",
                                  "kill rank=1 step=3 during=load", "kill rank=x step=3",
                                  "kill rank=1 step=3 when=now",
                                  "nan rank=1 step=3 during=save"])
def test_a_bad_drill_is_refused_before_any_process_starts(monkeypatch, text):
    from orch.config import Config
    from orch.launch.launcher import _check_drill

    monkeypatch.setenv("ORCH_DRILL", text)
    (problem,) = _check_drill(Config(), 2)
    assert problem.where == "ORCH_DRILL" and repr(text) in problem.message
    assert "kill rank=1 step=7 during=step" in problem.fix


@pytest.mark.parametrize(("text", "why", "fix"), [
    ("kill rank=1 step=5 during save", "'during' is not key=value", "write during=save"),
    ("kill rank=1 step=5 bogus", "'bogus' is not key=value", "remove it"),
    ("kill rank=1 rank=0 step=5", "rank is given twice", "give rank once"),
])
def test_a_drill_word_that_is_not_key_value_or_a_repeated_key_is_refused(monkeypatch, text, why,
                                                                        fix):
    """Such words were dropped (``during save`` ran a drill during the step) or the last of a
    repeated key taken: a drill other than the one written, which looks like a working job."""
    from orch.config import Config
    from orch.launch.launcher import _check_drill

    monkeypatch.setenv("ORCH_DRILL", text)
    (problem,) = _check_drill(Config(), 2)
    assert problem.where == "ORCH_DRILL"
    assert problem.message == f"{text!r} is not a drill: {why}" and problem.fix.startswith(fix)


def test_a_drill_that_cannot_fire_names_every_reason(monkeypatch):
    from orch.config import Config
    from orch.launch.launcher import _check_drill

    cfg = Config()
    cfg.train.steps = 10
    monkeypatch.setenv("ORCH_DRILL", "kill rank=4 step=11")
    (problem,) = _check_drill(cfg, 2)
    assert problem.message == ("'kill rank=4 step=11' would never fire: rank 4 is not one of "
                               "this run's 2; step 11 is after the run's last, 10")


def test_a_drill_fires_once_on_its_rank_at_its_point(monkeypatch):
    import orch.runtime.drills as drills

    killed: list[int] = []
    monkeypatch.setattr(drills.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv("ORCH_DRILL", "kill rank=1 step=3 during=save")
    for rank, attempt, point, step, fires in [
        ("0", "0", "save", 3, False), ("1", "0", "step", 3, False), ("1", "0", "save", 2, False),
        ("1", "1", "save", 3, False), ("1", "0", "save", 3, True)]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        drills._armed.cache_clear()
        killed.clear()
        drills.maybe_fail(point, step)
        assert killed == ([signal.SIGKILL] if fires else []), (rank, attempt, point, step)
    drills._armed.cache_clear()


def test_a_raise_drill_raises_its_error_in_place_of_the_kill(monkeypatch):
    import orch.runtime.drills as drills

    monkeypatch.setattr(drills.os, "kill", lambda pid, sig: pytest.fail("killed"))
    monkeypatch.setenv("ORCH_DRILL", "raise rank=0 step=3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    drills._armed.cache_clear()
    drills.maybe_fail("step", 2)
    with pytest.raises(drills.DrillError, match="rank 0 raises during step 3"):
        drills.maybe_fail("step", 3)
    drills._armed.cache_clear()


def test_rank_log_lines_carry_time_rank_and_step(tmp_path, monkeypatch):
    """What a worker prints goes to its rank log, each line with the rank and step; rank 1's
    stdout stays off the terminal, its stderr does not."""
    from orch.runtime import rank_log

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(rank_log, "_step", "-")
    monkeypatch.setattr(rank_log.faulthandler, "enable", lambda file: None)
    path = rank_log.log_to_file(tmp_path, 1, 2)
    print("before")
    rank_log.at_step(3)
    print("partial", end="")
    print(" line\nnext")
    print("oops", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    lines = path.read_text().splitlines()
    assert lines[0].startswith("== rank 1 of 2, attempt 1, pid ")
    assert [line.split(" ", 1)[1] for line in lines[1:]] == [
        "rank 1 step - | before", "rank 1 step 3 | partial line", "rank 1 step 3 | next",
        "rank 1 step 3 | oops"]
    assert out.getvalue() == "" and err.getvalue() == "oops\n"


def test_a_rank_that_lost_a_peer_says_so_in_one_line_and_logs_its_traceback(tmp_path,
                                                                          monkeypatch):
    """Each surviving rank printed gloo's 25-line traceback above the launcher's summary, which
    already names the rank that failed; other errors keep their traceback on the terminal."""
    from orch.runtime import rank_log

    err = io.StringIO()
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(rank_log.faulthandler, "enable", lambda file: None)
    path = rank_log.log_to_file(tmp_path, 1, 2)

    def raised(exc: Exception) -> Exception:
        try:
            raise exc
        except Exception as caught:  # noqa: BLE001 - a traceback to report
            return caught

    rank_log.report_crash(raised(RuntimeError("[pair.cc:537] Read error: Connection reset by "
                                              "peer")))
    shown = err.getvalue()
    assert shown == ("orch worker: stopped, a peer is gone (RuntimeError: [pair.cc:537] Read "
                     "error: Connection reset by peer); traceback in the rank log\n")
    assert "Traceback (most recent call last)" in path.read_text()
    timeout = ("DistBackendError: [../third_party/gloo/gloo/transport/tcp/pair.cc:446] "
               "Timed out waiting 5000ms for send operation to complete")
    rank_log.report_crash(raised(RuntimeError(timeout)))  # 40 lines on the terminal before
    shown = err.getvalue()[len(shown):]
    assert shown.startswith("orch worker: stopped, timed out waiting for a peer") \
        and shown.count("\n") == 1, shown
    # gloo's long reason is cut at a sentence's end, not mid-sentence ("Check the logs of")
    long = ("[pair.cc:538] Read error: Connection reset by peer. This is typically caused by a "
            "remote worker crashing. Check the logs of the remote worker for the error. "
            "Otherwise this may be a network problem.")
    before = len(err.getvalue())
    rank_log.report_crash(raised(RuntimeError(long)))
    assert err.getvalue()[before:] == (
        "orch worker: stopped, a peer is gone (RuntimeError: [pair.cc:538] Read error: "
        "Connection reset by peer. This is typically caused by a remote worker crashing. Check "
        "the logs of the remote worker for the error.); traceback in the rank log\n")
    shown = err.getvalue()
    rank_log.report_crash(raised(ValueError("a bug")))
    assert "Traceback (most recent call last)" in err.getvalue()[len(shown):]
    # the launcher's Ctrl-C, passed on by torchrun: 50 lines of KeyboardInterrupt per worker
    before = len(err.getvalue())
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as interrupted:
        rank_log.report_crash(interrupted)
    assert err.getvalue()[before:] == "orch worker: stopped by SIGINT; traceback in the rank log\n"
    assert "KeyboardInterrupt" in path.read_text()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_progress_line_stays_last_with_an_eta(tmp_path, monkeypatch):
    """Rank 0 on a terminal: the progress line is redrawn in place (with an ETA) and other
    output goes above it; the log file and metrics.jsonl get every step as plain lines."""
    from orch.runtime import rank_log
    from orch.runtime.metrics import MetricsLog, StepMetrics, eta

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(rank_log.faulthandler, "enable", lambda file: None)
    monkeypatch.setattr(rank_log, "_step", "-")
    log_file = rank_log.log_to_file(tmp_path, 0, 1)
    tee = sys.stdout
    metrics = MetricsLog(tmp_path, True, tee)

    def step(n: int) -> StepMetrics:
        return StepMetrics(step=n, steps=100, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=512,
                           step_time_s=2.0, tokens_per_s=256.0, tflops=0.01, mfu=0.01,
                           mem_bytes=0, mem_total_bytes=1)

    metrics.log(step(1))
    print("orch: saved checkpoint")
    metrics.log(step(2))
    metrics.close()
    shown = terminal.getvalue()
    first = "step 1/100 | loss 2.000"
    assert shown.startswith("\r\x1b[K" + first) and "ETA 3m18s" in shown
    assert f"| ETA 3m18s\r\x1b[Korch: saved checkpoint\n{first}" in shown  # above, redrawn
    assert shown.endswith("| ETA 3m16s\n")
    lines = log_file.read_text().splitlines()[1:]
    assert [line.split(" | ", 1)[1] for line in lines][1] == "orch: saved checkpoint"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert (eta(3725), eta(65), eta(9)) == ("1h02m", "1m05s", "9s")


def test_tensorboard_without_its_package_is_refused_before_start(monkeypatch):
    import importlib.util

    from orch.config import load_config
    from orch.launch.launcher import _check_tensorboard

    cfg = load_config("configs/tiny.yaml", ["run.tensorboard=true"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    (problem,) = _check_tensorboard(cfg)
    assert problem.where == "run.tensorboard" and "pip install tensorboard" in problem.fix


def test_a_recorded_failure_is_whole_and_read_by_torchruns_agent(tmp_path, monkeypatch):
    """The record is renamed into place (a worker stopped by SIGTERM while writing it must not
    leave half a JSON file, which crashes the agent instead of restarting): torch's ProcessFailure
    reads the message back, and no side file is left."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from orch.runtime.rank_log import record_failure

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    try:
        raise RuntimeError("Connection closed by peer")
    except RuntimeError as exc:
        record_failure(exc)
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(path))
    assert failure.message["message"] == "RuntimeError: Connection closed by peer"
    assert "raise RuntimeError" in failure.message["extraInfo"]["py_callstack"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.json"]


def _training(run_dir: Path, stderr: int) -> subprocess.Popen:
    """A long one-process ``orch launch`` of the tiny model, returned once it is training."""
    from launch_harness import ORCH, REPO, overrides

    run = subprocess.Popen(
        [str(ORCH), "launch", "--nproc-per-node", "1", "configs/tiny.yaml",
         *overrides(run_dir, "train.steps=100000")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.stdout is not None
    for line in run.stdout:
        if line.startswith("step "):
            break
    return run


@pytest.mark.dist
def test_a_signalled_launch_ends_its_workers_and_says_so_without_a_traceback(tmp_path):
    """Ctrl-C or Slurm's SIGTERM reached the user as torchrun's SignalException traceback; now
    one line, exit 128 + the signal, as a shell reports it."""
    run = _training(tmp_path / "run", subprocess.PIPE)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM
    assert "orch launch: stopped by SIGTERM: the workers were ended" in err
    assert "Traceback" not in err


@pytest.mark.dist
def test_workers_end_when_their_launcher_is_killed_outright(tmp_path):
    """A launcher killed with SIGKILL cannot end its workers; they went on training and saving
    into a run directory whose lock had died with the launcher. Now the kernel ends them."""
    run_dir = tmp_path / "run"
    run = _training(run_dir, subprocess.DEVNULL)
    workers = subprocess.run(["pgrep", "-f", f"orch.runtime.worker .*run.dir={run_dir}"],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 1, workers
    run.kill()
    run.wait(timeout=30)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{workers[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    state = Path(f"/proc/{workers[0]}/stat")
    assert not state.exists() or state.read_text().split()[2] == "Z", "the worker lives on"


@pytest.mark.parametrize(("codes", "exit_code"), [((2, 2), 2), ((2, 1), 1)])
def test_workers_stopped_on_bad_input_make_the_launch_exit_2(tmp_path, monkeypatch, capsys,
                                                             codes, exit_code):
    """A damaged --resume PATH found only by the workers' hashing (both exit 2) made the
    launcher exit 1, as for a crash; bad input exits 2 however late it is found. torchrun's
    run is replaced by the failure it reports, so no process starts."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from orch.launch import lifeline
    from orch.launch.launcher import RunFailed, launch

    def fail(args: object) -> None:
        raise ChildFailedError("orch.runtime.worker", {rank: ProcessFailure(
            rank, 100 + rank, code, str(tmp_path / "none")) for rank, code in enumerate(codes)})

    monkeypatch.setattr(torchrun, "run", fail)
    for name in (lifeline.LAUNCHER_PID, "OMP_NUM_THREADS"):  # set by the launch: undone after
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RunFailed, match=r"2 worker\(s\) failed") as failed:
        launch(["--nproc-per-node", "2", "configs/tiny.yaml", "--set", f"run.dir={tmp_path}"])
    assert failed.value.exit_code == exit_code
    assert "stopped on bad input" in capsys.readouterr().err


def test_a_workers_message_is_one_write_ending_its_line(monkeypatch):
    """Each rank printed its message and then, separately, the newline, so with two ranks
    failing alike the second message began on the first one's last line."""
    from orch.runtime import training_worker as worker
    from orch.runtime.checkpoint import CheckpointError

    writes: list[str] = []
    stream = SimpleNamespace(write=writes.append, flush=lambda: None)

    def refuse(argv: list[str]) -> None:
        raise CheckpointError("/ck/step-00000006/__0_0.distcp", "checkpoint is damaged:\n  "
                              "sha256 differs", "resume from an older checkpoint")

    def leave(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(worker, "run", refuse)
    monkeypatch.setattr(worker, "end_with_launcher", lambda: None)
    monkeypatch.setattr(worker.os, "_exit", leave)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as exited:
        worker.main()
    assert exited.value.code == 2
    assert writes == ["orch worker: /ck/step-00000006/__0_0.distcp: checkpoint is damaged:\n  "
                      "sha256 differs\n    fix: resume from an older checkpoint\n"]


def test_ctrl_c_while_a_worker_imports_says_one_line(capsys):
    """A Ctrl-C while the workers still imported torch (before the worker's own handler) dumped
    each worker's KeyboardInterrupt traceback, interleaved; the entry module's guard says the
    one line a worker stopped later says, and the worker exits 130."""
    from orch.runtime import worker

    def interrupted() -> None:
        raise KeyboardInterrupt

    assert worker.load_worker(interrupted) is None
    assert capsys.readouterr().err == "orch worker: stopped by SIGINT while starting\n"
    assert worker.INTERRUPTED == 130
    assert worker.load_worker(lambda: print) is print  # no Ctrl-C: the worker's main
    # the entry imports nothing heavy itself: a Ctrl-C at any later point is the guard's
    code = "import sys, orch.runtime.worker; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_each_failed_attempt_torchrun_restarts_after_is_reported(tmp_path: Path, capsys):
    """torchrun's agent restarts every worker after a failure, logging only the first failed
    process's exit code: each attempt it restarts after gets the launcher's report, numbered."""
    attempts = Attempts(tmp_path, "node-a", nodes=1, max_restarts=2)
    attempts.start()
    killed = {1: failure(1, -signal.SIGKILL, "", 12),
              0: failure(0, 1, {"message": "RuntimeError: Connection closed by peer"}, 10)}
    assert attempts.restart(killed) and attempts.restarts_left == 1
    text = capsys.readouterr().err
    assert text.splitlines()[0] == ("orch launch: attempt 1 of 3 failed on node node-a; "
                                    "restarting every worker (1 restart left after this one)")
    assert "rank 1 (local rank 1, pid 101) on node-a: killed by SIGKILL" in text
    assert attempts.restart(killed) and attempts.restarts_left == 0
    assert "attempt 2 of 3 failed" in capsys.readouterr().err


def test_a_failure_on_bad_input_is_not_restarted(tmp_path: Path, capsys):
    """Every failed worker stopped on bad input (exit 2): a restart would meet it again, so
    none is made, and the report says why the restarts were left."""
    attempts = Attempts(tmp_path, "node-a", nodes=1, max_restarts=2)
    attempts.start()
    bad = {0: failure(0, 2, "", 10), 1: failure(1, 2, "", 11)}
    assert not attempts.restart(bad) and capsys.readouterr().err == ""
    assert attempts.final(bad) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "orch launch: training failed on node node-a (not restarted: a restart would meet the "
        "same bad input)")
    stopped = {0: failure(0, 2, "", 10), 1: failure(1, -signal.SIGTERM, "", 11)}
    assert not attempts.restart(stopped)  # torchrun stopped rank 1 after rank 0's exit 2
    assert attempts.final(stopped) == 2
    capsys.readouterr()
    mixed = {0: failure(0, 2, "", 10), 1: failure(1, -signal.SIGKILL, "", 11)}
    assert attempts.restart(mixed)
    several = Attempts(tmp_path, "node-a", nodes=2, max_restarts=2)
    several.start()  # each node decides alone: one that stopped would strand the others
    assert several.restart(bad) and "attempt 1 of 3 failed" in capsys.readouterr().err


def test_launches_in_threads_each_consult_their_own_and_torch_gets_its_agent_back():
    """The agent class is torch's module global: launches overlapping in threads (launch()
    runs outside the main thread too) each ask their own, and the last to end puts torch's
    back, whatever order they end in."""
    import threading

    import torch.distributed.launcher.api as launcher_api

    from orch.launch.attempts import _RESTART, consulted_on_restarts

    torch_agent = launcher_api.LocalElasticAgent
    entered, first_ended, seen = threading.Event(), threading.Event(), []

    def other() -> None:  # a launch that starts during the first and outlives it
        with consulted_on_restarts(lambda f: False):
            entered.set()
            first_ended.wait(10)
            seen.append((launcher_api.LocalElasticAgent, _RESTART.get()({})))

    with consulted_on_restarts(lambda f: True):
        agent = launcher_api.LocalElasticAgent
        assert agent is not torch_agent and issubclass(agent, torch_agent)
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait(10)
        assert _RESTART.get()({}) is True  # this thread's own
    first_ended.set()
    thread.join()
    assert seen == [(agent, False)]  # still in place for the launch still running, its own
    assert launcher_api.LocalElasticAgent is torch_agent and _RESTART.get() is None


def test_a_repartition_is_no_failed_attempt(tmp_path: Path, capsys):
    """Workers that exit to re-partition the pipeline (a new record in the run directory) are
    run again by the launcher on the new split, not restarted by torchrun, spending nothing."""
    from orch.parallel.pipeline.rebalance import REBALANCE_EXIT, REBALANCE_FILE

    attempts = Attempts(tmp_path, "node-a", nodes=1, max_restarts=1)
    attempts.start()
    exits = {0: failure(0, REBALANCE_EXIT, "", 10), 1: failure(1, -signal.SIGTERM, "", 11)}
    assert not attempts.repartitioned(exits)  # no record: a worker's own exit 75
    (tmp_path / REBALANCE_FILE).write_text(json.dumps({"step": 4, "layers_after": [3, 1]}))
    assert attempts.repartitioned(exits)
    assert not attempts.restart(exits) and attempts.restarts_left == 1
    assert capsys.readouterr().err == ""
