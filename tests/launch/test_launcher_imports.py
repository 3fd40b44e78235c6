"""``orch launch`` starts workers sooner when its own process imports only what it uses."""

from __future__ import annotations

import subprocess
import sys

from launch_harness import REPO


def test_the_launcher_does_not_import_dtensor_or_sympy():
    """The launcher validates, plans and runs torchrun's agent: DTensor (and sympy under it)
    came in with the NVMe tier's module for its scratch-file sweep, about half a second of
    every launch on 2 cores before any worker started (the workers import them anyway)."""
    code = ("import sys, orch.cli, orch.launch.launcher; "
            "print(sorted(m for m in ('torch.distributed.tensor', 'sympy', 'orch.models') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stdout.splitlines()[-1] == "[]"


def test_the_orch_command_skips_the_interpreter_teardown_after_its_exit_handlers():
    """``orch`` ends with ``os._exit`` after running the atexit handlers and flushing its output:
    Python's teardown with torch imported took 0.5-1.5 s of every ``orch launch`` after its
    workers had finished. A module-level object's finalizer (teardown) must not run; an atexit
    handler must, and the command's output and exit code must be whole."""
    code = ("import atexit, sys; from orch.cli import entry\n"
            "class Teardown:\n"
            "    def __del__(self): print('teardown ran', flush=True)\n"
            "kept = Teardown()\n"
            "atexit.register(lambda: print('atexit ran', flush=True))\n"
            "sys.argv = ['orch', 'ckpt', 'inspect', 'no-such-dir']\n"
            "entry()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 2 and "no-such-dir" in done.stderr
    assert "atexit ran" in done.stdout and "teardown ran" not in done.stdout


def test_the_orch_command_waits_for_its_threads_as_python_does():
    """A thread the interpreter would wait for (non-daemon) still running when the command is
    done: the normal exit, which finishes it, not ``os._exit``, which would cut it off."""
    code = ("import sys, threading, time; from orch.cli import entry\n"
            "def late(): time.sleep(2); print('thread finished', flush=True)\n"
            "threading.Thread(target=late).start()\n"
            "sys.argv = ['orch', 'plan', 'configs/tiny.yaml', '--world-size', '2']\n"
            "entry()\n")  # about 0.3 s: no torch
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0 and "plan for tiny" in done.stdout
    assert done.stdout.rstrip().endswith("thread finished")


def test_the_orch_command_started_with_stdout_closed_exits_as_before():
    """``orch plan ... >&-``: Python sets ``sys.stdout`` to None; the command's result is its
    exit code (0), not a traceback from flushing a stream that is not there."""
    code = ("import os, sys; os.close(1)\n"
            "os.execv(sys.executable, [sys.executable, '-c', 'import sys; from orch.cli import "
            "entry; sys.argv = [\\'orch\\', \\'plan\\', \\'configs/tiny.yaml\\', "
            "\\'--world-size\\', \\'2\\', \\'--json\\']; entry()'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
