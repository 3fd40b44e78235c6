"""``orch plan --auto``: enumerate every valid plan for a machine and keep the fastest that fit.

Candidates are generated valid by construction (tp inside a node and dividing the heads, pp at most
the layers and pp x virtual stages dividing them, experts folding into a stage, batch divisible by
micro-batch x dp) and are then checked by the same ``check_degrees`` that guards hand-written plans,
so the two can never disagree. Each set of degrees is tried with several micro-batch sizes and
recompute policies (and both ``parallel.grad_reduce`` settings where they differ); the best of
those represents the degrees in the ranking. Plans over memory are
counted with the memory group that dominated them, so users learn why a machine is too small.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from orch.config.schema import Config
from orch.parallel.schedules.generators import chunks_per_rank
from orch.plan.activations import RECOMPUTE
from orch.plan.cost import StepTime
from orch.plan.degrees import Degrees
from orch.plan.machine import Machine
from orch.plan.memory import MemoryEstimate
from orch.plan.placement import unreachable
from orch.plan.plan import (
    Plan,
    PlannedSplit,
    evaluate,
    grad_reduce,
    placement_key,
    plan_split,
    step_time,
    step_time_floor,
    with_notes,
)
from orch.plan.rules import check_degrees
from orch.plan.support import ddp_over_tp, layout_refusals
from orch.plan.topology import Link

MICRO_BATCHES = (1, 2, 4, 8)
GRAD_REDUCE = ("microbatch", "step")
"""``parallel.grad_reduce`` settings, least memory first: ``step`` holds whole gradients between
micro-batches for one reduce per step, which can be faster or, where the per-micro-batch
reduce-scatters hide behind the backward, not."""
MIN_CP_CHUNK = 1024
"""Context parallelism is searched only while each rank keeps this many tokens: below that its
ring exchanges cost more than the activation memory they save."""
HSDP_NODE_GROUPS = (1, 2, 4, 8)
"""HSDP shard groups searched, in whole nodes; full FSDP over all of dp is always searched."""
MEMORY_GROUPS = ("params", "grads", "optimizer", "activations", "buffers")


@dataclass
class SearchResult:
    best: list[Plan]
    """Fitting plans, fastest first, one per set of degrees."""
    evaluated: int = 0
    fit: int = 0
    over_memory: int = 0
    over_memory_causes: Counter[str] = field(default_factory=Counter)
    unconnected: int = 0
    """Sets of degrees that fit but whose groups span nodes sharing no network, in every node
    order tried."""
    fixed: dict[str, int | str] = field(default_factory=dict)
    """What the search kept as given (:func:`constraints`), by dotted path."""

    @property
    def kept(self) -> str:
        """``parallel.tp=2, train.micro_batch=4``: the constraints, as ``--set`` gives them."""
        return ", ".join(f"{path}={value}" for path, value in self.fixed.items())

    @property
    def most_common_cause(self) -> str:
        if not self.over_memory_causes:
            return ""
        cause, count = self.over_memory_causes.most_common(1)[0]
        return f"{cause} were the largest share in {count} of {self.over_memory}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SEARCHED = ("parallel.pp", "parallel.dp_replicate", "parallel.dp_shard", "parallel.cp",
            "parallel.tp", "parallel.ep", "parallel.etp", "train.micro_batch", "train.recompute",
            "parallel.grad_reduce")
"""What ``--auto`` chooses. One given with ``--set`` is kept as given (a constraint of the
search), and tried where the search would not try it by itself (a cp below
:data:`MIN_CP_CHUNK` tokens a rank, HSDP groups of part of a node, a micro-batch of 3); the
config file's values are searched over."""


def constraints(cfg: Config, given: Iterable[str]) -> dict[str, int | str]:
    """The values in ``cfg`` of the fields of :data:`SEARCHED` among ``given`` (dotted paths),
    in :data:`SEARCHED`'s order; ``dp_shard: -1`` (fill the world) constrains nothing."""
    given = set(given)
    fixed: dict[str, int | str] = {}
    for path in SEARCHED:
        if path in given:
            section, _, name = path.partition(".")
            value = getattr(getattr(cfg, section), name)
            if (path, value) != ("parallel.dp_shard", -1):
                fixed[path] = value
    return fixed


def candidate_degrees(cfg: Config, machine: Machine,
                      fixed: Mapping[str, int | str] | None = None) -> Iterator[Degrees]:
    """Every combination of degrees worth pricing on ``machine`` (before batch-size choices)
    that this version's runtime runs (``orch.plan.support``): offloaded, only replicas of
    the whole model (one process, or ``dp_replicate`` = the world; the search listed only
    FSDP, TP and pipeline plans, each refused by ``orch launch``); tensor parallelism never
    under plain DDP (``dp_shard`` 1 with replicas), which cannot hold DTensor parameters.
    ``fixed`` (:func:`constraints`): only degrees with those values."""
    m, p = cfg.model, cfg.parallel
    fixed = fixed or {}
    world, per_node = machine.world_size, machine.gpus_per_node

    def only(name: str, choices: Iterable[int]) -> list[int]:
        """``choices``, or where ``name`` is fixed, its value if it is one of them."""
        value = fixed.get(f"parallel.{name}")
        return [c for c in choices if value is None or c == value]

    if cfg.offload.enabled:
        replicas = Degrees(dp_replicate=world, dp_shard=1)
        if not layout_refusals(cfg, replicas, world) and _keeps(replicas, fixed):
            yield replicas
            return
        # refused whatever the layout (parameters left on the device, say): every layout is
        # priced, each row noting the refusal and its fix, as no plan otherwise would
    tp_limit = world if p.allow_cross_node_tp else per_node
    virtual = chunks_per_rank(p.pp_schedule, p.virtual_stages)
    for tp in only("tp", divisors(tp_limit)):
        if m.heads % tp or m.n_kv_heads % tp or (m.ffn_dim % tp and m.has_dense_mlp) or world % tp:
            continue
        if tp > 1 and m.is_moe and (not p.sequence_parallel
                                    or m.shared_experts * m.moe_ffn_dim % tp):
            continue
        for cp in only("cp", divisors(world // tp)):
            if (cp > 1 and cfg.train.seq_len // cp < MIN_CP_CHUNK
                    and "parallel.cp" not in fixed):
                continue
            for pp in only("pp", divisors(world // (tp * cp))):
                v = virtual if pp > 1 else 1
                if m.layers < pp or (v > 1 and m.layers % (pp * v)):
                    continue
                dp = world // (tp * cp * pp)
                replicas = (divisors(dp) if {"parallel.dp_replicate", "parallel.dp_shard"}
                            & fixed.keys()
                            else _replica_counts(dp, per_node // min(per_node, tp * cp)))
                for dp_replicate in only("dp_replicate", replicas):
                    if not only("dp_shard", [dp // dp_replicate]):
                        continue
                    if ddp_over_tp(tp, dp // dp_replicate * cp, dp_replicate, pp, m.is_moe):
                        continue
                    for ep, etp in _expert_layouts(cfg, dp * cp * tp, tp, fixed):
                        yield Degrees(
                            pp=pp,
                            dp_replicate=dp_replicate,
                            dp_shard=dp // dp_replicate,
                            cp=cp,
                            tp=tp,
                            ep=ep,
                            etp=etp,
                            virtual_stages=v,
                            sequence_parallel=p.sequence_parallel and tp > 1,
                        )


def _keeps(deg: Degrees, fixed: Mapping[str, int | str]) -> bool:
    """Whether ``deg`` has every fixed degree's value."""
    return all(getattr(deg, path.partition(".")[2]) == value
               for path, value in fixed.items() if path.startswith("parallel."))


def _replica_counts(dp: int, dp_per_node: int) -> list[int]:
    """dp_replicate values: 1 (full FSDP), and HSDP with shard groups of whole nodes."""
    shards = {dp_per_node * n for n in HSDP_NODE_GROUPS} if dp_per_node > 0 else set()
    return [1] + sorted(dp // s for s in shards if s < dp and dp % s == 0)


def _expert_layouts(cfg: Config, stage_ranks: int, tp: int,
                    fixed: Mapping[str, int | str] | None = None) -> list[tuple[int, int]]:
    """(ep, etp) pairs folding into a stage. Expert tensor parallelism is searched at 1 and at
    the dense tp (Megatron-Core's common choices); other values stay open to explicit plans
    (``fixed``: the values given)."""
    m, fixed = cfg.model, fixed or {}
    if not m.is_moe:
        return [(1, 1)]
    etps = ([fixed["parallel.etp"]] if "parallel.etp" in fixed else sorted({1, tp}))
    return [
        (ep, etp)
        for ep in divisors(m.experts)
        for etp in etps
        if stage_ranks % (ep * etp) == 0 and m.moe_ffn_dim % etp == 0
        and fixed.get("parallel.ep", ep) == ep
    ]


def search(cfg: Config, machine: Machine, top: int = 5,
           fixed: Mapping[str, int | str] | None = None) -> SearchResult:
    """The fastest plans that fit, ``top`` of them, one per set of degrees; ``fixed``
    (:func:`constraints`): only plans with those values."""
    fixed = dict(fixed or {})
    result = SearchResult(best=[], fixed=fixed)
    orders = machine.placements()  # node orders: their pipeline splits, so memory, differ
    best_per_degrees: list[_Priced] = []
    listed: list[tuple[int, float, int]] = []  # the best ``top`` keys of best_per_degrees
    tokens = cfg.train.global_batch * cfg.train.seq_len
    micro_batches = (int(fixed["train.micro_batch"]),) if "train.micro_batch" in fixed \
        else MICRO_BATCHES
    recomputes = (str(fixed["train.recompute"]),) if "train.recompute" in fixed else RECOMPUTE
    reduces = (str(fixed["parallel.grad_reduce"]),) if "parallel.grad_reduce" in fixed \
        else GRAD_REDUCE
    lean = reduces[0]  # the setting needing the least memory, what decides what fits
    # Every (micro-batch, recompute, grad_reduce) variant of cfg, made once: thousands of
    # degrees share them.
    variants = {(mb, r, g): _with(cfg, micro_batch=mb, recompute=r, grad_reduce=g)
                for mb in micro_batches for r in {cfg.train.recompute, *recomputes}
                for g in reduces}
    for deg in candidate_degrees(cfg, machine, fixed):
        split = _WithSplit(variants, deg, orders)
        settings = [
            mb for mb in micro_batches
            if cfg.train.global_batch % (mb * deg.dp) == 0
            # (the split the search makes always passes the rules: no need to make it here)
            and not check_degrees(variants[mb, cfg.train.recompute, lean], deg,
                                  machine.gpus_per_node)
        ]
        if not settings:
            continue
        # The smallest micro-batch with full recompute needs the least memory: when even that
        # does not fit under any node order, no setting of these degrees does.
        leanest = [split[settings[0], recomputes[-1], lean, i] for i in range(len(orders))]
        if not any(planned.fits for planned in leanest):
            count = len(settings) * len(recomputes)
            result.evaluated += count
            result.over_memory += count
            result.over_memory_causes[_dominant_group(_least(leanest))] += count
            continue
        usable = list(range(len(orders)))  # then the orders whose groups reach their members
        links: dict[int, dict[str, Link]] | None = None
        best: _Priced | None = None
        for mb in settings:
            if not usable:
                break
            # Recompute levels go from none to full: each needs less memory and more time, so
            # the first that fits (under some node order) is the one worth pricing, and the next
            # ones only where it fits by a pipeline split capped in memory (layers moved off
            # the early stages): a level needing less memory may fit the faster split by FLOPs.
            for index, recompute in enumerate(recomputes):
                result.evaluated += 1
                fitting = [i for i in usable if split[mb, recompute, lean, i].fits]
                if fitting and links is None:  # each node order whose groups all connect
                    links = {i: found for i in usable
                             if not unreachable(deg, found := orders[i].links(deg))}
                    result.unconnected += not links
                    usable = list(links)
                    fitting = [i for i in fitting if i in links]
                    if not usable:  # fits, but on nodes that cannot reach each other
                        result.fit += len(recomputes) - index
                        result.evaluated += len(recomputes) - index - 1
                        break
                if not fitting:
                    result.over_memory += 1
                    result.over_memory_causes[_dominant_group(
                        _least([split[mb, recompute, lean, i] for i in usable]))] += 1
                    continue
                result.evaluated += len(recomputes) - index - 1
                result.fit += len(recomputes) - index
                assert links is not None
                options = {(recompute, lean): fitting}
                capped = any(split[mb, recompute, lean, i].capped for i in fitting)
                for later in recomputes[index + 1:] if capped else ():
                    if fit := [i for i in usable if split[mb, later, lean, i].fits]:
                        options[later, lean] = fit
                    if not any(split[mb, later, lean, i].capped for i in fit):
                        break
                for reduce in reduces[1:]:
                    if grad_reduce(variants[mb, recompute, reduce], deg):
                        # where it differs from the lean setting, it needs more memory: priced
                        # at the first recompute level from this one that fits
                        options |= _first_fit(split, mb, recomputes[index:], reduce, usable)
                # (a floor whatever the split: the split need not be made to know it)
                floor = min(step_time_floor(variants[mb, *setting], deg, orders[i], links[i])
                            for setting, fit in options.items() for i in fit)
                if _band(tokens / floor) < _bar(best, listed, top):
                    break  # slower than what it would have to beat: left unpriced
                for setting, fit in options.items():
                    priced = [_price(split[mb, *setting, i].planned, deg, orders[i], links[i])
                              for i in fit]
                    chosen = min(priced,
                                 key=lambda p: placement_key(True, p.step, deg, p.machine))
                    if best is None or chosen.key < best.key:
                        best = chosen
                break
        if best is not None:
            best_per_degrees.append(best)
            bisect.insort(listed, best.key)
            del listed[top:]
    best_per_degrees.sort(key=lambda priced: priced.key)
    result.best = [with_notes(evaluate(p.cfg, deg=p.deg, machine=p.machine, links=p.links),
                              p.machine) for p in best_per_degrees[:top]]
    return result


def _first_fit(split: _WithSplit, mb: int, recomputes: Iterable[str], reduce: str,
               orders: list[int]) -> dict[tuple[str, str], list[int]]:
    """``{(recompute, reduce): the orders it fits}`` for the first of ``recomputes`` that fits
    under one of ``orders`` with micro-batch ``mb`` and ``reduce``; empty where none does."""
    for recompute in recomputes:
        if fit := [i for i in orders if split[mb, recompute, reduce, i].fits]:
            return {(recompute, reduce): fit}
    return {}


class _Priced(NamedTuple):
    """A setting of one set of degrees that fits, priced: what ranks it, and what makes its
    Plan. Only the plans listed are made (a Plan for every setting priced was a third of the
    time the search spent pricing)."""

    key: tuple[int, float, int]
    step: StepTime
    cfg: Config
    deg: Degrees
    machine: Machine
    links: dict[str, Link]


def _price(planned: tuple[Config, MemoryEstimate], deg: Degrees, machine: Machine,
           links: dict[str, Link]) -> _Priced:
    cfg, memory = planned
    step = step_time(cfg, deg, machine, links)
    return _Priced(_rank_key(step, memory), step, cfg, deg, machine, links)


class _WithSplit(dict):
    """The search's variants of a config, each with a candidate's pipeline split under one
    node order (which the memory model reads) and that split's memory estimate
    (:class:`PlannedSplit`), keyed ``(micro-batch, recompute, grad_reduce, order)``, made when
    first asked for."""

    def __init__(self, variants: dict[tuple[int, str, str], Config], deg: Degrees,
                 orders: list[Machine]) -> None:
        super().__init__()
        self.variants, self.deg, self.orders = variants, deg, orders

    def __missing__(self, key: tuple[int, str, str, int]) -> PlannedSplit:
        mb, recompute, reduce, order = key
        self[key] = plan_split(self.variants[mb, recompute, reduce], self.deg,
                               self.orders[order])
        return self[key]


def _least(over: list[PlannedSplit]) -> MemoryEstimate:
    """The estimate needing the least memory of settings that do not fit (each node order's):
    what its largest group says of why."""
    return min((planned.memory for planned in over), key=lambda memory: memory.total)


def _with(cfg: Config, micro_batch: int, recompute: str, grad_reduce: str) -> Config:
    """``cfg`` with one setting of what the search chooses besides the degrees."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, micro_batch=micro_batch, recompute=recompute),
        parallel=dataclasses.replace(cfg.parallel, grad_reduce=grad_reduce))


TIE_BAND = 0.001
"""Throughputs within one band this wide (a ratio) tie in the ranking."""


def _band(tokens_per_s: float) -> int:
    """The band of throughput :data:`TIE_BAND` wide that ``tokens_per_s`` falls in."""
    return math.floor(math.log(tokens_per_s) / math.log1p(TIE_BAND))


def _bar(best: _Priced | None, listed: list[tuple[int, float, int]], top: int) -> float:
    """The band a setting must reach to change what the search lists: that of the best setting
    of its degrees so far (a lower band ranks below it, whatever it communicates), and once
    ``top`` degrees have their best, that of the last of those (a lower band ranks below all
    ``top``, so it is not listed, nor is its degrees' best, which ranks no higher)."""
    bands = [-best.key[0]] if best is not None else []
    if len(listed) == top:
        bands.append(-listed[-1][0])
    return max(bands, default=-math.inf)


def _rank_key(step: StepTime, memory: MemoryEstimate) -> tuple[int, float, int]:
    """Fastest first; plans in one band of throughput (0.1% wide, on a log scale, so they are
    within 0.1% of each other) go to the one that communicates less (more slack when the
    network is slower than modelled), then to the one with less memory. A plan never ranks
    above one more than 0.1% faster (3 significant figures, as before, made bands up to 1%
    wide). Bands, not pairwise comparison, keep the order transitive, so sorting holds."""
    return (-_band(step.tokens_per_s), sum(step.comm_s.values()), memory.total)


def _dominant_group(memory: MemoryEstimate) -> str:
    sizes = {name: getattr(memory, name) for name in MEMORY_GROUPS}
    name = max(sizes, key=sizes.__getitem__)
    return "optimizer states" if name == "optimizer" else name
