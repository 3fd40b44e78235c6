"""Every node's ``orch launch`` checks the shared run directory at about the same time (one
command per node, the same ``run.dir`` on a shared file system): the check must not trip over
the others' checks. With one test-file name for all, one launcher's unlink removed the file
another had just written; that node stopped on "run.dir ... is not writable (No such file or
directory)" and the other nodes waited for it in the rendezvous until the CI's timeout."""

from __future__ import annotations

import threading
from pathlib import Path

from orch.errors import Problem
from orch.launch.launcher import _check_run_dir


def test_checks_at_once_on_one_directory_all_pass_and_leave_nothing(tmp_path: Path):
    run_dir = tmp_path / "run"
    found: list[Problem] = []

    def check_again_and_again() -> None:
        for _ in range(300):
            found.extend(_check_run_dir(run_dir))

    checkers = [threading.Thread(target=check_again_and_again) for _ in range(8)]
    for checker in checkers:
        checker.start()
    for checker in checkers:
        checker.join()
    assert found == []  # before the fix: hundreds of 2,400 failed here
    assert list(run_dir.iterdir()) == []


def test_a_directory_that_cannot_be_made_is_named_with_the_reason(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    [problem] = _check_run_dir(blocker / "run")
    assert problem.where == "run.dir"
    assert problem.message == f"'{blocker / 'run'}' is not writable (Not a directory)"
    assert "--set run.dir=PATH" in problem.fix
