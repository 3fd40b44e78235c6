"""NIC-aware against NIC-oblivious placement on a mixed-network cluster built on this machine.

Four "nodes" (network namespaces, one process each, ``orch.cluster.netbed``): two on a fast pair
standing in for InfiniBand, two on a fast pair standing in for RoCE, all four on a slow shared
network standing in for Ethernet, listed interleaved (ib0, roce0, ib1, roce1). The tiny model
trains with pp2 x FSDP2 twice, with the same degrees: once as ``orch plan`` places it
(``parallel.node_order: auto``: the InfiniBand pair is stage 0, the RoCE pair stage 1, so each
FSDP group runs over its fast pair) and once NIC-oblivious (``listed``: ranks in the listed
order, so each FSDP group joins an InfiniBand and a RoCE node and can only use the slow shared
network). Prints the median step time after warm-up of each, their ratio, and the plan's
prediction for each (the plan prices the ``cpu`` device entry's compute; its network figures
are the bed's rates, from the cluster description the bed writes).

    sudo .venv/bin/python benchmarks/hetero_nic.py [--steps 10] [--fast-mbit 1000]
        [--slow-mbit 100]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from bench_flags import at_least, description, positive_int

from orch.cluster.netbed import NetBed, Network, unavailable
from orch.runtime.records import is_eval

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).parent / "orch")
NODES = {"ib0": ["ib", "eth"], "roce0": ["roce", "eth"], "ib1": ["ib", "eth"],
         "roce1": ["roce", "eth"]}
WARMUP = 2


def run(bed: NetBed, cluster: Path, order: str, steps: int, seq_len: int, port: int
        ) -> tuple[float, float]:
    """Median measured and planned seconds per step under ``parallel.node_order: order``."""
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [f"cluster={cluster}", f"parallel.node_order={order}", "parallel.pp=2",
                "parallel.dp_shard=2", f"train.steps={steps}", f"train.seq_len={seq_len}",
                "train.global_batch=8", "train.micro_batch=2", "train.warmup_steps=1",
                "run.log_interval=1", "checkpoint.interval=0", f"run.dir={run_dir}"]
        done = bed.orch_launch(ORCH, ["configs/tiny.yaml", *(a for s in sets for a in
                                                              ("--set", s))],
                               ("ib0", "eth"), port, REPO)
        for node, (code, output) in done.items():
            if code:
                raise RuntimeError(f"{order}: node {node} failed:\n{output[-3000:]}")
        rows = [row for row in map(json.loads, (Path(run_dir) / "metrics.jsonl").open())
                if not is_eval(row)]  # the steps' records, not held-out evaluations'
        plan = json.loads((Path(run_dir) / "plan.json").read_text())
    return statistics.median(r["step_time_s"] for r in rows[WARMUP:]), plan["step_time_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    steps = at_least(WARMUP + 1, f"the first {WARMUP} are warm-up, left out of the median")
    parser.add_argument("--steps", type=steps, default=10)
    parser.add_argument("--seq-len", type=positive_int, default=64)
    parser.add_argument("--fast-mbit", type=positive_int, default=1000)
    parser.add_argument("--slow-mbit", type=positive_int, default=100)
    args = parser.parse_args(argv)
    if why := unavailable():
        sys.exit(f"hetero_nic: cannot build the test bed: {why}")
    networks = [Network("ib", "ib", args.fast_mbit), Network("roce", "roce", args.fast_mbit),
                Network("eth", "ethernet", args.slow_mbit)]
    results = {}
    with NetBed(networks, NODES) as bed, tempfile.TemporaryDirectory() as tmp:
        cluster = Path(tmp) / "cluster.yaml"
        cluster.write_text(yaml.safe_dump(bed.cluster()))
        for port, order in enumerate(("auto", "listed"), start=29531):
            results[order] = run(bed, cluster, order, args.steps, args.seq_len, port)
    (aware, aware_plan), (oblivious, oblivious_plan) = results["auto"], results["listed"]
    print(f"# hetero_nic: {datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores; "
          f"fast pairs {args.fast_mbit} Mbit/s, shared network {args.slow_mbit} Mbit/s; tiny "
          f"model, pp2 x FSDP2, seq {args.seq_len}, {args.steps} steps (median after "
          f"{WARMUP})\n")
    print("| placement | measured s/step | planned s/step |")
    print("|---|---|---|")
    print(f"| NIC-aware (node_order auto) | {aware:.3f} | {aware_plan:.3f} |")
    print(f"| NIC-oblivious (node_order listed) | {oblivious:.3f} | {oblivious_plan:.3f} |")
    print(f"\nNIC-aware is {oblivious / aware:.2f}x faster measured, "
          f"{oblivious_plan / aware_plan:.2f}x planned")


if __name__ == "__main__":
    main()
