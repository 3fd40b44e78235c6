"""AdamW with 8-bit block-wise quantized moments (Dettmers et al. 2021, "8-bit Optimizers via
Block-wise Quantization"): the optimizer, its plain-torch reference and the fused Triton kernel.

- ``quant``: the signed and unsigned dynamic maps, block layout, quantize/dequantize;
- ``reference``: the per-tensor update in plain torch (specification and CPU path);
- ``triton_kernel``: the fused dequantize-update-requantize kernel (imports triton);
- ``optimizer``: ``AdamW8bit``, which picks a path per tensor and owns the state format.
"""

from __future__ import annotations

from orch.kernels.adamw8bit.optimizer import AdamW8bit
from orch.kernels.adamw8bit.quant import (
    BLOCK,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
)

__all__ = ["BLOCK", "AdamW8bit", "dequantize_blockwise", "dynamic_map", "quantize_blockwise"]
