"""``AdamW8bit``: AdamW with both moments stored in 8 bits (block-wise dynamic quantization).

State per parameter (``optimizer.state[p]``), the same on the CPU and GPU paths:

- ``step``: fp32 scalar tensor on the CPU (as torch's AdamW keeps it);
- tensors of two or more dimensions with at least ``min_8bit_size`` elements and rows of at
  least ``MIN_ROW`` (counted on the whole, unsharded parameter; a narrower row's absmax per
  block would cost more than the codes save): ``exp_avg`` and ``exp_avg_sq``, uint8 codes
  shaped like the parameter (signed and unsigned dynamic map), and ``exp_avg_absmax`` and
  ``exp_avg_sq_absmax``, fp32 ``[rows, ceil(rest / 256)]``, one per 256-element block of a
  row (see ``quant``);
- every other tensor (small ones, and 1-D ones such as norm gains and biases, which have no rows
  to align blocks with): fp32 ``exp_avg`` and ``exp_avg_sq`` shaped like the parameter, whatever
  its dtype (in bf16, ``v *= 0.999`` rounds back to ``v``: the second moment would never decay).

Complex parameters are refused (the 8-bit path would drop their imaginary part).

``state_dict()`` adds ``min_8bit_size`` to torch's (at the top level, which DCP leaves out), so
that loading it into an optimizer with another one says so; ``load_state_dict`` refuses states of
other shapes or dtypes before taking any (``loading``).

A sharded (DTensor) parameter is updated through its local shard, so each rank quantizes its
own part; its states are DTensors on the parameter's mesh (codes with its placements, absmax
with the same sharding of rows), so ``torch.distributed.checkpoint`` saves every rank's shard
and can load them onto another number of ranks. Since blocks never cross rows, a dim-0 shard
(FSDP2's) holds exactly the blocks of the unsharded tensor: sharded and single-process runs
quantize the same blocks. A parameter sharded on a later dim (tensor parallel's row-parallel
weights) has blocks within each rank's slice of a row; see ``_absmax_layout``.

Which path updates a tensor is ``orch.kernels.dispatch.use_triton("adamw8bit", p, grad)``: the
fused Triton kernel on CUDA, the chunked plain-torch reference otherwise.

The unsigned map's smallest nonzero code is 3.25e-7 of the block's absmax, and a positive second
moment is stored as at least that (``quant.midpoints``), so an element whose gradient stays more
than ~1,750x below the largest in its block (``1 / sqrt(3.25e-7)``) keeps a second moment too
large and steps less than AdamW would. Rounded to the nearest code, as in the paper's method,
that second moment was 0 beside a nonzero first moment: any element whose gradient was under
~4e-4 of its block's largest (below the first midpoint, 1.6e-7) then moved by
``lr * m / eps`` on a step with a zero gradient (an MoE expert that got no tokens, an embedding
row of an absent token, ``zero_grad(set_to_none=False)``). States saved that way are repaired
as they load (``loading.repair_orphaned_second_moments_``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from orch.errors import OrchError, ProblemsError
from orch.kernels.adamw8bit.loading import (
    QUANTIZED_KEYS,
    Wanted,
    check_loadable,
    repair_orphaned_second_moments_,
)
from orch.kernels.adamw8bit.quant import blocks_per_row, zero_code
from orch.kernels.adamw8bit.reference import Hyper, ScratchPool, step_8bit_, step_fp32_
from orch.kernels.dispatch import kernel_choice_problem, use_triton

MIN_ROW = 16
"""Fewest elements per row (after the first dim) for 8-bit moments. Each moment keeps a byte
per element and an fp32 absmax per block of a row, so rows of ``w < 256`` elements cost
``2 + 8 / w`` bytes per element: at most 2.5 here, where a (8192, 1) tensor took 10, more than
AdamW's 8."""


def _check_hyperparameters(group: dict[str, Any], owner: str, read_tensors: bool = True) -> None:
    """Refuse what would turn parameters to NaN or fail mid-step, naming each value: ``lr``,
    ``eps`` and ``weight_decay`` finite and at least 0 (NaN fails every comparison, so it
    passed ``< 0`` checks), ``betas`` two values in [0, 1) (1 divided by zero in the bias
    correction). Any real number counts (numpy's too), and a one-element tensor as its number
    (torch's optimizers take a tensor ``lr``) where ``read_tensors``: ``step`` leaves tensors
    to the checks when the group was added or loaded, since reading a CUDA one waits for the
    device."""
    def within(value: object, high: float) -> bool:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            if not read_tensors:
                return True
            value = value.item()
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and 0 <= float(value) < high)

    problems = [f"{key}={group.get(key)!r} is not a finite number >= 0"
                for key in ("lr", "eps", "weight_decay") if not within(group.get(key), math.inf)]
    betas = group.get("betas")
    pair = _pair(betas)
    if not (pair is not None and all(within(b, 1.0) for b in pair)):
        problems.append(f"betas={betas!r} is not two numbers in [0, 1)")
    if problems:
        raise ValueError(f"{owner}: {'; '.join(problems)}")


def _check_min_8bit_size(value: object) -> None:
    """Refuse a ``min_8bit_size`` that is not an int >= 0: ``'big'`` was taken and
    failed in the first step on a comparison with an int, and ``-5`` was taken as 0."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"AdamW8bit: min_8bit_size={value!r} is not an int >= 0 (the fewest "
                         "elements a tensor needs for 8-bit moments); fix: give a count of "
                         "elements as an int, such as the default 4096")


def _pair(value: object) -> tuple[Any, Any] | None:
    """``value``'s two items, where it is a sequence of two (a tuple, a list, a numpy array or
    tensor of two, as torch's AdamW takes them), else None (a string or mapping is not)."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        return None
    items = tuple(value)
    return (items[0], items[1]) if len(items) == 2 else None


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with 8-bit block-wise moments.

    Parameters are updated in fp32 (a lower-precision parameter is updated through an fp32
    copy of each chunk). ``min_8bit_size``: tensors with fewer elements keep fp32 moments.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
    ) -> None:
        defaults = {"lr": lr, "betas": _pair(betas) or betas, "eps": eps,
                    "weight_decay": weight_decay}  # a pair read once (an iterator's items go)
        _check_hyperparameters(defaults, "AdamW8bit")
        _check_min_8bit_size(min_8bit_size)
        super().__init__(params, defaults)
        self.min_8bit_size = int(min_8bit_size)
        self._scratch = ScratchPool()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then the group's hyperparameters (with the defaults it took) checked: a
        group's NaN ``lr`` turned its parameters to NaN without a word, and ``betas`` of one
        value failed only in the first step, on an unpacking error."""
        super().add_param_group(param_group)
        try:
            _check_hyperparameters(self.param_groups[-1],
                                   f"AdamW8bit param group {len(self.param_groups) - 1}")
        except ValueError:
            self.param_groups.pop()
            raise

    def quantized(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are (or will be) stored in 8 bits."""
        return _eligible(p) and p.numel() >= self.min_8bit_size

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every group checked before any is updated (a refused step changes nothing): its
        # hyperparameters again (a scheduler or the caller may have set them since), and what
        # it cannot step
        for index, group in enumerate(self.param_groups):
            _check_hyperparameters(group, f"AdamW8bit param group {index}", read_tensors=False)
            for p in group["params"]:
                if p.grad is not None:
                    self._check_steppable(p, p.grad)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                h = Hyper.at(int(state["step"].item()) + 1, float(group["lr"]), float(beta1),
                             float(beta2), float(group["eps"]), float(group["weight_decay"]))
                self._update(p, state, h)
                state["step"] += 1  # after the update: a step that failed did not count
        return loss

    def _check_steppable(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Refuse what ``step`` cannot do for ``p`` before it updates anything: a sparse
        gradient, a complex parameter, and a kernel choice (``ORCH_KERNELS``) that cannot run
        ``p``'s 8-bit update, which ``use_triton`` raised in the middle of the step, after the
        parameters before ``p`` had moved and ``p``'s step count had advanced."""
        if grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        if p.is_complex():
            raise ValueError(f"AdamW8bit does not support complex parameters (one of shape "
                             f"{tuple(p.shape)}, {p.dtype}); use torch.optim.AdamW for them")
        state = self.state.get(p)
        eight_bit = "exp_avg_absmax" in state if state else self.quantized(p)
        if eight_bit and (problem := kernel_choice_problem(_local(p), _local(grad))):
            raise ProblemsError([problem], title="cannot choose a kernel")

    def _update(self, p: torch.Tensor, state: dict[str, Any], h: Hyper) -> None:
        grad = p.grad
        if isinstance(p, DTensor) and isinstance(grad, DTensor) and grad.placements != p.placements:
            # e.g. a partial or replicated gradient of a tensor-parallel weight: take this
            # rank's part (what torch's optimizers get from DTensor's dispatch)
            grad = grad.redistribute(p.device_mesh, p.placements)
        param, grad = _local(p), _local(grad)
        if "exp_avg_absmax" not in state:
            step_fp32_(param, grad, _local(state["exp_avg"]), _local(state["exp_avg_sq"]), h)
            return
        target = param if param.is_contiguous() else param.contiguous()
        q1, q2, a1, a2 = (_local(state[k]) for k in QUANTIZED_KEYS)
        if use_triton("adamw8bit", target, grad):
            from orch.kernels.adamw8bit.triton_kernel import step_8bit_triton_

            step_8bit_triton_(target, grad, q1, q2, a1, a2, h)
        else:
            step_8bit_(target, grad, q1, q2, a1, a2, h, self._scratch)
        if target is not param:
            param.copy_(target)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0)
        local = _local(p)
        if not self.quantized(p):
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=torch.float32,
                                              memory_format=torch.preserve_format)
            return
        blocks = blocks_per_row(local.shape[1:].numel())  # per row of the local tensor
        codes = [torch.full(local.shape, zero_code(signed), dtype=torch.uint8,
                            device=local.device) for signed in (True, False)]
        absmax = [torch.zeros(local.shape[0], blocks, device=local.device) for _ in range(2)]
        if isinstance(p, DTensor):
            shape, placements = _absmax_layout(p, blocks)
            codes = [DTensor.from_local(c, p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride()) for c in codes]
            absmax = [DTensor.from_local(a, p.device_mesh, placements, run_check=False,
                                         shape=shape, stride=(shape[1], 1)) for a in absmax]
        state.update(zip(QUANTIZED_KEYS, (*codes, *absmax), strict=True))

    def state_dict(self) -> dict[str, Any]:
        """torch's, with ``min_8bit_size``, which decides which parameters have 8-bit states:
        a loader of another one can then name it. (A top-level entry, not a param-group one:
        DCP's optimizer state dicts, orch's checkpoints, keep only the state and the groups, and
        would refuse to resume a checkpoint saved before without a group entry it expects.)"""
        return {**super().state_dict(), "min_8bit_size": self.min_8bit_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every state tensor to its parameter's dtype; the codes stay uint8
        and the rest fp32, so take the saved tensors as they are (copied, on the parameter's
        device, other floating dtypes as fp32): a round trip is exact. A ``step`` saved as a
        number becomes a tensor, as torch's AdamW takes it (``.item()`` failed on it). A state
        saved before positive second moments were rounded up is repaired
        (``loading.repair_orphaned_second_moments_``)."""
        for index, group in enumerate(state_dict["param_groups"]):
            _check_hyperparameters(group, f"AdamW8bit state dict's param group {index}")
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) == len(params):  # else torch's loader says the groups differ
            check_loadable(state_dict, [self._wanted(p) for p in params], self.min_8bit_size)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "min_8bit_size"})
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key == "step" and not isinstance(value, torch.Tensor):
                    self.state[p][key] = torch.tensor(float(value))
                elif isinstance(value, torch.Tensor):
                    self.state[p][key] = _loaded(key, value, p.device)
            repair_orphaned_second_moments_(self.state[p])

    def _wanted(self, p: torch.Tensor) -> Wanted:
        """What ``p`` keeps: the (global) shape of each state tensor, ``step`` aside."""
        shape = tuple(p.shape)
        if not self.quantized(p):
            return Wanted(shape, {"exp_avg": shape, "exp_avg_sq": shape}, _eligible(p))
        blocks = blocks_per_row(_local(p).shape[1:].numel())
        absmax = _absmax_layout(p, blocks)[0] if isinstance(p, DTensor) else (shape[0], blocks)
        states = dict(zip(QUANTIZED_KEYS, (shape, shape, absmax, absmax), strict=True))
        return Wanted(shape, states, eligible=True)


def _eligible(p: torch.Tensor) -> bool:
    """Whether ``p`` has 8-bit moments at a small enough ``min_8bit_size``: two or more dims,
    rows of at least ``MIN_ROW``."""
    return p.ndim >= 2 and p.shape[1:].numel() >= MIN_ROW


def _loaded(key: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A saved state tensor as the optimizer keeps it: a copy (never the caller's), ``step`` on
    the CPU, codes as uint8 and every other state fp32."""
    if key == "step":
        return value.detach().to(device="cpu", copy=True)
    dtype = torch.uint8 if value.dtype == torch.uint8 else torch.float32
    return value.detach().to(device=device, dtype=dtype, copy=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _absmax_layout(p: DTensor, blocks: int) -> tuple[tuple[int, int], list[Placement]]:
    """Global shape and placements of a sharded parameter's absmax ``[rows, blocks]``.

    Rows follow the parameter's dim-0 sharding (FSDP2, vocabulary- and column-parallel
    weights; also FSDP2's strided dim-0 sharding over another dim-0 split, as of experts under
    expert parallelism, which torch 2.13's ``_StridedShard`` is not a ``Shard`` of), so those
    shards hold whole rows and the blocks of the unsharded tensor. Sharding
    on a later dim (row-parallel weights) cuts every row: each rank's blocks lie in its slice of
    the row (the unsharded tensor's blocks when the slice is a multiple of 256 wide), and the
    absmax is sharded on its block dim; that needs an even split.
    """
    placements: list[Placement] = []
    columns = blocks
    mesh = p.device_mesh
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate) or (isinstance(placement, (Shard, _StridedShard))
                                                and placement.dim % p.ndim == 0):
            placements.append(placement)
            continue
        if not isinstance(placement, Shard) or p.shape[placement.dim] % mesh.size(mesh_dim):
            raise OrchError(
                f"AdamW8bit keeps one absmax per 256 elements of a row, so a parameter sharded "
                f"after dim 0 needs an even split; got placements {p.placements} for shape "
                f"{tuple(p.shape)} on mesh {tuple(mesh.shape)}. fix: choose degrees that "
                "divide the dimension, or use optimizer.name=adamw"
            )
        placements.append(Shard(1))
        columns *= mesh.size(mesh_dim)
    return (p.shape[0], columns), placements
