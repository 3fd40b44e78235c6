"""Per-rank RNG states, saved with each checkpoint and restored on resume.

Each rank saves its python, numpy, torch CPU (and its CUDA device's) RNG states as
``rng-rank-<rank>.pt``.
Another world size may load a checkpoint (DCP reshards). Ranks that existed when it was saved get
their RNG states back; a rank that did not gets a seed derived from (train.seed, step, rank), so
the same restart always draws the same numbers (``derive_rng_seed``).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` reads back."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [kind, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # the rank's own device: the one it computes on
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def derive_rng_seed(seed: int, step: int, rank: int) -> int:
    """Seed for a rank that did not exist when the checkpoint was saved (the world grew).

    It depends only on (train.seed, step, rank), so every restart onto the same world size
    derives the same streams, and no two ranks share one.
    """
    digest = hashlib.sha256(f"orch-rng:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def load_rng(file: Path) -> dict[str, Any]:
    """A rank's saved RNG states, by torch's weights-only loader: plain data only, no code."""
    from orch.runtime.checkpoint.safe_load import refusal, unsafe

    try:
        return torch.load(file, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - the weights-only loader's refusal, or garbage
        raise unsafe(file, f"is not plain RNG state ({refusal(exc)})") from None


def restore_rng(states: dict[str, Any]) -> None:
    """Set this process's RNGs from ``capture_rng()`` output or a derived ``{"seed": n}``."""
    if "seed" in states:
        seed = int(states["seed"])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # seeds every CUDA device too
        return
    version, keys, gauss = states["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        # onto the device this rank computes on now, which need not have the index the saving
        # rank's had (2 nodes x 4 GPUs resumed on 1 x 8 renumbers local ranks)
        torch.cuda.set_rng_state(cuda)
