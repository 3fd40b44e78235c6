"""``orch doctor``: healthy in CPU mode here, and every missing piece named with its fix."""

from __future__ import annotations

import json

from orch import doctor
from orch.cli import main


def test_this_cpu_machine_is_healthy(capsys, tmp_path):
    assert main(["doctor", "--nvme-path", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "no GPU: CPU mode" in text and "torch 2.13.0" in text
    assert "ok       training: CPU with gloo" in text
    assert "no GPU   Triton kernels" in text  # not expected without a GPU, not missing
    assert f"nvme_path {tmp_path}: " in text and " GB free of " in text
    assert text.rstrip().endswith("healthy")
    assert "NVMe staging on huge pages: " in text  # ok or fallback: the kernel's to say


def test_a_kernel_without_huge_pages_is_a_fallback_with_the_fix(capsys, monkeypatch, tmp_path):
    from orch.offload import host_memory

    monkeypatch.setattr(host_memory, "huge_pages_setting", lambda: "never")
    assert main(["doctor", "--nvme-path", str(tmp_path)]) == 0  # slower, not missing
    text = capsys.readouterr().out
    assert ("fallback NVMe staging on huge pages: transparent huge pages are 'never' here: "
            "staging buffers on 4 KiB pages") in text
    assert "fix: set /sys/kernel/mm/transparent_hugepage/enabled to madvise" in text


def test_a_kernel_choice_launch_refuses_is_missing(capsys, monkeypatch):
    """Doctor said "healthy" under ``ORCH_KERNELS=triton`` (or ``bogus``) without a GPU, where
    ``orch launch`` refuses it (or the first step failed inside triton)."""
    monkeypatch.setenv("ORCH_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["doctor"]) == 1
    text = capsys.readouterr().out
    assert ("MISSING  Triton kernels: ORCH_KERNELS: 'triton' forces the Triton kernels, with no "
            "CUDA device on this machine") in text
    assert "fix: unset ORCH_KERNELS" in text and "1 missing: Triton kernels" in text
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["doctor"]) == 0
    assert ("ok       Triton kernels: forced (ORCH_KERNELS=triton), in Triton's interpreter"
            in capsys.readouterr().out)


def test_missing_pieces_are_listed_with_their_fix_and_exit_1(capsys, monkeypatch, tmp_path):
    real = doctor.version
    monkeypatch.setattr(doctor, "version",
                        lambda p: None if p in ("megatron-core", "safetensors") else real(p))
    missing = tmp_path / "nowhere"
    assert main(["doctor", "--nvme-path", str(missing)]) == 1
    text = capsys.readouterr().out
    assert "MISSING  training: missing safetensors; fix: pip install -e ." in text
    assert "MISSING  Megatron-Core interop: not installed; fix: pip install megatron-core" in text
    assert f"MISSING  NVMe tier directory: {missing} is not a writable directory" in text
    assert text.rstrip().endswith(
        "3 missing: training, NVMe tier directory, Megatron-Core interop")
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {f["name"] for f in report["features"] if f["state"] == "MISSING"} == {
        "training", "Megatron-Core interop"}


def test_the_p2p_matrix_tells_nvlink_from_pcie_from_neither():
    from types import SimpleNamespace

    links = {(0, 1): "nvlink", (1, 0): "nvlink", (0, 2): "pcie", (2, 0): "pcie"}
    nvml = SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        NVML_P2P_CAPS_INDEX_NVLINK="nvlink", NVML_P2P_CAPS_INDEX_READ="pcie",
        NVML_P2P_STATUS_OK=0,
        nvmlDeviceGetP2PStatus=lambda a, b, kind: 0 if links.get((a, b)) == kind else 5)
    matrix = doctor.p2p_matrix(nvml, 3)
    assert matrix == [["X", "NV", "P2P"], ["NV", "X", "."], ["P2P", ".", "X"]]
    report = doctor.Report("h", {"python": "3", "torch": "t", "cuda": "c"} | dict.fromkeys(
        ("triton", "deepspeed", "megatron-core", "nvidia-ml-py", "numpy", "pyyaml",
         "safetensors", "transformers"), "v"),
        [{"index": i, "name": "H100", "memory_bytes": 80 * 2**30, "uuid": f"GPU-{i}"}
         for i in range(3)], [], [], [], p2p=matrix)
    text = doctor.render(report)
    assert "  GPU 0: H100, 80.0 GiB, GPU-0" in text
    assert "  GPU 0      X   NV  P2P" in text


def test_an_nvme_path_without_free_space_is_missing(capsys, monkeypatch):
    """/proc passed as writable with '0.0 GB free of 0.0', and the machine was 'healthy'."""
    from orch.cli import main

    assert main(["doctor", "--nvme-path", "/proc"]) == 1
    assert "MISSING  NVMe tier directory: /proc " in capsys.readouterr().out  # (or unwritable)


def test_a_gpu_host_whose_nvml_is_silent_is_not_called_a_cpu_node(capsys, monkeypatch):
    """With CUDA working but NVML not answering (no nvidia-ml-py, a driver mismatch), doctor said
    "no GPU: CPU mode" and "note: no GPU: CPU node" beside "ok training: CUDA with NCCL"."""
    import torch

    from orch.cluster import detect

    node = detect.DetectedNode({"name": "gpu-07", "devices": 1, "device": "cpu", "nics": [],
                                "gpus": []},
                               ("NVML did not start: Driver Not Loaded", detect.CPU_NOTE))
    monkeypatch.setattr(detect, "detect_node", lambda: node)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    monkeypatch.setattr(doctor, "_op_state", lambda name: (True, "built"))
    text = doctor.render(doctor.examine())
    assert "  8 CUDA GPU(s) seen by torch; NVML does not answer (see the notes)" in text
    assert "note: NVML did not start: Driver Not Loaded" in text
    assert "CPU mode" not in text and "CPU node" not in text
    assert "ok       training: CUDA with NCCL" in text
    assert "MISSING  GPU telemetry: NVML does not answer (see the notes)" in text
