"""The step-time model: FLOP counts by hand, and the directions every estimate must move in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from orch.config import Config, load_config
from orch.parallel.schedules import SCHEDULES, Costs, build_schedule, simulate
from orch.plan.cost import (
    CLOSED_FORM,
    CPU_ADAM_PARAMS_PER_S,
    NVME_BYTES_PER_S,
    StepTime,
    estimate_step_time,
    flops_per_token,
    gemm_efficiency,
)
from orch.plan.degrees import Degrees
from orch.plan.devices import DeviceSpec, get_device
from orch.plan.layout import first_groups
from orch.plan.memory import param_counts
from orch.plan.schedule_shape import SIMULATED
from orch.plan.topology import Topology

REPO = Path(__file__).resolve().parents[2]
H100 = get_device("h100")


def config(name: str, **settings: Any) -> Config:
    """A preset with ``section.key=value`` overrides, written as ``section__key=value``."""
    overrides = [f"{key.replace('__', '.')}={value}" for key, value in settings.items()]
    return load_config(REPO / f"configs/{name}.yaml", overrides)


def degrees(cfg: Config, world: int) -> Degrees:
    p = cfg.parallel
    return Degrees(pp=p.pp, dp_replicate=p.dp_replicate,
                   dp_shard=world // (p.pp * p.dp_replicate * p.cp * p.tp), cp=p.cp, tp=p.tp,
                   ep=p.ep, etp=p.etp, virtual_stages=p.virtual_stages,
                   sequence_parallel=p.sequence_parallel and p.tp > 1)


def estimate(cfg: Config, world: int, gpus_per_node: int = 8,
             device: DeviceSpec = H100) -> StepTime:
    deg = degrees(cfg, world)
    links = Topology.uniform(world, gpus_per_node, device).links(first_groups(deg))
    return estimate_step_time(cfg, deg, links, device)


# --- FLOPs -------------------------------------------------------------------------------------

def test_llama3_8b_flops_per_token_by_hand() -> None:
    # Per layer: q and o 4096x4096, k and v 4096x1024 (8 KV heads), SwiGLU 3 x 4096x14336:
    # 218.1M; 32 layers 6.979B, plus the 128256x4096 output head 0.525B: 7.505B matmul weights.
    # Attention (PaLM): 12 x 32 layers x 8192 tokens x 4096 = 12.88 GFLOP per token.
    by_hand = 6 * 7.505e9 + 12 * 32 * 8192 * 4096
    assert flops_per_token(config("llama3-8b").model, 8192) == pytest.approx(by_hand, rel=0.02)


def test_large_model_short_sequence_is_6n() -> None:
    # Llama 3 70B: 80 x (2 x 8192^2 + 2 x 8192 x 1024 + 3 x 8192 x 28672) + 128256 x 8192.
    assert flops_per_token(config("llama3-70b").model, 128) == pytest.approx(6 * 69.5e9, rel=0.01)


def test_moe_counts_only_routed_top_k_and_shared_experts() -> None:
    # Mixtral 8x22B: ~39B active of ~141B parameters.
    mixtral = config("mixtral-8x22b").model
    assert flops_per_token(mixtral, 128) == pytest.approx(6 * 39e9, rel=0.02)
    # Qwen2-57B-A14B: ~14B active (a shared expert 8x the size of its 64 top-8 experts).
    qwen = config("qwen2-57b-a14b").model
    assert flops_per_token(qwen, 128) == pytest.approx(6 * 14e9, rel=0.05)


# --- step time ---------------------------------------------------------------------------------

PLANS = [
    ("llama3-8b", 64, {}),
    ("llama3-8b", 64, {"parallel__tp": 2}),
    ("llama3-8b", 64, {"parallel__tp": 8, "train__recompute": "full"}),
    ("llama3-8b", 64, {"parallel__cp": 4, "parallel__cp_kind": "ulysses"}),
    ("llama3-8b", 64, {"parallel__dp_replicate": 8, "train__micro_batch": 2}),
    ("llama3-70b", 256, {"parallel__tp": 8, "parallel__pp": 4, "train__recompute": "selective"}),
    ("llama3-70b", 256, {"parallel__tp": 8, "parallel__pp": 4, "parallel__virtual_stages": 5,
                         "parallel__pp_schedule": "interleaved"}),
    ("mixtral-8x22b", 128, {"parallel__tp": 2, "parallel__pp": 8, "parallel__ep": 8}),
    ("qwen2-57b-a14b", 64, {"parallel__ep": 8, "parallel__etp": 2, "parallel__cp": 2}),
    ("tiny-moe", 4, {"parallel__ep": 2}),
]


@pytest.mark.parametrize(("name", "world", "settings"), PLANS,
                         ids=[f"{p[0]}-{p[1]}-{len(p[2])}" for p in PLANS])
def test_mfu_never_exceeds_compute_efficiency(name: str, world: int,
                                              settings: dict[str, Any]) -> None:
    for gpus_per_node in (8, 2):
        step = estimate(config(name, **settings), world, gpus_per_node)
        assert 0 < step.mfu <= H100.compute_efficiency
        assert step.total_s == pytest.approx(step.compute_s + step.exposed_comm_s + step.bubble_s)
        assert step.tokens_per_s == pytest.approx(step.tokens_per_step / step.total_s)
        assert step.exposed_comm_s <= sum(step.comm_s.values()) + 1e-12
        json.dumps(step.as_dict())


def test_llama3_8b_on_64_h100_lands_in_a_believable_mfu_band() -> None:
    # Published bf16 MFU for Llama 3 8B on H100: 33-39% for torchtitan's FSDP2 (docs/
    # performance.md, GPUs capped at 500 W); Megatron-Core reaches the mid-40s to ~50%.
    for settings in ({}, {"parallel__tp": 2}):
        step = estimate(config("llama3-8b", **settings), 64)
        assert 0.30 <= step.mfu <= 0.60, settings


def test_fp32_compute_is_priced_at_the_fp32_peak() -> None:
    """An fp32 plan was priced at the bf16 tensor-core peak: the same step time as bf16 on an
    H100, where float32 matmuls (TF32 off, PyTorch's default) run at 67 of 989 TFLOP/s."""
    # (one reduce per step: bf16's reduce-scatter every micro-batch over 8 nodes would show)
    bf16 = estimate(config("llama3-8b", parallel__grad_reduce="step"), 64)
    fp32 = estimate(config("llama3-8b", train__precision="fp32", parallel__grad_reduce="step"),
                    64)
    assert fp32.compute_s == pytest.approx(bf16.compute_s * 989.4 / 67)
    assert fp32.mfu == pytest.approx(bf16.mfu, rel=0.05)  # each against its own peak
    assert get_device("cpu").peak("fp32") == get_device("cpu").peak_flops


def test_gradients_are_reduced_in_fp32_under_bf16_too() -> None:
    """Gradient reduction was priced in the compute dtype, at half its bytes under bf16, where
    FSDP2 reduces in fp32 (reduce_dtype) and DDP holds fp32 parameters: a run's comm_bytes
    showed the gathers halve under bf16 and the reduce not. Under a pipeline FSDP gathers once
    per step, as many bytes as it reduces under fp32."""
    cfg = dict(parallel__pp=2, parallel__dp_replicate=2)
    instant = dataclasses.replace(H100, intra_latency_s=0.0, inter_latency_s=0.0)  # bytes alone
    bf16 = estimate(config("llama3-8b", **cfg), 64, device=instant).comm_s
    fp32 = estimate(config("llama3-8b", train__precision="fp32", **cfg), 64,
                    device=instant).comm_s
    assert bf16["dp_shard-cp"] == pytest.approx(0.75 * fp32["dp_shard-cp"], rel=1e-12)
    assert bf16["dp_replicate"] == fp32["dp_replicate"]  # the shards' gradients only


def test_grad_reduce_microbatch_reduce_scatters_every_micro_batch() -> None:
    """``parallel.grad_reduce: microbatch`` (the default) reduce-scatters each micro-batch's
    gradients, ``step`` once per step; HSDP's all-reduce across replicas runs once per step
    either way, and a pipeline stage reduces once per step whatever the setting. With one
    micro-batch per rank the two are the same plan."""
    def comm(world: int, mode: str, **settings: Any) -> StepTime:
        return estimate(config("llama3-8b", parallel__grad_reduce=mode, **settings), world)

    hsdp = dict(parallel__dp_replicate=2)  # 16 ranks: 128 micro-batches per rank
    per_micro, per_step = comm(16, "microbatch", **hsdp), comm(16, "step", **hsdp)
    deg = degrees(config("llama3-8b", **hsdp), 16)
    links = Topology.uniform(16, 8, H100).links(first_groups(deg))
    dense = param_counts(config("llama3-8b").model).dense_total
    units = config("llama3-8b").model.layers + 1  # a block each, and the root
    reduce = 7 * (dense * 4 / 8 / links["dp_shard-cp"].bandwidth  # a ring reduce-scatter over 8
                  + units * links["dp_shard-cp"].latency_s)  # ranks, fp32, one per unit
    assert per_micro.comm_s["dp_shard-cp"] - per_step.comm_s["dp_shard-cp"] == pytest.approx(
        127 * reduce)
    assert per_micro.comm_s["dp_replicate"] == per_step.comm_s["dp_replicate"]
    assert per_micro.compute_s == per_step.compute_s
    assert per_micro.exposed_comm_s >= per_step.exposed_comm_s
    # the reduce-scatters beside 127 backwards hide as the step's one did beside the last (on
    # NVLink), and so do 32 a step over 8 nodes whose rings use every NIC of theirs; not those
    # of a group with one rank a node, on its NIC share alone
    assert per_micro.total_s == pytest.approx(per_step.total_s, rel=0.01)
    whole_nodes = comm(64, "microbatch"), comm(64, "step")
    assert whole_nodes[0].total_s == pytest.approx(whole_nodes[1].total_s, rel=0.01)
    across = [estimate(config("llama3-8b", parallel__grad_reduce=mode), 64, gpus_per_node=1)
              for mode in ("microbatch", "step")]
    assert across[0].total_s > 1.1 * across[1].total_s
    one = dict(train__global_batch=16)  # one micro-batch per rank
    assert comm(16, "microbatch", **one) == comm(16, "step", **one)
    pipelined = dict(parallel__pp=2)
    assert comm(16, "microbatch", **pipelined) == comm(16, "step", **pipelined)


def test_fsdp_pays_each_units_ring_latency() -> None:
    """FSDP gathers and reduce-scatters unit by unit (a block each, and the root), and each
    ring pays n - 1 latency-bound steps: priced as one collective for the whole model, a gather
    of Llama 3 70B over 4,096 ranks paid 41 ms of latency where its 81 units' pay 3.3 s, and
    --auto chose plain FSDP over 1,024 ranks of 4,096 (an HSDP keeps the rings short)."""
    cfg = config("llama3-70b", parallel__dp_shard=4096, train__global_batch=4096)
    instant = dataclasses.replace(H100, intra_latency_s=0.0, inter_latency_s=0.0)
    latency = (estimate(cfg, 4096).comm_s["dp_shard-cp"]
               - estimate(cfg, 4096, device=instant).comm_s["dp_shard-cp"])
    collectives = 2 + 1  # one micro-batch: two gathers (forward, backward), one reduce-scatter
    assert latency == pytest.approx(collectives * 81 * 4095 * H100.inter_latency_s)
    def replicas_latency(**settings: Any) -> float:
        cfg = config("llama3-8b", **settings)
        return (estimate(cfg, 64).comm_s["dp_replicate"]
                - estimate(cfg, 64, device=instant).comm_s["dp_replicate"])

    # HSDP all-reduces unit by unit (32 blocks and the root); DDP bucket by bucket (25 MiB of
    # Llama 3 8B's 32 GB of fp32 gradients: 1,226), not per unit
    hsdp = replicas_latency(parallel__dp_replicate=8, parallel__dp_shard=8)
    assert hsdp == pytest.approx(2 * 33 * 7 * H100.inter_latency_s)
    buckets = -(-param_counts(config("llama3-8b").model).dense_total * 4 // (25 << 20))
    ddp = replicas_latency(parallel__dp_replicate=64, parallel__dp_shard=1)
    assert ddp == pytest.approx(2 * buckets * 63 * H100.inter_latency_s)
    from orch.plan import resolve_machine, search

    machine = resolve_machine(config("llama3-70b"), 4096, None, None, [])
    assert machine is not None
    best = search(config("llama3-70b"), machine, top=1).best[0]
    assert best.degrees.dp_replicate > 1, best.degrees


def test_tp_across_nodes_is_slower_than_inside_one() -> None:
    cfg = config("llama3-8b", parallel__tp=8)
    inside, across = estimate(cfg, 64, gpus_per_node=8), estimate(cfg, 64, gpus_per_node=4)
    # rings over 4 NICs' shares a node (200 GB/s) against NVLink (450 GB/s), slower latency
    assert across.comm_s["tp"] > 2 * inside.comm_s["tp"]
    assert across.total_s > inside.total_s


def test_more_data_parallel_ranks_raise_throughput_at_fixed_batch() -> None:
    cfg = config("llama3-8b")
    rates = [estimate(cfg, world).tokens_per_s for world in (8, 16, 64, 256, 1024)]
    assert rates == sorted(rates) and rates[-1] > 50 * rates[0]


def test_pipeline_bubble_shrinks_with_more_micro_batches() -> None:
    fractions = []
    for batch in (64, 128, 512):
        step = estimate(config("llama3-70b", parallel__tp=8, parallel__pp=4,
                               train__global_batch=batch), 256)
        # The bubble idles a share of each stage's critical work: compute and exposed TP.
        fractions.append(step.bubble_s / (step.compute_s + step.comm_s["tp"]))
    assert fractions == sorted(fractions, reverse=True)
    # 8 data-parallel ranks: 64 sequences are 8 micro-batches, a bubble of (4 - 1) / 8.
    assert fractions[0] == pytest.approx(3 / 8)


def test_schedules_order_their_bubbles() -> None:
    def bubble(**settings: Any) -> float:
        return estimate(config("llama3-70b", parallel__tp=8, parallel__pp=4, **settings),
                        256).bubble_s

    one_f_one_b = bubble(parallel__pp_schedule="1f1b")
    assert bubble(parallel__pp_schedule="2bp-1f1b") < one_f_one_b
    assert bubble(parallel__pp_schedule="zb-h1") == pytest.approx(one_f_one_b / 3)
    assert bubble(parallel__pp_schedule="interleaved", parallel__virtual_stages=2) == (
        pytest.approx(one_f_one_b / 2))
    assert bubble(parallel__pp_schedule="zbv", parallel__virtual_stages=2) == (
        pytest.approx(one_f_one_b / 6))
    assert set(CLOSED_FORM) | set(SIMULATED) == set(SCHEDULES)
    assert not set(CLOSED_FORM) & set(SIMULATED)


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 1), (2, 3), (4, 1), (4, 2), (4, 5),
                                                      (4, 8), (8, 1), (8, 4), (8, 12), (8, 20)])
def test_zbv_bubble_is_the_simulated_one_at_any_micro_batch_count(stages, microbatches):
    """The plan priced ZB-V at a sixth of 1F1B's bubble whatever the micro-batches, where with
    fewer than ``2 pp`` of them more than the fill idles (4 stages, 2 micro-batches: 0.58 of the
    work, not 0.25): its share of the work now is the simulator's."""
    def bubble(schedule: str) -> float:
        # 256 ranks, tp 8: 32 / stages data-parallel ranks, one sequence per micro-batch
        return estimate(config("llama3-70b", parallel__tp=8, parallel__pp=stages,
                               parallel__pp_schedule=schedule,
                               train__global_batch=32 // stages * microbatches), 256).bubble_s

    share = bubble("zbv") / bubble("1f1b") * (stages - 1) / microbatches
    built = build_schedule("zbv", stages, microbatches, 2)
    simulated = simulate(built, Costs()).makespan / (3 * microbatches) - 1
    assert share == pytest.approx(simulated)


def test_2bp_bubble_follows_its_bound_on_deferred_steps():
    """The bubble of a 2BP schedule is its built schedule's simulated idle time: it was half
    1F1B's whatever ``parallel.pp_max_deferred`` said (369.5 ms for Llama 3 8B on 4 stages at
    0 and at 16), where ``orch schedule`` shows 16 waiting W's idle more than 1F1B."""
    def bubble(**settings: Any) -> float:
        return estimate(config("llama3-70b", parallel__tp=8, parallel__pp=4, **settings),
                        256).bubble_s

    one_f_one_b = bubble(parallel__pp_schedule="1f1b")
    by_bound = {d: bubble(parallel__pp_schedule="2bp-1f1b",
                          **({} if d is None else {"parallel__pp_max_deferred": d}))
                for d in (None, 0, 16)}
    # 4 stages: 1F1B idles 3 (F + I + W); W's right after their I's 2, r on rank r 1 (ZB-H1's
    # staircase), 16 waiting 6, the backlog a tail at the end of the step
    assert by_bound[None] == pytest.approx(one_f_one_b / 3)
    assert by_bound[0] == pytest.approx(one_f_one_b * 2 / 3)
    assert by_bound[16] == pytest.approx(one_f_one_b * 2)
    assert bubble(parallel__pp_schedule="2bp-gpipe") == pytest.approx(one_f_one_b * 2 / 3)


def test_recompute_costs_compute_but_not_model_flops() -> None:
    none, selective, full = (estimate(config("llama3-8b", train__recompute=r), 64)
                             for r in ("none", "selective", "full"))
    assert full.compute_s == pytest.approx(none.compute_s * 4 / 3)
    assert none.compute_s < selective.compute_s < 1.1 * none.compute_s
    assert full.flops_per_token == none.flops_per_token
    assert full.mfu < none.mfu


def test_ring_attention_hides_behind_long_sequences() -> None:
    # Same tokens per rank per micro-batch, so matmul efficiency is equal in both.
    short = estimate(config("llama3-8b", parallel__cp=8, train__seq_len=4096,
                            train__micro_batch=2), 64, 4)
    long = estimate(config("llama3-8b", parallel__cp=8, train__seq_len=8192,
                           train__global_batch=1024), 64, 4)
    for step in (short, long):
        assert step.comm_s["cp"] > 0
    # Attention grows with the square of the chunk, K/V traffic only linearly.
    assert long.comm_s["cp"] / long.compute_s < short.comm_s["cp"] / short.compute_s


def test_expert_parallel_all_to_alls_are_priced() -> None:
    local = estimate(config("mixtral-8x22b", parallel__tp=2, parallel__pp=8, parallel__ep=8),
                     128)
    spread = estimate(config("mixtral-8x22b", parallel__tp=2, parallel__pp=8, parallel__ep=8),
                      128, gpus_per_node=2)
    assert 0 < local.comm_s["ep"] < spread.comm_s["ep"]
    assert "edp" in local.comm_s and "tp" in local.comm_s


def test_small_matmuls_lose_efficiency():
    h100, cpu = get_device("h100"), get_device("cpu")
    assert gemm_efficiency(8192, 4096, 1, h100) == pytest.approx(0.94, abs=0.01)
    assert gemm_efficiency(2048, 4096, 1, h100) < gemm_efficiency(8192, 4096, 1, h100)
    assert gemm_efficiency(8192, 4096, 8, h100) < gemm_efficiency(8192, 4096, 2, h100)
    # A CPU core saturates on far smaller matmuls than an H100.
    assert gemm_efficiency(512, 256, 1, cpu) > 0.85 > gemm_efficiency(512, 256, 1, h100)


def test_fine_grained_experts_compute_at_their_own_gemms_size() -> None:
    """Qwen3-30B-A3B's 128 experts (top-8) at 8K tokens: an expert's GEMMs take 512 rows a
    micro-batch without expert parallelism, 4,096 under ep8; they were priced at the dense
    layers' rate, so ``--auto`` saw no reason to spread them. A dense model is priced as
    before, and Mixtral's 8 coarse experts (thousands of rows each) lose next to nothing."""
    h100 = get_device("h100")
    alone = estimate(config("qwen3-30b-a3b"), 64)
    spread = estimate(config("qwen3-30b-a3b", parallel__ep=8), 64)
    assert spread.compute_s < 0.8 * alone.compute_s
    rows = 8192 * 8 / 128  # a rank's tokens, top-8, over 128 experts
    dense_rate = gemm_efficiency(8192, 2048, 1, h100)
    routed = (gemm_efficiency(rows, 2048, 1, h100), gemm_efficiency(8 * rows, 2048, 1, h100))
    assert routed[0] < routed[1] < dense_rate
    llama = config("llama3-8b")
    assert estimate(llama, 64).compute_s == pytest.approx(
        flops_per_token(llama.model, 8192) * 2048 * 8192 / 64
        / (h100.peak("bf16") * h100.compute_efficiency * gemm_efficiency(8192, 4096, 1, h100)))


def test_offload_prices_host_traffic_and_the_cpu_step() -> None:
    """One H100 fine-tuning Llama 3 8B with parameters, gradients and optimizer at home on the
    CPU: 8 micro-batches each move the parameters in twice and the gradients out once over
    PCIe 5 (50 GB/s), synchronously; the CPU step (8B parameters at 1.9 G/s) hides behind the
    next forward as far as it goes."""
    cfg = config("llama3-8b", train__global_batch=8, train__micro_batch=1)
    base = estimate(cfg, 1)
    for group in ("params", "grads", "optimizer"):
        setattr(cfg.offload, group, "cpu")
    off = estimate(cfg, 1)
    n = param_counts(cfg.model).total
    transfers = 8 * 3 * n * 4 / 50e9
    step = n / CPU_ADAM_PARAMS_PER_S
    assert off.comm_s["offload"] == pytest.approx(transfers + step)
    hidden = base.compute_s / 3  # the forward's share
    assert off.total_s == pytest.approx(base.total_s + transfers + max(0.0, step - hidden))
    assert off.tokens_per_s < base.tokens_per_s
    cfg.offload.activations = "cpu"  # swapping adds each micro-batch's activations, both ways
    assert estimate(cfg, 1).comm_s["offload"] > off.comm_s["offload"]
    assert "offload" not in base.comm_s
    cfg.offload.activations = "device"
    cfg.offload.params = cfg.offload.optimizer = "nvme"  # ~3 GB/s: every fetch reads the disk,
    nvme = estimate(cfg, 1)  # and the update reads and writes parameters and AdamW moments
    fetches, update = 8 * 2 * n * 4 / NVME_BYTES_PER_S, (2 * n * 4 + 2 * n * 8) / NVME_BYTES_PER_S
    assert nvme.comm_s["offload"] == pytest.approx(transfers + step + fetches + update, rel=1e-3)
    cfg.offload.grads = "nvme"  # written after each of the 8 backwards, read before 7 of them
    grads = estimate(cfg, 1)  # (exposed), and read once more by the update
    disk = (15 * n * 4 + n * 4) / NVME_BYTES_PER_S
    assert grads.comm_s["offload"] == pytest.approx(nvme.comm_s["offload"] + disk, rel=1e-3)


def test_offloaded_replicas_each_step_a_share_on_the_cpu() -> None:
    """Four replicas of Llama 3 8B at home on the CPU: 2 micro-batches each, and each replica
    steps a quarter of the parameters (orch.offload.partition)."""
    cfg = config("llama3-8b", train__global_batch=8, train__micro_batch=1,
                 parallel__dp_replicate=4, parallel__dp_shard=1)
    for group in ("params", "grads", "optimizer"):
        setattr(cfg.offload, group, "cpu")
    n = param_counts(cfg.model).total
    transfers, step = 2 * 3 * n * 4 / 50e9, n / 4 / CPU_ADAM_PARAMS_PER_S
    assert estimate(cfg, 4).comm_s["offload"] == pytest.approx(transfers + step)
    # sharing the parameters (offload.shard_params): each use of a unit (forward and backward,
    # 2 micro-batches) first comes from its owner over the replicas' link
    kept = estimate(cfg, 4).comm_s["offload"]
    cfg.offload.shard_params = True
    deg = degrees(cfg, 4)
    link = Topology.uniform(4, 8, H100).links(first_groups(deg))["dp_replicate"]
    broadcasts = 2 * 2 * (n * 4 / link.bandwidth + link.latency_s)
    assert estimate(cfg, 4).comm_s["offload"] == pytest.approx(kept + broadcasts)


def test_experts_not_folded_travel_with_the_dense_weights() -> None:
    """With ep = etp = tp = 1 the experts are in the blocks' FSDP units: gathered inside the
    shard group and all-reduced over the replicas, like the dense weights. They were priced as
    gathered over every replica on the inter-node link: 156 of a 160 s step for Mixtral 8x22B on
    8 x 8 H100s, where the dense weights took 0.7 s. (Reduced once per step: each micro-batch's
    reduce-scatter of 141B parameters' gradients would show beside 2 s of compute.)"""
    cfg = config("mixtral-8x22b", parallel__dp_replicate=8, parallel__ep=1,
                 parallel__grad_reduce="step")
    step = estimate(cfg, 64)
    assert "edp" not in step.comm_s and step.total_s < 1.1 * step.compute_s
    folded = estimate(config("mixtral-8x22b", parallel__dp_replicate=8, parallel__ep=8), 64)
    assert folded.comm_s["edp"] > 0  # folded experts: FSDP over their own edp ranks


def _newton_schulz(rows: int, cols: int) -> float:
    """FLOPs of Muon's five quintic iterations on a matrix, by hand: per iteration X X^T, its
    square and that times X, on the wide orientation (m <= n)."""
    m, n = sorted((rows, cols))
    return 5 * (2 * m * m * n + 2 * m ** 3 + 2 * m * m * n)


def test_muon_orthogonalizes_only_the_experts_fsdp_leaves_a_rank() -> None:
    """FSDP shards an expert stack on its experts' dim and Muon keeps that split: Mixtral 8x22B
    over 64 FSDP ranks leaves each rank one expert (or none) to orthogonalize, not all 8 (its
    step was priced 38 s where the busiest rank spends 6); the dense matrices the 64 ranks
    split they share out: 2 of the 112 q and o (6144 square, one layout), 2 of the 112 k and v,
    1 of the 56 routers."""
    muon = estimate(config("mixtral-8x22b", optimizer__name="muon"), 64)
    adamw = estimate(config("mixtral-8x22b"), 64)
    shared_out = (2 * _newton_schulz(6144, 6144) + 2 * _newton_schulz(1024, 6144)
                  + _newton_schulz(8, 6144))
    rate = H100.peak("bf16") * H100.compute_efficiency
    comm = sum(seconds - adamw.comm_s.get(dim, 0.0) for dim, seconds in muon.comm_s.items())
    assert muon.optimizer_s - comm == pytest.approx(
        (shared_out + 56 * 3 * _newton_schulz(16384, 6144)) / rate, rel=1e-9)
    # the step's own term, after the model's compute and communication, which it leaves alone
    assert (muon.compute_s, muon.exposed_comm_s) == (adamw.compute_s, adamw.exposed_comm_s)
    assert muon.total_s == pytest.approx(adamw.total_s + muon.optimizer_s)


def test_muon_shares_out_the_matrices_over_the_ranks_that_split_them() -> None:
    """Each rank orthogonalizes one whole matrix of each chunk of as many as ranks split them
    (``orch.runtime.muon.matrix_chunks``): Llama 3 70B under tp8 x fsdp128 has 5 layouts (wq,
    wo; wk and wv; w1 and w3; w2) of at most 160 matrices over 1,024 ranks, so the busiest
    rank runs 5 matrices' iterations, not all 560 (26 s of a 58 s step). HSDP's replicas each
    share out the same matrices (their iterations are plain FSDP's)."""
    def iterations(name: str, world: int, **settings: Any) -> float:
        muon = estimate(config(name, optimizer__name="muon", **settings), world)
        adamw = estimate(config(name, **settings), world)
        return muon.optimizer_s - sum(seconds - adamw.comm_s.get(dim, 0.0)
                                      for dim, seconds in muon.comm_s.items())

    rate = H100.peak("bf16") * H100.compute_efficiency
    five = (2 * _newton_schulz(8192, 8192) + _newton_schulz(1024, 8192)
            + 2 * _newton_schulz(28672, 8192))
    assert iterations("llama3-70b", 1024, parallel__tp=8) == pytest.approx(five / rate, rel=1e-9)
    assert iterations("llama3-8b", 128, parallel__dp_replicate=2) == pytest.approx(
        iterations("llama3-8b", 64), rel=1e-12)


def test_each_all_to_all_spreads_a_matrix_a_chunk() -> None:
    """A chunk (the last padded to the group with zeros) goes out and back by an all-to-all in
    which each rank spreads one matrix's fp32 bytes: Llama 3 8B over 64 FSDP ranks sends its 4
    chunks' (q and o 4096 square, k and v 1024 x 4096, w1 and w3, and w2's 32 of 64) twice,
    63/64 of each at a rank's own share of the link (priced as one gather a matrix: 224)."""
    instant = dataclasses.replace(H100, intra_latency_s=0.0, inter_latency_s=0.0)
    cfg = config("llama3-8b", optimizer__name="muon")
    deg = degrees(cfg, 64)
    link = Topology.uniform(64, 8, instant).links(first_groups(deg))["dp_shard-cp"]
    sent = estimate(cfg, 64, device=instant).comm_s["dp_shard-cp"] - estimate(
        config("llama3-8b"), 64, device=instant).comm_s["dp_shard-cp"]
    matrices = 4096 * 4096 + 1024 * 4096 + 2 * 14336 * 4096
    assert sent == pytest.approx(2 * 63 / 64 * 4 * matrices / link.bandwidth, rel=1e-9)


def test_muon_shares_the_router_over_fsdp_only() -> None:
    """The router is whole on every tensor-parallel rank (only FSDP splits it): its all-to-alls
    run over the FSDP group alone, so the tp ones do not grow with the experts."""
    def tp_comm(experts: int) -> float:
        settings = dict(parallel__tp=2, model__experts=experts)
        return (estimate(config("mixtral-8x22b", optimizer__name="muon", **settings), 64)
                .comm_s["tp"] - estimate(config("mixtral-8x22b", **settings), 64).comm_s["tp"])

    assert tp_comm(8) == pytest.approx(tp_comm(16), rel=1e-12)


def test_muon_pays_its_rings_latency_per_chunk_and_direction() -> None:
    """A chunk goes out and comes back by one all-to-all each (``orch.runtime.muon``): Llama 3
    8B's 224 matrices over 64 FSDP ranks are 4 chunks (q and o share a layout; k and v; w1 and
    w3; w2), 8 all-to-alls' latency, where a gather a matrix paid 224 rings'."""
    instant = dataclasses.replace(H100, intra_latency_s=0.0, inter_latency_s=0.0)

    def latency(name: str) -> float:
        cfg = config("llama3-8b", optimizer__name=name)
        return (estimate(cfg, 64).comm_s["dp_shard-cp"]
                - estimate(cfg, 64, device=instant).comm_s["dp_shard-cp"])

    assert latency("muon") - latency("adamw") == pytest.approx(
        4 * 2 * 63 * H100.inter_latency_s, rel=1e-6)
