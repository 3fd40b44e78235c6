"""The automatic activation policy (``offload.activations: auto``): keep, swap or recompute.

Per decoder block, from what the measuring step measured (its forward seconds, the bytes its
forward saves for backward, the host link's bytes per second while swapping them), leaving out
each block's first forward, which carries one-time costs (a first kernel's setup, the allocator
growing, the first pinned buffers: 288 ms against 57 ms for the same block here, and runs chose
differently from one launch to the next): step 1 with two or more micro-batches, else step 2.

- **keep** on the device while the device budget has room after the parameter window: the
  last blocks first, since their backward comes first (swapping them would leave no time to
  bring the tensors back, and recomputing them delays the start of the backward);
- otherwise **swap** when sending the bytes home and back (``2 * bytes / bandwidth``) costs less
  than running the forward again: on a CPU device the copies are synchronous, so that is the
  comparison; on CUDA they run beside the compute (the copy home beside the block's own forward,
  the copy back beside the backward of the block after it), and a copy that takes less than the
  forward hides behind it;
- otherwise **recompute** (the block's forward runs again in its backward, from its input).

:func:`choose` is the decision alone (pure, tested on numbers); the engine measures, applies
and logs (:mod:`orch.offload.engine`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

Action = Literal["keep", "swap", "recompute"]


@dataclass(frozen=True)
class Measured:
    """One block's figures from the measuring step."""

    name: str
    forward_s: float
    """Seconds of the block's forward, without the swap's copies."""
    saved_bytes: int
    """What the forward saved for backward (each storage once)."""


@dataclass(frozen=True)
class Choice:
    name: str
    action: Action
    reason: str

    def __str__(self) -> str:
        return f"{self.name} {self.action} ({self.reason})"


def choose(blocks: list[Measured], room_bytes: int, bandwidth: float) -> list[Choice]:
    """The action for each of ``blocks`` (in forward order): keep the last blocks while their
    saved bytes fit in ``room_bytes``, then swap or recompute by the cheaper time at
    ``bandwidth`` bytes per second; returned in forward order."""
    chosen: list[Choice] = []
    room = room_bytes
    for block in reversed(blocks):
        mb = block.saved_bytes / 1e6
        if block.saved_bytes <= room:
            room -= block.saved_bytes
            chosen.append(Choice(block.name, "keep", f"{mb:.1f} MB fit in the budget's room, "
                                                     f"{room / 1e6:.1f} MB left"))
            continue
        copy_s = 2 * block.saved_bytes / bandwidth
        ms = f"copies {copy_s * 1e3:.1f} ms {{}} forward {block.forward_s * 1e3:.1f} ms"
        if copy_s < block.forward_s:
            chosen.append(Choice(block.name, "swap", f"{mb:.1f} MB: " + ms.format("<")))
        else:
            chosen.append(Choice(block.name, "recompute", f"{mb:.1f} MB: " + ms.format(">=")))
        room = 0  # keep a suffix only: an earlier block kept would wait longest for its turn
    return chosen[::-1]


class WarmTimes:
    """Per unit, the fastest of its timings after its first (which carries one-time costs)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, index: int, seconds: float) -> None:
        count = self.counts[index] = self.counts.get(index, 0) + 1
        self.seconds[index] = seconds if count <= 2 else min(self.seconds[index], seconds)

    def warm(self, indices: list[int]) -> bool:
        """Whether each of ``indices`` was timed after its first time."""
        return all(self.counts.get(index, 0) >= 2 for index in indices)


class AutoActivations:
    """``offload.activations: auto`` in the engine: the measuring steps swap every block while
    timing its forwards (the swap records the bytes and copy seconds); once each block ran
    twice, at a step's end, :meth:`decide` fixes each block's action for the rest of the run."""

    def __init__(self, blocks: dict[int, str], device: torch.device) -> None:
        self.blocks, self.device = blocks, device
        """Unit index -> name of the decoder blocks the policy decides for."""
        self.measuring = True
        self.steps = 0
        """Steps measured so far."""
        self.actions: dict[int, Action] = dict.fromkeys(blocks, "swap")
        self.forward_s = WarmTimes()
        self._start: dict[int, float] = {}
        self.choices: list[Choice] = []

    def step_done(self) -> bool:
        """Count a measured step; whether every block's forward has a warm timing now."""
        self.steps += 1
        return self.forward_s.warm(list(self.blocks))

    def swaps(self, index: int) -> bool:
        """Whether unit ``index``'s saved tensors go home (units outside the policy: yes)."""
        return self.actions.get(index, "swap") == "swap"

    def keeps(self, index: int) -> bool:
        return self.actions.get(index) == "keep"

    def forward_started(self, index: int) -> None:
        if self.measuring and index in self.blocks:
            self._sync()
            self._start[index] = time.perf_counter()

    def forward_ended(self, index: int) -> None:
        if index in self._start:
            self._sync()
            self.forward_s.add(index, time.perf_counter() - self._start.pop(index))

    def _sync(self) -> None:
        if self.device.type == "cuda":  # time the kernels, not their launch
            torch.cuda.synchronize(self.device)

    def decide(self, measured: dict[int, tuple[int, float]], room_bytes: int) -> list[Choice]:
        """Choose from the blocks' forward times and ``measured`` (unit index -> bytes sent
        home and seconds the copies took, warm, in the measuring steps)."""
        blocks = [Measured(name, max(0.0, self.forward_s.seconds[i] - measured[i][1]),
                           measured[i][0])
                  for i, name in self.blocks.items()]
        self.choices = choose(blocks, room_bytes, self.bandwidth(measured))
        self.actions = {i: c.action for i, c in zip(self.blocks, self.choices, strict=True)}
        self.measuring = False
        return self.choices

    def bandwidth(self, measured: dict[int, tuple[int, float]]) -> float:
        """Bytes per second of the measuring steps' (warm) copies home."""
        return (sum(measured[i][0] for i in self.blocks)
                / max(sum(measured[i][1] for i in self.blocks), 1e-9))


__all__ = ["Action", "AutoActivations", "Choice", "Measured", "WarmTimes", "choose"]
