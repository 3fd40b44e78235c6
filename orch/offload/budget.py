"""The device budget: every byte the offload engine places on the device tier, against its limit.

The engine asks before it places anything (a fetched layer's parameters, a layer's gradients
waiting to leave) and gives the bytes back when it frees them. Asking for more than the limit is
a bug in the engine's plan, not a user error: the plan refuses budgets too small for one layer
before anything starts (``orch.config.rules``), so here it raises with the numbers. On a machine
without a GPU the device tier is ordinary memory, and this accounting is what tests check.
"""

from __future__ import annotations


class BudgetExceeded(RuntimeError):
    """The engine tried to hold more device bytes than its budget."""


class DeviceBudget:
    """Bytes in use on the device tier, their peak, and the limit they may not pass."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"device budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def take(self, nbytes: int, what: str) -> None:
        """Account ``nbytes`` placed on the device for ``what``; raises when over the limit."""
        if not self.fits(nbytes):
            raise BudgetExceeded(
                f"placing {what} ({nbytes:,} bytes) would hold {self.used + nbytes:,} device "
                f"bytes, over the budget of {self.limit:,}"
            )
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def give(self, nbytes: int) -> None:
        """Return ``nbytes`` freed from the device."""
        if nbytes > self.used:
            raise RuntimeError(f"freeing {nbytes:,} device bytes but only {self.used:,} are held")
        self.used -= nbytes

    def reset_peak(self) -> None:
        """Start a new peak from what is held now (the engine does this every step)."""
        self.peak = self.used


__all__ = ["BudgetExceeded", "DeviceBudget"]
