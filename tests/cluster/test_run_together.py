"""``run_together`` (the nodes of one job started at once): every command's exit code and
output, and a hung one stopped at the deadline with what it had said, not a bare timeout."""

from __future__ import annotations

from pathlib import Path

from orch.cluster.netbed import run_together


def test_each_command_gets_its_code_and_output_and_a_hung_one_is_stopped(tmp_path: Path):
    done = run_together({
        "quick": ["sh", "-c", "echo fine; echo complaint >&2; exit 3"],
        "hung": ["sh", "-c", "echo waiting; exec sleep 60"],
    }, tmp_path, timeout=2)
    assert done["quick"] == (3, "fine\ncomplaint\n")
    assert done["hung"] == (None, "waiting\n")


def test_commands_run_at_once_in_the_given_directory(tmp_path: Path):
    # Each waits for the other's file: run one after the other, neither would finish.
    done = run_together({
        "a": ["sh", "-c", "touch a; while [ ! -e b ]; do sleep 0.05; done; pwd -P"],
        "b": ["sh", "-c", "touch b; while [ ! -e a ]; do sleep 0.05; done"],
    }, tmp_path, timeout=20)
    assert done == {"a": (0, f"{tmp_path.resolve()}\n"), "b": (0, "")}
