"""The model and optimizer as a checkpoint holds them, saved and loaded.

The state dicts are torch's distributed ones (``get_state_dict``), the optimizer's flattened to
parameter names (:data:`STATE_OPTIONS`), so a checkpoint moves between plans. An offloaded run's
go through :class:`~orch.offload.checkpoint_homes.CheckpointHomes`, which never brings the whole
model and its optimizer states into CPU memory.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from orch.offload.checkpoint_homes import CheckpointHomes, State
from orch.offload.engine import OffloadEngine
from orch.runtime.checkpoint import CheckpointManager
from orch.runtime.checkpoint.manifest import Manifest
from orch.runtime.optim import implementation_kept

STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
"""Optimizer state keyed by parameter name (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``):
pipeline ranks hold different parameters in the same-numbered groups, so group-indexed keys
would collide in one checkpoint, and names let a checkpoint move between layouts."""


class TrainState:
    """``model`` and ``optimizer`` (offloaded by ``offload``, if given) for checkpoints."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 offload: OffloadEngine | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.homes = CheckpointHomes(offload, optimizer) if offload is not None else None

    def _state(self, loading: bool = False) -> State:
        if self.homes is not None:
            self.homes.prepare(loading)
        model_state, optim_state = get_state_dict(self.model, self.optimizer,
                                                  options=STATE_OPTIONS)
        return {"model": model_state, "optim": optim_state}

    def save(self, checkpoints: CheckpointManager, step: int, data_state: dict[str, Any]) -> Path:
        """Save as checkpoint ``step`` with the data position ``data_state``; all ranks."""
        state = self._state()
        planner = self.homes.save_planner(state) if self.homes is not None else None
        return checkpoints.save(step, state, data_state, planner)

    def load(self, checkpoints: CheckpointManager, path: Path) -> Manifest:
        """Load checkpoint ``path`` (verified first) into the model and optimizer; all ranks."""
        state = self._state(loading=True)
        resting = self.homes.set_aside(state) if self.homes is not None else []
        manifest = checkpoints.load(path, state)
        kept = self.homes.states_kept(resting) if self.homes is not None else nullcontext()
        with implementation_kept(self.optimizer), kept:
            # Offloaded parameters were loaded in place above (CPU homes) or come unit by unit
            # below (NVMe), so torch's model loader has nothing to do for them.
            set_state_dict(self.model, self.optimizer, options=STATE_OPTIONS,
                           model_state_dict={} if self.homes is not None else state["model"],
                           optim_state_dict=state["optim"])
        if self.homes is not None:
            self.homes.load_units(resting, partial(checkpoints.read_into, path))
        return manifest


__all__ = ["STATE_OPTIONS", "TrainState"]
