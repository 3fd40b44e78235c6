"""``train.compile``: tokens/s of orch launch with each decoder block compiled (inductor)
against the same run uncompiled, in turn, in the same session.

    .venv/bin/python benchmarks/compile.py [--procs 1] [--steps 12] [--rounds 2] [--set k=v ...]

Default: the tiny model of configs/tiny.yaml, one process, in bf16 on a GPU, as users train there
(the config's fp32 is for CPU runs), fp32 on CPU (``train.precision`` set so before ``--set``,
which may change it). The first steps compile (inductor: tens of seconds on CPU), so the median
step time after ``--warmup`` steps is compared; the compile time is printed apart.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics

from bench_flags import description, timed_launches
from orch_runs import launch, steady_tokens_per_s


def main(argv: list[str] | None = None) -> None:
    args = timed_launches(argparse.ArgumentParser(description=description(__doc__)), argv,
                          steps=12, sets=[])
    import torch

    cuda = torch.cuda.is_available()
    overrides = [f"train.precision={'bf16' if cuda else 'fp32'}", *args.sets]
    where = torch.cuda.get_device_name() if cuda else platform.machine()
    print(f"# train.compile: {args.config} {' '.join(overrides)}, {args.procs} process(es), "
          f"{args.steps} steps ({where}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {datetime.date.today()})")
    print("| round | compile | tokens/s | first step s | steady step s |")
    print("|---:|---|---:|---:|---:|")
    speed: dict[str, list[float]] = {"none": [], "inductor": []}
    for round_ in range(1, args.rounds + 1):
        for backend in speed:
            sets = [f"train.steps={args.steps}", "train.warmup_steps=1", "run.log_interval=1",
                    f"train.compile={backend}", *overrides]
            rows, _ = launch(args.config, args.procs, sets)
            rate = steady_tokens_per_s(rows, args.warmup)
            speed[backend].append(rate)
            steady = statistics.median(r["step_time_s"] for r in rows[args.warmup:])
            print(f"| {round_} | {backend} | {rate:,.0f} | {rows[0]['step_time_s']:.2f} | "
                  f"{steady:.3f} |", flush=True)
    ratios = [c / n for c, n in zip(speed["inductor"], speed["none"], strict=True)]
    print(f"\ninductor / uncompiled tokens/s per round: {', '.join(f'{r:.2f}x' for r in ratios)}")


if __name__ == "__main__":
    main()
