"""Pipeline schedules measured: orch's, run by orch's executor, against
torch.distributed.pipelining's own, on the same model and batch, with the simulator's prediction
beside each.

Model: ``--blocks`` residual MLP blocks (``x + W2 gelu(W1 x)``, d = ``--dim``, hidden 4d), split
evenly over the stages; ``--rows`` rows per micro-batch; mean-squared-error loss. Every pipeline
rank is a process pinned to a core of its own with one compute thread, so idle time is real (never
more stages than cores: the run refuses otherwise and says which it was). For m = 1x, 2x and 4x as
many micro-batches as stages it runs orch's gpipe, 1f1b, 2bp-gpipe, 2bp-1f1b, zb-h1, interleaved (2
stages per rank) and zbv (2 stages per rank in a V) and torch's Schedule1F1B,
ScheduleInterleavedZeroBubble and ScheduleZBVZeroBubble (both 2 stages per rank), each for
``--steps`` steps after 2 warm-up steps, and prints per schedule: rows/s (median step), the ratio to
torch's Schedule1F1B at the same m, the mean idle fraction over ranks, the peak in-flight
activations of any rank (micro-batch stages whose forward ran and whose weight gradients did not
yet: what activation memory scales with), and the simulator's prediction from the mean measured
F/B/I/W costs of that run (and the measured/predicted ratio). Every schedule's compute calls are
timed the same way (``ActionClock``). orch's schedules run on orch's stages, whose split backward
defers the linear layers' weight GEMMs (``SplitBackwardStage``), torch's on torch's
``PipelineStage``; a last table gives each one's measured F, B, I and W per micro-batch, and a
first one what each split costs against a fused backward, measured alone in one process, with the
memory allocated after the forward and after I (what waits for W; ``--split-only`` prints that
table alone). ``--schedules`` runs a subset (torch's Schedule1F1B, the anchor of every ratio,
always runs).

    .venv/bin/python benchmarks/pipeline.py [--stages 2] [--blocks 8] [--dim 512] [--rows 192]
        [--rounds 5] [--steps 3] [--schedules zbv,torch ZBV] [--split-only]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_flags import description
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    Schedule1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from orch.parallel.pipeline.executor import ActionClock, PipelineExecutor
from orch.parallel.pipeline.timeline import measured_timeline
from orch.parallel.pipeline.weight_grads import (
    SplitBackwardStage,
    WeightGradStore,
    defer_linear_weight_grads,
)
from orch.parallel.schedules import (
    Costs,
    build_schedule,
    placement_of,
    rank_stages,
    schedule_with_comms,
    simulate,
    worst_mix,
)
from orch.parallel.schedules.actions import Action, Schedule

WARMUP = 2
ORCH = [("gpipe", 1), ("1f1b", 1), ("2bp-gpipe", 1), ("2bp-1f1b", 1), ("zb-h1", 1),
        ("interleaved", 2), ("zbv", 2)]
TORCH = {"torch 1F1B": (Schedule1F1B, 1), "torch InterleavedZB": (ScheduleInterleavedZeroBubble, 2),
         "torch ZBV": (ScheduleZBVZeroBubble, 2)}


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


_KIND = {FORWARD: "F", FULL_BACKWARD: "B", BACKWARD_INPUT: "I", BACKWARD_WEIGHT: "W"}


def torch_order(order: dict, name: str, world: int, m: int, v_shape: bool) -> Schedule:
    """A torch multi-stage schedule's compute order as an orch Schedule, for the simulator.

    In torch's stage the first stage's input-gradient step computes nothing and its
    weight-gradient step is the whole backward, so they become one fused B where the W was."""
    ranks = []
    for rank in range(world):
        acts = []
        for act in order[rank]:
            if act is None or act.computation_type not in _KIND:
                continue
            kind, stage = _KIND[act.computation_type], act.stage_index
            if stage == 0 and kind == "I":
                continue
            acts.append(Action("B" if stage == 0 and kind == "W" else kind, stage,
                               act.microbatch_index))
        ranks.append(acts)
    return schedule_with_comms(name, world, m, ranks, 2, "v" if v_shape else "loop")


class _Runner:
    """One schedule at one micro-batch count on this rank: its stages, its step, its records."""

    def __init__(self, rank: int, world: int, blocks: list[Block], args: argparse.Namespace,
                 name: str, virtual: int, torch_cls: type | None, m: int) -> None:
        count = world * virtual
        per = args.blocks // count
        v_shape = torch_cls is ScheduleZBVZeroBubble or placement_of(name) == "v"
        mine = rank_stages(rank, world, virtual, "v" if v_shape else "loop")
        meta = torch.empty(args.rows, args.dim, device="meta", requires_grad=True)
        kind = PipelineStage if torch_cls else SplitBackwardStage  # what each executor runs
        stages = [kind(nn.Sequential(*blocks[s * per:(s + 1) * per]), s, count,
                       torch.device("cpu"), input_args=meta, output_args=meta)
                  for s in mine]
        self.blocks, self.virtual, self.times = blocks, virtual, []
        if torch_cls is None:
            self.order = build_schedule(name, world, m, virtual)
            runner = PipelineExecutor(stages, self.order, dist.group.WORLD, loss_fn)
            self.clock, self._step = runner.clock, runner.step
        else:
            sched = torch_cls(stages[0] if torch_cls is Schedule1F1B else stages, m, loss_fn)
            self.order = (build_schedule("1f1b", world, m) if torch_cls is Schedule1F1B
                          else torch_order(sched.pipeline_order, name, world, m, v_shape))
            self.clock = ActionClock()
            for stage in stages:
                self.clock.attach(stage)

            def step(x: torch.Tensor, y: torch.Tensor) -> None:
                dist.barrier()
                self.clock.start()
                sched.step(*((x,) if 0 in mine else ()),
                           target=y if count - 1 in mine else None)

            self._step = step
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(m * args.rows, args.dim, generator=gen)
        self.y = torch.randn(m * args.rows, args.dim, generator=gen)

    def step(self) -> float:
        """One timed step (seconds, from a common barrier to the last rank's end)."""
        for block in self.blocks:
            block.zero_grad(set_to_none=True)
        start = time.perf_counter()
        self._step(self.x, self.y)
        dist.barrier()
        return time.perf_counter() - start


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: dict) -> None:
    os.sched_setaffinity(0, {rank})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    blocks = [Block(args.dim) for _ in range(args.blocks)]
    # orch's stages make their linear layers defer weight GEMMs: a copy of the same weights,
    # so torch's schedules run the untouched layers.
    orch_blocks = copy.deepcopy(blocks)
    runs = [(name, v, None) for name, v in ORCH] + [(n, v, c) for n, (c, v) in TORCH.items()]
    runs = [run for run in runs if run[0] in args.schedules]
    runners = {(name, factor * world): _Runner(rank, world, blocks if cls else orch_blocks,
                                               args, name, v, cls, factor * world)
               for factor in (1, 2, 4) for name, v, cls in runs}
    for runner in runners.values():
        for _ in range(WARMUP):
            runner.step()
    # Rounds: every schedule takes a few steps in turn, so slow drift on the machine (other
    # load, frequency) hits all of them alike and each round gives paired ratios.
    rounds: dict[tuple[str, int], list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for key, runner in runners.items():
            rounds[key].append(statistics.median(runner.step() for _ in range(args.steps)))
    per_stage = activation_bytes(blocks[: args.blocks // world], args.rows, args.dim)
    for key, runner in runners.items():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, runner.clock.records)
        if rank == 0:
            out[key] = (rounds[key], gathered, runner.virtual, per_stage, runner.order,
                        key[0] in TORCH)
    dist.destroy_process_group()


def activation_bytes(blocks: list[Block], rows: int, dim: int) -> int:
    """Bytes autograd keeps from one micro-batch's forward through ``blocks`` (tensors saved for
    backward, parameters excluded): what each in-flight micro-batch holds on a rank."""
    params = {p.untyped_storage().data_ptr() for b in blocks for p in b.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(rows, dim, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.Sequential(*blocks)(x)
    return sum(seen.values())


def _mean_spans(gathered: list, torch_stage: bool) -> dict[str, float]:
    """Mean measured seconds per action kind and stage (one micro-batch). On torch's stage the
    first stage's split backward counts as one B (``torch_order``): its I computes nothing."""
    spans: dict[str, list[float]] = defaultdict(list)
    for rank in gathered:
        for text, start, end in rank:
            act = Action.parse(text)
            if torch_stage and act.stage == 0 and act.kind == "I":
                continue
            fused = torch_stage and act.stage == 0 and act.kind == "W"
            spans["B" if fused else act.kind].append(end - start)
    return {k: statistics.mean(v) for k, v in spans.items()}


def _costs(gathered: list, virtual: int, torch_stage: bool) -> Costs:
    """Mean measured seconds per action kind, for one rank's whole share (V chunks)."""
    mean = {k: v * virtual for k, v in _mean_spans(gathered, torch_stage).items()}
    i, w = mean.get("I", mean.get("B", 0.0) / 2), mean.get("W", mean.get("B", 0.0) / 2)
    return Costs(f=mean["F"], b=mean.get("B"), i=i, w=w)


def split_costs(args: argparse.Namespace, reps: int = 30) -> SplitCosts:
    """One stage's forward and backward for one micro-batch, three ways: fused (autograd's),
    torch's split (``I`` by ``stage_backward_input``, ``W`` by ``stage_backward_weight``, as
    torch's stage does) and orch's (one pass deferring the weight GEMMs, then the GEMMs), for a
    middle stage (input gradient wanted) and the first (on torch's first stage I is empty and W
    is the whole backward, as in its stage). Keyed ``(way, first)``: seconds, the fastest of
    ``reps`` (compute alone, without the machine's noise; the ways in turn on one pinned core),
    and the bytes allocated after the forward and after I (what waits for W; after the whole
    backward for the fused way), over those before the forward (:func:`_allocated`)."""
    torch.manual_seed(0)
    plain = nn.Sequential(*[Block(args.dim) for _ in range(args.blocks // args.stages)])
    deferring = copy.deepcopy(plain)
    defer_linear_weight_grads(deferring)
    store = WeightGradStore()
    x, grad = torch.randn(args.rows, args.dim), torch.randn(args.rows, args.dim)

    # each way a generator that pauses after the forward and after I
    def fused(inputs: torch.Tensor) -> Iterator[None]:
        out = plain(inputs)
        yield
        out.backward(grad)
        yield

    def torch_split(inputs: torch.Tensor) -> Iterator[None]:
        out = plain(inputs)
        yield
        if not inputs.requires_grad:  # torch's first stage: no I, W is the whole backward
            yield
            out.backward(grad)
            return
        _, groups = stage_backward_input([out], [grad], [inputs], plain.parameters())
        yield
        stage_backward_weight(plain.parameters(), groups)

    def orch_split(inputs: torch.Tensor) -> Iterator[None]:
        out = deferring(inputs)
        yield
        with store.collect():
            out.backward(grad)
        yield
        store.take()()

    ways = {"fused backward": (fused, plain), "torch's split": (torch_split, plain),
            "orch's split": (orch_split, deferring)}
    spans: dict[tuple[str, bool], list[float]] = defaultdict(list)
    held: dict[tuple[str, bool], tuple[int, int]] = {}
    for rep in range(reps + 3):
        for first in (False, True):
            for name, (way, model) in ways.items():
                model.zero_grad(set_to_none=True)
                inputs = x.clone().requires_grad_(not first)
                if rep == 1:  # memory, once (after a first pass of every way: lazy set-ups)
                    before, phases, after = _allocated(), way(inputs), []
                    for _ in range(2):  # after the forward, after I
                        next(phases)
                        after.append(_allocated() - before)
                    held[(name, first)] = (after[0], after[1])
                    for _ in phases:  # W
                        pass
                    continue
                start = time.perf_counter()
                for _ in way(inputs):  # the forward is timed too: the same in every way
                    pass
                if rep >= 3:
                    spans[(name, first)].append(time.perf_counter() - start)
    return {key: (min(v), *held[key]) for key, v in spans.items()}


SplitCosts = dict[tuple[str, bool], tuple[float, int, int]]
"""(way, first stage) -> seconds, bytes held after the forward, bytes held after I."""


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _allocated() -> int:
    """Bytes this process has allocated now by glibc's count (heap in use plus its own
    mappings), which CPU tensors come from: exact to the allocation, unlike the resident set."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def order_robustness(order: Schedule) -> tuple[float, float]:
    """A schedule's simulated step over the work each rank does, M (F + I + W), at equal costs,
    and the worst over ``COST_MIXES`` (``worst_mix``): the order alone, without the noise."""
    return simulate(order, Costs()).makespan / (3 * order.microbatches), worst_mix(order)


def main(argv: list[str] | None = None) -> None:
    # Here, not at the top: tests load this file as a module, without benchmarks/ on the path.
    from bench_flags import at_least, positive_int

    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--stages", type=at_least(2), default=2)
    parser.add_argument("--blocks", type=positive_int, default=8)
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--rows", type=positive_int, default=192)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="steps per schedule per round")
    parser.add_argument("--split-only", action="store_true",
                        help="only the first table (what each split costs), then stop")
    every = [name for name, _ in ORCH] + list(TORCH)
    parser.add_argument("--schedules", default=",".join(every),
                        help=f"comma-separated subset of: {', '.join(every)}")
    args = parser.parse_args(argv)
    chosen = {name.strip() for name in args.schedules.split(",")}
    if unknown := chosen - set(every):
        raise SystemExit(f"--schedules: unknown {', '.join(sorted(unknown))}; valid: "
                         f"{', '.join(every)}")
    args.schedules = [name for name in every if name in chosen | {"torch 1F1B"}]
    cores = len(os.sched_getaffinity(0))
    if args.stages > cores:
        raise SystemExit(f"{args.stages} stages need a core each; this machine has {cores}")
    if args.blocks % (2 * args.stages):
        raise SystemExit(f"--blocks must be a multiple of 2 x stages = {2 * args.stages}")
    print(f"# pipeline: {args.stages} stages, each a process pinned to its own core with one "
          f"thread ({cores} cores here); {args.blocks} residual MLP blocks d={args.dim}, "
          f"{args.rows} rows per micro-batch; {args.rounds} rounds of {args.steps} steps per "
          f"schedule after {WARMUP} warm-up ({platform.machine()}, torch {torch.__version__}, "
          f"{datetime.date.today()})\n")
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    costs = split_costs(args)
    os.sched_setaffinity(0, range(cores))
    print("One stage's forward + backward of one micro-batch, one pinned core (fastest of 30, "
          "the ways in turn); in brackets the MiB allocated after the forward / after I (held "
          "until W; the fused way: after its whole backward, the weight gradients)\n")
    print("| stage | fused backward | torch's split (I, then W) | orch's split (I, then W) |")
    print("|---|---:|---:|---:|")
    for first in (False, True):
        base = costs[("fused backward", first)][0]
        cells = []
        for way in ("fused backward", "torch's split", "orch's split"):
            seconds, forward, after_i = costs[(way, first)]
            ratio = "" if way == "fused backward" else f" ({seconds / base:.3f}x)"
            cells.append(f"{seconds * 1e3:.1f} ms{ratio} [{forward / 2**20:.1f} / "
                         f"{after_i / 2**20:.1f}]")
        print(f"| {'first' if first else 'middle'} | " + " | ".join(cells) + " |")
    print()
    if args.split_only:
        return
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(args.stages, f"{tmp}/store", args, out),
                           nprocs=args.stages, start_method="spawn")
        results = dict(out)
    print("| m | schedule | rows/s | vs torch 1F1B (range over rounds) | idle | peak in-flight "
          "| peak activations | simulated rows/s | measured / simulated |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in sorted({m for _, m in results}):
        base = results[("torch 1F1B", m)][0]
        for name in args.schedules:
            rounds, gathered, virtual, per_stage, order, torch_stage = results[(name, m)]
            seconds = statistics.median(rounds)
            ratios = sorted(b / s for b, s in zip(base, rounds, strict=True))
            timeline = measured_timeline(gathered)
            peak = max(timeline.peak_activations)
            predicted = simulate(order, _costs(gathered, virtual, torch_stage)).makespan
            sim = f"{m * args.rows / predicted:,.0f}"
            versus = f"{predicted / seconds:.2f}"
            print(f"| {m} | {name} | {m * args.rows / seconds:,.0f} | "
                  f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) | "
                  f"{timeline.bubble_fraction:.1%} | {peak} | "
                  f"{peak * per_stage / virtual / 2**20:.1f} MiB | {sim} | {versus} |", flush=True)
    print("\nThe same orders simulated (no noise): step over each rank's work M (F + I + W) at "
          "F = I = W, and the worst over forward 0.8-1.25x and I:W from 0.8:1.2 to 1.2:0.8\n")
    print("| m | schedule | equal costs | worst mix |")
    print("|---:|---|---:|---:|")
    for m in sorted({m for _, m in results}):
        for name in args.schedules:
            equal, worst = order_robustness(results[(name, m)][4])
            print(f"| {m} | {name} | {equal:.3f} | {worst:.3f} |")
    m = max(m for _, m in results)
    print(f"\nMeasured compute per micro-batch and stage at m = {m} (ms; on torch's stage the "
          "first stage's backward is one B, its I computing nothing)\n")
    print("| schedule | F | B | I | W | I + W |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.schedules:
        _, gathered, _, _, _, torch_stage = results[(name, m)]
        mean = _mean_spans(gathered, torch_stage)
        split = mean["I"] + mean["W"] if "I" in mean and "W" in mean else None
        cells = [mean.get(k) for k in "FBIW"] + [split]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c * 1e3:.1f}" for c in cells)
              + " |")


if __name__ == "__main__":
    main()
