"""Where each unit's parameters and optimizer states rest between uses: CPU memory or NVMe.

On the cpu tier a parameter's ``data`` is its home and stays in memory. On the NVMe tier it is a
placeholder (right shape, no bytes) and the bytes are in the tier's file, one group per unit for
the parameters and one for the optimizer states; they come into memory only

- to be copied to the device (:meth:`Homes.params_to_copy`: read, copied, the buffer given
  back; nothing is written, the parameters did not change), and
- for the unit's optimizer step (:meth:`Homes.in_memory`: parameters and states read into
  place, stepped, written back, placeholders again), which also covers the states the
  optimizer creates on its first step, and
- for a checkpoint save or load (:meth:`Homes.all_in_memory`), so checkpoints are ordinary and
  reshardable. That holds the whole model in CPU memory for the save: stated in the README.

The optimizer states that go to NVMe are a parameter's non-scalar state tensors (AdamW's
moments, AdamW8bit's quantized moments and their block scales); the step counts stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from orch.offload.nvme import NvmeTier, placeholder


class Homes:
    """The rest place of each unit's parameters (``units[i]``) and optimizer states."""

    def __init__(self, units: list[list[nn.Parameter]], tier: NvmeTier | None = None,
                 params_on_nvme: bool = False, optimizer_on_nvme: bool = False) -> None:
        if (params_on_nvme or optimizer_on_nvme) and tier is None:
            raise ValueError("an NVMe home needs an NvmeTier")
        self.units, self.tier = units, tier
        self.params_on_nvme, self.optimizer_on_nvme = params_on_nvme, optimizer_on_nvme
        if params_on_nvme:
            for index in range(len(units)):
                self._put_params(index)

    # --- one unit ---------------------------------------------------------------------------

    @contextmanager
    def params_to_copy(self, index: int) -> Iterator[list[torch.Tensor]]:
        """Unit ``index``'s parameters as they rest, readable for the block's duration."""
        if not self.params_on_nvme:
            yield [p.data for p in self.units[index]]
            return
        assert self.tier is not None
        try:
            yield self.tier.read(("params", index))
        finally:
            self.tier.done(("params", index))

    @contextmanager
    def in_memory(self, index: int, optimizer: torch.optim.Optimizer | None,
                  staged: bool = True) -> Iterator[None]:
        """Unit ``index``'s parameters and ``optimizer``'s states for them in memory, in place,
        for the block's duration; what the block changed is written back. ``staged=False``
        reads into pageable memory instead of the pinned staging pool (many units at once)."""
        if not (self.params_on_nvme or self.optimizer_on_nvme):
            yield
            return
        tier = self.tier
        assert tier is not None
        params = self.units[index]
        if self.params_on_nvme:
            for p, view in zip(params, tier.read(("params", index), staged), strict=True):
                p.data = view
        entries = _state_entries(optimizer, params) if self.optimizer_on_nvme else []
        if entries and tier.has(("optimizer", index)):
            views = tier.read(("optimizer", index), staged)
            for (state, key), view in zip(entries, views, strict=True):
                state[key] = view
        try:
            yield
        finally:
            if self.params_on_nvme:
                self._put_params(index)
            if self.optimizer_on_nvme:
                self._put_states(index, optimizer)

    def _put_params(self, index: int) -> None:
        assert self.tier is not None
        params = self.units[index]
        self.tier.write(("params", index), [p.data for p in params])
        for p in params:
            p.data = placeholder(p.data)

    def _put_states(self, index: int, optimizer: torch.optim.Optimizer | None) -> None:
        assert self.tier is not None
        entries = _state_entries(optimizer, self.units[index])
        if not entries:
            return
        self.tier.write(("optimizer", index), [state[key] for state, key in entries])
        for state, key in entries:
            state[key] = placeholder(state[key])

    # --- everything -------------------------------------------------------------------------

    @contextmanager
    def all_in_memory(self, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Every unit in memory (checkpoint save and load; the optimizer may gain states)."""
        with ExitStack() as stack:
            for index in range(len(self.units)):
                stack.enter_context(self.in_memory(index, optimizer, staged=False))
            yield

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()


def _state_entries(optimizer: torch.optim.Optimizer | None,
                   params: list[nn.Parameter]) -> list[tuple[dict, str]]:
    """``(state dict, key)`` of each non-scalar state tensor of ``params``, in a fixed order."""
    if optimizer is None:
        return []
    entries = []
    for p in params:
        state = optimizer.state.get(p, {})
        entries += [(state, key) for key in sorted(state)
                    if isinstance(state[key], torch.Tensor) and state[key].dim() > 0]
    return entries


__all__ = ["Homes"]
