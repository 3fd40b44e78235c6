"""Fine-tune the largest Llama-style model the machine holds on one GPU: orch vs ZeRO-Infinity.

Both train the same model (orch's Llama: RoPE, grouped-query attention, SwiGLU, RMSNorm, in one of
the Llama shapes of ``SHAPES``) from the same initial weights on the same batches (``--batch``
sequences of ``--seq`` tokens of the shipped corpus), with the same AdamW and clipping, bf16
compute on the GPU, and parameters and optimizer states on NVMe:

- orch: ``offload.params: nvme``, ``offload.optimizer: nvme``, gradients in CPU memory,
  activations on the GPU, ``device_budget: auto`` (``orch launch``, one process);
- DeepSpeed ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on NVMe (ZeRO-Infinity,
  ``max_in_cpu: 0`` so the parameters really leave RAM, pinned buffers).

``--shape auto`` (the default) picks the largest shape whose state fits this machine's free memory
and the free space under ``--dir``, for the more demanding of the two (NVMe: 14 bytes per parameter,
DeepSpeed's bf16 parameters and fp32 master weights and moments; CPU memory: 10 bytes per parameter,
the fp32 model as built plus fp32 gradients, with a fifth to spare). Printed: per contender, seconds
per step (median after ``--warmup``), tokens/s, TFLOP/s by PaLM's formula
(``orch.plan.cost.flops_per_token``, the figure orch's metrics report), peak RSS, NVMe bytes per
step (their total after ``--warmup`` over those steps) and the first losses (close, not equal: bf16
on both sides); then orch's TFLOP/s over DeepSpeed's (issue 8's target: at least 2x). A contender
that fails is a row saying why; without DeepSpeed orch runs alone. Without a GPU it says so and
stops; ``--device cpu --shape tiny`` runs the same path on a tiny model in fp32 (the test suite
does).

    .venv/bin/python benchmarks/offload_finetune.py [--dir /nvme] [--shape auto] [--steps 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_flags import at_least, description, positive_int, steps_after_warmup
from offload_contenders import config, disk_per_step, installed, train

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=256, layers=2, heads=8, kv_heads=4, ffn_dim=688),
    "1b": dict(dim=2048, layers=16, heads=32, kv_heads=8, ffn_dim=8192),
    "3b": dict(dim=3072, layers=28, heads=24, kv_heads=8, ffn_dim=8192),
    "8b": dict(dim=4096, layers=32, heads=32, kv_heads=8, ffn_dim=14336),
    "13b": dict(dim=5120, layers=40, heads=40, kv_heads=40, ffn_dim=13824),
    "34b": dict(dim=8192, layers=48, heads=64, kv_heads=8, ffn_dim=22016),
    "70b": dict(dim=8192, layers=80, heads=64, kv_heads=8, ffn_dim=28672),
}
"""Llama 3.2 1B and 3B, Llama 3 8B, Llama 2 13B, Code Llama 34B and Llama 3 70B's layer shapes
(the vocabulary is the shipped corpus's bytes in a 32,000-entry embedding)."""

VOCAB = 32000
NVME_BYTES_PER_PARAM = 14
CPU_BYTES_PER_PARAM = 10 * 1.2
CONTENDERS = ("orch nvme", "deepspeed nvme")


def model_sets(shape: str, seq: int) -> list[str]:
    """The model of ``shape`` trained on sequences of ``seq`` tokens."""
    return [f"model.name=llama-{shape}", f"model.vocab_size={VOCAB}", f"train.seq_len={seq}",
            f"model.max_seq_len={seq}", *(f"model.{k}={v}" for k, v in SHAPES[shape].items())]


def run_sets(shape: str, seq: int, batch: int, steps: int, device: str) -> list[str]:
    """The run both contenders train (one micro-batch per step, constant learning rate)."""
    return [*model_sets(shape, seq), f"train.global_batch={batch}",
            f"train.micro_batch={batch}", f"train.steps={steps}", "train.warmup_steps=0",
            "train.min_lr_ratio=1.0", "train.lr=1e-5", "optimizer.weight_decay=0.0",
            f"train.precision={'bf16' if device == 'cuda' else 'fp32'}"]


def param_count(shape: str, seq: int) -> int:
    from orch.plan.memory import param_counts

    return param_counts(config(model_sets(shape, seq)).model).total


def largest_fitting(seq: int, nvme_dir: Path) -> tuple[str, str]:
    """The largest shape whose state fits (and why), from free memory and disk now."""
    memory = _available_memory()
    disk = shutil.disk_usage(nvme_dir).free
    fitting = "tiny"
    for shape in SHAPES:
        n = param_count(shape, seq)
        if n * NVME_BYTES_PER_PARAM <= disk and n * CPU_BYTES_PER_PARAM <= memory:
            fitting = shape
    return fitting, (f"largest of {', '.join(SHAPES)} within {memory / 2**30:.0f} GiB free "
                     f"memory and {disk / 2**30:.0f} GiB free under {nvme_dir}")


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def tflops(result: dict, shape: str, seq: int, warmup: int) -> tuple[float, float]:
    """Median seconds per step after ``warmup`` and TFLOP/s at that speed (PaLM's count)."""
    from orch.plan.cost import flops_per_token

    seconds = statistics.median(result["step_s"][warmup:])
    per_token = flops_per_token(config(model_sets(shape, seq)).model, seq)
    return seconds, result["tokens"] * per_token / seconds / 1e12


def machine(device: str, nvme_dir: Path) -> str:
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else "no GPU (CPU smoke run)"
    versions = f"torch {torch.__version__}"
    try:
        import deepspeed

        versions += f", deepspeed {deepspeed.__version__}"
    except ImportError:
        pass
    return (f"{where}; {os.cpu_count()} CPU cores, {_available_memory() / 2**30:.0f} GiB "
            f"memory free, {shutil.disk_usage(nvme_dir).free / 2**30:.0f} GiB free under "
            f"{nvme_dir}; {platform.machine()}, {versions}, {datetime.date.today()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto")
    parser.add_argument("--seq", type=positive_int, default=2048)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=4)
    parser.add_argument("--warmup", type=at_least(0), default=1)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="NVMe directory")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=CONTENDERS)
    args = parser.parse_args(argv)
    steps_after_warmup(parser, args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/offload_finetune.py needs a CUDA GPU: it fine-tunes a model larger "
              "than the GPU with orch and with DeepSpeed ZeRO-Infinity; benchmarks/"
              "offload_cpu.py compares them on CPU.")
        return 0
    shape, why = ((args.shape, "asked for") if args.shape != "auto"
                  else largest_fitting(args.seq, args.dir))
    n = param_count(shape, args.seq)
    print(f"# offloaded fine-tuning: Llama-style {shape} ({n / 1e9:.2f}B parameters: {why}), "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps", flush=True)
    print(f"# {machine(args.device, args.dir)}", flush=True)
    sets = run_sets(shape, args.seq, args.batch, args.steps, args.device)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    results = {}
    for name in installed(args.only):
        with tempfile.TemporaryDirectory(dir=args.dir) as nvme_dir:
            results[name] = train(name, sets, Path(nvme_dir), env, args.device)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print("\n| contender | s/step | tokens/s | TFLOP/s | peak RSS GiB | NVMe read GB/step | "
          "NVMe written GB/step | first losses |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    speed = {}
    for name, r in results.items():
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} | | | | | | |")
            continue
        seconds, speed[name] = tflops(r, shape, args.seq, args.warmup)
        read, written = (b / 1e9 for b in disk_per_step([r], args.warmup))
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"| {name} | {seconds:.2f} | {r['tokens'] / seconds:,.0f} | {speed[name]:.3g} | "
              f"{r['peak_rss'] / 2**30:.1f} | {read:.2f} | {written:.2f} | {losses} |")
    if len(speed) == 2:
        print(f"\norch / DeepSpeed ZeRO-Infinity TFLOP/s: "
              f"{speed['orch nvme'] / speed['deepspeed nvme']:.2f}x (target 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
