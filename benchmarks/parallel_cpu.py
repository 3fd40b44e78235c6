"""Every parallel layout on this machine: measured tokens/s next to the plan's estimate, the
communication each dimension carried per step, and expert dispatch time against expert compute.

Part 1 trains the tiny configs under ``orch launch`` (gloo, fp32) for each layout of the
parallel issue and prints the steady-state tokens/s (median step after warm-up), the plan's
estimate for the same degrees on the ``cpu`` device entry, their ratio, the single-process
tokens/s of the same config (the alternative: not splitting at all), and rank 0's bytes per
step per dimension from metrics.jsonl. Each layout and its single process run in turn for
``--rounds`` rounds, the order rotating, and "vs 1 process" is the median of the same round's
ratios, with their range (``rounds.py``): this machine's speed drifts with its load. On a 2-core
machine every layout past 2 processes oversubscribes the cores, which the ratio column shows;
the plan's CPU entry has no notion of it.

Part 2 times one MoE layer's expert-parallel dispatch (route, permute, the two all-to-alls with
their count exchange, unpermute; forward and backward, experts replaced by the identity) and its
expert compute alone (the grouped SwiGLU on the rows this rank receives, forward and backward),
on 2 and 4 gloo ranks, and prints their ratio.

    .venv/bin/python benchmarks/parallel_cpu.py [--steps 12] [--seq-len 128] [--tokens 4096]
        [--rounds 2] [--only LAYOUT ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import time

import torch
from bench_flags import at_least, description, positive_int
from orch_runs import launch, steady_tokens_per_s
from rounds import in_turn, paired

WARMUP = 3
DENSE, MOE = "configs/tiny.yaml", "configs/tiny-moe.yaml"
LAYOUTS = {  # name: (config, processes, overrides)
    "fsdp2": (DENSE, 2, ["parallel.dp_shard=2"]),
    "tp2": (DENSE, 2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp2+sp": (DENSE, 2, ["parallel.tp=2"]),
    "cp2 ring": (DENSE, 2, ["parallel.cp=2", "parallel.cp_kind=ring"]),
    "cp2 ulysses": (DENSE, 2, ["parallel.cp=2", "parallel.cp_kind=ulysses"]),
    "tp2 x dp2": (DENSE, 4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "cp2 x tp2": (DENSE, 4, ["parallel.cp=2", "parallel.tp=2"]),
    "dp2 x tp2 x cp2": (DENSE, 8, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.cp=2"]),
    "ep2": (MOE, 2, ["parallel.ep=2"]),
    "ep4": (MOE, 4, ["parallel.ep=4"]),
    "ep2 x dp2": (MOE, 4, ["parallel.ep=2"]),
    "ep2 x etp2": (MOE, 4, ["parallel.ep=2", "parallel.etp=2"]),
    "moe tp2+sp": (MOE, 2, ["parallel.tp=2"]),
    "ep2 x tp2+sp": (MOE, 2, ["parallel.tp=2", "parallel.ep=2"]),
}
MOE_SETTINGS = ["model.experts=8"]
SINGLE = "1 process"


def _run(config: str, procs: int, sets: list[str]) -> tuple[float, list[dict], dict]:
    """Steady tokens/s of one ``orch launch``, its metrics records and its plan."""
    rows, plan = launch(config, procs, sets)
    return steady_tokens_per_s(rows, WARMUP), rows, plan


def layouts(steps: int, seq_len: int, only: list[str], rounds: int) -> None:
    """Part 1. Each layout runs in turn with one process of its own config, ``rounds`` times,
    the order rotating (``rounds.py``), and "vs 1 process" is the ratio within a round: one
    single-process run at the start stood for every layout, and a machine whose load changed in
    between made the ratio say 15.9x."""
    common = [f"train.steps={steps}", f"train.seq_len={seq_len}", "run.log_interval=1",
              "train.warmup_steps=1", "train.micro_batch=1"]
    print("| layout | procs | tokens/s | plan estimate | measured / plan | 1 process | "
          "vs 1 process (range) | MB per step by dimension |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in only or LAYOUTS:
        config, procs, overrides = LAYOUTS[name]
        sets = [*common, *(MOE_SETTINGS if config == MOE else [])]
        runs: dict[str, list[float]] = {name: [], SINGLE: []}
        for round_ in range(rounds):
            for who in in_turn(list(runs), round_):
                if who == SINGLE:
                    runs[SINGLE].append(_run(config, 1, sets)[0])
                else:
                    rate, rows, plan = _run(config, procs, [*sets, *overrides])
                    runs[name].append(rate)
        ours, base = statistics.median(runs[name]), statistics.median(runs[SINGLE])
        estimate = plan["step"]["tokens_per_s"]
        comm = {dim: statistics.median(r["comm_bytes"].get(dim, 0) for r in rows[WARMUP:])
                for dim in sorted({d for r in rows for d in r["comm_bytes"]})}
        traffic = ", ".join(f"{dim} {b / 1e6:.1f}" for dim, b in comm.items())
        median, low, high = paired(runs[name], runs[SINGLE])
        print(f"| {name} | {procs} | {ours:,.0f} | {estimate:,.0f} | {ours / estimate:.2f} | "
              f"{base:,.0f} | {median:.2f} ({low:.2f}-{high:.2f}) | {traffic} |", flush=True)


class _Identity(torch.nn.Module):
    """Stands in for the experts: returns the rows, remembers how many arrived per expert."""

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.counts = counts
        return rows * 1.0


def _dispatch_vs_compute(rank: int, world: int, store: str, tokens: int, out: dict) -> None:
    import torch.distributed as dist

    from orch.config import load_config
    from orch.models.moe import MoEFeedForward
    from orch.parallel.expert_parallel import apply_expert_parallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = dataclasses.replace(load_config(MOE).model, experts=8)
    layer = MoEFeedForward(cfg)
    apply_expert_parallel(layer, None)
    x = torch.randn(tokens, cfg.dim, generator=torch.Generator().manual_seed(rank))
    experts, stand_in = layer.experts, _Identity()
    layer.experts = stand_in  # type: ignore[assignment]  # dispatch alone
    dispatch = _timed(lambda: layer(x.clone().requires_grad_()).sum().backward())
    layer.experts = experts
    counts = stand_in.counts
    rows = torch.randn(int(counts.sum()), cfg.dim)
    compute = _timed(lambda: experts(rows.clone().requires_grad_(), counts).sum().backward())
    times = torch.tensor([dispatch, compute])
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        out["times"] = times.tolist()
    dist.destroy_process_group()


def _timed(fn, repeats: int = 10) -> float:  # type: ignore[no-untyped-def]
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def dispatch_ratio(tokens: int) -> None:
    import tempfile

    import torch.multiprocessing as mp

    print("\n| ep ranks | tokens per rank | dispatch ms (fwd+bwd) | expert compute ms "
          "(fwd+bwd) | dispatch / compute |")
    print("|---:|---:|---:|---:|---:|")
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
            out = manager.dict()
            mp.start_processes(_dispatch_vs_compute, args=(world, f"{tmp}/store", tokens, out),
                               nprocs=world, start_method="spawn")
            dispatch, compute = out["times"]
        print(f"| {world} | {tokens} | {dispatch * 1e3:.1f} | {compute * 1e3:.1f} | "
              f"{dispatch / compute:.2f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    steps = at_least(WARMUP + 1, f"the first {WARMUP} are warm-up, left out of the median")
    parser.add_argument("--steps", type=steps, default=12)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--tokens", type=positive_int, default=4096,
                        help="tokens per rank (part 2)")
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="rounds of part 1, each running every layout beside one process")
    parser.add_argument("--only", nargs="+", choices=sorted(LAYOUTS), default=[],
                        help="run these layouts of part 1 only, and skip part 2")
    args = parser.parse_args(argv)
    print(f"# parallel_cpu: tiny configs, gloo fp32, seq {args.seq_len}, {args.steps} steps, "
          f"{args.rounds} paired rounds ({platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {datetime.date.today()})\n")
    layouts(args.steps, args.seq_len, args.only, args.rounds)
    if not args.only:
        dispatch_ratio(args.tokens)


if __name__ == "__main__":
    main()
