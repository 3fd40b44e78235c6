"""Accelerator catalog: the figures the cost model needs for each device type.

A ``DeviceSpec`` holds peak dense compute, memory, and the per-device bandwidth and latency of the
two link kinds a collective can cross: inside a node (NVLink, PCIe, loopback) and between nodes
(the NIC share of one device). Figures come from NVIDIA's datasheets (cited per entry); the
efficiency and latency figures are modelling choices, explained where they are set. A cluster
description may override any number for its own hardware (``with_overrides``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orch.config.coerce import did_you_mean
from orch.errors import OrchError

GiB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator type. Bandwidths are bytes/s per device in one direction."""

    name: str
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s (no sparsity); for ``cpu`` an fp32 figure."""
    memory_bytes: int
    intra_node_bw: float
    """What one device can send to its node peers at once (NVLink: half the bidirectional total)."""
    inter_node_bw: float
    """The device's share of the node's NICs, used when a cluster does not list its NICs."""
    memory_bw: float
    """Device memory bandwidth, what elementwise ops stream at (selective recompute's cost)."""
    compute_efficiency: float = 0.6
    """Fraction of peak a well-tuned training step sustains on compute alone (matmuls,
    attention and the elementwise ops between them); the cost model's ceiling on MFU."""
    intra_latency_s: float = 3e-6
    """Per ring step inside a node (NCCL's latency-bound regime is a few microseconds)."""
    inter_latency_s: float = 10e-6
    """Per ring step across nodes (RDMA plus NCCL proxy overheads)."""
    matmul_half_size: float = 2**21
    """Elements (rows x columns) of a per-rank matmul output at which kernels reach half of
    ``compute_efficiency``: thousands of SMs need big tiles, a CPU core much smaller ones."""
    host_bw: float = 25e9
    """Device <-> host memory copies, one direction (offloaded parameters, gradients and
    activations cross it): PCIe 4.0 x16 sustains ~25 GB/s of its 32, PCIe 5.0 ~50 of its 64."""
    fp32_flops: float = 0.0
    """Dense fp32 FLOP/s, what float32 matmuls run at (PyTorch leaves TF32 off by default, so
    they do not use the tensor cores); 0: ``peak_flops`` (``cpu``)."""
    description: str = ""
    fused_norm: bool = True
    """Whether torch's RMSNorm is one fused kernel here (CUDA: it keeps its input and
    statistics) or composite (CPU builds: it also keeps the normalized tensor), what the memory
    model counts of each norm."""
    orch_kernels: bool = True
    """Whether orch's Triton kernels run here (CUDA) or torch's ops do (CPU builds): attention
    within documents then keeps no seq x seq mask (the kernels take the document ids), what the
    memory model counts of ``train.document_mask``."""

    def peak(self, precision: str) -> float:
        """FLOP/s at ``train.precision`` (``bf16`` or ``fp32``): what step times and MFU are
        reckoned against (an fp32 plan was priced at the bf16 tensor-core peak, 15x too fast on
        an H100)."""
        return self.fp32_flops if precision == "fp32" and self.fp32_flops else self.peak_flops


OVERRIDABLE = tuple(
    f.name for f in dataclasses.fields(DeviceSpec)
    if f.name not in ("name", "description", "fused_norm", "orch_kernels")
)
"""Fields a cluster description may override: every number."""


DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity, so 989.4
        # dense; FP32 67 TFLOPS; 80 GB HBM3 at 3.35 TB/s; NVLink 4 900 GB/s bidirectional. DGX
        # H100: one 400 Gb/s ConnectX-7 (NDR) per GPU. Efficiency 0.55: bf16 MFU reported on H100
        # runs from 33-39% (torchtitan, Llama 3.1 8B, GPUs capped at 500 W) to 49.3%
        # (Megatron-Core, Mixtral 8x22B), so compute alone must sustain a little more than the
        # best of those.
        DeviceSpec(
            name="h100-sxm-80gb", peak_flops=989.4e12, fp32_flops=67e12, memory_bytes=80 * GiB,
            intra_node_bw=450e9, inter_node_bw=50e9, memory_bw=3.35e12, compute_efficiency=0.55,
            host_bw=50e9,
            description="NVIDIA H100 SXM5 80GB, NVLink 4, 400 Gb/s NDR per GPU",
        ),
        # NVIDIA H200 datasheet (SXM): same BF16 and FP32 compute as H100 (1,979 TFLOPS sparse),
        # 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional; DGX H200: 400 Gb/s per GPU.
        # Its "141 GB" is nearer GiB: nvidia-smi reports 143,771 MiB (140.4 GiB; 141e9 bytes
        # left 7% of it out of every plan); the H100's 81,559 MiB is taken as its 80 GiB.
        DeviceSpec(
            name="h200", peak_flops=989.4e12, fp32_flops=67e12, memory_bytes=143_771 * 2**20,
            intra_node_bw=450e9, inter_node_bw=50e9, memory_bw=4.8e12, compute_efficiency=0.55,
            host_bw=50e9,
            description="NVIDIA H200 SXM 141GB, NVLink 4, 400 Gb/s NDR per GPU",
        ),
        # NVIDIA A100 datasheet (SXM4 80GB): BF16 312 TFLOPS dense (624 sparse), FP32 19.5, HBM2e
        # 2,039 GB/s, NVLink 3 600 GB/s bidirectional. DGX A100: one 200 Gb/s HDR ConnectX-6 per
        # GPU. A100 is the easier part to saturate: torchtitan reports 56-58% MFU for Llama 3 8B
        # on 64 A100s.
        DeviceSpec(
            name="a100-80gb", peak_flops=312e12, fp32_flops=19.5e12, memory_bytes=80 * GiB,
            intra_node_bw=300e9, inter_node_bw=25e9, memory_bw=2.039e12, compute_efficiency=0.6,
            description="NVIDIA A100 SXM4 80GB, NVLink 3, 200 Gb/s HDR per GPU",
        ),
        # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: BF16 tensor with FP32
        # accumulate 165.2 TFLOPS dense, FP32 82.6; 24 GB GDDR6X at 1,008 GB/s. No NVLink: peers
        # talk over PCIe 4.0 x16 (32 GB/s theoretical, ~25 GB/s measured). Nodes: a 100 Gb/s
        # Ethernet NIC shared by the box, taken here as 12.5 GB/s per device only when a cluster
        # file says nothing better.
        DeviceSpec(
            name="rtx4090", peak_flops=165.2e12, fp32_flops=82.6e12, memory_bytes=24 * GiB,
            intra_node_bw=25e9, inter_node_bw=12.5e9, memory_bw=1.008e12, compute_efficiency=0.5,
            intra_latency_s=10e-6, inter_latency_s=30e-6,
            description="NVIDIA GeForce RTX 4090 24GB, PCIe 4.0 x16, no NVLink",
        ),
        # A modest CPU "device" for gloo runs on this kind of machine: 170 GFLOP/s fp32 (torch's
        # sgemm of 2048 x 2048 on the 2-core CI machine with two threads, 2026-12-05; it was
        # 1 TFLOP/s, and the tiny model's plan said 21k tokens/s where 613 were measured), gloo
        # over loopback (~5 GB/s) inside a host, 10 Gb/s Ethernet between hosts; "host" copies
        # are memory copies (~5 GB/s on 2 cores); torch's elementwise ops stream at 23-24 GB/s
        # (a copy, an add) down to 12 (a multiply by a scalar) and 2.5 (SiLU, bound by its
        # exponential) with two threads: 20 GB/s.
        DeviceSpec(
            name="cpu", peak_flops=170e9, memory_bytes=24 * GiB,
            intra_node_bw=5e9, inter_node_bw=1.25e9, memory_bw=20e9, compute_efficiency=0.5,
            host_bw=5e9, intra_latency_s=20e-6, inter_latency_s=50e-6, matmul_half_size=2**14,
            description="CPU with gloo: loopback inside a host, 10 Gb/s Ethernet between",
            fused_norm=False, orch_kernels=False,
        ),
    )
}

ALIASES = {"h100": "h100-sxm-80gb", "a100": "a100-80gb", "4090": "rtx4090"}


class UnknownDeviceError(OrchError):
    """A device name that is neither in the catalog nor an alias."""

    def __init__(self, name: str) -> None:
        self.name = name
        known = sorted([*DEVICES, *ALIASES])
        self.message = f"unknown device {name!r}"
        self.fix = f"{did_you_mean(str(name), known)}known devices: {', '.join(known)}"
        super().__init__(f"{self.message}\n    fix: {self.fix}")


def get_device(name: str) -> DeviceSpec:
    """The catalog entry for ``name`` (case-insensitive, aliases allowed)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        raise UnknownDeviceError(name)
    return DEVICES[key]


def with_overrides(spec: DeviceSpec, **fields: float) -> DeviceSpec:
    """``spec`` with some numbers replaced, for hardware that differs from the catalog entry.

    Unknown field names are a programming error (``TypeError``); the cluster loader checks user
    keys against ``OVERRIDABLE`` first and reports them as problems.
    """
    unknown = set(fields) - set(OVERRIDABLE)
    if unknown:
        raise TypeError(f"DeviceSpec has no overridable fields {sorted(unknown)}")
    return dataclasses.replace(spec, **fields)


__all__ = ["ALIASES", "DEVICES", "DeviceSpec", "OVERRIDABLE", "UnknownDeviceError",
           "get_device", "with_overrides"]
