"""Every node's ``orch launch`` checks the shared run directory at about the same time (one
command per node, the same ``run.dir`` on a shared file system): the check must not trip over
the others' checks. With one test-file name for all, one launcher's unlink removed the file
another had just written; that node stopped on "run.dir ... is not writable (No such file or
directory)" and the other nodes waited for it in the rendezvous until the CI's timeout."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from orch.errors import Problem
from orch.launch.launcher import _check_run_dir


def test_checks_at_once_on_one_directory_all_pass_and_leave_nothing(tmp_path: Path):
    run_dir = tmp_path / "run"
    assert _check_run_dir(run_dir) == [] and not run_dir.exists()  # made only by a launch
    run_dir.mkdir()
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
    assert problem.message == f"'{blocker / 'run'}': '{blocker}' is a file"
    assert "--set run.dir=PATH" in problem.fix


def test_a_second_launch_into_a_run_directory_in_use_stops_before_starting(tmp_path: Path):
    """Two launches into one run directory on one node both ran, each superseding the other's
    checkpoints; the second now stops (exit 2) naming the first's process, and the directory
    is free again once the first has ended. Other nodes' locks are their own."""
    import os
    import socket

    from launch_harness import launch, overrides

    from orch.launch.run_lock import run_dir_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    node = f"{socket.gethostname()}-0"
    with run_dir_lock(run_dir, node):
        out = launch("--nproc-per-node", "1", "configs/tiny.yaml", *overrides(run_dir))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"run.dir: '{run_dir}' is in use by another orch launch on this node (pid " \
               f"{os.getpid()}, since" in out.stderr
        # two c10d launchers on one machine (every node at --node-rank 0) share a lock name
        assert "for another node of the same job on this machine (a c10d rendezvous has every " \
               "node at --node-rank 0), give each launcher its own ORCH_NODE=NAME" in \
               " ".join(out.stderr.split()), out.stderr
        assert not (run_dir / "config.yaml").exists()  # nothing of the second launch written
        with run_dir_lock(run_dir, "other-host-0"):  # another node of the same job
            pass
    with run_dir_lock(run_dir, node):  # released with its holder: free again
        pass


def test_a_plan_over_the_device_memory_is_said_at_launch():
    """The plan's "DOES NOT FIT" was shown by orch plan only; a launch started silently."""
    from orch.cli import build_parser
    from orch.config import load_config
    from orch.launch.launcher import memory_warning
    from orch.plan import build_plan

    cfg = load_config("configs/llama3-70b.yaml", ["parallel.dp_shard=1"])
    warning = memory_warning(build_plan(cfg, 1, 1, "h100-sxm-80gb"))
    assert warning is not None and "over the" in warning
    # the command it suggests is one orch plan takes (it named a --search that does not exist)
    command = warning[warning.index("(orch plan ") + 6:warning.index(" lists plans")]
    args = build_parser().parse_args(command.replace("CONFIG", "configs/llama3-70b.yaml").split())
    assert args.auto and args.world_size == 1
    assert memory_warning(build_plan(load_config("configs/tiny.yaml"), 1, 1, "cpu")) is None


def test_two_launches_claiming_one_cluster_node_share_its_lock():
    """With a cluster description a node's name fixes its ranks: two launches claiming node n0
    (whatever their --node-rank) both took its ranks and hung in the rendezvous; now they take
    the same lock, and the second stops. Without one, host and node rank tell nodes apart."""
    from types import SimpleNamespace

    from orch.config import Config
    from orch.launch.launcher import _lock_name

    def args(node_rank: int) -> SimpleNamespace:
        return SimpleNamespace(node_rank=node_rank, training_script_args=["--node-name", "n0"])

    clustered = Config()
    clustered.cluster = "configs/clusters/mixed-nic.yaml"
    assert _lock_name(args(0), clustered) == _lock_name(args(1), clustered) == "n0"
    assert _lock_name(args(0), Config()) != _lock_name(args(1), Config())


def test_a_run_directory_that_cannot_be_locked_is_warned_about_or_refused(tmp_path, monkeypatch,
                                                                           capsys):
    """Only a lock held by another launch was handled; any other flock or open error was a
    traceback. A file system without flock (ENOLCK, ENOSYS, EOPNOTSUPP) now warns once and goes
    on unlocked; a lock file that cannot be opened (a directory in its place) or another lock
    error stops the launch naming the path and the fix."""
    import errno
    import fcntl

    import orch.errors
    from orch.errors import PlanError
    from orch.launch import run_lock
    from orch.launch.run_lock import run_dir_lock

    monkeypatch.setattr(orch.errors, "_warned", set())
    (tmp_path / ".orch-launch-dir-0.lock").mkdir()
    with pytest.raises(PlanError) as refused:
        with run_dir_lock(tmp_path, "dir-0"):
            pytest.fail("ran without its lock file")
    (problem,) = refused.value.problems
    assert problem.message.startswith(
        f"cannot open the launch lock file '{tmp_path}/.orch-launch-dir-0.lock': Is a directory")
    assert f"remove what is at {tmp_path}/.orch-launch-dir-0.lock" in problem.fix

    def cannot(code: int):
        def flock(fd: int, op: int) -> None:
            raise OSError(code, os.strerror(code))
        return flock

    ran = []
    for code in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
        monkeypatch.setattr(fcntl, "flock", cannot(code))
        with run_dir_lock(tmp_path, "n-0"):
            ran.append(code)
    assert len(ran) == 3
    err = capsys.readouterr().err
    assert err.count(f"orch: warning: the run directory {tmp_path} cannot be locked") == 3
    assert "does not support flock: No locks available" in err
    monkeypatch.setattr(fcntl, "flock", cannot(errno.EIO))
    with pytest.raises(PlanError, match=r"cannot lock '.*\.orch-launch-n-0\.lock': Input/output"):
        with run_dir_lock(tmp_path, "n-0"):
            pytest.fail("ran unlocked after an I/O error")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nfs:/x {tmp_path} nfs4 rw 0 0\n")
    assert run_lock._file_system(tmp_path / "sub", mounts) == "nfs4"
