"""``train.recompute``: tokens/s of orch launch without recompute, with op-level selective and
with full recompute, in turn, in the same session, beside the plan's step time and activation
memory for each (the plan's recompute model against the runtime it prices).

    .venv/bin/python benchmarks/recompute.py [--procs 1] [--steps 10] [--rounds 2] [--set k=v ...]

Default: configs/tiny.yaml at micro-batch 8 x 512 tokens, one process, fp32 on CPU. Ratios are
to the run without recompute of the same round; the plan's ratio beside them is what its cost
model says for the same config on the ``cpu`` device (or the config's).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

from bench_flags import description, timed_launches
from orch_runs import launch, steady_tokens_per_s

MODES = ("none", "selective", "full")
SHAPE = ["train.seq_len=512", "train.micro_batch=8", "train.global_batch=8"]


def main(argv: list[str] | None = None) -> int:
    args = timed_launches(argparse.ArgumentParser(description=description(__doc__)), argv,
                          steps=10, sets=SHAPE)
    import torch

    print(f"# train.recompute: {args.config} {' '.join(args.sets)}, {args.procs} process(es), "
          f"{args.steps} steps ({platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {datetime.date.today()})")
    print("| round | recompute | tokens/s | vs none | plan: vs none | plan: activations MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for round_ in range(1, args.rounds + 1):
        base: tuple[float, float] | None = None
        for mode in MODES:
            sets = [f"train.steps={args.steps}", "train.warmup_steps=1", "run.log_interval=1",
                    f"train.recompute={mode}", *args.sets]
            rows, plan = launch(args.config, args.procs, sets)
            rate = steady_tokens_per_s(rows, args.warmup)
            planned = plan["tokens_per_s"]
            base = base or (rate, planned)
            activations = plan["memory"]["activations"] / 2**20
            print(f"| {round_} | {mode} | {rate:,.0f} | {rate / base[0]:.2f}x | "
                  f"{planned / base[1]:.2f}x | {activations:,.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
