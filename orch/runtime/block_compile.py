"""``train.compile``: torch.compile each decoder block, as torchtitan does.

A block's ``forward`` is compiled in place, not the block wrapped: the module keeps its class and
parameter names (checkpoints, FSDP units and the HuggingFace mapping do not see the compile), and
the hooks other layers of orch put on the block (FSDP's gathers, the offload engine's fetches,
pipeline stages) stay outside the compiled code, where they can do I/O and collectives. Inside a
block, torch.compile sees orch's kernels as the custom ops they are (``torch.ops.orch.*``), and
context and expert parallelism's collectives and MoE routing's data-dependent shapes as graph breaks
(the code between them is compiled; checked with ``TORCH_LOGS=graph_breaks``). Activation recompute
wraps the compiled forward (``orch.parallel.recompute``), so a recomputed block runs the compiled
code again: the other way round from torchtitan, which compiles the checkpointed block, because
orch's recompute is built on saved-tensor hooks, which torch.compile does not trace. The offload
engine's saved-tensor hooks see the compiled graph's saved tensors.

Blocks of one kind share one compiled graph: torch.compile treats their parameters as inputs
(``inline_inbuilt_nn_modules``), so a model of 80 identical blocks compiles once, not 80 times.

Refused by the config rules: tensor parallelism (torch 2.13 hands redistribution a plain
gradient where it expects a DTensor, and the backward fails), the split-backward pipeline
schedules (a compiled block's backward computes weight gradients with input gradients, so W
would have nothing to defer: measured, zbv's W actions took 7 ms in all against 125 ms), recompute
in a pipeline stage (the recomputed compiled forward saves other tensors than the first: "mat2
must be a matrix") and selective recompute under DDP (dynamo's DDP graph splitting fails on its
tags).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, backend: str) -> int:
    """Compile the ``forward`` of every block in ``model.layers`` with ``backend`` (``none``
    leaves the model untouched); returns how many were compiled."""
    if backend == "none":
        return 0
    for block in model.layers.values():
        block.forward = torch.compile(block.forward, backend=backend)
    return len(model.layers)
