"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, set on the optimizer before each step, so resuming
needs no scheduler state and gives exactly the uninterrupted run's rates. A run extended to more
``train.steps`` has its decay stretched to the new end unless ``train.decay_steps`` keeps the old
one; the launcher says which (:func:`decay_change`). Weight decay applies to
matrices only (linear and embedding weights), not to norm weights, as in Llama and torchtitan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from orch.config.schema import Config, TrainConfig
from orch.errors import OrchError


def decay_end(train: TrainConfig) -> int:
    """The step where the lr decay ends: ``train.decay_steps``, or ``train.steps`` (Megatron's
    ``--lr-decay-iters``, defaulting to ``--train-iters``)."""
    return train.decay_steps or train.steps


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then the decay until
    :func:`decay_end`, then the floor."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    if step <= train.warmup_steps:
        return peak * step / max(1, train.warmup_steps)
    if train.lr_schedule == "constant":
        return peak
    progress = (step - train.warmup_steps) / max(1, decay_end(train) - train.warmup_steps)
    progress = min(1.0, progress)
    if train.lr_schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def saved_decay_end(saved_train: dict[str, Any]) -> int:
    """:func:`decay_end` of a checkpoint's run, from its config's ``train`` section (one saved
    before ``decay_steps`` existed ended its decay at ``steps``); 0 where it says neither."""
    return int(saved_train.get("decay_steps") or saved_train.get("steps") or 0)


def decay_change(saved_train: dict[str, Any], train: TrainConfig, step: int) -> str | None:
    """What a resume at checkpoint ``step`` does to the lr schedule where ``train`` ends the
    decay elsewhere than the checkpoint's run did (``saved_train``, its config's ``train``
    section: the other schedule fields are the same, or the resume is refused): the rates of
    the steps to come change, the next one's included. None where they do not (a constant
    schedule, the same end, or both ends reached already)."""
    before = saved_decay_end(saved_train)
    now = decay_end(train)
    if train.lr_schedule == "constant" or before in (0, now) or step >= max(before, now):
        return None
    old = dataclasses.replace(train, decay_steps=before)
    first = max(step, train.warmup_steps) + 1  # the warmup is the same on both
    return (f"the lr decay ends at step {now} where the checkpoint's run ended it at {before} "
            f"(train.decay_steps, else train.steps): step {first}'s lr is "
            f"{lr_at(first, train):.3g}, {lr_at(first, old):.3g} on that schedule; "
            f"--set train.decay_steps={before} keeps it")


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
    # torch's own choice of implementation (foreach=None): the multi-tensor step on a GPU, one
    # tensor at a time on the CPU, bit for bit the same update. Forcing foreach on the CPU cost
    # twice the time per step (tiny model: 15 ms against 7) and, on DTensor parameters, seconds of
    # sharding propagation for the foreach ops' many-tensor schemas in the first step (tp2 x
    # FSDP2 on 4 CPU processes: 7.4 s against 3.3 s)
    return torch.optim.AdamW(groups, lr=lr_at(1, cfg.train), betas=(o.beta1, o.beta2), eps=o.eps)


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
