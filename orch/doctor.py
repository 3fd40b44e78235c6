"""``orch doctor``: what this machine has, and what each orch feature is missing here.

It reports versions (torch with its CUDA and NCCL, triton, deepspeed and whether its async I/O
and CPU Adam ops can be built or are built, megatron-core, nvidia-ml-py), the GPUs with memory
and NVLink/P2P reach and the NICs (``orch.cluster.detect``, the same reader as ``orch cluster
detect``), free space at the NVMe path, and then one line per feature: ``ok``, ``fallback`` (it
runs another way, said how) or ``MISSING`` with the fix. Exit 0 when nothing is missing, 1
otherwise. A machine without a GPU is healthy in CPU mode: the GPU-only features say "no GPU"
and do not count as missing. Nothing here builds an op or starts a process group, so it answers
in seconds.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OK, FALLBACK, MISSING, NOT_HERE = "ok", "fallback", "MISSING", "no GPU"


@dataclass(frozen=True)
class Feature:
    name: str
    state: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    host: str
    versions: dict[str, str]
    gpus: list[dict[str, Any]]
    nics: list[dict[str, Any]]
    notes: list[str]
    disk: list[str]
    features: list[Feature] = field(default_factory=list)
    p2p: list[list[str]] = field(default_factory=list)
    """Per GPU pair: NV (NVLink), P2P (peer-to-peer over PCIe), . (neither), X (itself)."""
    cuda_devices: int = 0
    """The GPUs torch sees through CUDA, whether or not NVML answers (``gpus`` is NVML's)."""

    @property
    def missing(self) -> list[Feature]:
        return [f for f in self.features if f.state == MISSING]


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _op_state(builder_name: str) -> tuple[bool, str]:
    """(can build, what) for a DeepSpeed op: compatible here, and built already or not."""
    from orch.offload.cpu_adam import stderr_with_descriptor, use_venv_extension_cache

    use_venv_extension_cache()
    import torch

    if not torch.cuda.is_available():  # else DeepSpeed warns that it guessed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops import op_builder

        builder = getattr(op_builder, builder_name)()
        with stderr_with_descriptor():
            if not builder.is_compatible(verbose=False):
                return False, "cannot be built here"
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
        built = any(root.glob(f"**/{builder.NAME}.so"))
        return True, "built" if built else "builds on first use (a minute or two)"
    except Exception as exc:  # noqa: BLE001 - deepspeed missing or broken: say what
        return False, f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0]})"


def examine(nvme_path: str | None = None) -> Report:
    """Everything ``orch doctor`` prints, gathered (no op builds, no processes)."""
    import torch

    from orch.cluster.detect import detect_node

    versions = {"python": platform.python_version()}
    for package in ("torch", "triton", "deepspeed", "megatron-core", "nvidia-ml-py", "numpy",
                    "pyyaml", "safetensors", "transformers"):
        versions[package] = version(package) or "not installed"
    gpu = torch.cuda.is_available()
    versions["cuda"] = torch.version.cuda or "none (CPU build of torch)"
    if gpu and torch.distributed.is_nccl_available():
        versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    node = detect_node()
    report = Report(socket.gethostname(), versions, node.entry["gpus"], node.entry["nics"],
                    _notes(node.notes, gpu), _disk(nvme_path),
                    cuda_devices=torch.cuda.device_count() if gpu else 0)
    if len(report.gpus) > 1:
        report.p2p = p2p_matrix(_pynvml(), len(report.gpus))
    report.features = _features(report, gpu, nvme_path)
    return report


def _notes(notes: tuple[str, ...], gpu: bool) -> list[str]:
    """The node detection's notes, less its "no GPU: CPU node" where torch sees CUDA: NVML not
    answering made detection call a GPU host a CPU node, beside "training: CUDA with NCCL"."""
    from orch.cluster.detect import CPU_NOTE

    return [note for note in notes if not (gpu and note == CPU_NOTE)]


def _pynvml() -> Any:
    import pynvml

    return pynvml


def p2p_matrix(nvml: Any, count: int) -> list[list[str]]:
    """NVML's peer-to-peer status for each ordered pair of GPUs: NVLink first, then PCIe reads;
    [] when NVML cannot tell."""
    try:
        nvml.nvmlInit()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        matrix = []
        for i, a in enumerate(handles):
            row = []
            for j, b in enumerate(handles):
                if i == j:
                    row.append("X")
                elif nvml.nvmlDeviceGetP2PStatus(a, b, nvml.NVML_P2P_CAPS_INDEX_NVLINK) == \
                        nvml.NVML_P2P_STATUS_OK:
                    row.append("NV")
                elif nvml.nvmlDeviceGetP2PStatus(a, b, nvml.NVML_P2P_CAPS_INDEX_READ) == \
                        nvml.NVML_P2P_STATUS_OK:
                    row.append("P2P")
                else:
                    row.append(".")
            matrix.append(row)
        nvml.nvmlShutdown()
        return matrix
    except Exception:  # noqa: BLE001 - NVML absent or too old: the GPU lines still print
        return []


def _disk(nvme_path: str | None) -> list[str]:
    lines = []
    for label, path in (("nvme_path", nvme_path), ("working directory", os.getcwd())):
        if not path:
            continue
        if not Path(path).is_dir():
            lines.append(f"{label} {path}: not a directory")
            continue
        usage = shutil.disk_usage(path)
        writable = os.access(path, os.W_OK | os.X_OK)
        lines.append(f"{label} {path}: {usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f}"
                     + ("" if writable else " (not writable)"))
    return lines


def _forced_kernels() -> Feature | None:
    """The kernels ``ORCH_KERNELS`` forces, where it is set, as ``orch launch`` checks it (doctor
    said "healthy" to values launch refuses)."""
    import torch

    from orch.kernels.dispatch import kernel_choice_problem

    forced = os.environ.get("ORCH_KERNELS", "")
    if (problem := kernel_choice_problem()) is not None:
        return Feature("Triton kernels", MISSING, f"ORCH_KERNELS: {problem.message}", problem.fix)
    if forced == "reference":
        return Feature("Triton kernels", OK, "plain-torch reference kernels everywhere "
                       "(ORCH_KERNELS=reference)")
    if forced == "triton":
        where = "" if torch.cuda.is_available() else ", in Triton's interpreter (TRITON_INTERPRET)"
        return Feature("Triton kernels", OK, f"forced (ORCH_KERNELS=triton){where}")
    return None


def _features(report: Report, gpu: bool, nvme_path: str | None) -> list[Feature]:
    import torch

    v = report.versions
    out = []
    missing_core = [p for p in ("numpy", "pyyaml", "safetensors") if v[p] == "not installed"]
    out.append(Feature("training", MISSING if missing_core else OK,
                       f"missing {', '.join(missing_core)}" if missing_core else
                       ("CUDA with NCCL" if gpu else "CPU with gloo (bf16 computes in fp32)"),
                       "pip install -e . (or make setup)" if missing_core else ""))
    if gpu:
        nccl = torch.distributed.is_nccl_available()
        out.append(Feature("multi-GPU communication", OK if nccl else MISSING,
                           f"NCCL {v.get('nccl', '')}" if nccl else "this torch has no NCCL",
                           "" if nccl else "install a CUDA build of torch"))
        triton = v["triton"] != "not installed"
        out.append(_forced_kernels() or Feature(
            "Triton kernels", OK if triton else MISSING,
            f"triton {v['triton']}" if triton else "triton is missing",
            "" if triton else "pip install triton"))
        nvml = bool(report.gpus)
        out.append(Feature("GPU telemetry", OK if nvml else MISSING,
                           "NVML answers" if nvml else "NVML does not answer (see the notes)",
                           "" if nvml else "pip install nvidia-ml-py; check the driver"))
    else:
        out.append(_forced_kernels()
                   or Feature("Triton kernels", NOT_HERE, "plain-torch reference kernels on CPU"))
        out.append(Feature("GPU telemetry", NOT_HERE, "process memory (RSS) on CPU"))
    can_aio, aio = _op_state("AsyncIOBuilder")
    out.append(Feature("NVMe offload I/O", OK if can_aio else FALLBACK,
                       f"DeepSpeed async I/O op {aio}" if can_aio else
                       f"DeepSpeed async I/O op {aio}: an O_DIRECT thread pool is used instead",
                       "" if can_aio else "apt-get install libaio-dev"))
    out.append(_staging_pages())
    can_adam, adam = _op_state("CPUAdamBuilder")
    out.append(Feature("CPU Adam (offload)", OK if can_adam else FALLBACK,
                       f"DeepSpeed CPU Adam {adam}" if can_adam else
                       f"DeepSpeed CPU Adam {adam}: torch's fused AdamW steps instead",
                       "" if can_adam else "install a C++ compiler (apt-get install g++)"))
    if nvme_path:
        usable = Path(nvme_path).is_dir() and os.access(nvme_path, os.W_OK | os.X_OK)
        free = shutil.disk_usage(nvme_path).free if usable else 0
        why = (f"{nvme_path} is not a writable directory" if not usable else
               f"{nvme_path} has no free space (a pseudo file system such as /proc?)"
               if not free else nvme_path)
        out.append(Feature("NVMe tier directory", OK if usable and free else MISSING, why,
                           "" if usable and free else "create it on an SSD, or point "
                           "offload.nvme_path at one"))
    megatron = v["megatron-core"] != "not installed"
    out.append(Feature("Megatron-Core interop", OK if megatron else MISSING,
                       f"megatron-core {v['megatron-core']}" if megatron else "not installed",
                       "" if megatron else "pip install megatron-core"))
    hf = v["transformers"] != "not installed"
    out.append(Feature("HuggingFace export/import", OK,
                       "safetensors" + (f", transformers {v['transformers']} (to check logits)"
                                        if hf else "; transformers not installed (only the "
                                        "tests need it)")))
    tools = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    bed = not tools and root
    out.append(Feature("namespace test bed (multi-node tests)", OK if bed else FALLBACK,
                       "ip and tc, as root" if bed else
                       (f"missing {', '.join(tools)}" if tools else "not root") +
                       ": those tests skip"))
    return out


def _staging_pages() -> Feature:
    """Whether the NVMe tier's staging buffers can sit on huge pages here
    (``orch.offload.host_memory``): the kernel's transparent huge page mode, and Linux 6.1+ to
    collapse DeepSpeed's buffers, whose pages are locked as they are made."""
    from orch.offload.host_memory import HUGE_PAGES_FIX, huge_pages_refused, huge_pages_setting

    name, release = "NVMe staging on huge pages", platform.release()
    if (refused := huge_pages_refused()) is not None:
        return Feature(name, FALLBACK, f"{refused}: staging buffers on 4 KiB pages (O_DIRECT "
                       "reads into them ran at 0.55x where orch was measured)",
                       HUGE_PAGES_FIX if sys.platform == "linux" else "")
    version = tuple(int(part) for part in re.findall(r"\d+", release)[:2])
    if version < (6, 1):
        return Feature(name, FALLBACK, f"Linux {release} cannot collapse DeepSpeed's locked "
                       "buffers (6.1+), so they stay on 4 KiB pages; the O_DIRECT pool's get "
                       "huge pages", "a Linux 6.1 or later kernel")
    return Feature(name, OK, f"transparent huge pages {huge_pages_setting()}, Linux {release}")


def render(report: Report) -> str:
    v = report.versions
    lines = [f"orch doctor on {report.host} (Python {v['python']}, {sys.platform})", "versions"]
    lines.append(f"  torch {v['torch']}, CUDA {v['cuda']}" + (f", NCCL {v['nccl']}"
                                                             if "nccl" in v else ""))
    lines.append("  " + ", ".join(f"{p} {v[p]}" for p in (
        "triton", "deepspeed", "megatron-core", "nvidia-ml-py", "numpy", "pyyaml",
        "safetensors", "transformers")))
    lines.append("devices")
    if not report.gpus:
        lines.append(f"  {report.cuda_devices} CUDA GPU(s) seen by torch; NVML does not answer "
                     "(see the notes)" if report.cuda_devices else
                     "  no GPU: CPU mode (one gloo process per node by default)")
    for gpu in report.gpus:
        lines.append(f"  GPU {gpu['index']}: {gpu['name']}, {gpu['memory_bytes'] / 2**30:.1f} "
                     f"GiB, {gpu['uuid']}")
    if report.p2p:  # NV: NVLink, P2P: peer-to-peer over PCIe, .: through the host
        lines.append("  P2P     " + " ".join(f"{g['index']:>4}" for g in report.gpus))
        for gpu, row in zip(report.gpus, report.p2p, strict=True):
            lines.append(f"  GPU {gpu['index']:<3} " + " ".join(f"{cell:>4}" for cell in row))
    lines.append("network")
    lines += [f"  {nic.get('interface') or nic.get('name')}: {nic['type']}, "
              f"{nic['bandwidth_gbps']} Gb/s, network {nic['network']}"
              for nic in report.nics] or ["  no usable NIC found"]
    lines += [f"  note: {note}" for note in report.notes]
    lines.append("disk")
    lines += [f"  {line}" for line in report.disk]
    lines.append("features")
    for f in report.features:
        lines.append(f"  {f.state:<8s} {f.name}: {f.detail}" + (f"; fix: {f.fix}" if f.fix
                                                                   else ""))
    missing = report.missing
    lines.append("healthy" if not missing else
                 f"{len(missing)} missing: " + ", ".join(f.name for f in missing))
    return "\n".join(lines)


__all__ = ["Feature", "Report", "examine", "render"]
