"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, set on the optimizer before each step, so resuming
needs no scheduler state and gives exactly the uninterrupted run's rates. Weight decay applies to
matrices only (linear and embedding weights), not to norm weights, as in Llama and torchtitan.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from orch.config.schema import Config, TrainConfig
from orch.errors import OrchError


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then the decay."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    if step <= train.warmup_steps:
        return peak * step / max(1, train.warmup_steps)
    if train.lr_schedule == "constant":
        return peak
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    progress = min(1.0, progress)
    if train.lr_schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW (torch's; on offloaded runs the CPU kernel ``offload.cpu_adam`` picks) or
    AdamW8bit (orch's 8-bit moments), decay on matrices only."""
    o = cfg.optimizer
    if o.name not in ("adamw", "adamw8bit"):
        raise OrchError(
            f"optimizer.name: {o.name!r} is not one of adamw, adamw8bit; fix: use one of them"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if o.name == "adamw8bit":
        from orch.kernels.adamw8bit import AdamW8bit

        return AdamW8bit(groups, lr=lr_at(1, cfg.train), betas=(o.beta1, o.beta2), eps=o.eps)
    if cfg.offload.optimizer != "device":  # the step runs on the CPU: its fastest kernel
        from orch.offload.cpu_adam import cpu_adamw

        return cpu_adamw(groups, lr_at(1, cfg.train), (o.beta1, o.beta2), o.eps,
                         cfg.offload.cpu_adam)
    return torch.optim.AdamW(
        groups, lr=lr_at(1, cfg.train), betas=(o.beta1, o.beta2), eps=o.eps, foreach=True
    )


IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
"""Param-group keys that say how the step runs, not what it computes."""


@contextmanager
def implementation_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Loading optimizer state replaces every param-group value with the saved one, including
    how the saving run stepped (``fused`` on an offloaded CPU run, ``foreach`` on a device
    run); keep this run's own choice, so a resume onto another plan steps as fast as a fresh
    run of that plan."""
    own = [{k: group[k] for k in IMPLEMENTATION_KEYS if k in group}
           for group in optimizer.param_groups]
    yield
    for group, keys in zip(optimizer.param_groups, own, strict=True):
        group.update(keys)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
