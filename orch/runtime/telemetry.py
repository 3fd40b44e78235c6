"""What each rank's device is doing, read at every logged step into ``metrics.jsonl``.

On a GPU, NVML (nvidia-ml-py) for the device this rank computes on, found by its UUID (CUDA's
and NVML's device orders can differ): memory used and total, utilization, power and temperature.
On the CPU, the process's resident set and the machine's memory. Every rank reads its own, and
the trainer gathers them so rank 0 writes one record with a reading per rank (``devices``).
A reading NVML cannot give is left out of the record rather than guessed.
"""

from __future__ import annotations

import os
from typing import Any

import torch


class Telemetry:
    """Reads this rank's device; ``read()`` is cheap (a few NVML calls or one /proc read)."""

    def __init__(self, device: torch.device, rank: int) -> None:
        self.device = device
        self.rank = rank
        self._nvml: Any = None
        self._handle: Any = None
        self.uuid = ""
        if device.type == "cuda":
            self._open_nvml(device)

    def _open_nvml(self, device: torch.device) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML: memory from torch only, said by absence
            self._nvml = None

    def read(self) -> dict[str, Any]:
        """This rank's reading: ``rank``, ``device`` and whichever figures the device gives."""
        out: dict[str, Any] = {"rank": self.rank, "device": str(self.device),
                               "rss_bytes": rss_bytes()}
        if self.device.type != "cuda":
            out["host_total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return out
        free, total = torch.cuda.mem_get_info(self.device)
        out |= {"uuid": self.uuid, "mem_used_bytes": total - free, "mem_total_bytes": total}
        if self._nvml is not None:
            nvml, handle = self._nvml, self._handle
            for key, call in (("util_percent", lambda: nvml.nvmlDeviceGetUtilizationRates(
                                   handle).gpu),
                              ("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
                              ("temperature_c", lambda: nvml.nvmlDeviceGetTemperature(
                                  handle, nvml.NVML_TEMPERATURE_GPU))):
                try:
                    out[key] = call()
                except Exception:  # noqa: BLE001 - a figure this device does not report
                    continue
        return out


def memory_in_use(reading: dict[str, Any]) -> int:
    """The memory figure of one reading: device memory in use on a GPU, else the resident set."""
    return int(memory_field(reading))


def memory_field(reading: dict[str, Any]) -> Any:
    """:func:`memory_in_use`'s figure as the reading holds it (for checks of read-back
    records)."""
    return reading.get("mem_used_bytes", reading.get("rss_bytes", 0))


def rss_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``), 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


__all__ = ["Telemetry", "memory_in_use", "rss_bytes"]
