"""Device readings (orch.runtime.telemetry): the CPU figures here, and the GPU path against a
stand-in NVML and CUDA (no GPU on this machine), so its calls and units are checked."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from orch.runtime.telemetry import Telemetry


def test_cpu_reading_is_the_resident_set():
    reading = Telemetry(torch.device("cpu"), rank=3).read()
    assert reading["rank"] == 3 and reading["device"] == "cpu"
    assert 10e6 < reading["rss_bytes"] < reading["host_total_bytes"]


def test_gpu_reading_comes_from_nvml_by_uuid(monkeypatch):
    asked = {}

    def by_uuid(uuid: str) -> str:
        asked["uuid"] = uuid
        return "handle"

    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87),
        nvmlDeviceGetPowerUsage=lambda h: 612_345,  # milliwatts
        nvmlDeviceGetTemperature=lambda h, sensor: 71,
        NVML_TEMPERATURE_GPU=0,
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(uuid="58d7c7f9-aaaa"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * 2**30, 80 * 2**30))
    reading = Telemetry(torch.device("cuda", 1), rank=5).read()
    assert asked["uuid"] == "GPU-58d7c7f9-aaaa"
    assert reading == {"rank": 5, "device": "cuda:1", "rss_bytes": reading["rss_bytes"],
                       "uuid": "GPU-58d7c7f9-aaaa", "mem_used_bytes": 50 * 2**30,
                       "mem_total_bytes": 80 * 2**30, "util_percent": 87,
                       "power_w": 612.345, "temperature_c": 71}
