"""Which implementation of an op runs: the Triton kernel or the plain-torch reference.

The kernel runs on CUDA tensors when triton imports; everything else (CPU tensors, no triton)
takes the reference, which is the specification and computes the same result. ``ORCH_KERNELS``
forces a choice: ``reference`` everywhere, or ``triton`` even on CPU (with
``TRITON_INTERPRET=1``, how the tests run the kernels here); any other value, ``triton``
without triton, or ``triton`` on the CPU without the interpreter, is an error (``orch launch``
says so before starting). A fallback on a CUDA tensor is logged once per op.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from orch.errors import Problem, ProblemsError

log = logging.getLogger("orch.kernels")


_triton: bool | None = None


def triton_available() -> bool:
    """Whether triton imports (asked once). A module global, not ``functools.cache``, which
    ``torch.compile`` warns of when it traces through a call (it reads the global instead)."""
    global _triton
    if _triton is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton = False
        else:
            _triton = True
    return _triton


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET``), read as Triton reads it: it
    takes ``true``, ``on``, ``yes`` and ``y`` (any case) as well as ``1``. Plain Python over the
    environment, not ``triton.knobs`` (a C function ``torch.compile`` cannot trace through, and
    ``use_triton`` runs inside compiled blocks)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


@functools.cache
def warn_once(op: str, reason: str, instead: str = "the plain-torch reference") -> None:
    """Log, once per op and reason, that ``op`` runs ``instead`` of its Triton kernel."""
    log.warning("orch.kernels.%s: using %s (%s)", op, instead, reason)


KERNEL_CHOICES = ("reference", "triton")
"""What ``ORCH_KERNELS`` may force; unset or empty lets each call choose."""


def kernel_choice_problem(*tensors: torch.Tensor) -> Problem | None:
    """What is wrong with ``ORCH_KERNELS``: a value that is not a choice (it was taken for
    unset, so ``Reference`` still ran the kernels on CUDA), ``triton`` where triton does not
    import (the reference ran without a word), or ``triton`` for tensors it cannot run: on
    the CPU Triton runs only in its interpreter (``TRITON_INTERPRET=1``), else it failed in
    the first step with "0 active drivers". ``tensors``: a call's; without (``orch launch``,
    ``orch doctor``), whether this machine has a CUDA device."""
    forced = os.environ.get("ORCH_KERNELS", "")
    if forced not in ("", *KERNEL_CHOICES):
        return Problem("ORCH_KERNELS", f"{forced!r} is not one of {', '.join(KERNEL_CHOICES)}",
                       "set ORCH_KERNELS=reference or triton, or unset it to let orch choose")
    if forced != "triton":
        return None
    if not triton_available():
        return Problem("ORCH_KERNELS", "'triton' forces the Triton kernels, but triton does "
                       "not import", "install triton, or unset ORCH_KERNELS")
    on_cpu = not all(t.is_cuda for t in tensors) if tensors else not torch.cuda.is_available()
    if on_cpu and not interpreting():
        where = "tensors on the CPU" if tensors else "no CUDA device on this machine"
        return Problem("ORCH_KERNELS", f"'triton' forces the Triton kernels, with {where}, "
                       "where Triton runs only in its interpreter (TRITON_INTERPRET is not set)",
                       "unset ORCH_KERNELS (the CPU runs the plain-torch reference kernels), "
                       "or set TRITON_INTERPRET=1 to run the kernels interpreted (slow: tests)")
    return None


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """True when ``op`` should run its Triton kernel on ``tensors``."""
    forced = os.environ.get("ORCH_KERNELS", "")
    if forced == "reference":
        return False
    if forced:
        if (problem := kernel_choice_problem(*tensors)) is not None:
            raise ProblemsError([problem], title="cannot choose a kernel")
        return True
    if not all(t.is_cuda for t in tensors):
        return False
    if not triton_available():
        warn_once(op, "triton is not installed")
        return False
    return True
