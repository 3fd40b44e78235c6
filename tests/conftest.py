"""Suite-wide setup. Without a GPU, Triton kernels run in interpreter mode (set before anything
imports triton), so the kernel tests compare kernels with their references on CPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
