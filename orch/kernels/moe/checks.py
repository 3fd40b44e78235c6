"""Input checks for the MoE dispatch ops: each failure names the argument and says the fix.

Shape, dtype and device checks are free. Value checks (expert ids in range, counts summing to the
rows, row_map entries in range) read one small tensor back to the host, a sync per call on a GPU;
callers that have already checked their routing pass ``check=False`` to skip them.
"""

from __future__ import annotations

import torch

from orch.errors import OrchError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class MoEInputError(OrchError, ValueError):
    """A bad argument to moe_permute, moe_unpermute or grouped_mm (a ValueError too)."""

    def __init__(self, op: str, arg: str, message: str, fix: str) -> None:
        self.op, self.arg, self.fix = op, arg, fix
        super().__init__(f"{op}: {arg} {message}\n    fix: {fix}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def tensor(op: str, arg: str, value: object, ndim: int, dtypes: tuple, kind: str) -> None:
    """``value`` is a tensor with ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise MoEInputError(op, arg, f"must be a torch.Tensor, got {type(value).__name__}",
                            f"pass {arg} as a tensor")
    if value.dim() != ndim:
        raise MoEInputError(op, arg, f"must have {ndim} dimensions, got shape {_shape(value)}",
                            f"pass {arg} with shape {kind}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise MoEInputError(op, arg, f"has dtype {value.dtype}, expected one of {names}",
                            f"convert it, e.g. {arg}.to({dtypes[-1]})")


def same_device(op: str, ref_arg: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for arg, value in others.items():
        if value is not None and value.device != ref.device:
            raise MoEInputError(op, arg, f"is on {value.device} but {ref_arg} is on {ref.device}",
                                f"move it with {arg}.to({ref_arg}.device)")


def positive_int(op: str, arg: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoEInputError(op, arg, f"must be an int >= {minimum}, got {value!r}",
                            f"pass a whole number >= {minimum}")
    return value


def check_permute(tokens, expert_ids, num_experts, capacity) -> None:
    op = "moe_permute"
    tensor(op, "tokens", tokens, 2, FLOAT_DTYPES, "[num_tokens, hidden]")
    tensor(op, "expert_ids", expert_ids, 2, INT_DTYPES, "[num_tokens, top_k]")
    if expert_ids.shape[0] != tokens.shape[0]:
        raise MoEInputError(op, "expert_ids", f"has {expert_ids.shape[0]} rows but tokens has "
                            f"{tokens.shape[0]}", "give one row of top_k expert ids per token")
    same_device(op, "tokens", tokens, expert_ids=expert_ids)
    positive_int(op, "num_experts", num_experts, 1)
    if capacity is not None:
        positive_int(op, "capacity", capacity, 0)


def expert_id_range(expert_ids: torch.Tensor, num_experts: int, kept: torch.Tensor | None
                    ) -> int | None:
    """Check ids lie in [0, num_experts) and read ``kept`` (when given), in one host sync."""
    if expert_ids.numel() == 0:
        return None if kept is None else 0
    lo, hi = torch.aminmax(expert_ids.long())
    parts = [lo, hi] if kept is None else [lo, hi, kept]
    values = torch.stack(parts).tolist()
    if values[0] < 0 or values[1] >= num_experts:
        bad = values[0] if values[0] < 0 else values[1]
        raise MoEInputError("moe_permute", "expert_ids", f"holds {bad}, outside "
                            f"[0, {num_experts}) for num_experts={num_experts}",
                            "route to expert indices below num_experts (or raise num_experts)")
    return None if kept is None else values[2]


def check_unpermute(expert_out, row_map, weights, num_tokens, check: bool) -> None:
    op = "moe_unpermute"
    tensor(op, "expert_out", expert_out, 2, FLOAT_DTYPES, "[kept_rows, hidden]")
    tensor(op, "row_map", row_map, 2, (torch.int64,), "[num_tokens, top_k] (from moe_permute)")
    positive_int(op, "num_tokens", num_tokens, 0)
    if row_map.shape[0] != num_tokens:
        raise MoEInputError(op, "row_map", f"has {row_map.shape[0]} rows but num_tokens is "
                            f"{num_tokens}", "pass the row_map moe_permute returned for "
                            "these tokens, and num_tokens = tokens.shape[0]")
    if weights is not None:
        tensor(op, "weights", weights, 2, FLOAT_DTYPES, "[num_tokens, top_k]")
        if weights.shape != row_map.shape:
            raise MoEInputError(op, "weights", f"has shape {_shape(weights)} but row_map has "
                                f"{_shape(row_map)}", "pass the router weights [num_tokens, "
                                "top_k] in the same slot order as the expert ids")
    same_device(op, "expert_out", expert_out, row_map=row_map, weights=weights)
    if expert_out.shape[0] > row_map.numel():
        raise MoEInputError(op, "expert_out", f"has {expert_out.shape[0]} rows, more than the "
                            f"{row_map.numel()} copies in row_map", "pass the expert outputs "
                            "in moe_permute's row order, one row per kept copy")
    if not check or row_map.numel() == 0:
        return
    lo, hi = torch.aminmax(row_map)
    kept = row_map[row_map >= 0]
    lo, hi, used = torch.stack([lo, hi, kept.new_tensor(kept.numel())]).tolist()
    rows = expert_out.shape[0]
    # a row kept twice leaves another row unread: the inverse map had unset entries (counted
    # once the range holds, so a stray huge entry is not a huge count)
    repeated = used - kept.unique().numel() if lo >= -1 and hi < rows else 0
    if lo < -1 or hi >= rows or used != rows or repeated:
        also = f" ({repeated} of them repeated)" if repeated else ""
        raise MoEInputError(op, "row_map", f"does not fit expert_out: entries span [{lo}, {hi}] "
                            f"with {used} kept copies{also}, but expert_out has {rows} rows",
                            "pass the row_map from the moe_permute call that made these rows "
                            "(entries are -1 or a row index; one kept copy per row)")


def check_grouped_mm(x, w, tokens_per_expert, check: bool) -> None:
    op = "grouped_mm"
    tensor(op, "x", x, 2, FLOAT_DTYPES, "[rows, hidden_in]")
    tensor(op, "w", w, 3, FLOAT_DTYPES, "[num_experts, hidden_in, hidden_out]")
    tensor(op, "tokens_per_expert", tokens_per_expert, 1, INT_DTYPES, "[num_experts]")
    if w.dtype != x.dtype:
        raise MoEInputError(op, "w", f"has dtype {w.dtype} but x has {x.dtype}",
                            f"cast one of them, e.g. w.to({x.dtype})")
    if w.shape[1] != x.shape[1]:
        raise MoEInputError(op, "w", f"has shape {_shape(w)} but x has {x.shape[1]} columns",
                            f"w must be [num_experts, {x.shape[1]}, hidden_out]")
    if w.shape[0] == 0 or tokens_per_expert.shape[0] != w.shape[0]:
        raise MoEInputError(op, "tokens_per_expert", f"has {tokens_per_expert.shape[0]} "
                            f"entries for {w.shape[0]} experts in w",
                            "give one count per expert (w.shape[0] >= 1 entries)")
    same_device(op, "x", x, w=w)
    if tokens_per_expert.device.type not in ("cpu", x.device.type):
        raise MoEInputError(op, "tokens_per_expert", f"is on {tokens_per_expert.device}",
                            "keep it on the CPU or on x's device")
    if not check:
        return
    counts = tokens_per_expert.long()
    lo, total = torch.stack([counts.min(), counts.sum()]).tolist()
    if lo < 0 or total != x.shape[0]:
        raise MoEInputError(op, "tokens_per_expert", f"sums to {total} (smallest {lo}) but x "
                            f"has {x.shape[0]} rows", "pass the counts moe_permute returned "
                            "for these rows: non-negative, summing to x.shape[0]")
