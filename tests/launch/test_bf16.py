"""bf16 under ``orch launch`` without a GPU (``ORCH_CPU_BF16=1`` keeps ``train.precision: bf16`` on
CPU): FSDP's mixed precision (bf16 compute, fp32 reduction) and bf16 activations between pipeline
stages, the paths a GPU run takes.

ZB-V on pp2 x fsdp2 defers weight gradients past FSDP's post-backward; before
``orch.parallel.pipeline.late_grads`` those gradients met FSDP's float32 accumulators in bf16 and
the step failed ("FSDP reduce-scatter expects uniform gradient dtype"). Now its losses and gradient
norms equal the plain fsdp2 run's (the same data-parallel reduction).

Offloaded training in bf16 fetches bf16 device copies of its float32 homes (``offload.params``;
the engine's own numbers are tests/offload/test_engine.py's): its accounted device peak is half
the float32 run's and a staging buffer, where before it was the same (float32 copies, cast again
by autocast outside the engine's accounting).

One process casts by autocast and runs its backward outside it: a recomputed block recomputes
under the forward's autocast (it recomputed in float32 and failed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_harness import launch, metrics, overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

BF16 = {"ORCH_CPU_BF16": "1"}
SETTINGS = ["train.precision=bf16", "train.steps=3"]
ZBV = ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.virtual_stages=2"]


def _run(procs: int, run_dir: Path, *extra: str, bf16: bool = True) -> list[dict]:
    out = launch("--nproc-per-node", str(procs), "configs/tiny.yaml",
                 *overrides(run_dir, *SETTINGS, *extra), env=BF16 if bf16 else None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("computing in fp32" in out.stdout) != bf16
    return [row for row in metrics(run_dir) if "loss" in row]


def test_zbv_over_fsdp_in_bf16_trains_as_fsdp_alone(tmp_path):
    plain = _run(2, tmp_path / "fsdp2")
    piped = _run(4, tmp_path / "pp2-fsdp2", *ZBV)
    assert len(plain) == len(piped) == 3
    for a, b in zip(plain, piped, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]


def test_offload_in_bf16_fetches_bf16_copies(tmp_path):
    homes = ["offload.params=cpu", "offload.grads=cpu", "offload.optimizer=cpu",
             "offload.cpu_adam=torch", "run.log_interval=1"]
    fp32 = _run(1, tmp_path / "fp32", *homes, bf16=False)
    bf16 = _run(1, tmp_path / "bf16", *homes)
    assert len(fp32) == len(bf16) == 3
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2), a["step"]
        peak, peak32 = b["offload"]["device_peak_bytes"], a["offload"]["device_peak_bytes"]
        # half, and the float32 staging of the conversions (the largest matrix: 0.7 MB)
        assert 0.5 < peak / peak32 < 0.7, (peak, peak32)


def test_one_process_under_autocast_recomputes_as_it_computed(tmp_path):
    """One process (no FSDP: autocast casts) runs its backward outside autocast: with either
    recompute the workers failed on the first backward (the block recomputed in float32). Now
    the losses and gradient norms equal the run without recompute (the same bf16 forward)."""
    plain = _run(1, tmp_path / "none", "run.log_interval=1")
    for mode in ("selective", "full"):
        again = _run(1, tmp_path / mode, "run.log_interval=1", f"train.recompute={mode}")
        assert len(again) == len(plain) == 3
        for a, b in zip(plain, again, strict=True):
            assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"], (mode, a["step"])
