"""What ``AdamW8bit.load_state_dict`` refuses, and what it says about it.

A state dict loads when every parameter's saved states have the keys, shapes and dtypes this
optimizer keeps for it (``step`` aside, which may be a number). Where they do not, the message
lists every parameter that differs and, where the differences say where the state dict came
from, names it with its fix: torch's AdamW (fp32 moments where this optimizer keeps 8-bit
ones), or AdamW8bit with another ``min_8bit_size`` (recorded in state dicts saved since, and
otherwise told from which parameters have 8-bit states).

Loading also repairs states saved before a positive second moment was always stored as at
least the unsigned map's smallest nonzero code (:func:`repair_orphaned_second_moments_`).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from orch.kernels.adamw8bit.quant import zero_code

FP32_KEYS = ("exp_avg", "exp_avg_sq")
QUANTIZED_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


@dataclass(frozen=True)
class Wanted:
    """What an optimizer keeps for one parameter, ``step`` aside."""

    shape: tuple[int, ...]
    """The parameter's (global) shape."""
    states: dict[str, tuple[int, ...]]
    """The (global) shape of each state tensor."""
    eligible: bool
    """Whether a small enough ``min_8bit_size`` keeps its moments in 8 bits (two or more dims,
    rows wide enough): then fp32 moments in a state dict tell its ``min_8bit_size``."""

    @property
    def eight_bit(self) -> bool:
        return "exp_avg_absmax" in self.states

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()


def check_loadable(state_dict: Mapping[str, Any], wanted: list[Wanted],
                   min_8bit_size: int) -> None:
    """Raise ValueError naming every parameter whose states in ``state_dict`` differ from
    ``wanted`` (in parameter order; as many as the state dict has), with what the state dict
    looks like and the fix."""
    groups = state_dict["param_groups"]
    saved = [state_dict["state"].get(i, {}) for g in groups for i in g["params"]]
    recorded = state_dict.get("min_8bit_size")  # None in one saved before it was recorded
    torch_groups = any("amsgrad" in g for g in groups)  # torch's Adam and AdamW have it
    layouts = [_other_layout(state, want) for state, want in zip(saved, wanted, strict=True)]
    shapes = [_shape_problem(i, state, want) for i, (state, want) in
              enumerate(zip(saved, wanted, strict=True))]
    dtypes = [p for i, (state, want, shape) in enumerate(zip(saved, wanted, shapes, strict=True))
              if not shape for p in _dtype_problems(i, state, want)]
    steps = [f"parameter {i}: step={state['step']!r} is not a number" for i, state in
             enumerate(saved) if "step" in state and not _is_step(state["step"])]
    problems = [p for p in shapes if p] + dtypes + steps
    if not problems:
        return
    fixes = []
    if any(shapes):
        layout_only = all(layout for layout, shape in zip(layouts, shapes, strict=True) if shape)
        fix = (_layout_fix(saved, wanted, min_8bit_size, recorded, torch_groups)
               if layout_only else None)
        fixes.append(fix or "fix: load it into an AdamW8bit over the parameters that saved it, "
                            "in the same order and param groups")
    if dtypes:
        fixes.append("fix: load the state dict as AdamW8bit.state_dict() gave it: its codes are "
                     "uint8 and the rest floating point (a cast of every tensor, as .float() "
                     "does, breaks the codes)")
    if steps:
        fixes.append("fix: give each state's step as a number or a one-element tensor")
    raise ValueError("AdamW8bit.load_state_dict: states these parameters cannot take:\n  "
                     + "\n  ".join(problems + fixes))


REPAIR_CHUNK = 1 << 22
"""Elements per pass of :func:`repair_orphaned_second_moments_`: its masks stay a few MiB
however large the tensor (a loaded state may fill most of a GPU)."""


def repair_orphaned_second_moments_(state: Mapping[str, Any]) -> None:
    """Give every second-moment code 0 that sits beside a nonzero first-moment code the unsigned
    map's smallest nonzero code, in place (on the local shard of a DTensor).

    Before the quantizer rounded every positive ``v`` up (``quant.midpoints``), an element whose
    gradient was under ~4e-4 of its block's largest had ``v`` stored as code 0 and ``m`` as a
    nonzero code; such a state, loaded into this version, still moved that element by
    ``lr * m / eps`` on a step with a zero gradient. A nonzero ``m`` comes from a nonzero
    gradient, so ``v`` was positive and its code 0 stands for a value under the first midpoint,
    which today's quantizer stores as the smallest code: the repair gives what a save from this
    version would hold. Done once, at load, rather than in every step: it costs one pass over
    the codes, and the step kernels (reference and Triton, bit-identical) stay as they are.

    A no-op on fp32 states and on stand-ins that hold no bytes (an offloaded run's loader reads
    those states later, a unit at a time, and repairs them then)."""
    if not all(isinstance(state.get(key), torch.Tensor) for key in QUANTIZED_KEYS):
        return
    q1, q2 = (_local(state[key]) for key in ("exp_avg", "exp_avg_sq"))
    if q1.numel() == 0 or any(q.untyped_storage().size() == 0 for q in (q1, q2)):
        return
    signed_zero, smallest = zero_code(True), zero_code(False) + 1  # the map's 0 is code 0
    per_chunk = max(1, REPAIR_CHUNK // max(1, q1.shape[1:].numel()))
    for r0 in range(0, q1.shape[0], per_chunk):  # row slices: views, so the fill is in place
        m, v = q1[r0:r0 + per_chunk], q2[r0:r0 + per_chunk]
        orphaned = (v == 0) & (m != signed_zero)
        v.masked_fill_(orphaned, smallest)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shape_problem(index: int, state: Mapping[str, Any], want: Wanted) -> str | None:
    """The shapes ``state`` has, where they are not ``want``'s: a parameter of another shape with
    as many elements took them without an error and stepped on misaligned blocks (torch's AdamW
    raises)."""
    tensors = {k: v for k, v in state.items() if k != "step"}
    if not tensors:
        return None
    # (an offloaded run's loader passes stand-ins for states it reads a unit at a time)
    got = {k: tuple(v.shape) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    whole = len(got) == len(tensors)
    if any(want.states.get(k) != shape for k, shape in got.items()) or (
            whole and got.keys() != want.states.keys()):
        return (f"parameter {index} (shape {want.shape}) needs {want.states}, the state dict "
                f"has {got}")
    return None


def _other_layout(state: Mapping[str, Any], want: Wanted) -> bool:
    """Whether ``state`` is the other kind of state for the same parameter: fp32 moments where
    8-bit ones are wanted, or the reverse (what another ``min_8bit_size`` gives)."""
    keys = set(state) - {"step"}
    moments = state.get("exp_avg")
    same_shape = isinstance(moments, torch.Tensor) and tuple(moments.shape) == want.shape
    other = set(FP32_KEYS) if want.eight_bit else set(QUANTIZED_KEYS)
    return same_shape and keys == other


def _dtype_problems(index: int, state: Mapping[str, Any], want: Wanted) -> list[str]:
    """Codes that are not uint8 (a float copy of them loaded, and the step then failed on a
    size mismatch), and other states that are not floating point."""
    problems = []
    for key, value in state.items():
        if key == "step" or not isinstance(value, torch.Tensor):
            continue
        if want.eight_bit and key in FP32_KEYS:
            if value.dtype != torch.uint8:
                problems.append(f"parameter {index}: {key} is {value.dtype}, needs torch.uint8 "
                                "(8-bit codes)")
        elif not value.dtype.is_floating_point:
            problems.append(f"parameter {index}: {key} is {value.dtype}, needs a floating-point "
                            "dtype (loaded as torch.float32)")
    return problems


def _is_step(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _layout_fix(saved: list[Mapping[str, Any]], wanted: list[Wanted], min_8bit_size: int,
                recorded: object, torch_groups: bool) -> str | None:
    """Where the state dict came from and what to do, when its states differ from this
    optimizer's only in which parameters have 8-bit moments; None where no ``min_8bit_size``
    gives its states (another optimizer's parameters)."""
    eight = [w.numel for s, w in zip(saved, wanted, strict=True) if "exp_avg_absmax" in s]
    full = [w.numel for s, w in zip(saved, wanted, strict=True)
            if w.eligible and "exp_avg" in s and "exp_avg_absmax" not in s]
    if recorded == min_8bit_size:
        return None
    if isinstance(recorded, int):
        return (f"the state dict was saved by AdamW8bit(min_8bit_size={recorded}), which keeps "
                f"8-bit moments for other parameters than min_8bit_size={min_8bit_size}\n  fix: "
                f"construct this AdamW8bit with min_8bit_size={recorded} to load it")
    if not eight:
        if torch_groups:
            return ("the state dict is torch.optim.AdamW's (fp32 exp_avg and exp_avg_sq), where "
                    "this optimizer keeps 8-bit moments\n  fix: load it into torch.optim.AdamW "
                    "(optimizer.name: adamw), or start this AdamW8bit afresh without it (or, "
                    "keeping those moments in fp32 for good, construct it with "
                    f"min_8bit_size={max(full) + 1})")
        return ("the state dict keeps fp32 moments where this optimizer keeps 8-bit ones: an "
                f"AdamW8bit's with a min_8bit_size over {max(full)}, or torch.optim.AdamW's\n  "
                f"fix: if AdamW8bit saved it, construct this one with min_8bit_size="
                f"{max(full) + 1}; if torch.optim.AdamW did, load it into that, or start this "
                "AdamW8bit afresh without it")
    low, high = max(full, default=-1) + 1, min(eight)
    if low > high:
        return None
    between = f"from {low} to {high}" if full else f"of at most {high}"
    return (f"the state dict looks saved by AdamW8bit with a min_8bit_size {between}, not "
            f"{min_8bit_size}\n  fix: construct this AdamW8bit with min_8bit_size={high} to "
            "load it")
