"""Every parallel layout trains the single-process numbers under ``orch launch``.

One module-scoped set of runs, two launches at a time (process start-up dominates: a launch
costs 4-10 s alone on 2 cores, a 4-process one about twice a 1-process one; 34 launches took
318 s one at a time and 273 s two at a time): a single-process reference per model and one run
per layout, all on the same data. Dense (tiny): data parallel (FSDP2 on 4 ranks, DDP on 2; HSDP
2x2 accumulating micro-batches with a reduce per micro-batch, FSDP2 on 2 with one per step: both
``parallel.grad_reduce`` modes, each checked gradient by gradient in
tests/parallel/test_grad_reduce.py), tensor + sequence parallelism composed with FSDP2, context
parallel (Ulysses alone, ring composed with TP). Two of the tensor-parallel layouts (ring x TP,
and 2BP-1F1B x TP below) run Qwen3's attention (``model.qk_norm``, heads wider than dim / heads:
QK-norm's weights replicated over the tp ranks, their gradients summed) against a single process
of that model, one launch more.
MoE (tiny-moe with 8 experts, top-2, aux loss and aux-loss-free bias both on): expert parallel over
2 ranks, ep2 folded into HSDP 2x2 (so the dense part runs HSDP), ep2 x etp2, ep2 with ring context
parallelism (the balancing loss sums the loads of the cp ranks, so it sees whole sequences), and
tensor + sequence parallel dense layers with the experts replicated on the tp ranks (tp2 in two
replicas: their expert-data-parallel unit sums the gradients) or split over them (ep2 x tp2 x
FSDP2). Pipeline
(every schedule on 2 and 4 ranks is checked gradient by gradient in tests/parallel/test_pipeline.py;
here under orch launch): 1F1B on 2 stages, ZB-H1 x FSDP2 with full recompute, 2BP-1F1B x 2 replicas
(HSDP with shards of one: DDP let them drift apart), 2BP-1F1B x TP2 with selective recompute,
interleaved (2 stages per rank) x ep2 on the MoE model, and ZB-V (2 stages per rank in a V, the
first rank also computing the loss) x FSDP2. Offload: one process with parameters, gradients, AdamW
states and swapped activations resting on the NVMe tier (a file in the test's directory), and a 7 MB
device budget (CPU homes are checked bit for bit in tests/offload); and two offloaded replicas of
the MoE model (``parallel.dp_replicate=2``: CPU homes, each replica stepping and saving the
optimizer states of its own units), twice: keeping every parameter in CPU memory, and with
``offload.shard_params`` keeping only its own units' parameters, on NVMe (the two must agree bit
for bit; shared parameters in CPU memory are checked in tests/parallel/test_offload_replicas.py).
Paths that a listed layout already runs are left to the
per-gradient tests in tests/parallel, to keep the suite's time: tensor parallel alone (with and
without sequence parallelism), expert parallel over 4 ranks, dense HSDP on its own, ring
attention without TP, FSDP x CP x TP on 8 processes (each was here and passed before 2026-12-02;
FSDP2 on 2 ranks is in every composed layout).
Every run evaluates as well (``eval:``, after steps 2 and 4, on two global batches of a small
held-out file the fixture writes): each layout's held-out losses must equal the single process's
within the loss tolerance, so evaluation is checked on every layout without a launch of its own;
the single process's run without evaluation (the one launch added for them) must train the same
numbers bit for bit, and the single processes' last evaluations must equal their final
checkpoints' weights run forward by hand on the same windows of the file. Measured: held-out
losses within 9.6e-7 of the single process's on every layout and resharded run (0 on 13 of 30),
the hand computation within 4.8e-7 (0 for the dense model).

Four layouts (pp2, the offloaded ones) run as a user resuming after a preemption: stopped at step
2, then the same command again, so their checks also cover a resume into pipeline stages and into
the offload tiers and the replicas' partition (an exact resume is tested in test_resume.py, so no
uninterrupted twin here).

Resharding: six runs resume another layout's step-2 checkpoint under a different plan (dp4 ->
dp2 x tp2, pp2 -> one process, ep2 -> ep4 on the MoE model with its expert bias, tp2 (x dp2) ->
cp2, NVMe-offloaded -> FSDP2 on 4 ranks and back) and must continue as the new plan's own
uninterrupted run does (for ep4, which has no run of its own here, as the single-process
reference, which every plan's run equals within the same tolerances).

The MoE routing is uneven by itself at this size: the test checks that every MoE run had empty
experts and experts with over twice the mean load in the same steps as the reference.

Measured with 6 steps (fp32, gloo, AdamW with clipping active): losses within 9.5e-7, MoE
balancing losses within 1.2e-8, gradient norms within 2.4e-6 relative, final parameters within
5.5e-5 (mean 8.2e-9) over all layouts. The tolerances are 5-20x above those (every parameter's
gradient is compared on its own, per rank, in tests/parallel); parameters after AdamW steps get
a looser max bound (AdamW can turn 1e-8 gradient noise into +-lr steps on near-zero gradients,
DESIGN.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_harness import (
    FAST,
    ONE_THREAD,
    eval_metrics,
    launch,
    metrics,
    overrides,
    two_at_a_time,
)
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from orch.config import load_config
from orch.models.llama import Transformer

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 4
EVAL_BATCHES = 2
EVAL_FILE = "held_out.txt"  # in the fixture's directory, beside every run's
EVAL = ["eval.interval=2", f"eval.batches={EVAL_BATCHES}"]  # after steps 2 and 4
LOSS_ATOL = 1e-5
GRAD_NORM_RTOL = 3e-5
PARAM_ATOL = 3e-4
PARAM_MEAN_ATOL = 1e-7
FLIPPED_LOSS_ATOL = 1e-3  # after a routing flip (measured: 1.0e-4 two steps later)
FLIPPED_PARAM_FACTOR = 30  # ... final parameters 4.0e-4 (mean 1.1e-6)

DENSE = "configs/tiny.yaml"
MOE = "configs/tiny-moe.yaml"
MOE_SETTINGS = ["model.experts=8", "model.bias_update_rate=0.001"]
TP2_DP2 = ["parallel.tp=2", "parallel.dp_shard=2", "train.recompute=selective"]
QWEN3 = ["model.qk_norm=true", "model.head_dim=48"]  # Qwen3's attention on the dense model
EP2_ETP2 = ["parallel.ep=2", "parallel.etp=2", "train.recompute=full"]
OFFLOAD_BUDGET = 7_000_000
OFFLOAD = ["offload.params=nvme", "offload.grads=nvme", "offload.optimizer=nvme",
           "offload.activations=nvme", "offload.nvme_path={scratch}",
           f"offload.device_budget={OFFLOAD_BUDGET}"]
REPLICAS_BUDGET = 20_000_000  # one MoE block with 8 experts needs 17.0 MB on the device
OFFLOAD_REPLICAS = ["offload.params=cpu", "offload.grads=cpu", "offload.optimizer=cpu",
                    "offload.activations=cpu", f"offload.device_budget={REPLICAS_BUDGET}",
                    "parallel.dp_replicate=2", "parallel.dp_shard=1",
                    "offload.cpu_adam=torch"]  # one kernel: the shared twin equals it exactly
LAYOUTS = {  # name: (config, processes, overrides, expected degrees)
    "fsdp4": (DENSE, 4, ["parallel.dp_shard=4"], dict(dp_shard=4)),
    "ddp2": (DENSE, 2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"], dict(dp_replicate=2)),
    # four micro-batches per rank reduce-scattered once per step; HSDP's two reduce-scattered
    # each (parallel.grad_reduce's default), its all-reduce waiting for the last
    "fsdp2_accum_step": (DENSE, 2, ["train.micro_batch=1", "parallel.grad_reduce=step"],
                         dict(dp_shard=2)),
    "hsdp2x2_accum": (DENSE, 4, ["train.micro_batch=1", "parallel.dp_replicate=2",
                                 "parallel.dp_shard=2"], dict(dp_replicate=2, dp_shard=2)),
    "tp2sp_fsdp2": (DENSE, 4, TP2_DP2, dict(dp_shard=2, tp=2)),
    "cp2_ulysses": (DENSE, 2, ["parallel.cp=2", "parallel.cp_kind=ulysses"], dict(cp=2)),
    "cp2_tp2": (DENSE, 4, [*QWEN3, "parallel.cp=2", "parallel.tp=2", "train.recompute=full"],
                dict(cp=2, tp=2)),
    # selective recompute around the experts' own FSDP unit failed in the first backward
    "ep2": (MOE, 2, ["parallel.ep=2", "train.recompute=selective"], dict(dp_shard=2, ep=2)),
    "ep2_hsdp2x2": (MOE, 4, ["parallel.ep=2", "parallel.dp_replicate=2", "parallel.dp_shard=2"],
                    dict(dp_replicate=2, dp_shard=2, ep=2, edp=2)),
    "ep2_etp2": (MOE, 4, EP2_ETP2, dict(dp_shard=4, ep=2, etp=2)),
    "ep2_cp2": (MOE, 4, ["parallel.ep=2", "parallel.cp=2"], dict(dp_shard=2, cp=2, ep=2)),
    "pp2": (DENSE, 2, ["parallel.pp=2"], dict(pp=2)),
    "pp2_fsdp2_zb": (DENSE, 4, ["parallel.pp=2", "parallel.dp_shard=2",
                                "parallel.pp_schedule=zb-h1", "train.recompute=full"],
                     dict(pp=2, dp_shard=2)),
    "pp2_tp2_2bp": (DENSE, 4, [*QWEN3, "parallel.pp=2", "parallel.tp=2",
                               "parallel.pp_schedule=2bp-1f1b", "train.recompute=selective"],
                    dict(pp=2, tp=2)),
    "pp2_ddp2_2bp": (DENSE, 4, ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1",
                                "parallel.pp_schedule=2bp-1f1b"], dict(pp=2, dp_replicate=2)),
    "pp2v2_ep2": (MOE, 4, ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=interleaved",
                           "parallel.virtual_stages=2"], dict(pp=2, dp_shard=2, ep=2)),
    "pp2v2_zbv_fsdp2": (DENSE, 4, ["parallel.pp=2", "parallel.dp_shard=2",
                                   "parallel.pp_schedule=zbv", "parallel.virtual_stages=2"],
                        dict(pp=2, dp_shard=2)),
    "offload_nvme": (DENSE, 1, OFFLOAD, dict()),
    "offload_dp2_moe": (MOE, 2, OFFLOAD_REPLICAS, dict(dp_replicate=2)),
    "offload_dp2_moe_shared_nvme": (MOE, 2, [*OFFLOAD_REPLICAS, "offload.shard_params=true",
                                             "offload.params=nvme", "offload.optimizer=nvme",
                                             "offload.nvme_path={scratch}"],
                                    dict(dp_replicate=2)),
    # replicas of tp ranks: FSDP2 with shards of one, as the experts tp folds need (a plain
    # DDP could not hold the DTensors, and this was refused as if it ran)
    "tp2_moe_replicas": (MOE, 4, ["parallel.tp=2", "parallel.dp_replicate=2",
                                  "parallel.dp_shard=1"], dict(tp=2, dp_replicate=2)),
    "ep2_tp2_fsdp2": (MOE, 4, ["parallel.tp=2", "parallel.ep=2", "parallel.dp_shard=2"],
                      dict(dp_shard=2, tp=2, ep=2)),
}
RESUMED = ("pp2", "offload_nvme", "offload_dp2_moe", "offload_dp2_moe_shared_nvme")
RESHARDED = {  # name: (the layout that saved step 2, the plan that resumes it)
    "dp4_to_dp2tp2": ("fsdp4", "tp2sp_fsdp2"),
    "pp2_to_pp1": ("pp2", "single"),
    "ep2_to_ep4": ("ep2", "ep4"),
    "tp2_to_cp2": ("tp2sp_fsdp2", "cp2_ulysses"),
    "offload_to_fsdp4": ("offload_nvme", "fsdp4"),
    "fsdp4_to_offload": ("fsdp4", "offload_nvme"),  # chunks from 4 ranks into NVMe units
}
TARGETS = {**LAYOUTS, "single": (DENSE, 1, [], {}), "single_moe": (MOE, 1, [], {}),
           "single_no_eval": (DENSE, 1, ["eval.interval=0"], {}),
           "single_qwen3": (DENSE, 1, QWEN3, {}),
           "ep4": (MOE, 4, ["parallel.ep=4"], dict(dp_shard=4, ep=4))}
SAVED_AT_2 = {source for source, _ in RESHARDED.values()} - set(RESUMED)
DEGREES = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "etp", "edp")


HELD_OUT = """In the beginning was the Word, and the Word was with God, and the Word was God.
The same was in the beginning with God. All things were made by him; and without him was not
any thing made that was made. In him was life; and the life was the light of men. And the light
shineth in darkness; and the darkness comprehended it not. There was a man sent from God, whose
name was John. The same came for a witness, to bear witness of the Light, that all men through
him might believe. He was not that Light, but was sent to bear witness of that Light.
"""


def same_routing_steps(ref: list[dict], got: list[dict]) -> int:
    """Steps, from the first, whose expert loads equal the reference's (all of them for dense
    models). Routing is discrete: once fp32 noise flips a near-tie, that token takes another
    expert and the runs differ by more than rounding from then on (seen: ep2 x cp2, step 4)."""
    for index, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a.get("expert_load") != b.get("expert_load"):
            return index
    return len(ref)


def reference_of(layout: str) -> str:
    if TARGETS[layout][0] == MOE:
        return "single_moe"
    return "single_qwen3" if QWEN3[0] in TARGETS[layout][2] else "single"


def uninterrupted(target: str) -> str:
    """The run a resumed one is held to: the same plan's own run (every layout here), or the
    single-process reference, which every plan's run equals within the tolerances (ep4)."""
    return target if target in ("single", *LAYOUTS) else reference_of(target)


def final_params(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{STEPS:08d}", out)
    return torch.load(out, weights_only=False)["model"]


def _launch(config: str, procs: int, run_dir: Path, *extra: str, resume: Path | None = None
            ) -> str:
    settings = MOE_SETTINGS if config == MOE else []
    held_out = f"eval.path={run_dir.parent / EVAL_FILE}"
    out = launch("--nproc-per-node", str(procs), config,
                 *overrides(run_dir, f"train.steps={STEPS}", *settings, *EVAL, held_out,
                            *extra),
                 *(["--resume", str(resume)] if resume else []), env=ONE_THREAD)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _run_layout(name: str, dirs: dict[str, Path], scratch: Path) -> None:
    """One layout's run (after a first launch stopped at step 2, for the resumed ones)."""
    config, procs, extra, _ = TARGETS[name]
    extra = [item.format(scratch=scratch) for item in extra]
    if name in RESUMED:
        _launch(config, procs, dirs[name], *extra, "run.stop_at_step=2")
    if name in SAVED_AT_2:
        extra.append("checkpoint.interval=2")
    stdout = _launch(config, procs, dirs[name], *extra)
    if name in RESUMED:
        assert "resumed from" in stdout and "step-00000002" in stdout


def _reshard(name: str, dirs: dict[str, Path], scratch: Path) -> None:
    """A run resuming another layout's step-2 checkpoint under a new plan."""
    source, target = RESHARDED[name]
    config, procs, extra, _ = TARGETS[target]
    extra = [item.format(scratch=scratch) for item in extra]
    saved = dirs[source] / "checkpoints" / "step-00000002"
    stdout = _launch(config, procs, dirs[name], *extra, resume=saved)
    assert f"resumed from {saved} at step 2" in stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    references = ["single", "single_moe", "single_no_eval", "single_qwen3"]
    names = [*references, *LAYOUTS, "nvme", *RESHARDED]
    dirs = {name: root / name for name in names}
    scratch = root / "nvme"  # the NVMe tier's directory (its scratch files have no name)
    scratch.mkdir()
    # text for two evaluation batches and a tail no evaluation reads (held out in name only:
    # the corpus has these verses too; the checks need comparable numbers, not unseen text)
    (root / EVAL_FILE).write_text(HELD_OUT * 4)
    # the most processes first, so the last launches to finish are short ones
    layouts = sorted([*references, *LAYOUTS], key=lambda name: -TARGETS[name][1])
    two_at_a_time(_run_layout, layouts, dirs, scratch)
    two_at_a_time(_reshard, RESHARDED, dirs, scratch)  # from the layouts' checkpoints
    return dirs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_is_the_layout_asked_for(runs, layout):
    d = json.loads((runs[layout] / "plan.json").read_text())["degrees"]
    want = {name: LAYOUTS[layout][3].get(name, 1) for name in DEGREES}
    if "edp" not in LAYOUTS[layout][3]:
        want["edp"] = d["world"] // (want["pp"] * want["ep"] * want["etp"])
    assert {name: d[name] for name in DEGREES} == want


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_losses_and_grad_norms_match_single_process(runs, layout):
    ref, got = metrics(runs[reference_of(layout)]), metrics(runs[layout])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert same_routing_steps(ref, got) >= 3  # a flip needs a near-tie: not in the first steps
    assert_same_steps(ref, got)


def assert_same_steps(ref: list[dict], got: list[dict]) -> None:
    """Per-step losses, balancing losses and gradient norms within the tolerances (looser for
    the steps after a routing flip)."""
    same = same_routing_steps(ref, got)
    for a, b in zip(ref[:same], got[:same], strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL)
        if a["aux_loss"] is not None:
            assert abs(a["aux_loss"] - b["aux_loss"]) <= LOSS_ATOL, a["step"]
    for a, b in zip(ref[same:], got[same:], strict=True):  # after a flip: close, not exact
        assert abs(a["loss"] - b["loss"]) <= FLIPPED_LOSS_ATOL, (a["step"], a["loss"], b["loss"])


def test_the_accumulating_runs_reduce_as_asked(runs):
    """Both ``parallel.grad_reduce`` modes ran (and trained the single process's numbers, in the
    tests above), each over several micro-batches."""
    plans = [json.loads((runs[name] / "plan.json").read_text())
             for name in ("fsdp2_accum_step", "hsdp2x2_accum")]
    assert [(p["microbatches"], p["grad_reduce"]) for p in plans] == [
        (4, "step"), (2, "microbatch")]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_final_parameters_match_single_process(runs, layout, tmp_path):
    assert_same_final_params(runs[reference_of(layout)], runs[layout], tmp_path)


def assert_same_final_params(ref_run: Path, run: Path, tmp: Path) -> None:
    """Every final parameter, whole, within the tolerances (looser after a routing flip)."""
    ref, got = final_params(ref_run, tmp), final_params(run, tmp)
    ref_steps, steps = metrics(ref_run), metrics(run)
    ref_steps = ref_steps[len(ref_steps) - len(steps):]  # a resumed run logs its own steps
    flipped = same_routing_steps(ref_steps, steps) < len(steps)
    scale = FLIPPED_PARAM_FACTOR if flipped else 1
    assert ref.keys() == got.keys()
    for name, tensor in ref.items():
        assert got[name].shape == tensor.shape, name  # full tensors, not TP, EP or FSDP shards
        diff = (tensor - got[name]).abs()
        assert diff.max() <= scale * PARAM_ATOL, name
        assert diff.mean() <= scale * PARAM_MEAN_ATOL, name


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if LAYOUTS[name][0] == MOE])
def test_moe_routing_is_uneven_and_the_same_as_single_process(runs, layout):
    ref = torch.tensor([m["expert_load"] for m in metrics(runs["single_moe"])])
    loads = torch.tensor([m["expert_load"] for m in metrics(runs[layout])])  # step, layer, e
    assert torch.equal(loads[0], ref[0])  # the same weights route the same tokens the same way
    # later steps: weights equal to ~1e-7, so a near-tie may flip a choice, but hardly any
    assert ((loads - ref).abs().sum((1, 2)) <= 0.01 * ref.sum((1, 2))).all()
    loads = loads.float()
    assert (loads == 0).any()  # some expert of some layer received no token in a step
    assert (loads.amax(-1) > 2 * loads.mean(-1)).any()  # and some took over twice the mean


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name.startswith("pp")])
def test_pipeline_runs_record_their_measured_timeline(runs, layout):
    run = runs[layout]
    plan = json.loads((run / "plan.json").read_text())
    pp, micro = plan["degrees"]["pp"], plan["microbatches"]
    stages_per_rank = plan["degrees"]["virtual_stages"]
    trace = json.loads((run / "pipeline_trace.json").read_text())
    assert trace["otherData"]["step"] == STEPS
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    forwards = [e for e in events if e["cat"] == "F"]
    assert len(forwards) == pp * stages_per_rank * micro  # every stage, every micro-batch
    assert {e["tid"] for e in events} == set(range(pp))
    assert (run / "pipeline_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for record in metrics(run):
        assert len(record["pipeline_idle"]) == pp
        assert all(0 <= fraction < 1 for fraction in record["pipeline_idle"])
        idle_s = [fraction * record["step_time_s"] for fraction in record["pipeline_idle"]]
        assert all(0 <= waited <= idle for waited, idle in  # a part of the idle time
                   zip(record["pipeline_transfer_s"], idle_s, strict=True))


@pytest.mark.parametrize("name", sorted(RESHARDED))
def test_a_checkpoint_resumes_onto_another_plan_as_that_plan_would_have_run(runs, name, tmp_path):
    """Saved at step 2 under one plan, resumed under another (other world size and degrees,
    offloaded or not): the plan is the new one, and steps 3-4 (losses, gradient norms, hence
    the same data: a sample seen twice or skipped would change them) and the final parameters
    equal the new plan's uninterrupted run."""
    source, target = RESHARDED[name]
    degrees = json.loads((runs[name] / "plan.json").read_text())["degrees"]
    want = TARGETS[target][3]
    assert {k: degrees[k] for k in want} == want and degrees["world"] == TARGETS[target][1]
    ref, got = metrics(runs[uninterrupted(target)]), metrics(runs[name])
    assert [m["step"] for m in got] == list(range(3, STEPS + 1))
    assert_same_steps(ref[2:], got)
    assert_same_final_params(runs[uninterrupted(target)], runs[name], tmp_path)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_evaluations_match_single_process(runs, layout):
    """The held-out loss after steps 2 and 4 (each global batch split over the data-parallel
    ranks and context-parallel positions, run forward only through TP, EP, pipeline stages or
    the offload tiers) equals the single process's within the loss tolerance (after a routing
    flip, the looser one)."""
    ref, got = eval_metrics(runs[reference_of(layout)]), eval_metrics(runs[layout])
    assert [e["step"] for e in got] == [2, STEPS] == [e["step"] for e in ref]
    tokens = EVAL_BATCHES * 8 * 64
    assert all(e["eval_tokens"] == tokens for e in got)
    same = same_routing_steps(metrics(runs[reference_of(layout)]), metrics(runs[layout]))
    for a, b in zip(ref, got, strict=True):
        atol = LOSS_ATOL if a["step"] <= same else FLIPPED_LOSS_ATOL
        assert abs(a["eval_loss"] - b["eval_loss"]) <= atol, (a, b)


@pytest.mark.parametrize("name", sorted(RESHARDED))
def test_a_resharded_run_evaluates_as_its_plans_uninterrupted_run(runs, name):
    _, target = RESHARDED[name]
    ref = [e for e in eval_metrics(runs[uninterrupted(target)]) if e["step"] > 2]
    got = eval_metrics(runs[name])
    assert [e["step"] for e in got] == [STEPS] == [e["step"] for e in ref]
    assert abs(ref[0]["eval_loss"] - got[0]["eval_loss"]) <= LOSS_ATOL


def test_evaluations_change_no_training_number(runs, tmp_path):
    """The same run with evaluations and without: the same losses, gradient norms and final
    parameters, bit for bit (no data, RNG, gradient or optimizer state touched)."""
    with_eval, without = runs["single"], runs["single_no_eval"]
    assert eval_metrics(without) == [] and len(eval_metrics(with_eval)) == 2
    keys = ("step", "loss", "grad_norm", "lr")
    assert ([[m[k] for k in keys] for m in metrics(with_eval)]
            == [[m[k] for k in keys] for m in metrics(without)])
    ref, got = final_params(without, tmp_path), final_params(with_eval, tmp_path)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("reference", ["single", "single_moe", "single_qwen3"])
def test_the_eval_loss_is_the_checkpoints_weights_run_forward_by_hand(runs, reference,
                                                                        tmp_path):
    """An independent computation: the final checkpoint's weights in a fresh model, run forward
    on the held-out file's first ``EVAL_BATCHES x 8`` windows of 65 tokens (packed back to
    back, each sharing its last token with the next window's first), all at once; the mean
    token cross-entropy equals the run's evaluation after the last step."""
    config, _, extra, _ = TARGETS[reference]
    cfg = load_config(config, [*FAST, *(MOE_SETTINGS if config == MOE else []), *extra])
    model = Transformer(cfg.model)
    model.load_state_dict(final_params(runs[reference], tmp_path))
    model.eval()
    ids = torch.tensor(list((runs[reference].parent / EVAL_FILE).read_bytes()))  # byte ids
    seq, count = cfg.train.seq_len, EVAL_BATCHES * cfg.train.global_batch
    windows = torch.stack([ids[i * seq: i * seq + seq + 1] for i in range(count)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    (last,) = [e for e in eval_metrics(runs[reference]) if e["step"] == STEPS]
    assert abs(float(loss) - last["eval_loss"]) <= LOSS_ATOL, (float(loss), last["eval_loss"])


def test_loss_falls(runs):
    for reference in ("single", "single_moe"):
        losses = [m["loss"] for m in metrics(runs[reference])]
        assert losses[-1] < losses[0] - 1.0  # from ln(256) = 5.55 downwards


def test_replication_with_tp_is_refused(tmp_path):
    out = launch("--nproc-per-node", "4", "configs/tiny.yaml",
                 *overrides(tmp_path / "ddp_tp", "parallel.tp=2", "parallel.dp_replicate=2",
                            "parallel.dp_shard=1"))
    assert out.returncode == 2 and "Traceback" not in out.stderr  # refused before spawning
    assert "DDP cannot replicate tensor-parallel (DTensor) parameters" in out.stderr
    assert "use parallel.dp_shard >= 2" in out.stderr and "step 1/" not in out.stdout


def test_offloaded_replicas_kept_their_device_budget(runs):
    """Two replicas, each the whole MoE model at home in CPU memory: every step's peak on each
    replica within the budget (their numbers equal the single process's in the tests above);
    ``offload`` is rank 0's figures, each rank's are in its ``devices`` reading. Its
    comm_bytes hold every gradient's reduce onto its owner (a step said only the norms'
    all-reduce, 120 bytes) and, after each start's first step (the run stops at step 2 and is
    started again), the previous update's broadcasts."""
    run = runs["offload_dp2_moe"]
    grads = json.loads((run / "plan.json").read_text())["memory"]["grads"]
    starts: list[list[int]] = []
    for record in metrics(run):
        if "resumed_from" in record:  # the first record of each start
            starts.append([])
        starts[-1].append(record["comm_bytes"]["dp"])
    assert len(starts) == 2
    for first, *later in starts:
        assert first >= grads and later and all(sent > first for sent in later), starts
    for record in metrics(run):
        assert [d["rank"] for d in record["devices"]] == [0, 1]
        assert record["devices"][0]["offload"] == record["offload"]
        for figures in (d["offload"] for d in record["devices"]):
            peak, budget = figures["device_peak_bytes"], REPLICAS_BUDGET
            assert figures["device_budget_bytes"] == budget and 0 < peak <= budget


def test_shared_parameters_train_the_replicas_numbers_exactly(runs, tmp_path):
    """``offload.shard_params``: each replica keeps only its own units' parameters (here on
    NVMe) and receives the others' per use, and sums each micro-batch's gradients onto the
    owners, which changes where the bytes are and nothing else: with two replicas the same
    losses, gradient norms and final parameters as the replicas that keep every parameter in CPU
    memory, bit for bit (both stopped at step 2 and resumed; uneven routing makes the replicas
    finish units in different orders and fetch ahead differently)."""
    layout = "offload_dp2_moe_shared_nvme"
    kept, shared = metrics(runs["offload_dp2_moe"]), metrics(runs[layout])
    for a, b in zip(kept, shared, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
        assert b["offload"]["params_received_bytes"] > 0
        assert "params_received_bytes" not in a["offload"]
    assert ([e["eval_loss"] for e in eval_metrics(runs["offload_dp2_moe"])]
            == [e["eval_loss"] for e in eval_metrics(runs[layout])])  # forwards alone too
    ref = final_params(runs["offload_dp2_moe"], tmp_path)
    got = final_params(runs[layout], tmp_path)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[name], got[name]) for name in ref)


def test_offloaded_run_kept_its_device_budget(runs):
    records = [m["offload"] for m in metrics(runs["offload_nvme"])]
    block, head = 4 * 725_504, 4 * (256 * 256 + 256)  # fp32 parameters of a block, the head
    for record in records:
        assert record["device_budget_bytes"] == OFFLOAD_BUDGET
        assert 2 * block <= record["device_peak_bytes"] <= OFFLOAD_BUDGET  # one prefetched
        # per micro-batch (4), every gradient went home once and every unit came to the device
        # twice (forward, backward) but the head, which stays from its forward to its backward
        assert record["to_device_bytes"] == 2 * record["to_home_bytes"] - 4 * head
        # the swapped activations come back from the NVMe tier for each backward, and
        # gradients, states and parameters are read besides (parameters only where no copy was
        # kept since their last use: tests/offload/test_nvme.py counts those bytes)
        swapped = record["activations_to_home_bytes"]
        assert swapped == record["activations_to_device_bytes"] > 0
        assert record["nvme_read_bytes"] > swapped
    assert not list(runs["nvme"].iterdir())  # the tier's scratch file went with the run
    # the optimizer figures are the previous step's update (none before a launch's first step:
    # steps 1 and 3, the run stopped at 2 and resumed)
    for record in records[1::2]:
        seconds, waited = record["optimizer_s"], record["optimizer_wait_s"]
        assert seconds > 0 and record["optimizer_overlap"] == max(0.0, 1 - waited / seconds)
    assert all(m["offload"] is None for m in metrics(runs["single"]))
