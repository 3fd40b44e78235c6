"""Per-rank memory model: parameters, gradients, optimizer state, activations and buffers.

The planner calls :func:`estimate_memory` for every candidate of a search, so it is integer
arithmetic only: no torch, no loop over layers, and whatever depends only on the model, the
sequence shape or the pipeline shape is computed once and cached.

Activations come from the term model in ``orch.plan.activations`` (what one decoder layer saves
for backward), here multiplied out over layers, pipeline stages and micro-batches in flight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cache, lru_cache
from typing import NamedTuple

from orch.config.schema import MODEL_SHAPE, OFFLOADED, WORLD_DEGREES, Config, ModelConfig
from orch.offload.sizes import CONVERSION_STAGING_ELEMENTS, NVME_GRAD_BUFFERS, region_padding
from orch.parallel.schedules.actions import rank_stages
from orch.parallel.schedules.generators import placement_of
from orch.plan.activations import (
    Arch,
    Recompute,
    Term,
    deferred_weight_grad_bytes,
    layer_activation_bytes,
    layer_terms,
    norm_terms,
    recomputed_bytes,
    split_weight_grad_bytes,
)
from orch.plan.degrees import Degrees
from orch.plan.schedule_shape import COUNTED, Held, held

PARAM_BYTES = 4
"""Parameters stay fp32 (FSDP2 mixed precision); the bf16 compute copy is a transient buffer."""
GRAD_BYTES = 4
"""Sharded gradients are reduced and kept in fp32."""
ADAMW_BYTES = 8
"""Two fp32 moments."""
QUANT_BLOCK = 256
"""adamw8bit: one fp32 absmax per block of 256 elements, per moment."""
MUON_BYTES = 4
"""muon: one fp32 momentum per element of the blocks' matrices (the rest keeps AdamW's two)."""


class MuonMatrices(NamedTuple):
    """Matrices of one layout that ``orch.runtime.muon.matrix_chunks`` steps together."""

    count: int
    """How many the busiest pipeline rank holds."""
    rows: int
    cols: int
    stack: int
    """Whole matrices in each (a rank's experts of an expert stack; else 1)."""
    split: tuple[str, ...]
    """The group dimensions that split its matrices."""


def muon_matrices(m: ModelConfig, deg: Degrees, layers: float) -> list[MuonMatrices]:
    """The busiest pipeline rank's Muon matrices (its ``layers``, MoE ones among them in the
    model's proportion) by layout, which the step's memory (:func:`muon_step_bytes`) and time
    (``orch.plan.cost``) both read: one mesh, placements and shape make a bucket whatever layer
    they are in. FSDP's shards and tensor parallelism's split the dense matrices (TP's columns
    and rows are layouts apart: colwise ``wq``, ``wk``, ``wv``, ``w1``, ``w3`` and rowwise
    ``wo``, ``w2``); FSDP alone the router (whole on every tp rank); expert tensor parallelism
    the experts' matrices, of which a rank keeps its own share whole (an expert stack stays
    split by experts over expert parallelism and over the FSDP that shards it:
    ``Degrees.expert_shard``, Mixtral's 8 over 64 FSDP ranks leave one to a rank, not 8)."""
    moe = layers * m.moe_layers / m.layers
    dense = layers - moe
    h, q, kv = m.dim, m.heads * m.head_size, m.n_kv_heads * m.head_size
    shared = m.shared_experts * m.moe_ffn_dim
    tp = deg.tp > 1
    both = tuple(dim for dim, n in (("dp_shard-cp", deg.fsdp), ("tp", deg.tp)) if n > 1)
    counts: dict[tuple, float] = {}

    def add(count: float, rows: int, cols: int, layout: object, split: tuple[str, ...] = both,
            stack: int = 1) -> None:
        if count:
            key = (rows, cols, stack, split, layout)
            counts[key] = counts.get(key, 0.0) + count

    for count, rows, cols, colwise in (
            (layers, q, h, True), (2 * layers, kv, h, True), (layers, h, q, False),
            (2 * dense, m.ffn_dim, h, True), (dense, h, m.ffn_dim, False),
            (2 * moe * bool(shared), shared, h, True), (moe * bool(shared), h, shared, False)):
        add(count, rows, cols, colwise if tp else None)
    own_experts = math.ceil(m.experts / max(deg.ep, 1) / deg.expert_shard)
    expert_split = ("etp",) if deg.etp > 1 else ()
    add(moe, m.experts, h, "router" if tp else None, both[:1] if deg.fsdp > 1 else ())
    add(2 * moe, h, m.moe_ffn_dim, "experts", expert_split, own_experts)
    add(moe, m.moe_ffn_dim, h, "experts", expert_split, own_experts)
    # a fraction of a layer (an even share of layers over stages) holds whole matrices
    return [MuonMatrices(math.ceil(round(count, 6)), rows, cols, stack, split)
            for (rows, cols, stack, split, _), count in counts.items()]


def muon_step_bytes(m: ModelConfig, deg: Degrees, ns_bytes: int) -> int:
    """Bytes a Muon step (``orch.runtime.muon``) holds beside the parameters, gradients and
    states, at its largest matrix (:func:`muon_matrices`), which a rank holds whole once the
    ranks that split it have shared out its chunk (or a rank's expert stack): its Nesterov
    update and the result in fp32 (8 bytes an element), the iterate and its next in
    ``ns_bytes`` each, and two Gram matrices (``X X^T`` and its polynomial) of the shorter side
    squared; measured on the CPU to the byte in fp32 (tests/plan/test_memory.py). Where groups
    split the matrix, the all-to-alls that bring it and take the result back hold up to
    ``2 groups + 1`` fp32 copies of it: the chunk's stack of shards, each group's received
    pieces and their rearranged copy (torch's ``shard_dim_alltoall``; padding of uneven shards
    aside), 20 bytes an element under FSDP x TP, more than the iterations' 12 to 16; read from
    torch's code, not measured: gloo has no all-to-all (DTensor gathers instead). The step
    runs after the backward has freed the activations, so it raises a rank's peak only where
    it exceeds them."""
    def held(stack: int, rows: int, cols: int, groups: int) -> int:
        iterations = (stack * rows * cols * (8 + 2 * ns_bytes)
                      + 2 * stack * min(rows, cols) ** 2 * ns_bytes)
        return max(iterations, 4 * (2 * groups + 1) * stack * rows * cols if groups else 0)

    return max(held(b.stack, b.rows, b.cols, len(b.split)) for b in muon_matrices(m, deg, m.layers))


MEMORY_READS = (
    *MODEL_SHAPE, *(f"train.{name}" for name in (
        "precision", "recompute", "seq_len", "micro_batch", "global_batch", "document_mask")),
    "optimizer.name", *WORLD_DEGREES, *(f"parallel.{name}" for name in (
        "ep", "etp", "virtual_stages", "pp_schedule", "pp_max_deferred", "stage_layers", "cp_kind",
        "sequence_parallel", "grad_reduce")),
    *OFFLOADED, "offload.shard_params", "offload.prefetch_depth", "offload.io_threads")
"""The config fields :func:`estimate_memory` reads (shapes, batch and precision, optimizer
states, degrees and schedule, homes): what a check of its bytes reads (``Problem.reads``);
fields, not whole sections, so that a failed field it does not read (``train.lr``,
``offload.nvme_path``) leaves its problems in."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a :class:`ModelConfig`; ``total`` equals ``sum(p.numel())``.

    Per-layer fields (``attention``, ``norms``, ``mlp`` for dense layers; ``router``, ``experts``
    (all routed experts), ``shared_expert`` for MoE layers) are for one layer of that kind.
    ``active`` counts what one token touches (``top_k`` routed experts), for FLOPs.
    """

    embedding: int
    head: int
    attention: int
    attention_bias: int
    """Of ``attention``, the q/k/v biases (``model.qkv_bias``): no matmul operand, so no
    autocast keeps a 16-bit copy of them for its backward."""
    norms: int
    mlp: int
    router: int
    experts: int
    shared_expert: int
    final_norm: int
    dense_layers: int
    moe_layers: int
    total: int
    active: int
    expert_total: int

    @property
    def dense_total(self) -> int:
        """Everything that is not a routed expert (routers and shared experts included)."""
        return self.total - self.expert_total


def model_key(m: ModelConfig) -> tuple:
    """The hashable shape of a model; ``_param_counts`` and ``_archs`` unpack it in this order."""
    return (m.vocab_size, m.dim, m.layers, m.heads, m.n_kv_heads, m.head_size, m.ffn_dim,
            m.experts, m.top_k, m.moe_ffn_dim, m.shared_experts, m.moe_layer_interval,
            m.tie_embeddings, m.qk_norm, m.qkv_bias)


@lru_cache(maxsize=64)
def _param_counts(key: tuple) -> ParamCounts:
    vocab, h, layers, heads, kv, hd, ffn, experts, top_k, fe, shared, interval, tied, qk, bias = key
    moe_layers = layers // interval if experts else 0
    dense_layers = layers - moe_layers
    biases = heads * hd + 2 * kv * hd if bias else 0
    attention = 2 * h * heads * hd + 2 * h * kv * hd + biases
    one_expert = 3 * h * fe
    counts = dict(
        embedding=vocab * h, head=0 if tied else vocab * h, attention=attention,
        attention_bias=biases,
        norms=2 * h + (2 * hd if qk else 0),  # the block's two, and QK-norm's q and k
        mlp=3 * h * ffn, router=h * experts, experts=experts * one_expert,
        shared_expert=shared * one_expert if experts else 0, final_norm=h,
        dense_layers=dense_layers, moe_layers=moe_layers,
    )
    total = (counts["embedding"] + counts["head"] + h + layers * (attention + counts["norms"])
             + dense_layers * counts["mlp"]
             + moe_layers * (counts["router"] + counts["experts"] + counts["shared_expert"]))
    expert_total = moe_layers * counts["experts"]
    active = total - moe_layers * (experts - top_k) * one_expert if experts else total
    return ParamCounts(**counts, total=total, active=active, expert_total=expert_total)


def param_counts(model: ModelConfig) -> ParamCounts:
    """Closed-form parameter counts of ``orch.models.llama.Transformer(model)``."""
    return _param_counts(model_key(model))


def zero_bytes_per_param(stage: int, dp: int, k: int = 12) -> float:
    """Bytes per parameter per rank under ZeRO ``stage`` 0-3 (Rajbhandari et al. 2020, Fig. 1).

    Mixed-precision Adam: 2 (fp16 params) + 2 (fp16 grads) + ``k`` (fp32 master copy, momentum,
    variance) bytes; stage 1 shards the ``k``, stage 2 also the grads, stage 3 everything.
    """
    sharded = {0: 0, 1: k, 2: 2 + k, 3: 4 + k}[stage]
    return 4 + k - sharded + sharded / dp


def _archs(key: tuple, act_bytes: int, flash: bool, fused_norm: bool, ring: bool,
           autocast: bool) -> tuple[Arch, Arch]:
    """The (dense layer, MoE layer) archs of ``orch.models.llama`` for a model key."""
    _, h, _, heads, kv, hd, ffn, experts, top_k, fe, shared, _, _, qk, _ = key
    dense = Arch(hidden=h, heads=heads, kv_heads=kv, head_dim=hd, ffn=ffn, fused_norm=fused_norm,
                 flash=flash, act_bytes=act_bytes, ring=ring, autocast=autocast, qk_norm=qk)
    moe = replace(dense, experts=experts, top_k=top_k, expert_ffn=fe, shared_ffn=shared * fe)
    return dense, moe


@dataclass(frozen=True)
class _Activations:
    """Bytes per micro-batch: per layer kind, and the model-level tensors outside the layers."""

    dense: int
    moe: int
    dense_wgrad: int
    moe_wgrad: int
    head_wgrad: int
    """What the output head's deferred weight-gradient step holds on the last stage: its input
    and the logits' gradient (the stage defers every ``nn.Linear`` of its module, the head's)."""
    wgrad_keeps_live: bool
    """Under tensor parallelism the runtime splits the backward as torch does
    (``torch_split``, :class:`~orch.parallel.pipeline.late_grads.LateGradsStage`): its ``I`` keeps
    the micro-batch's whole graph for ``W`` (``retain_graph``), so a waiting ``W`` holds the
    stage's live activations, and ``dense_wgrad`` and the others count the gradients kept beside
    them (:func:`~orch.plan.activations.split_weight_grad_bytes`)."""
    boundary_wgrad: int
    """What torch's waiting ``W`` also keeps on a stage before the last: the stage's output and
    the gradient received for it (the latter the last layer's output gradient itself, without
    sequence parallelism)."""
    dense_recomputed: int
    """What recomputing one layer in its backward holds at once (``train.recompute``)."""
    moe_recomputed: int
    every_stage: int
    first_stage: int
    last_stage: int
    logits_buffer: int


@lru_cache(maxsize=1024)
def _activations(
    key: tuple, act: int, flash: bool, fused_norm: bool, s: int, b: int, t: int, sp: bool,
    cp: int, ep: int, etp: int, recompute: Recompute, ring: bool, autocast: bool,
    torch_split: bool = False, documents: bool = False, sdpa_mask: bool = False,
) -> _Activations:
    dense, moe = _archs(key, act, flash, fused_norm, ring, autocast)
    vocab, h, hd = key[0], key[1], key[5]
    pc = _param_counts(key)
    # Under autocast each matmul keeps the 16-bit copy of its weight it was cast to, from its
    # forward to its backward: per micro-batch (autocast caches casts within one forward only),
    # but not where recompute casts them again in the backward; the head is never recomputed.
    copies = act if autocast and recompute == "none" else 0
    matrices = pc.attention - pc.attention_bias
    dense_copies = copies * (matrices + pc.mlp) // t
    moe_copies = copies * ((matrices + pc.shared_expert) // t + pc.router
                           + pc.experts // (ep * etp))
    head_copy = act * -(-vocab // t) * h if autocast else 0
    tok = s // cp * b
    tok_sp = tok // t if sp else tok
    logits = tok * -(-vocab // t) * 4
    last = norm_terms("final_norm", dense, tok_sp) + [
        Term("head_in", tok * h, act, wgrad=True),  # gathered under sequence parallelism
        Term("log_probs", tok * -(-vocab // t), 4),  # the fp32 loss keeps log-softmax
        Term("head_weight_copy", head_copy, 1),
    ]
    # (a dense layer has no experts for etp to split: one answer for every etp)
    residual = dense.residual_bytes
    dense_kept, dense_wgrad, dense_recomputed = _layer_bytes(dense, s, b, t, sp, cp, 1, recompute,
                                                             torch_split)
    moe_kept, moe_wgrad, moe_recomputed = (_layer_bytes(moe, s, b, t, sp, cp, etp, recompute,
                                                        torch_split)
                                           if moe.experts else (0, 0, 0))
    return _Activations(
        dense=dense_kept + dense_copies,
        moe=moe_kept + moe_copies if moe.experts else 0,
        dense_wgrad=dense_wgrad,
        moe_wgrad=moe_wgrad,
        head_wgrad=(sum(x.nbytes for x in last if x.name != "log_probs") + tok_sp * h * residual
                    if torch_split else sum(x.nbytes for x in last if x.wgrad))
        + tok * -(-vocab // t) * act,  # the logits' gradient
        wgrad_keeps_live=torch_split,
        boundary_wgrad=tok_sp * h * residual * (1 + sp) if torch_split else 0,
        dense_recomputed=dense_recomputed,
        moe_recomputed=moe_recomputed,
        # RoPE cos/sin tables, made once per forward in the residual stream's dtype; with
        # train.document_mask the int64 document ids of the whole sequence, and where SDPA
        # runs the attention the block-causal mask every layer shares (:func:`_sdpa_mask`)
        every_stage=2 * (s // cp) * hd * dense.residual_bytes
        + documents * b * s * 8 + sdpa_mask * b * s * s * act,
        first_stage=tok * 8,  # the embedding keeps the int64 token ids
        last_stage=sum(x.nbytes for x in last),
        logits_buffer=logits,
    )


@lru_cache(maxsize=1024)
def _layer_bytes(arch: Arch, s: int, b: int, t: int, sp: bool, cp: int, etp: int,
                 recompute: Recompute, torch_split: bool = False) -> tuple[int, int, int]:
    """Bytes one layer of ``arch`` keeps between forward and backward under ``recompute``,
    holds for a deferred weight-gradient step (``torch_split``: beside what it keeps), and
    holds again while being recomputed, per rank
    and micro-batch: made once per layer shape, where :func:`_activations` is asked once per
    expert layout too (hundreds of them in a search, each listing every tensor again)."""
    if recompute == "selective":
        recomputed = recomputed_bytes(arch, s, b, t, sp, cp, etp)
    elif recompute == "full":
        recomputed = sum(x.nbytes for x in layer_terms(arch, s, b, t, sp, cp, etp))
    else:
        recomputed = 0
    return (layer_activation_bytes(arch, s, b, t, sp, cp, etp, recompute),
            (split_weight_grad_bytes if torch_split else deferred_weight_grad_bytes)(
                arch, s, b, t, sp, cp, etp), recomputed)


def _in_flight(schedule: str, pp: int, v: int, stage: int, n_micro: int,
               max_deferred: int | None = None) -> tuple[int, int, int, int, Held]:
    """Micro-batches whose activations ``stage`` holds at its peak: ``(num, den, first, last,
    deferred)``.

    Layer activations are ``num / den`` micro-batches of all the stage's layers; ``first`` and
    ``last`` count micro-batches for the embedding's and the loss's tensors. ``deferred``, for
    the 2BP schedules and ZB-H1 (``orch.plan.schedule_shape``), is what the schedule built with
    ``max_deferred`` holds instead of ``num``: each ``(activations, pending W's)`` that can be the
    rank's peak, a pending W holding its layers' ``deferred_weight_grad_bytes``.
    GPipe runs every forward first; 1F1B holds ``pp - stage``; interleaved 1F1B holds
    ``pp*v + pp - 1 - 2*stage`` chunk micro-batches of ``1/v`` of the stage's layers (Megatron's
    warmup), i.e. ``1 + (pp-1)/(pp*v)`` times 1F1B's on stage 0; ZB-V holds ``2*pp`` half-share
    chunks on every rank (its bound); its first rank runs up to ``2*pp - 1`` first-chunk forwards
    before the first backward, and the loss's input-gradient step right after each loss
    (``orch.parallel.schedules.vshape``).
    """
    if pp == 1:
        return 1, 1, 1, 1, ()
    if schedule in ("gpipe", "2bp-gpipe"):
        edge = n_micro
    else:
        edge = min(pp - stage, n_micro)
    if schedule in COUNTED:
        deferred = held(schedule, pp, n_micro, max_deferred)[stage]
        return max(live for live, _ in deferred), 1, edge, edge, deferred
    if schedule == "gpipe":
        return n_micro, 1, n_micro, n_micro, ()
    if schedule == "zbv":
        return min(2 * pp, 2 * n_micro), 2, min(2 * pp - 1, n_micro), 1, ()
    if schedule == "interleaved" and v > 1:
        return min(pp * v + pp - 1 - 2 * stage, n_micro * v), v, edge, edge, ()
    return edge, 1, edge, edge, ()


@lru_cache(maxsize=1024)
def _stages(
    layers: int, interval: int, is_moe: bool, pp: int, v: int, schedule: str, n_micro: int,
    chunk_layers: tuple[int, ...] = (), max_deferred: int | None = None,
) -> tuple[tuple[int, int, int, bool, bool, int, int, int, int, Held], ...]:
    """``(stage, dense layers, MoE layers, first, last, num, den, edges..., deferred)`` (of
    :func:`_in_flight`, ``max_deferred`` the 2BP bound) of each stage that can be the worst: the
    first and last, and the first middle stage of each layer mix and deferred states (later ones
    hold no more micro-batches). Stage ``p`` owns the chunks the schedule places on it (``p,
    p+pp, ...`` of ``pp*v``, or ``p`` and ``2*pp-1-p`` in ZB-V's V), each of
    ``chunk_layers[c]`` layers (``parallel.stage_layers``) or an even split.
    """
    chunks = pp * v
    sizes = chunk_layers or tuple((c + 1) * layers // chunks - c * layers // chunks
                                  for c in range(chunks))
    starts = [sum(sizes[:c]) for c in range(chunks + 1)]
    rows, seen = [], set()
    for p in range(pp):
        n_layers = n_moe = 0
        owned = rank_stages(p, pp, v, placement_of(schedule))
        for c in owned:
            lo, hi = starts[c], starts[c + 1]
            n_layers += hi - lo
            n_moe += hi // interval - lo // interval if is_moe else 0
        mix = (n_layers - n_moe, n_moe)
        first, last = 0 in owned, chunks - 1 in owned
        in_flight = _in_flight(schedule, pp, v, p, n_micro, max_deferred)
        # a later stage with deferred W's can hold more than an earlier one: same mix, other W's
        kind = (mix, in_flight[-1])
        if not first and not last and kind in seen:
            continue
        seen.add(kind)
        rows.append((p, *mix, first, last, *in_flight))
    return tuple(rows)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank on the worst pipeline stage (``stage``: the most device bytes).

    ``params``, ``grads``, ``optimizer`` and ``activations`` are group sizes wherever the group
    lives; ``buffers`` are transient device bytes (unsharded FSDP copies, the logits gradient,
    the layer being recomputed). ``total`` is what the device holds: device-tier groups, the
    prefetch windows of offloaded ones, and buffers; ``cpu`` and ``nvme`` hold offloaded groups.
    ``window`` is the part of ``total`` the offload engine places (``offload.device_budget``
    bounds it), ``window_min`` the least it can work with: one unit's parameters, one
    gradient on its way home and, when activations are swapped, one unit's saved activations
    (a block's, with the rotary tables each block copies).
    ``staging_min`` is the pinned CPU memory the NVMe tier stages through at once: a unit's
    parameters on their way to the device and another unit's parameters and optimizer states
    being updated (the groups that rest on NVMe), each a padded region; reads ahead take only
    free room (or what kept copies hold, given up) beyond it, never waiting
    (:meth:`orch.offload.homes.Homes.read_ahead`), so a pool of exactly this many bytes trains
    with less overlap; ``grad_staging`` the locked CPU memory gradients on NVMe gather in,
    beside it (:mod:`orch.offload.grad_staging`).
    """

    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    total: int
    cpu: int
    nvme: int
    stage: int
    window: int = 0
    window_min: int = 0
    staging_min: int = 0
    grad_staging: int = 0
    stage_totals: tuple[tuple[int, int], ...] = ()
    """``(stage, total)`` of every stage that can be the worst (:func:`_stages`): which stages
    a pipeline split overfills (``orch.plan.plan`` caps their layers)."""

    def as_dict(self) -> dict[str, int]:
        return {name: value for name, value in asdict(self).items() if name != "stage_totals"}


_StageBytes = NamedTuple("_StageBytes", [
    (f.name, int) for f in fields(MemoryEstimate) if f.name not in ("stage", "stage_totals")])
"""One stage's share of :class:`MemoryEstimate` (its byte counts; a tuple: the search makes
tens of thousands)."""


def _ring(cfg: Config, deg: Degrees) -> bool:
    return deg.cp > 1 and cfg.parallel.cp_kind == "ring"


def _autocast(cfg: Config, deg: Degrees) -> bool:
    """Whether 16-bit compute runs under autocast over float32 weights: no FSDP wraps the
    blocks (``orch.runtime.parallelize``: no data or context parallelism, or DDP's pure
    replication without a pipeline or folded experts) and none are offloaded (the offload
    engine fetches 16-bit copies)."""
    if cfg.train.precision != "bf16" or cfg.offload.params != "device":
        return False
    folded = cfg.model.is_moe and deg.experts_folded
    wrapped = deg.dp * deg.cp > 1 or (folded and deg.edp > 1)
    ddp = deg.fsdp == 1 and not folded and deg.pp == 1
    return not wrapped or ddp


def recomputed_layer_bytes(cfg: Config, deg: Degrees) -> tuple[int, int]:
    """Bytes of saved tensors one (dense, MoE) layer makes again in its backward under
    ``train.recompute``, per rank and micro-batch (0 without recompute): the cost model reckons
    selective recompute's time from them (elementwise ops, bound by memory bandwidth)."""
    acts = _layer_activations(cfg, deg)
    return acts.dense_recomputed, acts.moe_recomputed


KERNEL_HEAD_DIMS = range(16, 129, 16)
"""The head_dims orch's attention kernels take (``orch.kernels.attention.checks``: a multiple of
16 up to 128); others run on torch's SDPA on a GPU too."""


def _sdpa_mask(cfg: Config, deg: Degrees, kernels: bool) -> bool:
    """Whether attention within documents keeps the additive seq x seq mask every layer's SDPA
    shares (``orch.kernels.attention.Documents``; Ulysses' too): not where orch's kernels run
    the attention (``kernels``: the device's, for a head_dim they take), which take the document
    ids, nor under ring context parallelism, whose blocks mask as they go."""
    kernels = kernels and cfg.model.head_size in KERNEL_HEAD_DIMS
    return cfg.train.document_mask and not kernels and not _ring(cfg, deg)


def _layer_activations(cfg: Config, deg: Degrees, flash: bool = True, fused_norm: bool = True,
                       key: tuple | None = None, kernels: bool = True) -> _Activations:
    """:func:`_activations` of ``cfg`` laid out as ``deg`` (its cached arithmetic); ``key``:
    the model's :func:`model_key`, where the caller has it (the search asks this thousands of
    times); ``kernels``: whether orch's kernels run (:func:`_sdpa_mask`)."""
    tr = cfg.train
    return _activations(key or model_key(cfg.model), 2 if tr.precision == "bf16" else 4, flash,
                        fused_norm, tr.seq_len, tr.micro_batch, deg.tp, deg.sequence_parallel,
                        deg.cp, deg.ep, deg.etp, tr.recompute, _ring(cfg, deg),
                        _autocast(cfg, deg), deg.tp > 1,  # torch's split: orch.runtime.parallelize
                        tr.document_mask, _sdpa_mask(cfg, deg, kernels))


def estimate_memory(
    cfg: Config, deg: Degrees, *, flash: bool = True, fused_norm: bool = True,
    kernels: bool = True,
) -> MemoryEstimate:
    """Per-rank memory of training ``cfg`` under ``deg``, for the worst pipeline stage.

    Dense parameters are split by ``tp`` (norms and routers replicated) and sharded over
    ``deg.fsdp``; routed experts are split by ``ep * etp`` and sharded over the expert
    data-parallel shard degree. ``flash``/``fused_norm``/``kernels`` pick the kernels activations
    assume: the defaults are CUDA's; torch's CPU build uses flash SDPA but a composite RMSNorm,
    and no orch kernels (``train.document_mask`` then keeps SDPA's seq x seq mask).

    Gradients are sharded unless a step reduces them once: with several micro-batches per
    step and ``parallel.grad_reduce: step`` FSDP2 accumulates whole unsharded fp32 gradients
    until the last one's backward (gradient sync off), and a pipeline stage until its step's
    end whatever the setting, so those ranks hold their stage's gradients divided by ``tp``
    and expert parallelism only; ``microbatch`` reduce-scatters every backward.

    Approximations: FSDP keeps unsharded compute-dtype copies of the largest unit's parameters
    and gradients plus one prefetched layer (a pipeline stage: all its parameters and one
    unit's gradients; none when nothing is sharded and compute is fp32);
    recompute adds what one recomputed layer holds as a buffer; the 2BP schedules and ZB-H1
    hold, per rank, what their built schedule holds at its peak: activations in flight and, for
    each weight-gradient step waiting (as many as ``parallel.pp_max_deferred`` lets wait), every
    layer's linear inputs and output gradients, and on the last stage the head's input and
    logits gradient (``orch.plan.schedule_shape``); under tensor parallelism, where the run splits
    the backward as torch does, the stage's activations and the gradients at its weights. Offloaded
    optimizer states are split over ``dp_replicate`` replicas (``orch.offload.partition``), and with
    ``offload.shard_params`` the parameters and gradients at home too
    (``orch.offload.param_shards``). Per-parameter FSDP padding is ignored.
    """
    return StageMemory(cfg, deg, flash=flash, fused_norm=fused_norm, kernels=kernels).estimate(
        cfg.parallel.stage_layers)


def _stage_bytes(cfg: Config, deg: Degrees, flash: bool, fused_norm: bool,
                 key: tuple, kernels: bool = True) -> Callable[..., _StageBytes]:
    """What one pipeline stage holds, as a function of its row of :func:`_stages` (its dense
    and MoE layers, whether it is first or last, its micro-batches in flight): the arithmetic
    of :func:`estimate_memory`, made once per (config, degrees) and asked per stage, by the
    estimate and by :meth:`StageMemory.caps`."""
    m, tr, off = cfg.model, cfg.train, cfg.offload
    pc = _param_counts(key)
    act_bytes = 2 if tr.precision == "bf16" else 4
    tp, etp = deg.tp, deg.etp
    acts = _layer_activations(cfg, deg, flash, fused_norm, key, kernels)

    h = m.dim
    vocab = -(-m.vocab_size // tp) * h
    head = vocab + h if not m.tie_embeddings or deg.pp > 1 else h
    dense_layer = pc.attention // tp + pc.norms + pc.mlp // tp
    moe_layer = pc.attention // tp + pc.norms + pc.router + pc.shared_expert // tp
    experts = pc.experts // (deg.ep * etp)
    fsdp, eshard = deg.fsdp, deg.expert_shard
    autocast = _autocast(cfg, deg)  # its weight casts are counted with the activations
    gathers = fsdp > 1 or (pc.moe_layers > 0 and eshard > 1) or (act_bytes == 2 and not autocast)
    tiers = (off.params, off.grads, off.optimizer, off.activations)
    # FSDP2 with gradient sync off keeps each unit's whole unsharded gradient (in fp32, its
    # reduce dtype) from one backward to the next, and reduce-scatters the sum only in the
    # step's last backward: the trainer turns sync off for every micro-batch but the last under
    # ``parallel.grad_reduce: step``, and torch's pipeline stage for all of them whatever it
    # says (it reduces after the last). So those ranks hold their stage's gradients unsharded,
    # sharded ones only after the step's reduce. Under ``microbatch`` each backward
    # reduce-scatters, and only shards are kept (HSDP's sum of them waiting for the all-reduce).
    n_micro = max(1, tr.global_batch // (tr.micro_batch * deg.dp))
    pipelined = deg.pp > 1
    accumulates_whole = pipelined or (n_micro > 1 and cfg.parallel.grad_reduce == "step")
    unsharded_grads = accumulates_whole and not off.enabled
    # the largest single parameter: an MLP matrix, the (tp-split) embedding, or an expert stack
    largest = max(h * m.ffn_dim // tp, vocab, pc.experts // 3 // (deg.ep * etp))
    depth = off.prefetch_depth
    at_home = tiers == ("device",) * len(tiers)
    # What every stage reads, looked up once: the search asks tens of thousands of stages.
    norms, router, replicas = pc.norms, pc.router, deg.dp_replicate
    eight_bit, muon = cfg.optimizer.name == "adamw8bit", cfg.optimizer.name == "muon"
    muon_scratch = muon_step_bytes(m, deg, act_bytes) if muon else 0
    optim_away = tiers[2] != "device"
    # offloaded parameters are fetched as compute-dtype copies: nothing cast beside them
    gathered = (gathers and tiers[0] == "device") * act_bytes
    recast = act_bytes if autocast and tr.recompute != "none" else 0
    sharded_home = off.shard_params and tiers[0] != "device" and replicas > 1
    expert_layer = moe_layer + experts
    a = acts

    def stage_bytes(nd: int, nm: int, first: bool, last: bool, num: int, den: int,
                    first_mbs: int, last_mbs: int, deferred: Held = ()) -> _StageBytes:
        dense = nd * dense_layer + nm * moe_layer + first * vocab + last * head
        n = -(-dense // fsdp) + -(-(nm * experts) // eshard)
        if eight_bit:
            small = -(-((nd + nm) * norms + nm * router + last * h) // fsdp)
            big = n - small
            optim = ADAMW_BYTES * small + 2 * big + 8 * -(-big // QUANT_BLOCK)
        elif muon:  # AdamW for the embedding, the head and the norms
            adamw = -(-((nd + nm) * norms + first * vocab + last * head) // fsdp)
            optim = ADAMW_BYTES * adamw + MUON_BYTES * (n - adamw)
        else:
            optim = ADAMW_BYTES * n
        whole_optim = optim  # a unit's states are stepped whole, on one replica
        if optim_away:  # offloaded replicas each hold their own units' states
            optim = -(-optim // replicas)
        live = nd * a.dense + nm * a.moe + a.every_stage
        # a stage's first never waits a W (rank 0 runs fused B's): torch's I would keep it all
        wgrad = (a.wgrad_keeps_live * live + nd * a.dense_wgrad + nm * a.moe_wgrad
                 + last * a.head_wgrad + (not last) * a.boundary_wgrad)
        act = (max(n * live + w * wgrad for n, w in deferred) if deferred else num * live // den)
        act += first * first_mbs * a.first_stage + last * last_mbs * a.last_stage
        layer = max(nd and dense_layer, nm and expert_layer)
        unit = max(layer, first * vocab, last * head)
        # a pipeline stage keeps all its parameters gathered for the step (torch's stage
        # reshards after the last backward), else one unit, the next prefetched
        held = dense + nm * experts + unit if pipelined else 2 * unit + layer
        buffers = (gathered * held + last * a.logits_buffer
                   + max(nd and a.dense_recomputed, nm and a.moe_recomputed)
                   + recast * layer)  # a recomputed layer casts its weights again
        if muon:  # its step's peak, after the backward's: where it is the larger
            buffers = max(buffers, muon_scratch - act)

        unit_bytes = PARAM_BYTES * -(-unit // fsdp)
        params = PARAM_BYTES * n
        grads = GRAD_BYTES * (dense + nm * experts if unsharded_grads else n)
        if sharded_home:
            # each replica keeps its own units (in CPU memory with depth units on their way
            # from the others; on NVMe only its own); gradients: its own units' and the
            # others' sums for them, and the others' only until summed
            params = -(-params // replicas)
            if tiers[0] == "cpu":
                params += max(1, depth) * unit_bytes
            grads = 2 * -(-grads // replicas) + max(1, depth) * unit_bytes
        groups = (params, grads, optim, act)
        if at_home:  # nothing offloaded: no windows, no staging (most of what the search asks)
            return _StageBytes(*groups, buffers, buffers + sum(groups), 0, 0, 0, 0, 0, 0)
        # What the engine (orch.offload.engine) holds of an offloaded group: the unit in use
        # and up to depth - 1 prefetched, in the compute dtype; one matrix's gradient on its
        # way home; nothing of the optimizer (its step runs at home); activations: depth
        # layers' worth. Under bf16 also the float32 staging its copies convert through.
        copy_bytes = act_bytes * -(-unit // fsdp)
        converts = PARAM_BYTES * min(largest, CONVERSION_STAGING_ELEMENTS) * (act_bytes == 2)
        # a swapped unit copies every device tensor it saves, the tables each layer's
        # attention shares (``every_stage``) too
        unit_acts = max(nd and acts.dense, nm and acts.moe) + acts.every_stage
        minimum = (copy_bytes + converts, act_bytes * largest, 0, unit_acts)
        windows = (max(1, depth) * copy_bytes + converts, *minimum[1:3], depth * unit_acts)
        unit_optim = -(-whole_optim * -(-unit // fsdp) // max(1, n))
        # each a region of the tier, padded (orch.offload.nvme): its staging buffer is as large
        pad = region_padding(off.io_threads)
        staging = (2 * (unit_bytes + pad) if tiers[0] == "nvme" else 0) + (
            unit_optim + pad if tiers[2] == "nvme" else 0)
        grad_staging = NVME_GRAD_BUFFERS * (GRAD_BYTES * -(-unit // fsdp) + pad) * (
            tiers[1] == "nvme")
        total, cpu, nvme, window, window_min = buffers, 0, 0, 0, 0
        for size, tier, most, least in zip(groups, tiers, windows, minimum, strict=True):
            if tier == "device":
                total += size
                continue
            window += min(size, most)
            window_min += min(size, least)
            if tier in ("cpu", "auto"):  # auto keeps layers only where the budget has room
                cpu += size
            else:  # a region per unit, each padded
                nvme += size + (nd + nm + first + last) * region_padding(off.io_threads)
        total += window
        return _StageBytes(*groups, buffers, total, cpu, nvme, window, window_min, staging,
                           grad_staging)

    return stage_bytes


class WorstStage(NamedTuple):
    """The stage of a pipeline split holding the most device bytes, what it holds, and the
    total of every stage that can be the worst (:func:`_stages`): a :class:`MemoryEstimate`
    in the making, made one only when asked (it is a frozen record of fourteen fields, a
    third of an estimate's time, and the search asks of most splits whether they fit)."""

    stage: int
    held: _StageBytes
    stage_totals: tuple[tuple[int, int], ...]

    @property
    def total(self) -> int:
        return self.held.total

    def estimate(self) -> MemoryEstimate:
        return MemoryEstimate(**self.held._asdict(), stage=self.stage,
                              stage_totals=self.stage_totals)


class StageMemory:
    """What each pipeline stage of ``cfg`` holds under ``deg``, its split aside: the arithmetic
    of :func:`_stage_bytes`, made once and asked of several splits. The search asks it of each
    pipeline candidate's split by FLOPs, for the caps of the stages that split overfills, and
    of the split under those caps: made once per (config, degrees) rather than once per
    question (three times per pipeline candidate)."""

    def __init__(self, cfg: Config, deg: Degrees, *, flash: bool = True,
                 fused_norm: bool = True, kernels: bool = True) -> None:
        self.cfg, self.deg = cfg, deg
        self.key = model_key(cfg.model)
        self.stage_bytes = _stage_bytes(cfg, deg, flash, fused_norm, self.key, kernels)
        tr = cfg.train
        self.n_micro = max(1, tr.global_batch // (tr.micro_batch * deg.dp))

    def estimate(self, stage_layers: Sequence[int]) -> MemoryEstimate:
        """:func:`estimate_memory` of the config with ``stage_layers`` as its
        ``parallel.stage_layers`` (empty, or not one number per chunk: an even split)."""
        return self.worst(stage_layers).estimate()

    def worst(self, stage_layers: Sequence[int]) -> WorstStage:
        """:meth:`estimate`'s worst stage and what it holds, before it is made into a
        :class:`MemoryEstimate` (the search asks only whether most splits fit)."""
        m, deg = self.cfg.model, self.deg
        chunk_layers = tuple(stage_layers) \
            if deg.pp > 1 and len(stage_layers) == deg.pp * deg.virtual_stages else ()
        stages = _stages(m.layers, m.moe_layer_interval, _param_counts(self.key).moe_layers > 0,
                         deg.pp, deg.virtual_stages, self.cfg.parallel.pp_schedule,
                         self.n_micro, chunk_layers, self.cfg.parallel.pp_max_deferred)
        worst, totals = None, []
        for p, *row in stages:
            held = self.stage_bytes(*row)
            totals.append((p, held.total))
            if worst is None or held.total > worst[1].total:
                worst = (p, held)
        assert worst is not None  # every pipeline has a first stage
        return WorstStage(*worst, tuple(totals))

    def caps(self, limit: int) -> tuple[int, ...] | None:
        """The most layers each stage of a pipeline of one stage per rank can hold within
        ``limit`` bytes (at most ``layers - pp + 1``: a layer left for each other stage), from the
        stage's place in the pipeline alone, since a stage's bytes grow with its own layers and do
        not depend on the others' (:func:`_stage_bytes`); None where the stages cannot hold the
        model's layers between them. For dense models and MoE models with an MoE layer every
        layer: with MoE every few layers a stage's bytes depend on where it begins too.

        The search asks this of every pipeline candidate its split by FLOPs overfills, so it
        prices few stages: middle stages hold no more micro-batches in flight than the one before
        (GPipe as many, 1F1B ``pp - stage``), so their caps only grow down the pipeline and are
        walked down from the last middle stage's; under the 2BP schedules and ZB-H1, whose
        waiting W's can grow down the pipeline, each stage is capped on its own."""
        cfg, deg, stage_bytes, n_micro = self.cfg, self.deg, self.stage_bytes, self.n_micro
        m, pc = cfg.model, _param_counts(self.key)
        if pc.moe_layers and m.moe_layer_interval != 1:
            raise ValueError("StageMemory.caps: a stage's bytes depend on where it begins with MoE "
                             f"every {m.moe_layer_interval} layers")
        every_layer_moe = pc.moe_layers > 0
        places = [(stage == 0, stage == deg.pp - 1,
                   *_in_flight(cfg.parallel.pp_schedule, deg.pp, 1, stage, n_micro,
                               cfg.parallel.pp_max_deferred))
                  for stage in range(deg.pp)]

        @cache
        def held(count: int, place: tuple) -> int:
            moe = count if every_layer_moe else 0
            return stage_bytes(count - moe, moe, *place).total

        def most(place: tuple, top: int = m.layers - deg.pp + 1) -> int:
            """The most layers, up to ``top``, that fit at ``place`` (where one does): a guess
            from the bytes of one layer and of two (a stage's bytes are affine in its layers but
            for roundings), stepped to the exact count."""
            one = held(1, place)
            if one > limit or top == 1:
                return int(one <= limit)
            per_layer = held(2, place) - one
            count = min(top, 1 + (limit - one) // per_layer) if per_layer > 0 else top
            while count < top and held(count + 1, place) <= limit:
                count += 1
            while count > 1 and held(count, place) > limit:
                count -= 1
            return count

        # The tightest stage of each kind first: most candidates asked about fit nowhere.
        if any(held(1, place) > limit for place in {places[0], places[1], places[-1]}):
            return None
        middle, last = places[1:-1], most(places[-1])
        if cfg.parallel.pp_schedule in COUNTED:
            # W's waiting (more down the pipeline by default) can make a later stage hold more
            # than an earlier one: each stage's own cap
            caps = [most(places[0]), *(most(place) for place in middle), last]
            return tuple(caps) if all(caps) and sum(caps) >= m.layers else None
        # no middle stage holds more than the last middle one, nor the first
        widest = most(middle[-1]) if middle else m.layers - deg.pp + 1
        if last + (deg.pp - 1) * widest < m.layers:
            return None
        first = most(places[0], widest)
        caps, cap = [], widest
        for stage in range(len(middle) - 1, -1, -1):
            if first + last + sum(caps) + (stage + 1) * cap < m.layers:
                return None  # even the stages left at ``cap`` leave layers over
            # fewer fit where more micro-batches are in flight: often one layer fewer
            for _ in range(2):
                if held(cap, middle[stage]) <= limit:
                    break
                cap -= 1
            else:
                cap = most(middle[stage], cap)
            caps.append(cap)
        caps = [first, *reversed(caps), last]
        return tuple(caps) if sum(caps) >= m.layers else None
