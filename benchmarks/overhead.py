"""orch's training loop against a plain hand-written torch DDP loop: same model, data, batch.

The claim: orch's runtime (plan, wrapping, metrics, data stream) costs almost nothing over the
simplest correct loop, at least 0.95x its throughput where both do the same math (orch
replicated, ``dp_replicate=2``, which is DDP's). Both train ``configs/tiny.yaml`` on 2 gloo
processes for the same steps; the steady-state tokens/s of each run is the median step time after
warm-up. orch runs twice: replicated, and with its default plan for the config (FSDP2 over both
ranks, which costs more on two CPU processes and a tiny model). The runs are paired: each of
``--rounds`` rounds runs the plain loop and both orch cases in turn (the order rotating from
round to round), and each ratio is orch's over the plain loop's of the same round, so a machine
whose speed drifts moves both sides of a ratio. It prints each case's median tokens/s and the
median ratio with its range over the rounds.

    .venv/bin/python benchmarks/overhead.py [--rounds 3] [--steps 30] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import nullcontext

from bench_flags import at_least, description, positive_int
from orch_runs import BIN, REPO, launch, steady_tokens_per_s
from rounds import in_turn, paired

WARMUP = 5
PLAIN = "plain DDP"


def baseline(steps: int, seq_len: int) -> None:
    """The plain loop, run under torchrun: DDP, AdamW, accumulation with no_sync, clipping."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from orch.config import load_config
    from orch.models.llama import Transformer
    from orch.runtime.data import load_tokens

    cfg = load_config(REPO / "configs/tiny.yaml", [f"train.seq_len={seq_len}"])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = Transformer(cfg.model)
    ddp = DistributedDataParallel(model)
    t, o = cfg.train, cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)  # torch picks, as for orch
    tokens = torch.from_numpy(load_tokens(cfg.data, cfg.model.vocab_size).astype(np.int64))
    micro = t.global_batch // (world * t.micro_batch)
    gen = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for index in range(micro):
            offsets = torch.randint(len(tokens) - seq_len - 1, (t.micro_batch,), generator=gen)
            rows = torch.stack([tokens[i : i + seq_len + 1] for i in offsets.tolist()])
            sync = index == micro - 1
            with nullcontext() if sync else ddp.no_sync():
                logits = ddp(rows[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()) / micro
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    if rank == 0:
        median = statistics.median(times[WARMUP:])
        print(json.dumps({"tokens_per_s": t.global_batch * seq_len / median}), flush=True)
    dist.destroy_process_group()
    os._exit(0)


def run_baseline(steps: int, seq_len: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    out = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", __file__,
         "--baseline", "--steps", str(steps), "--seq-len", str(seq_len)],
        capture_output=True, text=True, env=env, cwd=REPO,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the plain DDP loop failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def run_orch(steps: int, seq_len: int, extra: list[str]) -> float:
    rows, _ = launch("configs/tiny.yaml", 2, [f"train.steps={steps}", f"train.seq_len={seq_len}",
                                              "run.log_interval=1", "train.warmup_steps=1",
                                              *extra])
    return steady_tokens_per_s(rows, WARMUP)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    steps = at_least(WARMUP + 1, f"the first {WARMUP} are warm-up, left out of the median")
    parser.add_argument("--steps", type=steps, default=30)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds, each running the plain loop and every orch case in turn")
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline:
        baseline(args.steps, args.seq_len)
        return
    import torch

    cases = {"orch replicated (dp_replicate=2)": ["parallel.dp_replicate=2",
                                                   "parallel.dp_shard=1"],
             "orch default (fsdp2)": []}
    print(f"# overhead: configs/tiny.yaml, 2 gloo processes, seq {args.seq_len}, {args.steps} "
          f"steps, {args.rounds} paired rounds ({platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {datetime.date.today()})")
    runs: dict[str, list[float]] = {PLAIN: [], **{name: [] for name in cases}}
    for round_ in range(args.rounds):
        for name in in_turn(list(runs), round_):
            runs[name].append(run_baseline(args.steps, args.seq_len) if name == PLAIN
                              else run_orch(args.steps, args.seq_len, cases[name]))
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {values[-1]:,.0f}"
                                                  for name, values in runs.items()), flush=True)
    plain = runs[PLAIN]
    print("\n| case | orch tokens/s (median) | plain DDP tokens/s (median) | ratio, median of "
          "rounds | ratio range |")
    print("|---|---:|---:|---:|---:|")
    for name in cases:
        median, low, high = paired(runs[name], plain)
        print(f"| {name} | {statistics.median(runs[name]):,.0f} | {statistics.median(plain):,.0f} "
              f"| {median:.3f} | {low:.3f}-{high:.3f} |")


if __name__ == "__main__":
    main()
