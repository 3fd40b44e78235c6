"""The AdamW that steps offloaded parameters on the CPU (``offload.cpu_adam``).

Measured on the 2-core CI machine, one step over 100M fp32 parameters
(``benchmarks/offload_io.py``): torch's foreach AdamW 405 ms, torch's fused AdamW 74 ms,
DeepSpeed's CPU Adam 53 ms; in a later run 92 and 104 ms the other way round (the machine is
shared). So ``auto`` times both on 4M parameters when the optimizer is built and takes the
faster (DeepSpeed's needs its op, which ``make setup`` builds once), and says what it measured.

DeepSpeed's own ``DeepSpeedCPUAdam`` keeps ``state["step"]`` as a Python int, which torch's
AdamW cannot load (its step counts are tensors) and a weights-only checkpoint cannot hold as a
tensor. :class:`DeepSpeedAdamW` calls the same kernel on torch AdamW's state layout (``step`` a
float tensor, ``exp_avg``, ``exp_avg_sq``), so a checkpoint moves freely between offloaded and
device-resident runs.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

_ids = itertools.count(10_000)  # DeepSpeed's own optimizers count from 0


def use_venv_extension_cache() -> None:
    """Build and load DeepSpeed's ops under the environment (``.venv/torch_extensions``), where
    ``make setup`` built them and ``make clean`` removes them."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


@contextmanager
def stderr_with_descriptor() -> Iterator[None]:
    """``sys.stderr`` with a file descriptor for the block, for DeepSpeed's op builders: they
    silence their compile check (libaio's, for the async I/O op; run again by ``load``) by
    redirecting stderr's descriptor, and where ``sys.stderr`` has none (a notebook, pytest's
    ``capsys``) the check fails as if the library were missing. The real stderr stands in."""
    stderr = sys.stderr
    try:
        stderr.fileno()
    except (AttributeError, OSError, ValueError):
        sys.stderr = sys.__stderr__ or stderr
    try:
        yield
    finally:
        sys.stderr = stderr


def load_cpu_adam() -> Any:
    """DeepSpeed's CPU Adam op, built on first use (a minute or two) and cached."""
    use_venv_extension_cache()
    from deepspeed.ops.op_builder import CPUAdamBuilder

    with stderr_with_descriptor():
        return CPUAdamBuilder().load(verbose=False)


class DeepSpeedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) by DeepSpeed's CPU Adam kernel, with
    torch AdamW's state layout (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float = 0.0) -> None:
        # Every key of torch AdamW's groups (amsgrad, maximize, ...): a checkpoint's optimizer
        # state lists each group key per parameter, so both must have the same keys to move
        # between offloaded and device-resident runs (or between the two CPU kernels).
        defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
        super().__init__(params, {**defaults, "lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self._op = load_cpu_adam()
        self._id = next(_ids)
        self._op.create_adam(self._id, lr, betas[0], betas[1], eps, weight_decay, True, False)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                self._op.adam_update(self._id, int(state["step"].item()), group["lr"], beta1,
                                     beta2, group["eps"], group["weight_decay"], True, p.data,
                                     p.grad, state["exp_avg"], state["exp_avg_sq"])


def _torch_fused(groups: list[dict], lr: float, betas: tuple[float, float],
                 eps: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


KERNELS = {"deepspeed": DeepSpeedAdamW, "torch": _torch_fused}


def _seconds_per_step(make: Any, numel: int = 1 << 22, repeats: int = 3) -> float:
    """Fastest of ``repeats`` steps over ``numel`` parameters (after one that allocates)."""
    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = torch.full_like(param, 1e-3)
    optimizer = make([{"params": [param], "weight_decay": 0.0}], 1e-4, (0.9, 0.95), 1e-8)
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
              impl: str) -> torch.optim.Optimizer:
    """The CPU AdamW ``impl`` names: ``deepspeed``, ``torch`` (fused), or ``auto``: whichever
    steps 4M parameters faster here and now (they trade places on a busy machine), said once;
    data-parallel replicas all take rank 0's choice, so they stay equal."""
    if impl == "auto":
        times = {}
        for name, make in KERNELS.items():
            try:
                times[name] = _seconds_per_step(make)
            except Exception as exc:  # no compiler, no deepspeed: the other one
                print(f"orch: CPU AdamW: {name} unavailable ({exc})", file=sys.stderr)
        impl = min(times, key=times.__getitem__)
        replicas = dist.is_initialized() and dist.get_world_size() > 1
        if replicas:  # data-parallel replicas step alike: rank 0's choice
            choice = [impl]
            dist.broadcast_object_list(choice, src=0)
            impl = choice[0]
        if not replicas or dist.get_rank() == 0:
            print("orch: CPU AdamW: " + ", ".join(
                f"{name} {seconds * 25e3:.0f} ms per 100M parameters" for name, seconds in
                sorted(times.items(), key=lambda item: item[1])) + f": {impl}", flush=True)
    try:
        return KERNELS[impl](groups, lr, betas, eps)
    except Exception as exc:
        raise RuntimeError(f"offload.cpu_adam: {impl} is unavailable ({exc}); use auto") from exc


__all__ = ["DeepSpeedAdamW", "cpu_adamw", "load_cpu_adam", "stderr_with_descriptor",
           "use_venv_extension_cache"]
