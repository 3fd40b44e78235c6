"""Suite-wide setup. Without a GPU, Triton kernels run in interpreter mode (set before anything
imports triton), so the kernel tests compare kernels with their references on CPU."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``make test`` runs two pytest workers side by side (pytest-xdist), one per core of the CI
    # machine: each computes on one thread, and so do the launches it starts (orch launch keeps
    # an OMP_NUM_THREADS it is given), since OpenMP threads that outnumber the cores wait on
    # each other's barriers (measured: 0.5-8.2 s a step instead of 0.15; see
    # tests/launch/test_omp_threads.py).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str], list[int]]:
    """``count_calls(module, name)`` wraps ``module.name`` for the test and returns a list that
    grows by one per call: how often a kernel launcher ran (the launchers are looked up at call
    time, so every path to them is counted)."""

    def count(module: object, name: str) -> list[int]:
        calls: list[int] = []
        original = getattr(module, name)

        def counted(*args: object) -> object:
            calls.append(1)
            return original(*args)

        monkeypatch.setattr(module, name, counted)
        return calls

    return count


@pytest.fixture(autouse=True)
def _environment_restored():
    """``orch launch``'s checks (``prepare``) export what its workers inherit into this
    process's environment (the planned world, thread counts, a cluster node's settings): put
    back after each test, so that no later test's workers read another test's launch."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
