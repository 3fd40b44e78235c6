"""The Plan: every degree, the rank layout, per-rank memory and the step-time estimate.

``build_plan`` is the one place where degrees are decided: launch, the parallel runtime and
checkpoints read the Plan and never re-derive a degree. A Plan is a frozen value that serializes
to JSON (``to_dict``); its rank groups are derived from its degrees on demand because at 4,096
ranks they are large and the search evaluates thousands of plans without needing them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from orch.config.rules import renormalized_top1
from orch.config.schema import WORLD_DEGREES, Config
from orch.errors import PlanError, Problem, reading
from orch.parallel.schedules.actions import rank_stages
from orch.parallel.schedules.generators import chunks_per_rank, placement_of
from orch.plan.activations import RECOMPUTE
from orch.plan.cost import (
    StepTime,
    estimate_step_time,
    head_flops,
    layer_flops,
    step_time_bound,
)
from orch.plan.degrees import Degrees
from orch.plan.layout import plan_groups, rank_coordinates
from orch.plan.machine import Machine, resolve_machine
from orch.plan.memory import (
    MEMORY_READS,
    MemoryEstimate,
    StageMemory,
    WorstStage,
    model_key,
)
from orch.plan.placement import (
    NodePlace,
    balanced_split,
    mixing,
    nic_notes,
    stage_speeds,
    unreachable,
)
from orch.plan.rules import check_degrees
from orch.plan.topology import Link

USABLE_MEMORY_FRACTION = 0.9
"""Share of device memory a plan may fill: the rest goes to the CUDA context, communication
buffers and allocator fragmentation, which the memory model does not itemize."""


@dataclass(frozen=True)
class Plan:
    model: str
    world_size: int
    gpus_per_node: int
    nodes: int
    device: str
    peak_flops: float
    """Dense peak FLOP/s per device at the run's precision, the mean over the plan's devices
    (on alike nodes the device's): MFU's denominator, in the plan and at run time."""
    degrees: Degrees
    schedule: str
    global_batch: int
    micro_batch: int
    seq_len: int
    microbatches: int
    """Micro-batches per data-parallel rank per step (gradient accumulation / pipeline depth)."""
    recompute: str
    grad_reduce: str
    """``parallel.grad_reduce`` where it decides something (several micro-batches per rank,
    gradients FSDP shards, no pipeline), else "" (one reduce per step whatever it says)."""
    layers_per_stage: tuple[int, ...]
    """Layers of each pipeline stage, first to last (pp x virtual_stages of them)."""
    memory: MemoryEstimate
    memory_limit_bytes: int
    """Bytes a rank may use: the usable share of the device."""
    offload_budget_bytes: int
    """Device bytes the offload engine may place (:func:`offload_budget`)."""
    tiers: dict[str, str]
    """Home tier of each tensor group (params, grads, optimizer, activations)."""
    pinned_budget_bytes: int
    """Pinned CPU bytes the NVMe tier may stage through (:func:`pinned_budget`)."""
    step: StepTime
    links: dict[str, Link]
    placement: tuple[NodePlace, ...] = ()
    """With a cluster description: its nodes in rank order (``orch.plan.placement``)."""
    optimizer: str = "adamw"
    """``optimizer.name``: what the optimizer states counted under memory are."""
    notes: tuple[str, ...] = ()
    """What the plan could not keep and what it costs (a data-parallel group spanning NIC
    types), said by ``orch plan`` and at launch."""
    devices: str = ""
    """Every device of the plan, alike ones counted together (``Topology.description``): on a
    mixed cluster ``device`` names only the slowest."""

    @property
    def device_summary(self) -> str:
        """``16 x h100-sxm-80gb``, or a mixed cluster's devices, ``8 x h200 + 8 x h100-...``."""
        return self.devices or f"{self.world_size} x {self.device}"

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_limit_bytes

    def groups(self) -> dict[str, list[list[int]]]:
        return plan_groups(self.degrees)

    def to_dict(self, with_groups: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "world_size": self.world_size,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "device": self.device,
            "devices": self.devices,
            "peak_flops": self.peak_flops,
            "degrees": self.degrees.as_dict(),
            "schedule": self.schedule,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "microbatches": self.microbatches,
            "recompute": self.recompute,
            "grad_reduce": self.grad_reduce,
            "optimizer": self.optimizer,
            "layers_per_stage": list(self.layers_per_stage),
            "memory_bytes_per_rank": self.memory.total,
            "memory_limit_bytes": self.memory_limit_bytes,
            "offload_budget_bytes": self.offload_budget_bytes,
            "tiers": dict(self.tiers),
            "pinned_budget_bytes": self.pinned_budget_bytes,
            "fits": self.fits,
            "memory": self.memory.as_dict(),
            "step_time_s": self.step.total_s,
            "tokens_per_s": self.step.tokens_per_s,
            "mfu": self.step.mfu,
            "step": self.step.as_dict(),
            "links": {dim: dataclasses.asdict(link) for dim, link in self.links.items()},
            "notes": list(self.notes),
        }
        if self.placement:
            out["nodes_in_rank_order"] = [dataclasses.asdict(place) for place in self.placement]
        if with_groups:
            out["groups"] = self.groups()
            if self.placement:
                out["ranks"] = self.ranks()
        return out

    def place_of(self, node: str) -> NodePlace:
        """Where node ``node`` of the cluster description sits in rank order."""
        return next(place for place in self.placement if place.name == node)

    def ranks(self) -> list[dict[str, Any]]:
        """Per rank, the node it runs on and that node's fastest NIC type."""
        return [{"rank": place.first_rank + local, "node": place.name, "nic": place.nic}
                for place in self.placement for local in range(place.ranks)]

    def rank_coordinates(self) -> list[dict[str, int]]:
        return rank_coordinates(self.degrees)


def memory_limit(cfg: Config, machine: Machine) -> int:
    """The usable share of the smallest device's memory: every node holds ranks of the plan
    (the slowest device, whose figures price the step, may have more memory than another)."""
    return int(machine.topology.memory_bytes * USABLE_MEMORY_FRACTION)


def offload_budget(cfg: Config, memory: MemoryEstimate, limit: int) -> int:
    """Device bytes the offload engine may place: ``offload.device_budget``, or with ``auto``
    what the device has left beside activations, buffers and device-tier groups."""
    budget = cfg.offload.device_budget
    if isinstance(budget, int):
        return budget
    return max(0, limit - (memory.total - memory.window))


PINNED_AUTO_FACTOR = 2
"""``pinned_budget: auto`` is this many times the least the NVMe tier stages at once, so a
prefetch and an update never wait for each other's buffers."""


def pinned_budget(cfg: Config, memory: MemoryEstimate) -> int:
    """Pinned CPU bytes for the NVMe tier's staging buffers: ``offload.pinned_budget``, or with
    ``auto`` twice the least it needs (0 when nothing rests on NVMe)."""
    budget = cfg.offload.pinned_budget
    return budget if isinstance(budget, int) else PINNED_AUTO_FACTOR * memory.staging_min


def config_degrees(cfg: Config, world_size: int, problems: list[Problem]) -> Degrees | None:
    """The degrees the config asks for, with ``dp_shard: -1`` filled from the world size."""
    p = cfg.parallel
    fixed = p.pp * p.dp_replicate * p.cp * p.tp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            problems.append(
                Problem(
                    "parallel",
                    f"world size {world_size} is not divisible by "
                    f"pp x dp_replicate x cp x tp = {p.pp} x {p.dp_replicate} x "
                    f"{p.cp} x {p.tp} = {fixed}",
                    "change the degrees or the world size so that they divide it",
                    WORLD_DEGREES,
                )
            )
            return None
        dp_shard = world_size // fixed
    elif fixed * dp_shard != world_size:
        problems.append(
            Problem(
                "parallel",
                f"pp x dp_replicate x dp_shard x cp x tp = {p.pp} x "
                f"{p.dp_replicate} x {dp_shard} x {p.cp} x {p.tp} = "
                f"{fixed * dp_shard}, not the world size {world_size}",
                "set parallel.dp_shard=-1 to fill the world, or fix the degrees",
                WORLD_DEGREES,
            )
        )
        return None
    return _given_degrees(cfg, dp_shard)


def _given_degrees(cfg: Config, dp_shard: int) -> Degrees:
    """The config's degrees, with ``dp_shard`` as given (the config's may be -1)."""
    p = cfg.parallel
    return Degrees(
        pp=p.pp,
        dp_replicate=p.dp_replicate,
        dp_shard=dp_shard,
        cp=p.cp,
        tp=p.tp,
        ep=p.ep,
        etp=p.etp,
        # zbv's default (1, left out) is its 2; without a pipeline, as given (1, or a problem)
        virtual_stages=chunks_per_rank(p.pp_schedule, p.virtual_stages) if p.pp > 1
        else p.virtual_stages,
        sequence_parallel=p.sequence_parallel and p.tp > 1,
    )


def evaluate(
    cfg: Config,
    deg: Degrees,
    machine: Machine,
    links: dict[str, Link] | None = None,
) -> Plan:
    """Price a set of degrees that already passed ``check_degrees``; ``links`` may be passed in
    when the caller (the search) already has them."""
    links = links if links is not None else machine.links(deg)
    cfg, memory = planned_memory(cfg, deg, machine)
    stage_layers = _stage_layers(cfg, deg, machine)
    limit = memory_limit(cfg, machine)
    t = cfg.train
    return Plan(
        model=cfg.model.name,
        world_size=machine.world_size,
        gpus_per_node=machine.gpus_per_node,
        nodes=machine.nodes,
        device=machine.device.name,
        peak_flops=machine.topology.total_peak(cfg.train.precision) / machine.world_size,
        degrees=deg,
        schedule=cfg.parallel.pp_schedule if deg.pp > 1 else "none",
        global_batch=t.global_batch,
        micro_batch=t.micro_batch,
        seq_len=t.seq_len,
        microbatches=t.global_batch // (t.micro_batch * deg.dp),
        recompute=t.recompute,
        grad_reduce=grad_reduce(cfg, deg),
        layers_per_stage=stage_layers,
        memory=memory,
        memory_limit_bytes=limit,
        offload_budget_bytes=offload_budget(cfg, memory, limit),
        tiers={g: getattr(cfg.offload, g) for g in ("params", "grads", "optimizer", "activations")},
        pinned_budget_bytes=pinned_budget(cfg, memory),
        step=step_time(cfg, deg, machine, links),
        links=links,
        placement=machine.places(),
        devices=machine.topology.description,
        optimizer=cfg.optimizer.name,
    )


def grad_reduce(cfg: Config, deg: Degrees) -> str:
    """:attr:`Plan.grad_reduce`: the setting where it changes what a rank holds and sends
    (several micro-batches, sharded gradients, no pipeline, no offload); "" elsewhere, where
    both settings run alike (``orch plan --auto`` then prices one)."""
    t = cfg.train
    several = t.global_batch // (t.micro_batch * deg.dp) > 1
    sharded = deg.fsdp > 1 or (cfg.model.is_moe and deg.expert_shard > 1)
    applies = several and sharded and deg.pp == 1 and not cfg.offload.enabled
    return cfg.parallel.grad_reduce if applies else ""


def step_time(cfg: Config, deg: Degrees, machine: Machine, links: dict[str, Link]) -> StepTime:
    """The step time of ``cfg``, split as :func:`planned_memory` splits it, under ``deg`` on
    ``machine``: :func:`evaluate`'s estimate alone, which the search asks of every setting that
    fits and makes a Plan of only for the few it lists."""
    stage_layers = _stage_layers(cfg, deg, machine)
    return estimate_step_time(cfg, deg, links, machine.device,
                              stage_load=_stage_load(cfg, deg, machine, stage_layers),
                              rank_layers=max(sum(stage_layers[chunk] for chunk in chunks)
                                              for chunks in _rank_chunks(cfg, deg)),
                              total_peak=machine.topology.total_peak(cfg.train.precision))


STEP_FLOOR_SLACK = 1e-9
"""Share :func:`step_time_floor` takes off its bound, far above the rounding of the sums that
make a step time (1e-16 each, summed in another order by the bound), so that no step is priced
below its floor."""


def step_time_floor(cfg: Config, deg: Degrees, machine: Machine,
                    links: dict[str, Link]) -> float:
    """Seconds :func:`step_time` cannot go below, whatever the pipeline split:
    :func:`step_time_bound` with the most loaded pipeline rank at least as loaded as under a
    split in proportion to speeds (on alike devices, an even split), less
    :data:`STEP_FLOOR_SLACK`. The search leaves settings unpriced whose floor is slower than
    the plans it would list already (most of them, so it prices a hundred settings, not
    thousands)."""
    speeds = _speeds(machine, deg, cfg.train.precision)
    least_load = len(speeds) * min(speeds) / sum(speeds)
    return (step_time_bound(cfg, deg, links, machine.device, least_load)
            * (1 - STEP_FLOOR_SLACK))


def _stage_load(cfg: Config, deg: Degrees, machine: Machine,
                stage_layers: tuple[int, ...]) -> float:
    """The slowest pipeline rank's compute (its layers' FLOPs, and the head's on the last stage,
    over its speed) over an even share of the model's at the slowest device, what the cost
    model assumes: a 31/1 split costs about twice an even one, a split in proportion to mixed
    devices' speeds less than all at the slowest's, and an even split of Llama 3 8B over 4
    stages 1.16x (the last stage's head is 1.8 layers' FLOPs at 8K tokens)."""
    if deg.pp == 1:
        return 1.0
    speeds = _speeds(machine, deg, cfg.train.precision)
    work = _chunk_work(cfg, stage_layers)
    times = [sum(work[chunk] for chunk in chunks) / speed
             for chunks, speed in zip(_rank_chunks(cfg, deg), speeds, strict=True)]
    even = sum(work) / deg.pp / min(speeds)
    return max(times) / even


def _rank_chunks(cfg: Config, deg: Degrees) -> list[list[int]]:
    """The pipeline chunks each rank runs (chunk ``r`` on rank ``r`` without virtual stages)."""
    if deg.virtual_stages == 1:
        return [[rank] for rank in range(deg.pp)]
    placement = placement_of(cfg.parallel.pp_schedule)
    return [list(rank_stages(rank, deg.pp, deg.virtual_stages, placement))
            for rank in range(deg.pp)]


def _speeds(machine: Machine, deg: Degrees, precision: str) -> list[float]:
    """Each pipeline rank's relative speed at ``precision``: its slowest device on a cluster,
    else all equal."""
    if machine.cluster is None:
        return [1.0] * deg.pp
    return stage_speeds(machine.topology, deg, precision)


_LAYER_WORK: dict[tuple, tuple[float, ...]] = {}
"""``layer_work`` by model shape and sequence length (the search asks per candidate)."""


def layer_work(cfg: Config) -> tuple[float, ...]:
    """Each layer's training FLOPs per token, the output head's added to the last layer's: what
    a pipeline split evens out (here, and in the re-partition by measured speed)."""
    key = (model_key(cfg.model), cfg.train.seq_len)
    if key not in _LAYER_WORK:
        *body, last = layer_flops(cfg.model, cfg.train.seq_len)
        _LAYER_WORK[key] = (*body, last + head_flops(cfg.model))
    return _LAYER_WORK[key]


def _chunk_work(cfg: Config, stage_layers: tuple[int, ...]) -> list[float]:
    """Each pipeline chunk's FLOPs per token, in chunk order."""
    work, bounds = layer_work(cfg), list(itertools.accumulate(stage_layers, initial=0))
    return [sum(work[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


def planned_memory(cfg: Config, deg: Degrees, machine: Machine) -> tuple[Config, MemoryEstimate]:
    """``cfg`` with the plan's split of a pipeline of one stage per rank, and its memory
    estimate: the split by FLOPs, and where that does not fit in memory the best split by FLOPs
    that does (:func:`_capped_split`); ``cfg`` itself when it holds a split already, has no
    pipeline, has virtual stages, or splits evenly (what the memory model assumes then). Both
    come from one :class:`StageMemory`: the split is made from memory estimates, and the search
    needs the estimate of the split it makes."""
    return plan_split(cfg, deg, machine).planned


class PlannedSplit:
    """:func:`planned_memory`'s answer, made as far as it is asked for: whether the split fits
    (``fits``) at once, its estimate (``memory``) and the config holding it (``planned``) when
    first asked. The search asks the first of every setting (13,300 for Mixtral at 1,024
    GPUs), the second of those that do not fit and the third of the few dozen it prices;
    where the split by FLOPs overfills a stage the split that fits is a dynamic program (160 of
    them, a tenth of that search, before)."""

    def __init__(self, cfg: Config, fits: bool,
                 make: Callable[[], tuple[Sequence[int] | None, WorstStage]],
                 capped: bool = False) -> None:
        self.cfg, self.fits, self._make = cfg, fits, make
        self.capped = capped
        """Whether the split fits only with layers moved off the stages by FLOPs would give
        them (memory caps): its slowest stage is then slower than that split's, so a setting
        needing less memory (more recompute) may step faster."""

    @classmethod
    def made(cls, cfg: Config, split: Sequence[int] | None, worst: WorstStage,
             limit: int) -> PlannedSplit:
        """``cfg`` given ``split`` (None: as it is), whose worst stage is ``worst``."""
        return cls(cfg, worst.total <= limit, lambda: (split, worst))

    @cached_property
    def _split(self) -> tuple[Sequence[int] | None, WorstStage]:
        return self._make()

    @cached_property
    def memory(self) -> MemoryEstimate:
        return self._split[1].estimate()

    @property
    def planned(self) -> tuple[Config, MemoryEstimate]:
        split = self._split[0]
        return (self.cfg if split is None else _with_split(self.cfg, split)), self.memory


def splits_pipeline(cfg: Config, deg: Degrees) -> bool:
    """Whether the plan splits the layers over the pipeline stages itself (one stage per rank,
    no ``parallel.stage_layers``): only then can memory cap the split (:func:`plan_split`)."""
    return deg.pp > 1 and deg.virtual_stages == 1 and not cfg.parallel.stage_layers


def plan_split(cfg: Config, deg: Degrees, machine: Machine) -> PlannedSplit:
    """:func:`planned_memory`, made as far as asked (:class:`PlannedSplit`)."""
    limit = memory_limit(cfg, machine)
    stages = StageMemory(cfg, deg, fused_norm=machine.device.fused_norm,
                         kernels=machine.device.orch_kernels)
    if not splits_pipeline(cfg, deg):
        return PlannedSplit.made(cfg, None, stages.worst(cfg.parallel.stage_layers), limit)
    split = _stage_layers(cfg, deg, machine)
    if cfg.model.layers % deg.pp == 0 and len(set(split)) == 1:
        # even: what the memory model assumes without a split
        return PlannedSplit.made(cfg, None, stages.worst(()), limit)
    return _capped_split(cfg, deg, machine, split, stages)


def _capped_split(cfg: Config, deg: Degrees, machine: Machine, by_flops: tuple[int, ...],
                  stages: StageMemory) -> PlannedSplit:
    """``cfg`` split ``by_flops`` where that fits in memory; else the split by FLOPs under a cap
    on each stage's layers, the most it has memory for (:meth:`StageMemory.caps`: a stage's
    bytes follow its own layers and place in the pipeline): the fastest split that fits (an
    upgraded node's 24/8 that does not fit becomes 23/9, not the even 16/16, which ran slower
    than before the upgrade); where none fits, ``by_flops``, for the report. Each with its
    memory estimate (``stages``: of ``cfg``). A split under caps fits (each stage holds no
    more layers than its cap, and a stage's bytes grow with its layers), so it is made only
    when asked for.

    With MoE layers every few layers a stage's bytes also depend on where it begins (its mix of
    MoE and dense layers), so no cap follows from its place alone: each stage over memory is
    capped a layer below what it holds and the split remade, until one fits or none can."""
    limit = memory_limit(cfg, machine)
    worst = stages.worst(by_flops)
    if worst.total <= limit:
        return PlannedSplit.made(cfg, by_flops, worst, limit)
    work, speeds = layer_work(cfg), tuple(_speeds(machine, deg, cfg.train.precision))
    if not cfg.model.is_moe or cfg.model.moe_layer_interval == 1:
        caps = stages.caps(limit)
        if caps is None:
            return PlannedSplit.made(cfg, by_flops, worst, limit)

        def under_caps() -> tuple[Sequence[int], WorstStage]:
            split = balanced_split(work, speeds, caps)
            planned = stages.worst(split)
            assert planned.total <= limit, (caps, split)  # (each stage within its cap)
            return split, planned

        return PlannedSplit(cfg, True, under_caps, capped=True)
    split, planned, tightened = by_flops, worst, [cfg.model.layers] * deg.pp
    while planned.total > limit:
        for stage, total in planned.stage_totals:
            if total > limit:
                tightened[stage] = split[stage] - 1
        if sum(tightened) < cfg.model.layers or min(tightened) < 1:
            return PlannedSplit.made(cfg, by_flops, worst, limit)
        split = balanced_split(work, speeds, tuple(tightened))
        planned = stages.worst(split)
    return PlannedSplit(cfg, True, lambda: (split, planned), capped=True)


def _with_split(cfg: Config, split: Sequence[int]) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel,
                                                                 stage_layers=list(split)))


def _stage_layers(cfg: Config, deg: Degrees, machine: Machine) -> tuple[int, ...]:
    """Layers per pipeline chunk: ``parallel.stage_layers`` when given; else, with one stage
    per rank, the split that evens out each stage's FLOPs (the head's on the last stage) over
    its device speed (:func:`balanced_split`: Llama 3 8B over 4 stages gets 8/8/9/7, what
    Megatron-LM users set by hand with ``--decoder-last-pipeline-num-layers``); with virtual
    stages an even split."""
    chunks = deg.pp * deg.virtual_stages
    if cfg.parallel.stage_layers and deg.pp > 1:
        return tuple(cfg.parallel.stage_layers)
    if deg.pp > 1 and deg.virtual_stages == 1:
        return balanced_split(layer_work(cfg), tuple(_speeds(machine, deg, cfg.train.precision)))
    return (cfg.model.layers // chunks,) * chunks


def place(cfg: Config, deg: Degrees, machine: Machine, problems: list[Problem]) -> Plan | None:
    """The plan of ``deg`` under the fastest node order of ``machine`` (one order without a
    cluster description), with notes on what it could not keep; a problem when no order lets
    every group reach its members."""
    plans, stranded = [], set()
    for placed in machine.placements():
        links = placed.links(deg)
        if cut := unreachable(deg, links):
            stranded.update(cut)
            continue
        plans.append((evaluate(cfg, deg, placed, links), placed))
    if not plans:
        problems.append(Problem(
            "cluster", f"the {', '.join(sorted(stranded))} groups of {deg.short()} span nodes "
            "that share no network, under every node order tried",
            "attach the nodes to a common network in the cluster description (a NIC's "
            "'network'), or choose degrees whose groups stay on connected nodes",
            (*WORLD_DEGREES, "parallel.ep", "parallel.etp")))
        return None
    plan, placed = min(plans, key=lambda pair: placement_key(
        pair[0].fits, pair[0].step, deg, pair[1]))
    return with_notes(plan, placed)


def placement_key(fits: bool, step: StepTime, deg: Degrees,
                  machine: Machine) -> tuple[bool, float, int]:
    """A plan that fits first (node orders split a pipeline differently, so one may fit where
    a faster one does not); then the fastest; on a tie, the order with fewer heavy groups
    spanning NIC types (then the listed order: ``min`` keeps the first). From the parts of a
    plan on ``machine``, which the search has before it makes one."""
    places = machine.places()
    if not places:
        return not fits, step.total_s, 0
    return not fits, step.total_s, mixing(deg, machine.topology, places, step.comm_s)


def with_notes(plan: Plan, machine: Machine) -> Plan:
    """``plan`` (placed on ``machine``) with notes on the NIC rules it had to relax."""
    if not plan.placement:
        return plan
    return dataclasses.replace(plan, notes=nic_notes(plan.degrees, machine.topology,
                                                     plan.placement, plan.step.comm_s,
                                                     plan.links, machine.only_listed))


def build_plan(
    cfg: Config,
    world_size: int | None = None,
    gpus_per_node: int | None = None,
    device: str | None = None,
) -> Plan:
    """The plan for exactly the degrees in ``cfg``; raises PlanError listing every problem.
    What is found on the machine reads ``cluster`` too (``Problem.reads``): the machine is the
    cluster description where one is given, else the options."""
    problems: list[Problem] = []
    machine = resolve_machine(cfg, world_size, gpus_per_node, device, problems)
    found: list[Problem] = []
    deg = config_degrees(cfg, machine.world_size, found) if machine else None
    # degrees that do not fill the world, or with no machine at all, still meet the other rules
    # (one round: heads that tp does not divide were said only once the world was right, and
    # not at all beside a bad --world-size, --device or cluster file); a dp_shard the config
    # gives is the user's own, only -1's is made up here; without a machine the rules that
    # read its node size (tp inside a node) are left out
    asked = deg or _given_degrees(cfg, max(cfg.parallel.dp_shard, 1))
    found.extend(check_degrees(cfg, asked, machine.gpus_per_node if machine else None,
                               dp_known=deg is not None or cfg.parallel.dp_shard != -1))
    if problems or found:
        raise PlanError([*problems, *reading(found, ("cluster",))])
    assert machine is not None and deg is not None
    plan = place(cfg, deg, machine, found)
    if plan is None:
        raise PlanError(reading(found, ("cluster",)))
    need, staging = plan.memory.window_min, plan.memory.staging_min
    if cfg.offload.enabled and plan.offload_budget_bytes < need:
        found.append(Problem(
            "offload.device_budget",
            f"{cfg.offload.device_budget} ({plan.offload_budget_bytes:,} bytes) is less than one "
            f"layer needs on the device: {need:,} bytes (its parameters, one gradient on its way "
            "home and, with offload.activations on cpu, its saved activations)",
            f"set offload.device_budget to at least {need:,} bytes, or auto", MEMORY_READS))
    if plan.pinned_budget_bytes < staging:
        found.append(Problem(
            "offload.pinned_budget",
            f"{cfg.offload.pinned_budget} ({plan.pinned_budget_bytes:,} bytes) is less than the "
            f"NVMe tier stages at once: {staging:,} bytes (a unit's parameters on their way to "
            "the device beside another unit's parameters and optimizer states being updated)",
            f"set offload.pinned_budget to at least {staging:,} bytes, or auto", MEMORY_READS))
    if found:
        raise PlanError(reading(found, ("cluster",)))
    plan = _budget_note(cfg, plan)
    other = "step" if plan.grad_reduce == "microbatch" else "microbatch"
    for setting, values in (("parallel.grad_reduce", (other,) if plan.grad_reduce else ()),
                            ("train.recompute", _more_recompute(cfg, deg, plan.fits))):
        if (note := _faster_setting_note(cfg, deg, machine, plan, setting, values)) is not None:
            plan = dataclasses.replace(plan, notes=(*plan.notes, note))
    if (routing := renormalized_top1(cfg.model)) is not None:
        plan = dataclasses.replace(plan, notes=(*plan.notes, routing))
    return plan


FASTER_SETTING_NOTE_GAIN = 0.1
"""How much faster another setting must be for a plan to say so: less is within what the
step-time model can tell apart."""


def _more_recompute(cfg: Config, deg: Degrees, fits: bool) -> tuple[str, ...]:
    """The recompute levels above ``cfg``'s worth trying: every one for a plan that does not
    fit (the fix most often wanted: Mistral NeMo 12B at 8K tokens on 16 H100s fits with
    selective recompute, and was only said not to fit); for one that fits, for a faster plan,
    only where the plan splits a pipeline by itself (each level needs less memory and more
    time, but a split capped to fit, layers moved off the early stages, can be slower than the
    FLOP-balanced one a higher level fits: Llama 3.1 405B on pp16 with selective recompute,
    30.5 s a step against full recompute's 24.5 s)."""
    if fits and not splits_pipeline(cfg, deg):
        return ()
    return RECOMPUTE[RECOMPUTE.index(cfg.train.recompute) + 1:]


def _faster_setting_note(cfg: Config, deg: Degrees, machine: Machine, plan: Plan, setting: str,
                         values: Sequence[str]) -> str | None:
    """A note where ``setting`` (``section.field``) at the fastest of ``values`` that fits is at
    least :data:`FASTER_SETTING_NOTE_GAIN` faster than ``plan``, or fits where ``plan`` does
    not; a hand-written plan kept such a setting to itself (``--auto`` weighs them): ``step``'s
    one reduce a step won by 44% on Ethernet-joined nodes, silently."""
    section, field = setting.split(".")
    fitting = []
    for value in values:
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(
            getattr(cfg, section), **{field: value})})
        if (found := place(changed, deg, machine, [])) is not None and found.fits:
            fitting.append((found.step.total_s, value, found))
    if not fitting:
        return None
    seconds, value, alternative = min(fitting, key=lambda option: option[0])
    faster = 1 - seconds / plan.step.total_s
    if plan.fits and faster < FASTER_SETTING_NOTE_GAIN:
        return None
    if plan.fits:
        said = f" and steps in {seconds:.4g} s, {faster:.0%} faster"
    else:  # beside a plan that does not fit, its step time is no yardstick ("-0% slower");
        # the setting named with its value ("where none does not" read as "nothing")
        said = (f" where {setting}={getattr(getattr(cfg, section), field)} does not, and steps "
                f"in {seconds:.4g} s")
    return (f"{setting}={value} fits ({alternative.memory.total / (1 << 30):.1f} GiB a rank)"
            f"{said}: set it, or compare with orch plan --auto")


def _budget_note(cfg: Config, plan: Plan) -> Plan:
    """``plan`` with a note where ``offload.device_budget`` is above what the device has left
    beside what is not offloaded: the budget then bounds nothing, and the engine's prefetching
    is held back by the device's memory, not by it (a plan said "of a 93.1 GiB offload budget"
    on a device with 21.6 GiB usable, silently)."""
    budget = cfg.offload.device_budget
    left = max(0, plan.memory_limit_bytes - (plan.memory.total - plan.memory.window))
    if not cfg.offload.enabled or not isinstance(budget, int) or budget <= left:
        return plan
    gib = 1 << 30
    note = (f"offload.device_budget {budget / gib:.1f} GiB is above the {left / gib:.1f} GiB "
            f"the device has left beside what is not offloaded (of "
            f"{plan.memory_limit_bytes / gib:.1f} GiB usable): it bounds nothing there; set "
            f"auto, or at most {left:,} bytes")
    return dataclasses.replace(plan, notes=(*plan.notes, note))
