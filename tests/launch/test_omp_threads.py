"""The launcher sizes its workers' OpenMP threads to the cores this job may use (its CPU
affinity: Slurm's binding, a cpuset, taskset), not to the machine: threads that outnumber the
cores wait on each other's barriers (measured: 0.5-8.2 s a step instead of 0.15)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from launch_harness import REPO

from orch.launch.launcher import prepare, usable_cores


@pytest.fixture
def one_core() -> Iterator[None]:
    """This thread (and what it starts) limited to one core, as ``taskset -c 0`` would."""
    if os.cpu_count() == 1:
        pytest.skip("one core: nothing to narrow")
    saved_env, saved_cores = dict(os.environ), os.sched_getaffinity(0)
    os.environ.pop("OMP_NUM_THREADS", None)
    os.sched_setaffinity(0, {min(saved_cores)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved_cores)
        os.environ.clear()
        os.environ.update(saved_env)


def _prepare(nproc: str, run_dir, monkeypatch) -> str:
    """``orch launch --nproc-per-node NPROC configs/tiny.yaml`` up to starting the workers;
    the process count it settled on."""
    monkeypatch.chdir(REPO)
    args, _, _ = prepare(["--nproc-per-node", nproc, "configs/tiny.yaml", "--set",
                          f"run.dir={run_dir}"])
    return args.nproc_per_node


def test_threads_follow_the_affinity_not_the_machine(one_core, tmp_path, monkeypatch):
    assert usable_cores() == 1 < os.cpu_count()
    _prepare("1", tmp_path, monkeypatch)
    assert os.environ["OMP_NUM_THREADS"] == "1"  # os.cpu_count() // 1 before


def test_nproc_cpu_counts_the_usable_cores(one_core, tmp_path, monkeypatch):
    assert _prepare("cpu", tmp_path, monkeypatch) == "1"


def test_a_given_thread_count_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    _prepare("1", tmp_path, monkeypatch)
    assert os.environ["OMP_NUM_THREADS"] == "3"
