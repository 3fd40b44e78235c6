"""Offloaded training on the CPU: orch against a plain torch loop and DeepSpeed ZeRO-3 offload.

The same GPT-like model (orch's Llama, dim 768, 18 layers, SwiGLU 2048: 128M parameters), the
same batch (4 sequences x 256 tokens of the shipped corpus, taken from orch's own data stream),
the same initial weights and AdamW settings with clipping, trained for ``--steps`` steps by:

- a plain torch loop (everything in memory: what offload is measured against for memory);
- DeepSpeed ZeRO-3 with parameters and optimizer states offloaded to the CPU, and to NVMe
  (ZeRO-Infinity: ``max_in_cpu: 0`` so parameters really leave RAM, which then needs
  ``stage3_max_reuse_distance: 0`` or step 2 fails with "Not enough buffers");
- orch (``orch launch``, one process) with parameters and optimizer states at home on the CPU,
  and on NVMe (``offload.params/optimizer: nvme``), gradients in CPU memory.

Each runs in its own process, all of them in turn for ``--rounds`` rounds (this machine's disk speed
drifts by 2x over minutes), the order rotating from round to round and the disk's dirty pages
written back (``os.sync``) between one contender and the next: a contender that ran right after an
NVMe one otherwise paid for its predecessor's gigabytes still being written (0.46x or 1.27x the same
ratio, by the order alone). Printed per contender: median seconds per step after ``--warmup`` (per
round, and their median), peak RSS of the training process during training (``ru_maxrss`` before any
checkpoint save; orch's progress line reports the same), disk bytes read and written per step
(``/proc/self/io`` for DeepSpeed, orch's own ``nvme_*_bytes`` records; their total after
``--warmup`` over the steps, all rounds), and the first losses, which must agree (same weights, same
batches); then the speed ratio of the same round, its median and range over the rounds
(``rounds.py``). Without DeepSpeed its contenders are left out (said at the start); a contender that
fails is a row saying why, and the others run on. Targets (issue 8): orch's NVMe offload at least
1.5x DeepSpeed's NVMe speed, and a lower peak RSS than the plain torch loop.

    .venv/bin/python benchmarks/offload_cpu.py [--steps 6] [--rounds 2] [--dir /tmp]
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

from bench_flags import at_least, description, positive_int, steps_after_warmup
from offload_contenders import disk_per_step, installed, train
from rounds import in_turn, paired

MODEL = ["model.name=gpt-128m", "model.dim=768", "model.layers=18", "model.heads=12",
         "model.kv_heads=12", "model.ffn_dim=2048", "model.max_seq_len=256"]
TRAIN = ["train.seq_len=256", "train.global_batch=4", "train.micro_batch=4",
         "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.lr=1e-4",
         "optimizer.weight_decay=0.0"]  # orch decays matrices only; the others decay all
CONTENDERS = ["torch loop", "deepspeed cpu", "deepspeed nvme", "orch cpu", "orch nvme"]


def measure(names: list[str], args: argparse.Namespace, env: dict
            ) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Each contender's results per round, and why each that failed did (it runs no more: its
    rounds would have no pairs; the others go on)."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    failed: dict[str, str] = {}
    sets = [*MODEL, *TRAIN, f"train.steps={args.steps}"]
    for round_ in range(args.rounds):  # in turn: this disk's speed drifts over minutes
        for name in in_turn([n for n in names if n not in failed], round_):
            os.sync()  # the last contender's writes, not this one's, are paid for here
            with tempfile.TemporaryDirectory(dir=args.dir) as nvme_dir:
                r = train(name, sets, Path(nvme_dir), env)
            if "failed" in r:
                failed[name] = r["failed"]
                del runs[name]
            else:
                runs[name].append(r)
            print(f"round {round_ + 1} {name}: {json.dumps(r)}", flush=True)
    return runs, failed


def report(runs: dict[str, list[dict]], failed: dict[str, str], args: argparse.Namespace
           ) -> None:
    """The table (a row per contender, failed ones saying why) and the paired ratios."""
    w = args.warmup
    seconds = {name: [statistics.median(r["step_s"][w:]) for r in rs] for name, rs in runs.items()}
    print("\n| contender | s/step (each round) | peak RSS GiB | disk read GB/step | "
          "disk written GB/step | first losses |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rs in runs.items():
        r = rs[0]
        step = statistics.median(seconds[name])
        each = ", ".join(f"{x:.2f}" for x in seconds[name])
        read, written = (b / 1e9 for b in disk_per_step(rs, w))
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        rss = max(x["peak_rss"] for x in rs) / 2**30
        print(f"| {name} | {step:.2f} ({each}) | {rss:.2f} | {read:.2f} | {written:.2f} | "
              f"{losses} |")
    for name, why in failed.items():
        print(f"| {name} | failed: {why} | | | | |")
    if "orch nvme" in runs and "deepspeed nvme" in runs:
        median, low, high = paired(seconds["deepspeed nvme"], seconds["orch nvme"])
        print(f"\norch nvme vs deepspeed nvme, the speed of the same round: median {median:.2f}x "
              f"({low:.2f}x-{high:.2f}x over {args.rounds} rounds; target 1.5x)")
    if "orch nvme" in runs and "torch loop" in runs:
        rss = (max(x["peak_rss"] for x in runs["orch nvme"])
               / max(x["peak_rss"] for x in runs["torch loop"]))
        print(f"orch nvme peak RSS / torch loop peak RSS: {rss:.2f} (target below 1)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--steps", type=positive_int, default=6)
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="each contender this many times")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="NVMe directory")
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=CONTENDERS)
    args = parser.parse_args(argv)
    steps_after_warmup(parser, args)
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    print(f"# offload on CPU: 128M-parameter GPT-like model, batch 4 x 256, {args.steps} steps "
          f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}), NVMe directory {args.dir}")
    runs, failed = measure(installed(args.only), args, env)
    report(runs, failed, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
