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

Each runs in its own process, all of them in turn for ``--rounds`` rounds (this machine's disk
speed drifts by 2x over minutes). Printed per contender: median seconds per step after ``--warmup``
(per round, and their median), peak RSS of the training process during training (``ru_maxrss``
before any checkpoint save; orch's progress line reports the same), disk bytes read and written per
step (``/proc/self/io`` for DeepSpeed, orch's own ``nvme_*_bytes`` records), and the first losses,
which must agree (same weights, same batches). Targets (issue 8): orch's NVMe offload at least 1.5x
DeepSpeed's NVMe speed, and a lower peak RSS than the plain torch loop.

    .venv/bin/python benchmarks/offload_cpu.py [--steps 6] [--rounds 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orch_runs import BIN, REPO

MODEL = ["model.name=gpt-128m", "model.dim=768", "model.layers=18", "model.heads=12",
         "model.kv_heads=12", "model.ffn_dim=2048", "model.max_seq_len=256"]
TRAIN = ["train.seq_len=256", "train.global_batch=4", "train.micro_batch=4",
         "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.lr=1e-4",
         "optimizer.weight_decay=0.0"]  # orch decays matrices only; the others decay all
CONTENDERS = ["torch loop", "deepspeed cpu", "deepspeed nvme", "orch cpu", "orch nvme"]


def _cfg(steps: int):
    from orch.config import load_config

    return load_config(REPO / "configs/tiny.yaml", [*MODEL, *TRAIN, f"train.steps={steps}"])


def _model_and_batches(cfg):
    """orch's initial weights and its data stream's first micro-batches, as its worker has."""
    import torch

    from orch.models.llama import Transformer
    from orch.runtime.data import BatchStream, PackedSequences, load_tokens

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    model.init_weights(cfg.train.seed)
    t = cfg.train
    dataset = PackedSequences(load_tokens(cfg.data, cfg.model.vocab_size), t.seq_len)
    stream = BatchStream(dataset, t.global_batch, t.micro_batch, 0, 1, t.seed)
    return model, [stream.next_step() for _ in range(t.steps)]


def _disk() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(name: str, steps: int, nvme_dir: str) -> None:
    """Train with the torch loop or DeepSpeed and print one JSON line of measurements."""
    import torch
    import torch.nn.functional as F

    cfg = _cfg(steps)
    model, batches = _model_and_batches(cfg)
    o, clip = cfg.optimizer, cfg.train.grad_clip
    adamw = {"lr": cfg.train.lr, "betas": (o.beta1, o.beta2), "eps": o.eps,
             "weight_decay": o.weight_decay}
    if name == "torch loop":
        opt = torch.optim.AdamW(model.parameters(), **adamw, foreach=True)

        def train_step(inputs, targets):
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        engine = _deepspeed(model, adamw, clip, cfg.train.micro_batch,
                            "nvme" if name.endswith("nvme") else "cpu", nvme_dir)

        def train_step(inputs, targets):
            loss = F.cross_entropy(engine(inputs).flatten(0, 1), targets.flatten())
            engine.backward(loss)
            engine.step()
            return loss
    times, losses, reads, writes = [], [], [], []
    for micro_batches in batches:
        (inputs, targets), = micro_batches
        start, (read, written) = time.perf_counter(), _disk()
        losses.append(float(train_step(inputs, targets)))
        times.append(time.perf_counter() - start)
        reads.append(_disk()[0] - read)
        writes.append(_disk()[1] - written)
    print(json.dumps({"step_s": times, "losses": losses, "read": reads, "written": writes,
                      "peak_rss": _peak_rss(),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)
    os._exit(0)  # DeepSpeed's I/O threads may outlive a clean shutdown


def _deepspeed(model, adamw: dict, clip: float, micro: int, tier: str, nvme_dir: str):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # deepspeed/runtime/zero/partition_parameters.py, Init._set_dtype, reads
    # `dtype or torch.float16 if is_fp16_supported() else torch.bfloat16`: on the CPU
    # accelerator (no fp16) that is bf16 whatever dtype the engine passes, so ZeRO-Infinity's
    # NVMe parameter buffers come out bf16 and the first fp32 matmul fails ("expected m1 and m2
    # to have the same dtype"). Claiming fp16 support makes it keep the model's fp32.
    get_accelerator().is_fp16_supported = lambda: True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    offload = {"device": tier, "pin_memory": False}
    if tier == "nvme":
        offload["nvme_path"] = nvme_dir
    zero = {"stage": 3, "offload_param": dict(offload), "offload_optimizer": dict(offload)}
    if tier == "nvme":  # ZeRO-Infinity with parameters out of RAM (see the module docstring)
        zero["offload_param"].update(max_in_cpu=0, buffer_count=5, buffer_size=int(1e8))
        zero["stage3_max_reuse_distance"] = 0
    config = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
        "gradient_clipping": clip, "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {**adamw, "betas": list(adamw["betas"])}},
        "aio": {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1,
                "single_submit": False, "overlap_events": True},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)
    return engine


def run_worker(name: str, steps: int, nvme_dir: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(steps),
                          "--dir", str(nvme_dir)], capture_output=True, text=True, env=env,
                         cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_orch(tier: str, steps: int, nvme_dir: Path, env: dict) -> dict:
    sets = [*MODEL, *TRAIN, f"train.steps={steps}", "run.log_interval=1",
            "checkpoint.interval=0", f"offload.params={tier}", "offload.grads=cpu",
            f"offload.optimizer={tier}", f"offload.nvme_path={nvme_dir}"]
    with tempfile.TemporaryDirectory() as run_dir:
        args = [arg for item in [*sets, f"run.dir={run_dir}"] for arg in ("--set", item)]
        out = subprocess.run([str(BIN / "orch"), "launch", "--nproc-per-node", "1",
                              "configs/tiny.yaml", *args], capture_output=True, text=True,
                             env=env, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"orch {tier} failed:\n{out.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    offload = [r["offload"] for r in rows]
    return {"step_s": [r["step_time_s"] for r in rows], "losses": [r["loss"] for r in rows],
            "read": [o.get("nvme_read_bytes", 0) for o in offload],
            "written": [o.get("nvme_written_bytes", 0) for o in offload],
            "peak_rss": max(r["mem_bytes"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="each contender this many times")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="NVMe directory")
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.dir)
        return
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    print(f"# offload on CPU: 128M-parameter GPT-like model, batch 4 x 256, {args.steps} steps "
          f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}), NVMe directory {args.dir}")
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for round_ in range(args.rounds):  # in turn: this disk's speed drifts over minutes
        for name in args.only:
            with tempfile.TemporaryDirectory(dir=args.dir) as nvme_dir:
                if name.startswith("orch"):
                    r = run_orch(name.split()[1], args.steps, Path(nvme_dir), env)
                else:
                    r = run_worker(name, args.steps, Path(nvme_dir), env)
            runs[name].append(r)
            print(f"round {round_ + 1} {name}: "
                  f"{json.dumps({k: v for k, v in r.items() if k != 'params'})}", flush=True)
    w = args.warmup
    seconds = {name: [statistics.median(r["step_s"][w:]) for r in rs] for name, rs in runs.items()}
    results = {name: rs[0] for name, rs in runs.items()}
    print("\n| contender | s/step (each round) | peak RSS GiB | disk read GB/step | "
          "disk written GB/step | first losses |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in results.items():
        step = statistics.median(seconds[name])
        each = ", ".join(f"{x:.2f}" for x in seconds[name])
        read, written = (statistics.median(r[k][w:]) / 1e9 for k in ("read", "written"))
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        rss = max(x["peak_rss"] for x in runs[name]) / 2**30
        print(f"| {name} | {step:.2f} ({each}) | {rss:.2f} | {read:.2f} | {written:.2f} | "
              f"{losses} |")
    if "orch nvme" in runs and "deepspeed nvme" in runs:
        ratios = [d / o for d, o in zip(seconds["deepspeed nvme"], seconds["orch nvme"],
                                        strict=True)]
        print(f"\norch nvme vs deepspeed nvme, per round: "
              f"{', '.join(f'{x:.2f}x' for x in ratios)} the speed (target 1.5x)")
    if "orch nvme" in runs and "torch loop" in runs:
        rss = (max(x["peak_rss"] for x in runs["orch nvme"])
               / max(x["peak_rss"] for x in runs["torch loop"]))
        print(f"orch nvme peak RSS / torch loop peak RSS: {rss:.2f} (target below 1)")


if __name__ == "__main__":
    main()
