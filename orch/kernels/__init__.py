"""orch's kernels. Each op has a plain-torch reference (the specification, and the CPU path), a
Triton kernel (the CUDA path) run as a torch custom op with its gradient (``torch.ops.orch.*``:
one op each to selective recompute and ``torch.compile``), and a dispatch that picks one
(``orch.kernels.dispatch``). Names resolve lazily so importing orch never imports triton.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "flash_attention": "orch.kernels.attention",
    "causal_attention": "orch.kernels.attention",
    "moe_permute": "orch.kernels.moe",
    "moe_unpermute": "orch.kernels.moe",
    "grouped_mm": "orch.kernels.moe",
    "AdamW8bit": "orch.kernels.adamw8bit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orch.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
