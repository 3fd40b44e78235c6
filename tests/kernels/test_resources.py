"""orch's Triton kernels compiled for real GPU architectures on this CPU machine
(``orch.kernels.resources``): every launch the shipped tiles make fits the shared memory of an
H100 and an A100, the 16-bit kernels keep their accumulators in registers on sm_90 (no spills),
and their matmuls use Hopper's wgmma. The interpreter tests check what the kernels compute;
these check what the compiler makes of them, which only a GPU run would show otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orch.kernels.resources import TARGETS, Resources, main, recording

triton = pytest.importorskip("triton")
needs_nvidia_backend = pytest.mark.skipif(
    "nvidia" not in triton.backends.backends, reason="this triton build has no NVIDIA backend")


def compiled(*args: str) -> list[dict]:
    """``python -m orch.kernels.resources --json ARGS`` in a process without the interpreter;
    its rows, after checking its exit status against the rows it reports as failing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, said so it does not warn
    done = subprocess.run([sys.executable, "-m", "orch.kernels.resources", "--json", *args],
                          env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows, done.stderr[-4000:]
    assert done.returncode == (1 if any(row["failing"] for row in rows) else 0), done.stderr
    return rows


@pytest.fixture(scope="module")
def bf16_rows() -> list[dict]:
    """Every bf16 kernel but attention's with documents, compiled for sm_90 and sm_80 (fp16
    compiles the same code with another type; float32, the GPU tests' dtype, is left out: its
    ieee matmuls take ptxas 40 s here)."""
    return compiled("--target", "sm_90", "--target", "sm_80", "--dtype", "bf16",
                    "--documents", "none")


@needs_nvidia_backend
def test_16_bit_kernels_fit_hopper_and_ampere_and_keep_their_registers_on_hopper(bf16_rows):
    """bf16 at the shipped tiles (:func:`bf16_rows`)."""
    rows = bf16_rows
    hopper = [row for row in rows if row["target"] == "sm_90"]
    kernels = {row["kernel"] for row in hopper}
    assert kernels == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel",
                       "_adamw8bit_kernel", "_scatter_rows", "_gather_rows", "_row_dots",
                       "_grouped_mm", "_grouped_mm_dw"}
    assert {row["case"] for row in hopper if row["case"].startswith("attention")} == {
        f"attention bf16 d={d}{causal}" for d in (64, 128) for causal in ("", " causal")}
    matmuls = {"sm_90": "wgmma", "sm_80": "mma"}
    for row in rows:
        assert row["shared_bytes"] <= TARGETS[row["target"]][1], row
        if row["kernel"] in ("_fwd_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel", "_grouped_mm",
                             "_grouped_mm_dw"):
            assert row["matmul"] == matmuls[row["target"]], row
    assert max(row["shared_bytes"] for row in hopper) > 64 * 1024  # the check has teeth
    assert not [row for row in hopper if row["local_bytes"]]  # a spill inside an inner loop


@needs_nvidia_backend
def test_document_kernels_keep_their_registers_on_hopper(bf16_rows):
    """The attention kernels with packed documents' ids (``HAS_DOCS``), bf16 on sm_90: they
    keep each row's document range in registers beside the accumulators (the forward at
    head_dim 128 needs 252-254 of the 255), and must not spill either. Their shared memory is
    their document-free twins', which :func:`bf16_rows` fits to sm_80 as well, so they are not
    compiled for sm_80 here (12 kernels, 17 s; there, where spills are reported and not held,
    the head_dim 128 forward spills 24-40 bytes)."""
    rows = compiled("--target", "sm_90", "--dtype", "bf16", "--op", "attention",
                    "--documents", "only")
    assert {row["case"] for row in rows} == {
        f"attention bf16 d={d}{causal} documents" for d in (64, 128) for causal in ("", " causal")}
    assert {row["kernel"] for row in rows} == {"_fwd_kernel", "_bwd_delta_kernel",
                                               "_bwd_dkv_kernel", "_bwd_dq_kernel"}
    twins = {(row["case"], row["kernel"]): row for row in bf16_rows if row["target"] == "sm_90"}
    for row in rows:
        assert row["matmul"] == ("-" if row["kernel"] == "_bwd_delta_kernel" else "wgmma"), row
        twin = twins[row["case"].removesuffix(" documents"), row["kernel"]]
        assert row["shared_bytes"] == twin["shared_bytes"], (row, twin)
        if row["kernel"] == "_fwd_kernel":  # the ranges' registers: HAS_DOCS was compiled
            assert row["registers"] > twin["registers"], (row, twin)
    assert max(row["registers"] for row in rows) > 240  # near the limit: the check has teeth
    assert not [row for row in rows if row["local_bytes"]]  # a spill inside an inner loop


def test_problems_name_the_limit_and_the_spill():
    over = Resources("_fwd_kernel", 255, 0, 240_000, "wgmma")
    assert over.problems("sm_90") == [
        "needs 240,000 bytes of shared memory, over sm_90's 232,448: the launch would fail"]
    spilling = Resources("_bwd_dkv_kernel", 255, 464, 41_000, "wgmma")
    assert spilling.problems("sm_80") == [
        "spills 464 bytes per thread to local memory (255 registers)"]
    assert Resources("_row_dots", 32, 0, 16, "-").problems("sm_90") == []


def test_interpreted_kernels_are_refused_with_the_fix(capsys):
    """This process runs Triton's interpreter (tests/conftest.py), so its kernels cannot be
    compiled: both entry points say what to do instead."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from orch.kernels.attention import kernels

    original = kernels._fwd_kernel
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"), \
            recording(kernels, "_fwd_kernel"):
        pass
    assert kernels._fwd_kernel is original
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "run with TRITON_INTERPRET unset" in capsys.readouterr().err
