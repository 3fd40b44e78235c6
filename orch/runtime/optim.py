"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, set on the optimizer before each step, so resuming
needs no scheduler state and gives exactly the uninterrupted run's rates. A run extended to more
``train.steps`` has its decay stretched to the new end unless ``train.decay_steps`` keeps the old
one; the launcher says which (:func:`decay_change`). A resume may also change the schedule or
its floor where the steps trained keep their rates (:func:`after_peak_refusal`). Weight decay
applies to matrices only (linear and embedding weights), not to norm weights, as in Llama and
torchtitan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from orch.config.schema import AFTER_PEAK_FIELDS, COOLDOWN_FIELDS, Config, TrainConfig
from orch.errors import OrchError

if TYPE_CHECKING:
    from orch.runtime.checkpoint.manifest import Manifest


def decay_end(train: TrainConfig) -> int:
    """The step where the lr decay ends: ``train.decay_steps``, or ``train.steps`` (Megatron's
    ``--lr-decay-iters``, defaulting to ``--train-iters``)."""
    return train.decay_steps or train.steps


def cooldown_length(train: TrainConfig) -> int:
    """Steps of a ``wsd`` schedule's cooldown: ``train.cooldown_steps``, or a fifth of the steps
    between the warmup's end and the decay's (rounded up), the share Hägele et al. (2024) found
    to match a cosine schedule's final loss."""
    return train.cooldown_steps or math.ceil(max(0, decay_end(train) - train.warmup_steps) / 5)


def decay_start(train: TrainConfig) -> int:
    """The last step at the peak lr: the warmup's end, or where a ``wsd`` schedule's cooldown
    begins (the stable phase's end, never before the warmup's)."""
    if train.lr_schedule == "wsd":
        return max(train.warmup_steps, decay_end(train) - cooldown_length(train))
    return train.warmup_steps


DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1 - progress,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "sqrt": lambda progress: 1 - math.sqrt(progress),
}
"""The share of (peak - floor) left at a decay's ``progress`` from 0 to 1, by curve."""


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, the peak until
    :func:`decay_start`, the decay until :func:`decay_end`, then the floor."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    if step <= train.warmup_steps:
        return peak * step / max(1, train.warmup_steps)
    start = decay_start(train)
    if train.lr_schedule == "constant" or step <= start:
        return peak
    progress = min(1.0, (step - start) / max(1, decay_end(train) - start))
    shape = train.cooldown_shape if train.lr_schedule == "wsd" else train.lr_schedule
    return floor + (peak - floor) * DECAY_SHAPES[shape](progress)


def saved_decay_end(saved_train: dict[str, Any]) -> int:
    """:func:`decay_end` of a checkpoint's run, from its config's ``train`` section (one saved
    before ``decay_steps`` existed ended its decay at ``steps``); 0 where it says neither."""
    return int(saved_train.get("decay_steps") or saved_train.get("steps") or 0)


def saved_schedule(saved_train: dict[str, Any], train: TrainConfig) -> TrainConfig:
    """``train`` with the decay a checkpoint's run placed (``saved_train``, its config's
    ``train`` section): its end (:func:`saved_decay_end`, else ``train``'s), cooldown, schedule
    and floor (the fields a resume may change)."""
    defaults = TrainConfig()
    return dataclasses.replace(train, decay_steps=saved_decay_end(saved_train) or decay_end(train),
                               **{name: saved_train.get(name, getattr(defaults, name))
                                  for name in (*COOLDOWN_FIELDS, *AFTER_PEAK_FIELDS)})


def train_of(section: dict[str, Any]) -> TrainConfig:
    """A resolved config's ``train`` section (``config_to_dict``) as a TrainConfig, the fields it
    lacks at their defaults."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in section.items() if name in names})


def decay_change(saved_train: dict[str, Any], train: TrainConfig, step: int) -> str | None:
    """What a resume at checkpoint ``step`` does to the lr schedule where ``train`` gives the
    steps to come other rates than the checkpoint's run did (``saved_train``, its config's
    ``train`` section): it places the decay elsewhere, or, from weights still at the peak
    (:func:`after_peak_refusal`), changes the schedule or its floor; the rates change from the first
    step that differs, and the ``--set``s named keep the checkpoint's. None where none does
    (constant schedules, the same decay, or both decays over already)."""
    before = saved_decay_end(saved_train)
    if before == 0:
        return None
    old = saved_schedule(saved_train, train)
    kinds = (old.lr_schedule, train.lr_schedule)
    ends = (decay_end(old), decay_end(train))
    starts = (decay_start(old), decay_start(train))
    reshaped = kinds == ("wsd", "wsd") and old.cooldown_shape != train.cooldown_shape
    moved = starts[0] != starts[1] or ends[0] != ends[1] or reshaped
    refloored = "constant" not in kinds and old.min_lr_ratio != train.min_lr_ratio
    if kinds == ("constant", "constant") or (kinds[0] == kinds[1] and not (moved or refloored)):
        return None
    # both hold the peak until the earlier decay starts, and their floor (the peak, where
    # constant) after the later ends
    first = next((s for s in range(max(step, min(starts)) + 1, max(ends) + 2)
                  if lr_at(s, train) != lr_at(s, old)), None)
    if first is None:
        return None
    changed = []
    if kinds[0] != kinds[1]:
        changed.append(f"the lr schedule is {kinds[1]} where the checkpoint's run's was "
                       f"{kinds[0]} (train.lr_schedule)")
    elif kinds[1] == "wsd" and moved:
        changed.append(f"the lr cooldown ({train.cooldown_shape}) runs over "
                       f"{_steps(starts[1] + 1, ends[1])} where the checkpoint's run ran it "
                       f"({old.cooldown_shape}) over {_steps(starts[0] + 1, ends[0])} "
                       "(train.cooldown_steps and train.decay_steps, else train.steps)")
    elif moved:
        changed.append(f"the lr decay ends at step {ends[1]} where the checkpoint's run ended "
                       f"it at {ends[0]} (train.decay_steps, else train.steps)")
    if refloored:
        changed.append(f"the lr floor is {train.lr * train.min_lr_ratio:.3g} where the "
                       f"checkpoint's run's was {old.lr * old.min_lr_ratio:.3g} "
                       "(train.min_lr_ratio)")
    return (f"{', and '.join(changed)}: step {first}'s lr is {lr_at(first, train):.3g}, "
            f"{lr_at(first, old):.3g} on that schedule; {' '.join(_keeping(old, train, before))} "
            "keeps it")


def _keeping(old: TrainConfig, train: TrainConfig, before: int) -> list[str]:
    """The ``--set``s that give ``train`` the checkpoint's schedule ``old`` (whose decay ended
    at ``before``): the fields ``old``'s schedule reads where ``train``'s differ, and those it
    does not read back at their defaults, since the config refuses them set beside it (a
    cooldown beside any schedule but ``wsd``, a floor or decay end beside ``constant``):
    "--set train.lr_schedule=constant" alone, after a wsd cooldown was set, was refused."""
    unread = () if old.lr_schedule == "wsd" else COOLDOWN_FIELDS
    if old.lr_schedule == "constant":
        unread += ("min_lr_ratio", "decay_steps")
    defaults = TrainConfig()
    want: dict[str, Any] = {"decay_steps": before if decay_end(old) != decay_end(train)
                            else train.decay_steps}
    want |= {name: getattr(old, name) for name in (*AFTER_PEAK_FIELDS, *COOLDOWN_FIELDS)}
    want |= {name: getattr(defaults, name) for name in unread}
    return [f"--set train.{name}={value}" for name, value in want.items()
            if value != getattr(train, name)]


def after_peak_refusal(manifest: Manifest, train: TrainConfig) -> str | None:
    """Why a resume from checkpoint ``manifest`` under ``train`` may not change the schedule's
    ``AFTER_PEAK_FIELDS`` (lr_schedule, min_lr_ratio), with the fix; None where it may.

    It may where nothing trained changes: the checkpoint's weights trained at the warmup's
    rates and then at the peak lr (:func:`checkpoint_peak_until` None) and ``train`` holds the
    peak through their step, so every step trained had the lr ``train`` gives it: a constant
    run cooled down as ``wsd``, a ``wsd`` run's floor set in its stable phase (MiniCPM's and
    DeepSeek's way: the cooldown decided later). Steps trained below the peak were shaped by
    the saved fields, and a schedule below the peak before the checkpoint's step would jump
    down to rates no step before it had."""
    step, peak = manifest.step, checkpoint_peak_until(manifest, train)
    if peak is not None:
        earlier = (f", or resume a checkpoint of step {peak} or earlier into a new run.dir"
                   if peak else "")
        return (f"its weights trained below the peak lr from step {peak + 1}, at the rates the "
                f"saved train.lr_schedule and train.min_lr_ratio gave them: keep those{earlier}")
    start = decay_start(train)
    if train.lr_schedule == "constant" or start >= step:
        return None
    trained = f"its weights trained at the peak lr through step {step}"
    if train.lr_schedule == "wsd":
        return (f"{trained}, and the cooldown starts at step {start + 1}: hold the peak through "
                f"step {step} with {_cooldown_after(step, train)}")
    as_wsd = dataclasses.replace(train, lr_schedule="wsd", cooldown_steps=0)
    later = "" if decay_start(as_wsd) >= step else f" with {_cooldown_after(step, as_wsd)}"
    return (f"{trained}, and {train.lr_schedule} decays it from step {start + 1}: decay "
            f"after step {step} instead, as a wsd cooldown: --set "
            f"train.lr_schedule=wsd --set train.cooldown_shape={train.lr_schedule}{later}")


def _cooldown_after(step: int, train: TrainConfig) -> str:
    """The ``--set``s that start ``wsd`` schedule ``train``'s cooldown after ``step`` (past the
    warmup): a cooldown no longer than the steps left to the decay's end, or a later end (the
    default cooldown, a fifth of the steps after the warmup, leaves four fifths stable)."""
    end, warmup = decay_end(train), train.warmup_steps
    later = (step + train.cooldown_steps if train.cooldown_steps
             else warmup - (-5 * (step - warmup) // 4))
    shorter = [f"--set train.cooldown_steps={end - step} (or fewer)"] if end > step else []
    where = "decay_steps" if train.decay_steps else "steps"
    return " or ".join([*shorter, f"--set train.{where}={later} (or more)"])


def wsd_phases(train: TrainConfig) -> str:
    """A ``wsd`` schedule's phases in words, which a launch says under its first line (the
    cooldown's start is derived from ``train.cooldown_steps``, or a fifth of the steps after
    the warmup, so nothing else shows where it falls)."""
    start, end = decay_start(train), decay_end(train)
    warmup = (f"warmup over {_steps(1, train.warmup_steps)}, " if train.warmup_steps else "")
    return (f"lr wsd: {warmup}the peak {train.lr:.3g} until step {start}, then a "
            f"{train.cooldown_shape} cooldown over {_steps(start + 1, end)} to "
            f"{train.lr * train.min_lr_ratio:.3g}")


def peak_until(step: int, train: TrainConfig, resumed_at: int, before: int | None
               ) -> int | None:
    """The last step of a run's history still at the peak lr (warmup aside) for its
    checkpoint at ``step``, where it went below the peak after that; None where it never has.

    ``train``: the schedule this launch trains under, from step ``resumed_at`` on (0 for a fresh
    run); ``before``: the same for the checkpoint it resumed from (None: at the peak
    throughout). The launch trains below the peak after the later of its own
    :func:`decay_start` and ``resumed_at``: a resume that moved the cooldown earlier does not
    make the steps before it cooled ones, nor one that moved it later the steps it cooled
    already peak ones (a constant schedule never leaves the peak)."""
    ours = max(decay_start(train), resumed_at)
    cooled = ours if train.lr_schedule != "constant" and step > ours else None
    return min((s for s in (before, cooled) if s is not None), default=None)


def checkpoint_peak_until(manifest: Manifest, train: TrainConfig) -> int | None:
    """:func:`peak_until` of checkpoint ``manifest``: as its manifest records it, or, where it
    was saved before manifests did, by its own config's schedule (``train`` for the fields it
    lacks), as though it had trained under that schedule from the start."""
    if manifest.lr is not None:
        value = manifest.lr.get("peak_until")
        return value if isinstance(value, int) else None
    saved = saved_schedule(manifest.config.get("train") or {}, train)
    return peak_until(manifest.step, saved, 0, None)


def _steps(first: int, last: int) -> str:
    """Steps ``first`` to ``last`` in words: a cooldown of one step, or of none (the warmup
    reaching the decay's end), read "steps 30-30" and "steps 21-20" otherwise."""
    if first > last:
        return "no step"
    return f"step {first}" if first == last else f"steps {first}-{last}"


def build_optimizer(model: nn.Module, cfg: Config, precision: str | None = None
                    ) -> torch.optim.Optimizer:
    """AdamW (torch's; on offloaded runs the CPU kernel ``offload.cpu_adam`` picks), AdamW8bit
    (orch's 8-bit moments) or Muon (``orch.runtime.muon``, its iterations in the run's compute
    ``precision``, else ``train.precision``), decay on matrices only."""
    o = cfg.optimizer
    if o.name not in ("adamw", "adamw8bit", "muon"):
        raise OrchError(f"optimizer.name: {o.name!r} is not one of adamw, adamw8bit, muon; "
                        "fix: use one of them")
    if o.name == "muon":
        from orch.runtime.muon import Muon, muon_groups

        bf16 = (precision or cfg.train.precision) == "bf16"
        return Muon(muon_groups(model, o.weight_decay), lr=lr_at(1, cfg.train),
                    betas=(o.beta1, o.beta2), eps=o.eps, momentum=o.muon_momentum,
                    ns_steps=o.muon_ns_steps, ns_dtype=torch.bfloat16 if bf16 else torch.float32)
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
