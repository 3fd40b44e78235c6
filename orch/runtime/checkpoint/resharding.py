"""Whether a checkpoint's optimizer states can be resharded onto another plan's degrees.

DCP reshards parameters and AdamW states between any degrees; AdamW8bit's block-wise states
only where both layouts cut the same blocks (see ``orch.kernels.adamw8bit.optimizer``).
"""

from __future__ import annotations

from pathlib import Path

from orch.config import Config
from orch.errors import Problem
from orch.plan.degrees import Degrees


def adamw8bit_resharding_problems(cfg: Config, degrees: Degrees, path: Path,
                                  saved: dict[str, int]) -> list[Problem]:
    """AdamW8bit's states of a row-parallel weight (split on its input dim by tensor
    parallelism) hold an absmax per 256 elements of each rank's slice of a row: the unsharded
    tensor's blocks only when the slice is a multiple of 256 wide. Between tensor-parallel
    degrees whose blocks differ the states cannot be resharded (DCP fails on the absmax
    shapes, in the workers): refused here, naming the weight. Expert tensor parallelism cuts
    each expert's ``w1``/``w3`` rows (``dim x hidden``) in every ``dim`` stretch, so no two of
    its degrees share blocks (DCP loaded them without a word, onto the wrong elements).
    ``saved`` holds the checkpoint's degrees (its manifest's plan). The launcher asks of the
    checkpoint it checks by sizes, the workers of the one they resume after hashing (an older
    one, saved under other degrees, when the newest is damaged)."""
    from orch.kernels.adamw8bit.quant import BLOCK

    if cfg.optimizer.name != "adamw8bit":
        return []
    saved_etp, new_etp = saved.get("etp", 1), degrees.etp
    if saved_etp != new_etp:
        return [Problem("parallel.etp", f"{new_etp}, resuming {path} saved at etp={saved_etp} "
                        "with optimizer.name=adamw8bit: expert tensor parallelism cuts every "
                        "row of the experts' w1 and w3 weights, whose 8-bit states are in "
                        f"blocks of {BLOCK} of each rank's part, so they cannot be resharded",
                        f"resume with parallel.etp={saved_etp}")]
    saved_tp, new_tp = saved.get("tp", 1), degrees.tp
    if new_tp == saved_tp:
        return []
    m = cfg.model
    row_parallel = [("attention.wo", m.heads * m.head_size), ("feed_forward.w2", m.ffn_dim)]
    if m.is_moe and m.shared_experts:  # split like the dense MLP, over its own width
        row_parallel.append(("feed_forward.shared_expert.w2", m.shared_experts * m.moe_ffn_dim))
    for what, width in row_parallel:
        if any(tp > 1 and (width // tp) % BLOCK for tp in (saved_tp, new_tp)):
            return [Problem("parallel.tp", f"{new_tp}, resuming {path} saved at tp={saved_tp} "
                            f"with optimizer.name=adamw8bit: the {what} weights ({width} wide, "
                            f"split by tensor parallelism) have 8-bit states in blocks of "
                            f"{BLOCK} of each rank's slice, which differ between the two "
                            "degrees, so the states cannot be resharded",
                            f"resume with parallel.tp={saved_tp}, or between degrees that split "
                            f"{width} into multiples of {BLOCK}")]
    return []


__all__ = ["adamw8bit_resharding_problems"]
