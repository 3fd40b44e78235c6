"""Step-time model: how long one optimizer step takes for a plan, and the MFU that implies.

An analytic, per-rank model, cheap enough (microseconds) to price every candidate of a search:

- **Compute**: the step's FLOPs (model FLOPs plus recomputation) split evenly over all ranks, at
  ``peak_flops x compute_efficiency`` of the slowest device. Full recompute runs the forward
  again; orch's selective recompute keeps every matmul and attention output and runs only the
  elementwise ops again, priced as memory traffic (``ELEMENTWISE_PASSES`` over the tensors they
  make, at ``memory_bw x compute_efficiency``). Either recompute runs the collectives inside a
  layer again (tensor, expert and Ulysses context parallelism); ring attention's outputs are
  kept by selective recompute.
- **Tensor parallelism** (+ sequence parallelism): per layer, forward and backward, an
  all-gather/reduce-scatter pair (or one all-reduce, the same volume) around attention and
  around the MLP, ring cost. It sits on the critical path, so it is all exposed.
- **Context parallelism**: ring attention passes K/V chunks ``cp - 1`` times per layer forward
  and again with dK/dV backward, hidden behind the attention compute of the rank's chunk;
  Ulysses' all-to-alls of q, k, v and the output are exposed.
- **Expert parallelism**: dispatch and combine all-to-alls, forward and backward, per MoE layer,
  of each token's ``top_k`` copies (tokens split over TP first, as sequence parallelism
  leaves them); exposed. With ``etp > 1`` the experts' own tensor
  parallelism gathers the routed tokens like TP does.
- **Data parallelism**: FSDP gathers parameters (compute dtype) in forward and again in backward
  (reshard after forward) for every micro-batch when there is no pipeline, once per step with
  one (torch's pipeline stage keeps them gathered across micro-batches); gradients accumulate
  locally and are reduced once per step (FSDP2's ``set_requires_gradient_sync(False)`` before
  the last micro-batch) under ``parallel.grad_reduce: step`` or in a pipeline, in fp32 whatever
  the compute dtype (``GRAD_REDUCE_BYTES``): reduce-scatter over FSDP's ``dp_shard x cp`` group,
  all-reduce of the shard over ``dp_replicate``; under ``microbatch`` (outside a pipeline) the
  reduce-scatter runs in every micro-batch's backward and only HSDP's all-reduce once per step.
  Expert weights
  do the same over the ranks sharding them (``Degrees.expert_shard``: all ``edp`` ranks when
  the experts are folded), else are all-reduced. Gathers and the earlier micro-batches'
  reduce-scatters overlap the whole step but the last backward; the last reduction only the
  last micro-batch's backward. Overlapped
  communication hides behind ``OVERLAP`` of the compute it runs beside.
- **Pipeline**: activation and gradient sends per micro-batch (exposed, small), and a bubble of
  ``(pp - 1) / (micro-batches x v)`` of the per-rank critical work, scaled per schedule; for the
  2BP schedules, ZB-H1 and ZB-V the built schedule's simulated idle time over its work.

FLOPs follow the PaLM / Megatron MFU convention (see ``flops_per_token``); a pipeline rank's share
is its layers' FLOPs, and the output head's on the last stage (``layer_flops``, ``head_flops``). Not
modelled: the embedding lookup and the loss (memory-bound, no matmul), load imbalance between
experts, contention of concurrent collectives for one NIC. Kernel efficiency falling at small
per-rank matmuls is a heuristic (``gemm_efficiency``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from orch.config.schema import Config, ModelConfig
from orch.parallel.schedules.generators import chunks_per_rank
from orch.plan.degrees import Degrees
from orch.plan.devices import DeviceSpec
from orch.plan.memory import (
    estimate_memory,
    model_key,
    muon_matrices,
    param_counts,
    recomputed_layer_bytes,
)
from orch.plan.schedule_shape import SIMULATED, bubble_share
from orch.plan.topology import Link

GRAD_REDUCE_BYTES = 4
"""Bytes per gradient element that data parallelism reduces: fp32 under bf16 too (FSDP2's
``reduce_dtype``, DDP's fp32 parameters: ``orch.parallel.data_parallel``), where parameters are
gathered in the compute dtype. A run's ``comm_bytes`` shows it (tiny model, 2 ranks: gathers
halve under bf16, the 12.1 MB reduce does not)."""
OVERLAP = 0.9
"""Share of the compute beside it that overlapped communication can hide: collectives running
concurrently take SMs and memory bandwidth from the kernels they overlap."""

CLOSED_FORM = ("gpipe", "1f1b", "interleaved")
"""Schedules whose bubble is 1F1B's ``(pp - 1) / micro-batches`` (interleaved's divided by its
chunks per rank): what the simulator finds for them at equal costs. The 2BP
schedules, ZB-H1 and ZB-V (``orch.plan.schedule_shape.SIMULATED``) are simulated as built
instead, since how much of the bubble their deferred weight-gradient steps fill depends on how
many may wait (``parallel.pp_max_deferred``: 2BP-1F1B at 4 stages fills two thirds of it by
default, a third with 0, and idles twice 1F1B's with 16, the backlog of W's becoming a tail) and,
for ZB-V, on how many micro-batches there are: only its fill, a sixth of 1F1B's, from ``2 pp``
micro-batches on, 0.58 of the work at ``pp = 4`` with 2 (a sixth said 0.25)."""

ELEMENTWISE_PASSES = 3
"""Bytes an elementwise op moves per byte it makes: it writes its output once and reads one or
two inputs of the same size (norms, RoPE, SiLU and the gating product, residual adds)."""

BACKWARD_SHARE = 2 / 3
"""Backward's share of a micro-batch's compute (2 of the 6 FLOPs per parameter are forward)."""

CPU_ADAM_PARAMS_PER_S = 1.9e9
"""Parameters per second an offloaded optimizer step updates on the host CPU: 100M parameters
in 53 ms on the 2-core CI machine with DeepSpeed's CPU Adam kernel (``offload.cpu_adam``; torch's
fused AdamW 74 ms, its foreach AdamW 405 ms: ``benchmarks/offload_io.py``); a server CPU with
more cores does better, so offloaded plans err on the slow side."""
NVME_BYTES_PER_S = 3e9
"""Reads or writes of the NVMe tier: one PCIe 4.0 SSD sustains about 3 GB/s for large aligned
transfers (``benchmarks/offload_io.py`` measures a machine's own)."""


def gemm_efficiency(tokens: float, hidden: int, tp: int, device: DeviceSpec) -> float:
    """Share of ``compute_efficiency`` reached by a rank's matmuls, ``x / (x + X0)``.

    Kernel efficiency falls when a rank's matmuls are small (few tokens per micro-batch after
    context parallelism, thin weight slices after tensor parallelism): too few tiles to fill
    the device and too little work per byte loaded. ``x = tokens x hidden / tp`` per
    micro-batch and ``X0`` is the device's ``matmul_half_size``; on an H100 that gives 0.94 for
    Llama 3 8B at 8K tokens without TP, 0.80 at 2K tokens or at tp 8 on 70B. A heuristic, not a
    measurement: it keeps the search from trading big matmuls for free-looking context or
    tensor parallelism.
    """
    size = tokens * hidden / tp
    return size / (size + device.matmul_half_size)


_LAYER_FLOPS: dict[tuple, tuple[float, ...]] = {}
"""``layer_flops`` by model shape and sequence length: the search asks for it per candidate."""


def layer_flops(m: ModelConfig, seq_len: int) -> tuple[float, ...]:
    """Training FLOPs per token of each layer in order (``flops_per_token``'s convention): what
    a pipeline stage's share of the compute is made of, dense and MoE layers differing."""
    key = (model_key(m), seq_len)
    if key not in _LAYER_FLOPS:
        pc = param_counts(m)
        attention = 12.0 * seq_len * m.heads * m.head_size
        one_expert = pc.experts // m.experts if m.experts else 0
        dense = 6.0 * (pc.attention + pc.mlp) + attention
        moe = (6.0 * (pc.attention + pc.router + pc.shared_expert + m.top_k * one_expert)
               + attention)
        _LAYER_FLOPS[key] = tuple(moe if m.is_moe_layer(i) else dense for i in range(m.layers))
    return _LAYER_FLOPS[key]


def head_flops(m: ModelConfig) -> float:
    """Training FLOPs per token of the output head, which the last pipeline stage runs: for
    Llama 3 8B (128K vocabulary) 1.8 layers' worth at 8K tokens."""
    return 6.0 * param_counts(m).embedding


_FLOPS: dict[tuple, float] = {}
"""``_flops`` by model shape and sequence length: every step time asks for it."""


def _flops(m: ModelConfig, seq_len: int) -> float:
    key = (model_key(m), seq_len)
    if key not in _FLOPS:
        _FLOPS[key] = sum(layer_flops(m, seq_len)) + head_flops(m)
    return _FLOPS[key]


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per token of one training step (forward and backward).

    PaLM's convention (Chowdhery et al., 2022, appendix B), also Megatron-LM's and torchtitan's
    for MFU: ``6 N + 12 L H Q T`` with N the weights each token is multiplied by (matmul weights
    outside the embedding lookup: attention, dense or top_k routed plus shared experts, the
    router, the output head; norms are not matmuls), L layers, H x Q the attention width and T
    the sequence length. Attention's QK^T and AV are counted over the whole sequence, without
    halving for the causal mask: fused kernels skip the masked half but run it at well below
    matmul efficiency, so the full count at matmul speed is also a fair time estimate.
    """
    return _flops(model, seq_len)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: dict[str, float] = field(hash=False)
    """Per group dimension, seconds of communication before any overlap."""
    exposed_comm_s: float
    """Communication not hidden behind compute."""
    bubble_s: float
    total_s: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    """Model FLOPs per second over the peak of all devices, each its own type's at the run's
    precision (recomputation does not count)."""
    flops_per_token: float
    optimizer_s: float = 0.0
    """The optimizer step's device time after the last backward, which nothing hides: Muon's
    iterations and the all-to-alls that share out its matrices (in ``comm_s`` too, by group);
    0 for AdamW, whose elementwise update the model leaves out."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "compute_s": self.compute_s, "comm_s": dict(self.comm_s),
            "exposed_comm_s": self.exposed_comm_s, "bubble_s": self.bubble_s,
            "optimizer_s": self.optimizer_s, "total_s": self.total_s,
            "tokens_per_step": self.tokens_per_step, "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu, "flops_per_token": self.flops_per_token,
        }


RING_DIMS = ("tp", "dp_shard", "dp_shard-cp", "dp_replicate", "etp", "edp")
"""Groups whose collectives are priced as rings (gathers, reduce-scatters, all-reduces), at the
link's ring bandwidth; the others send point to point or all to all (pipeline, cp: ring
attention's neighbour sends and Ulysses' all-to-alls; ep), each rank at its own share."""


DDP_BUCKET_BYTES = 25 << 20
"""What DDP all-reduces at once (``bucket_cap_mb``'s default, which orch keeps)."""


def _collective(size: float, n: int, link: Link, ring: bool = True, pieces: float = 1) -> float:
    """Seconds for a ring all-gather or reduce-scatter of a ``size``-byte tensor over ``n``
    ranks (at the link's :attr:`~orch.plan.topology.Link.ring_bandwidth`), or (``ring``
    false) an all-to-all in which each rank spreads ``size`` bytes evenly (at its own share of
    the link): either way each rank moves ``(n - 1) / n`` of ``size`` in ``n - 1``
    latency-bound steps; ``size`` moved as ``pieces`` collectives (FSDP's, one per unit) pays
    those steps' latency for each."""
    bandwidth = link.ring_bandwidth if ring else link.bandwidth
    return (n - 1) * (size / n / bandwidth + pieces * link.latency_s)


def _rate(cfg: Config, deg: Degrees, device: DeviceSpec, experts: bool = False) -> float:
    """FLOP/s a rank's matmuls reach for ``cfg``'s micro-batch under ``deg``; with
    ``experts``, its routed experts' GEMMs: each local expert's take the tokens routed to it,
    on average the rank's own (its sequence shard under tensor parallelism) times ``top_k``,
    gathered from the ``ep x etp`` ranks that share the experts, over the experts, split by
    ``etp``. Fine-grained experts without expert parallelism run thin GEMMs (Qwen3-30B-A3B at
    8K tokens: 512 rows an expert, against 4,096 under ep8), which is why Megatron and
    DeepSeek spread them: priced at the dense layers' rate, ``--auto`` left a 128-expert model
    on plain FSDP."""
    m, t = cfg.model, cfg.train
    rank_tokens = t.micro_batch * t.seq_len / deg.cp  # of one micro-batch, before TP splits them
    rows, split = rank_tokens, deg.tp
    if experts:
        rows, split = rank_tokens / deg.tp * m.top_k * deg.ep * deg.etp / m.experts, deg.etp
    return (device.peak(t.precision) * device.compute_efficiency
            * gemm_efficiency(rows, m.dim, split, device))


def _routed_share(m: ModelConfig, seq_len: int) -> float:
    """The routed experts' share of a token's training FLOPs (:func:`flops_per_token`)."""
    if not m.is_moe:
        return 0.0
    pc = param_counts(m)
    return pc.moe_layers * 6.0 * m.top_k * (pc.experts // m.experts) / _flops(m, seq_len)


def estimate_step_time(cfg: Config, deg: Degrees, links: dict[str, Link],
                       device: DeviceSpec, stage_load: float = 1.0,
                       rank_layers: float | None = None,
                       total_peak: float | None = None) -> StepTime:
    """Seconds per optimizer step of ``cfg`` laid out as ``deg`` over ``links``.

    ``links`` maps each group dimension of ``orch.plan.layout`` to its link (from
    ``Topology.links``); only dimensions of size above one are read. ``stage_load`` scales the
    compute to the slowest pipeline rank's (uneven layers, or devices of different speeds),
    against an even split at ``device``'s speed; ``rank_layers``, the most layers a pipeline
    rank holds (default an even share), sets the collectives and recompute inside layers.
    ``total_peak``, the FLOP/s of every rank's device together at the run's precision
    (``Topology.total_peak``; default every rank at ``device``'s), is MFU's denominator.
    """
    m, t = cfg.model, cfg.train
    layers = rank_layers if rank_layers is not None else m.layers / deg.pp
    compute, comm, exposed, bubble, micro = _terms(cfg, deg, links, device, stage_load, layers)
    if cfg.offload.enabled:
        comm["offload"], offload_exposed = _offload_seconds(cfg, deg, device, compute, micro,
                                                            links.get("dp_replicate"))
        exposed += offload_exposed
    optimizer = 0.0
    if cfg.optimizer.name == "muon":
        iterations, muon_comm = _muon_step(cfg, deg, links, device, layers)
        for dim, seconds in muon_comm.items():
            comm[dim] = comm.get(dim, 0.0) + seconds
        optimizer = iterations + sum(muon_comm.values())
    total = compute + exposed + bubble + optimizer
    fpt, tokens = _flops(m, t.seq_len), t.global_batch * t.seq_len
    tokens_per_s = tokens / total
    return StepTime(
        compute_s=compute, comm_s=comm, exposed_comm_s=exposed, bubble_s=bubble, total_s=total,
        tokens_per_step=tokens, tokens_per_s=tokens_per_s,
        mfu=fpt * tokens_per_s / (total_peak or deg.world * device.peak(t.precision)),
        flops_per_token=fpt, optimizer_s=optimizer,
    )


def step_time_bound(cfg: Config, deg: Degrees, links: dict[str, Link], device: DeviceSpec,
                    least_load: float) -> float:
    """Seconds :func:`estimate_step_time` cannot price ``cfg`` under ``deg`` below, whatever
    its pipeline split, so long as the most loaded rank's ``stage_load`` is at least
    ``least_load``: its terms at that load, with every pipeline rank holding an even share of
    the layers (the most any rank holds is at least that), and without host offload's.

    A bound because each term only grows with the load and the layers: the compute, the
    collectives inside the layers and the bubble directly; data parallelism's exposed traffic
    shrinks as the compute it hides behind grows, but by at most ``OVERLAP`` (under 1) of it,
    so compute plus that exposure never shrinks; offload's exposure is left out (it too
    shrinks with the compute, and is never negative). The search prunes with it: the
    collectives that no compute hides (tensor, expert, Ulysses) and the pipeline's bubble and
    sends are a third or more of a step for MoE models, which compute alone missed."""
    compute, _, exposed, bubble, _ = _terms(cfg, deg, links, device, least_load,
                                            cfg.model.layers / deg.pp)
    return compute + exposed + bubble


class _Terms(NamedTuple):
    """:func:`estimate_step_time`'s terms before host offload's (which it adds)."""

    compute: float
    comm: dict[str, float]
    """Per group dimension, seconds of communication before any overlap."""
    exposed: float
    bubble: float
    micro: float
    """Micro-batches per data-parallel rank per step."""


def reduces_per_micro_batch(cfg: Config, deg: Degrees) -> bool:
    """Whether FSDP reduce-scatters the gradients of every micro-batch, not once per step:
    ``parallel.grad_reduce: microbatch`` outside a pipeline (torch's pipeline stage reduces
    once per step whatever it says; DDP all-reduces once per step either way)."""
    return cfg.parallel.grad_reduce == "microbatch" and deg.pp == 1


def _terms(cfg: Config, deg: Degrees, links: dict[str, Link], device: DeviceSpec,
           stage_load: float, layers: float) -> _Terms:
    """:func:`estimate_step_time` but host offload, with the most loaded pipeline rank at
    ``stage_load`` and holding ``layers`` layers: what it prices and what
    :func:`step_time_bound` bounds it by, from one set of formulas."""
    m, t = cfg.model, cfg.train
    pc = param_counts(m)
    seq, act = t.seq_len, 2 if t.precision == "bf16" else 4
    attention_fpt = 12.0 * seq * m.heads * m.head_size  # per layer
    rank_tokens = t.micro_batch * seq / deg.cp  # of one micro-batch, before TP splits them
    rate = _rate(cfg, deg, device)
    fpt, full = _flops(m, seq), t.recompute == "full"
    routed = _routed_share(m, seq)  # at the experts' own rate, the rest at the dense one
    seconds_per_flop = (1 - routed) / rate + (routed / _rate(cfg, deg, device, experts=True)
                                             if routed else 0.0)
    # the model's FLOPs (full recompute's forward again) on the most loaded pipeline rank
    compute = (stage_load * (fpt + full * fpt / 3) * (t.global_batch * seq) / deg.world
               * seconds_per_flop)
    micro = max(1.0, t.global_batch / (t.micro_batch * deg.dp))
    moe_layers = layers * pc.moe_layers / m.layers
    if t.recompute == "selective":
        dense_bytes, moe_bytes = recomputed_layer_bytes(cfg, deg)
        remade = micro * ((layers - moe_layers) * dense_bytes + moe_layers * moe_bytes)
        compute += (ELEMENTWISE_PASSES * remade
                    / (device.memory_bw * device.compute_efficiency))
    # Collectives per block, forward and backward, and again in a recomputed forward.
    recomputes = t.recompute != "none"
    fwd_bwd = 6 if recomputes else 4
    comm: dict[str, float] = {}

    if deg.tp > 1:  # one block around attention in every layer, one around each dense MLP
        blocks = 2 * layers - moe_layers
        activations = rank_tokens * m.dim * act
        comm["tp"] = micro * blocks * fwd_bwd * _collective(activations, deg.tp, links["tp"])
    routed = rank_tokens / deg.tp * m.top_k * m.dim * act  # bytes a rank sends to its experts
    if moe_layers and deg.etp > 1:
        gathered = routed * deg.etp
        comm["etp"] = micro * moe_layers * fwd_bwd * _collective(gathered, deg.etp, links["etp"])
    if moe_layers and deg.ep > 1:
        comm["ep"] = micro * moe_layers * fwd_bwd * _collective(routed, deg.ep, links["ep"],
                                                                ring="ep" in RING_DIMS)

    cp_exposed = 0.0
    if deg.cp > 1:
        link = links["cp"]
        if cfg.parallel.cp_kind == "ring":
            kv = 2 * max(m.n_kv_heads / deg.tp, 1) * m.head_size * rank_tokens * act
            passes = 4 if full else 3  # K/V forward; K/V and dK/dV backward; full recompute
            step = kv / link.bandwidth + link.latency_s
            comm["cp"] = micro * layers * passes * (deg.cp - 1) * step
            hiding = micro * layers * attention_fpt * rank_tokens / deg.tp / rate
            cp_exposed = max(0.0, comm["cp"] - hiding)
        else:  # Ulysses: q, k, v in and the output back, four all-to-alls each way
            qkvo = (2 * m.heads + 2 * m.n_kv_heads) * m.head_size * rank_tokens / deg.tp * act
            passes = 3 if recomputes else 2
            four = (_collective(qkvo, deg.cp, link, ring="cp" in RING_DIMS)
                    + 3 * (deg.cp - 1) * link.latency_s)
            comm["cp"] = micro * layers * passes * four
            cp_exposed = comm["cp"]

    # Data parallelism: parameter gathers overlap the step, gradient reduction the last backward;
    # under grad_reduce: microbatch (no pipeline) FSDP's reduce-scatters run in every backward.
    gathers = 2 * micro if deg.pp == 1 else 1
    scatters = micro if reduces_per_micro_batch(cfg, deg) else 1
    gather = reduce = early = 0.0  # early: the reduce-scatters of all backwards but the last
    # experts not folded (ep = etp = tp = 1) are in the blocks' units, sharded like them
    folded = moe_layers > 0 and deg.experts_folded
    dense = (pc.dense_total + (0 if folded else pc.expert_total)) / (deg.pp * deg.tp)
    # FSDP gathers and reduces unit by unit (a block each, and the root's embedding, norm and
    # head): every unit's collective pays the ring's n - 1 latency-bound steps, which over
    # thousands of ranks outweigh the bytes (Llama 3 70B over 4,096 ranks: 41 ms a ring, 3.3 s
    # for each gather or reduce-scatter of its 81 units, once priced as one ring's 41 ms)
    units = math.ceil(layers) + deg.virtual_stages  # a root per chunk (at most: a middle
    # stage's holds no parameters)
    if deg.fsdp > 1:
        link = links["dp_shard-cp"]
        gather = gathers * _collective(dense * act, deg.fsdp, link, pieces=units)
        reduce = _collective(dense * GRAD_REDUCE_BYTES, deg.fsdp, link, pieces=units)
        early = (scatters - 1) * reduce
        comm["dp_shard-cp"] = gather + scatters * reduce
    if deg.dp_replicate > 1:  # once per step (HSDP's waits for the last micro-batch's)
        shard = dense / deg.fsdp * GRAD_REDUCE_BYTES
        # HSDP all-reduces unit by unit; DDP (replicas alone, outside a pipeline or MoE folding:
        # orch.parallel.data_parallel.replicates_with_ddp) bucket by bucket
        ddp = deg.fsdp == 1 and deg.pp == 1 and not folded
        pieces = math.ceil(shard / DDP_BUCKET_BYTES) if ddp else units
        comm["dp_replicate"] = 2 * _collective(shard, deg.dp_replicate, links["dp_replicate"],
                                               pieces=pieces)
        reduce += comm["dp_replicate"]
    if folded and deg.edp > 1:  # FSDP over every edp rank, whatever the dense layers do
        experts, link = pc.expert_total / (deg.pp * deg.ep * deg.etp), links["edp"]
        moe_units = math.ceil(moe_layers)
        expert_gather = gathers * _collective(experts * act, deg.edp, link, pieces=moe_units)
        expert_reduce = _collective(experts * GRAD_REDUCE_BYTES, deg.edp, link,
                                    pieces=moe_units)
        comm["edp"] = expert_gather + scatters * expert_reduce
        gather, reduce = gather + expert_gather, reduce + expert_reduce
        early += (scatters - 1) * expert_reduce
    # The last backward's reduce hides behind that backward only; the gathers, and the earlier
    # backwards' reduce-scatters, behind the rest of the step (one micro-batch: as before).
    window = BACKWARD_SHARE * compute / micro
    dp_exposed = (max(0.0, gather + early - OVERLAP * (compute - window))
                  + max(0.0, reduce - OVERLAP * window))

    # Communication on the critical path of every micro-batch; the bubble idles a share of it.
    on_path = comm.get("tp", 0.0) + comm.get("etp", 0.0) + comm.get("ep", 0.0) + cp_exposed
    bubble = 0.0
    if deg.pp > 1:
        schedule = cfg.parallel.pp_schedule
        chunks = chunks_per_rank(schedule, deg.virtual_stages)
        link = links["pp"]
        message = rank_tokens * m.dim * act / (deg.tp if deg.sequence_parallel else 1)
        comm["pp"] = micro * 2 * chunks * (message / link.bandwidth + link.latency_s)
        if schedule in SIMULATED:
            share = bubble_share(schedule, deg.pp, int(micro), cfg.parallel.pp_max_deferred)
        else:
            share = (deg.pp - 1) / (micro * chunks)  # CLOSED_FORM
        bubble = share * (compute + on_path)

    exposed = on_path + dp_exposed + comm.get("pp", 0.0)
    return _Terms(compute, comm, exposed, bubble, micro)


def _newton_schulz_flops(rows: int, cols: int, steps: int) -> float:
    """FLOPs of ``steps`` quintic Newton-Schulz iterations on a ``rows x cols`` matrix (on its
    wide orientation, ``m <= n``): per step the Gram matrix ``X X^T`` (2 m^2 n), its square
    (2 m^3) and that times ``X`` (2 m^2 n)."""
    m, n = sorted((rows, cols))
    return steps * (4.0 * m * m * n + 2.0 * m ** 3)


def _muon_step(cfg: Config, deg: Degrees, links: dict[str, Link], device: DeviceSpec,
               layers: float) -> tuple[float, dict[str, float]]:
    """Seconds of a Muon step on the busiest pipeline rank (``orch.runtime.muon``): the
    iterations and the all-to-alls, per group dimension, that share out its matrices.

    A bucket of :func:`~orch.plan.memory.muon_matrices` goes in chunks of as many matrices as
    ranks split them (the last padded with zeros), each rank orthogonalizing one whole matrix
    of a chunk, so the busiest runs ``ceil(count / ranks)`` (Llama 3 70B under tp8 x fsdp128: 5
    matrices where it ran all 560). A chunk travels by one all-to-all per splitting group there
    and one back, in which each rank spreads a matrix's bytes in fp32 (its shards of the
    chunk's matrices, or their pieces whole over the groups already passed), each paying its
    ring's latency. At the device's matmul pace in the compute dtype."""
    steps, flops = cfg.optimizer.muon_ns_steps, 0.0
    group_sizes = {"dp_shard-cp": deg.fsdp, "tp": deg.tp, "etp": deg.etp}
    comm: dict[str, float] = {}
    for bucket in muon_matrices(cfg.model, deg, layers):
        chunks = math.ceil(bucket.count / math.prod(group_sizes[d] for d in bucket.split))
        flops += chunks * bucket.stack * _newton_schulz_flops(bucket.rows, bucket.cols, steps)
        matrix_bytes = 4 * bucket.stack * bucket.rows * bucket.cols
        for dim in bucket.split:
            seconds = 2 * chunks * _collective(matrix_bytes, group_sizes[dim], links[dim],
                                               ring=False)
            comm[dim] = comm.get(dim, 0.0) + seconds
    rate = device.peak(cfg.train.precision) * device.compute_efficiency
    return flops / rate, comm


def _offload_seconds(cfg: Config, deg: Degrees, device: DeviceSpec, compute: float,
                     micro: float, replicas_link: Link | None) -> tuple[float, float]:
    """Seconds of host traffic per step under ``offload.*`` and how much of it is exposed.

    What ``orch.offload.engine`` does: an offloaded unit's parameters cross to the device for
    its forward and again for its backward on every micro-batch, every gradient crosses home
    once per micro-batch, swapped activations cross out and back; all counted as exposed, a
    bound from above (on CUDA they run on a side stream beside the compute, on a CPU device
    they are synchronous).
    The CPU optimizer step runs beside the next forward: only what exceeds the forward shows.
    With ``shard_params`` each use of a unit is first broadcast from its owner over the
    replicas' link (counted as exposed too, as the copies it feeds).
    """
    off = cfg.offload
    params = param_counts(cfg.model).total / (deg.pp * deg.tp * deg.fsdp)
    traffic = 0.0
    if off.params != "device":
        traffic += 2 * micro * params * 4
    if off.grads != "device":
        traffic += micro * params * 4
    if off.activations != "device":  # a micro-batch's saved activations, out and back
        traffic += 2 * micro * estimate_memory(
            cfg, deg, fused_norm=device.fused_norm, kernels=device.orch_kernels).activations
    transfers = traffic / device.host_bw
    if off.shard_params and deg.dp_replicate > 1 and replicas_link is not None:
        transfers += 2 * micro * (params * 4 / replicas_link.bandwidth + replicas_link.latency_s)
    # replicas step a share each (orch.offload.partition)
    optimizer = (params / deg.dp_replicate / CPU_ADAM_PARAMS_PER_S
                 if off.optimizer != "device" else 0.0)
    # NVMe homes: parameters are read for every fetch (exposed, like the copies they feed);
    # the update reads and writes the unit's parameters and states beside the next forward.
    disk = 2 * micro * params * 4 if off.params == "nvme" else 0.0
    update_io = 2 * params * 4 if off.params == "nvme" else 0.0
    if off.optimizer == "nvme":
        update_io += 2 * estimate_memory(
            cfg, deg, fused_norm=device.fused_norm, kernels=device.orch_kernels).optimizer
    if off.grads == "nvme":  # written after each micro-batch's backward, read before the
        disk += (2 * micro - 1) * params * 4  # next adds (behind and ahead of the backward,
        update_io += params * 4  # counted as exposed, as the fetches), and read by the update
    transfers += disk / NVME_BYTES_PER_S
    optimizer += update_io / NVME_BYTES_PER_S
    hidden = (1 - BACKWARD_SHARE) * compute
    return transfers + optimizer, transfers + max(0.0, optimizer - hidden)


__all__ = ["CLOSED_FORM", "CPU_ADAM_PARAMS_PER_S", "NVME_BYTES_PER_S", "OVERLAP", "StepTime",
           "estimate_step_time", "flops_per_token", "gemm_efficiency", "head_flops",
           "layer_flops", "reduces_per_micro_batch", "step_time_bound"]
