"""``train.compile`` under ``orch launch``: each decoder block's forward compiled in place.

With the ``aot_eager`` backend (torch.compile's graphs and AOT autograd, no code generation) the
numbers must be the uncompiled run's exactly, so any change the compile makes to what is computed
shows; with ``inductor`` (generated kernels) within float32 rounding. Parameter names, and so the
checkpoints, are the uncompiled model's: a compiled run resumes an uncompiled one's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_harness import launch, metrics, overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _run(procs: int, run_dir: Path, *extra: str) -> tuple[list[dict], str]:
    out = launch("--nproc-per-node", str(procs), "configs/tiny.yaml",
                 *overrides(run_dir, "train.steps=3", *extra))
    assert out.returncode == 0, out.stdout + out.stderr
    return [row for row in metrics(run_dir) if "loss" in row], out.stdout


@pytest.mark.parametrize("procs, extra", [
    (2, ["train.recompute=selective"]),  # FSDP's hooks and the recompute around the compile
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=1f1b"]),
], ids=["fsdp2-selective", "pp2-1f1b"])
def test_compiled_blocks_train_the_uncompiled_numbers(tmp_path, procs, extra):
    plain, _ = _run(procs, tmp_path / "plain", *extra)
    compiled, said = _run(procs, tmp_path / "compiled", *extra, "train.compile=aot_eager")
    blocks = 4 if "parallel.pp=2" not in extra else 2
    assert f"torch.compile (aot_eager) on this rank's {blocks} decoder blocks" in said
    assert [(r["loss"], r["grad_norm"]) for r in compiled] == [
        (r["loss"], r["grad_norm"]) for r in plain]


def test_inductor_trains_within_rounding_and_resumes_an_uncompiled_checkpoint(tmp_path):
    run = tmp_path / "run"
    plain, _ = _run(1, tmp_path / "plain", "train.steps=4")
    _run(1, run, "train.steps=4", "checkpoint.interval=2", "run.stop_at_step=2")
    resumed, said = _run(1, run, "train.steps=4", "train.compile=inductor")
    assert "resumed from" in said and "torch.compile (inductor)" in said
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed, plain, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
