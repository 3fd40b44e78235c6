"""The units of a cluster description's figures, and the unit slips each one refuses.

A device override counts in the unit of its ``DeviceSpec`` field (bytes/s per device, FLOP/s,
seconds, bytes) and a NIC's ``bandwidth_gbps`` in Gb/s. Either may be written with its unit
instead (``inter_node_bw: 400Gb/s``, ``bandwidth_gbps: 25GB/s``, ``peak_flops: 989.4TFLOP/s``,
``inter_latency_s: 15us``), converted here. A bare number that no such hardware has is refused
with what it was likely meant as: ``inter_node_bw: 400`` (meant as Gb/s) priced every
collective at 400 bytes/s, a step of 9.7e9 s, and said nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from orch.config.coerce import Quantity, Rejected


def sci(x: float) -> str:
    """``5e10`` for 5e+10, ``1.5e-5`` for 1.5e-05: a figure as one would write it in YAML."""
    return re.sub(r"e([+-]?)0*(\d)", lambda m: f"e{m[1].strip('+')}{m[2]}", f"{x:.4g}")


def given(x: float) -> str:
    """A figure the user wrote, as :func:`sci` writes it where that keeps every digit, else in
    full (``sci`` rounds to four: 100001 read "1e5", the very limit it was refused for)."""
    short = sci(x)
    if float(short) == x:
        return short
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else repr(float(x))


_DECIMAL = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}
BYTES_PER_S: dict[str, float] = {
    **{f"{p}B/s": f for p, f in (_DECIMAL | _BINARY).items()},
    **{f"{p}{bits}": f / 8 for p, f in _DECIMAL.items() for bits in ("b/s", "bps", "bit/s")},
}
"""Rate units (case matters: b is a bit, B a byte) -> bytes/s."""
_RATES = "b/s, Mb/s, Gb/s, Gbps (bits); B/s, MB/s, GB/s, TB/s, GiB/s (bytes); b is a bit, B a byte"


def _slow_rate(*meant: str) -> Callable[[float], tuple[str, str]]:
    """What a bare number under 1e8 bytes/s was likely meant as: a figure of ``meant`` units
    (a link's 400 Gb/s or 900 GB/s; a memory's 3.35 TB/s), else a slow rate written bare."""

    def said(n: float) -> tuple[str, str]:
        if n < 1e5:
            return (f"{given(n)} looks like {' or '.join(meant)}: this field is bytes/s per device "
                    f"({sci(n)} bytes/s is no GPU, memory or network link)",
                    "write " + ", ".join(f"{sci(n * BYTES_PER_S[unit])} or '{sci(n)}{unit}' for "
                                         f"{sci(n)} {unit}" for unit in meant))
        return (f"{given(n)} bytes/s ({n * 8 / 1e9:.3g} Gb/s) per device is slower than a GPU, "
                "memory or network link: this field is bytes/s per device",
                "write the figure in bytes/s such as 50e9 (400 Gb/s), or write it with its unit "
                f"if it is this slow: '{sci(n / 1e6)}MB/s'")

    return said


_FLOOR = (1e8, float("inf"))
"""0.8 Gb/s per device: below it a bare number is a figure in another unit."""
LinkBandwidth = Annotated[float, Quantity(
    "bytes/s per device", "50e9", BYTES_PER_S, _RATES, _FLOOR, _slow_rate("Gb/s", "GB/s"))]
"""``intra_node_bw``, ``inter_node_bw`` and ``host_bw``."""
MemoryBandwidth = Annotated[float, Quantity(
    "bytes/s per device", "3.35e12", BYTES_PER_S, _RATES, _FLOOR, _slow_rate("TB/s", "GB/s"))]
"""``memory_bw``."""


def _fast_port(n: float) -> tuple[str, str]:
    return (f"{given(n)} Gb/s is faster than any NIC port: this field is Gb/s (gigabits per "
            "second)", f"write the port's speed in Gb/s such as 400, or with its unit "
            f"('400Gb/s', '50GB/s'): as bits/s {sci(n)} is {sci(n / 1e9)} Gb/s, as bytes/s "
            f"{sci(n * 8 / 1e9)} Gb/s")


Gbps = Annotated[float, Quantity(
    "Gb/s", "400", {unit: f * 8 / 1e9 for unit, f in BYTES_PER_S.items()}, _RATES, (0, 1e5),
    _fast_port)]
"""A NIC port's speed (``bandwidth_gbps``, ``measured_gbps``): a bare number over 100,000
(100 Tb/s) was written in bits/s or bytes/s."""


def _slow_compute(n: float) -> tuple[str, str]:
    fix = (f"write {sci(n * 1e12)} or '{sci(n)}TFLOP/s' for {sci(n)} TFLOP/s" if n < 1e5
           else "write the figure in FLOP/s such as 989.4e12, or with its unit ('989.4TFLOP/s')")
    return f"{given(n)} FLOP/s is slower than any device: this field is FLOP/s per device", fix


FlopsPerSecond = Annotated[float, Quantity(
    "FLOP/s", "989.4e12",
    {f"{p}{flops}": f for p, f in {"": 1, "g": 1e9, "t": 1e12, "p": 1e15}.items()
     for flops in ("flop/s", "flops")},
    "GFLOP/s, TFLOP/s, PFLOP/s or TFLOPS", (1e9, float("inf")), _slow_compute, fold_case=True)]
"""``peak_flops`` and ``fp32_flops``: a bare number under 1e9 was written in TFLOP/s."""


def _long_latency(n: float) -> tuple[str, str]:
    return (f"{given(n)} s per ring step is longer than any link's latency: this field is seconds",
            f"write {sci(n * 1e-6)} or '{sci(n)}us' for {sci(n)} microseconds")


Seconds = Annotated[float, Quantity(
    "seconds", "15e-6", {"s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9},
    "s, ms, us, ns", (0, 0.01), _long_latency)]
"""``intra_latency_s`` and ``inter_latency_s``: a bare number over 10 ms was in microseconds."""


def device_memory(n: int) -> int:
    """``memory_bytes`` of at least 1 MiB: ``memory_bytes: 80`` was meant as GiB."""
    if n < 2**20:
        raise Rejected(f"{n} bytes is no device's memory: this field is bytes",
                       f"write it with its unit: {n}GiB (or {n}GB)")
    return n


__all__ = ["BYTES_PER_S", "FlopsPerSecond", "Gbps", "LinkBandwidth", "MemoryBandwidth",
           "Seconds", "device_memory", "sci"]
