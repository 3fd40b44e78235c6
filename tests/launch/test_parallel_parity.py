"""Every parallel layout trains the single-process numbers under ``orch launch``.

One module-scoped set of runs (process start-up dominates): a single-process reference and one
run per layout (data parallel: FSDP2, DDP, HSDP; tensor parallel with and without sequence
parallelism, composed with FSDP2; context parallel, ring and Ulysses, composed with TP and
FSDP2), all on the same config and data; then tp2 x FSDP2 again, stopped at step 3 and
resumed, which must equal the uninterrupted run exactly.

Measured here (6 steps, fp32, gloo, AdamW with clipping active): losses within 9.5e-7, gradient
norms within 2.3e-6 relative, final parameters within 2.7e-5 (mean 5.4e-9) over all layouts.
The tolerances are 10-20x above those; parameters after AdamW steps get a looser max bound
(AdamW can turn 1e-8 gradient noise into +-lr steps on near-zero gradients, DESIGN.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_harness import launch, metrics, overrides
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 6
LOSS_ATOL = 1e-5
GRAD_NORM_RTOL = 3e-5
PARAM_ATOL = 3e-4
PARAM_MEAN_ATOL = 1e-7

TP2_DP2 = ["parallel.tp=2", "parallel.dp_shard=2", "train.recompute=selective"]
LAYOUTS = {  # name: (processes, overrides, expected degrees (dp_replicate, dp_shard, cp, tp))
    "fsdp2": (2, ["parallel.dp_shard=2"], (1, 2, 1, 1)),
    "ddp2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"], (2, 1, 1, 1)),
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], (2, 2, 1, 1)),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"], (1, 1, 1, 2)),
    "tp2sp": (2, ["parallel.tp=2"], (1, 1, 1, 2)),
    "tp2sp_fsdp2": (4, TP2_DP2, (1, 2, 1, 2)),
    "cp2_ring": (2, ["parallel.cp=2", "parallel.cp_kind=ring"], (1, 1, 2, 1)),
    "cp2_ulysses": (2, ["parallel.cp=2", "parallel.cp_kind=ulysses"], (1, 1, 2, 1)),
    "cp2_tp2": (4, ["parallel.cp=2", "parallel.tp=2", "train.recompute=full"], (1, 1, 2, 2)),
    "fsdp2_cp2_tp2": (8, ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=2"],
                      (1, 2, 2, 2)),
}


def final_params(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{STEPS:08d}", out)
    return torch.load(out, weights_only=False)["model"]


def _launch(procs: int, run_dir: Path, *extra: str) -> str:
    out = launch("--nproc-per-node", str(procs), "configs/tiny.yaml",
                 *overrides(run_dir, f"train.steps={STEPS}", *extra))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    dirs = {name: root / name for name in ["single", *LAYOUTS, "resumed"]}
    _launch(1, dirs["single"])
    for name, (procs, extra, _) in LAYOUTS.items():
        _launch(procs, dirs[name], *extra)
    _launch(4, dirs["resumed"], *TP2_DP2, "run.stop_at_step=3")
    stdout = _launch(4, dirs["resumed"], *TP2_DP2)
    assert "resumed from" in stdout and "step-00000003" in stdout
    return dirs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_is_the_layout_asked_for(runs, layout):
    d = json.loads((runs[layout] / "plan.json").read_text())["degrees"]
    assert (d["dp_replicate"], d["dp_shard"], d["cp"], d["tp"]) == LAYOUTS[layout][2]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_losses_and_grad_norms_match_single_process(runs, layout):
    ref, got = metrics(runs["single"]), metrics(runs[layout])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_final_parameters_match_single_process(runs, layout, tmp_path):
    ref, got = final_params(runs["single"], tmp_path), final_params(runs[layout], tmp_path)
    assert ref.keys() == got.keys()
    for name, tensor in ref.items():
        assert got[name].shape == tensor.shape, name  # full tensors, not TP or FSDP shards
        diff = (tensor - got[name]).abs()
        assert diff.max() <= PARAM_ATOL and diff.mean() <= PARAM_MEAN_ATOL, name


def test_resume_under_tp_and_fsdp_is_exact(runs, tmp_path):
    whole, split = metrics(runs["tp2sp_fsdp2"]), metrics(runs["resumed"])
    assert [m["step"] for m in split] == list(range(1, STEPS + 1))
    for a, b in zip(whole, split, strict=True):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (
            b["step"], b["loss"], b["grad_norm"], b["lr"])
    ref = final_params(runs["tp2sp_fsdp2"], tmp_path)
    got = final_params(runs["resumed"], tmp_path)
    assert all(torch.equal(ref[name], got[name]) for name in ref)


def test_loss_falls(runs):
    losses = [m["loss"] for m in metrics(runs["single"])]
    assert losses[-1] < losses[0] - 1.0  # from ln(256) = 5.55 downwards


def test_replication_with_tp_is_refused(tmp_path):
    out = launch("--nproc-per-node", "4", "configs/tiny.yaml",
                 *overrides(tmp_path / "ddp_tp", "parallel.tp=2", "parallel.dp_replicate=2",
                            "parallel.dp_shard=1"))
    assert out.returncode == 2 and "Traceback" not in out.stderr  # refused before spawning
    assert "DDP cannot replicate tensor-parallel (DTensor) parameters" in out.stderr
    assert "use parallel.dp_shard >= 2" in out.stderr and "step 1/" not in out.stdout
