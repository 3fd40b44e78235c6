"""orch's AdamW8bit against torch's AdamW and the other 8-bit AdamWs: time per step, state bytes.

The claim: orch's AdamW8bit holds about a quarter of AdamW's optimizer state (2 bytes per
element plus one fp32 absmax per 256, against 8), at a step time that keeps the CPU step of
offloaded training practical (its plain-torch reference path), and that its fused Triton
kernel is competitive on a GPU. Every optimizer updates the same parameters (a Llama-like set
of matrices plus norm vectors) with the same gradients, in this process:

- CPU (always): ~10M parameters; orch's reference path vs torch AdamW (fused, foreach), and
  bitsandbytes' AdamW8bit and torchao's AdamW8bit when they are installed (they are not orch
  dependencies but its ``bench`` extra, pinned to the versions of the recorded results:
  ``make bench``, or ``pip install -e ".[bench]"``; else their rows say "not installed" and
  that command);
- GPU (only with CUDA): ~1B parameters; orch's Triton kernel vs the same alternatives.

    .venv/bin/python benchmarks/optim8bit.py [--device cpu|cuda|all] [--steps 20]
        [--write benchmarks/results/optim8bit-cpu.md]

Times are the median (and the best) of ``--steps`` steps after the first step and ``--warmup``
warm-up steps; on the CPU the optimizers take their steps in turn (see ``measure``). torchao
compiles its step per tensor shape, so the first step is reported apart.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_flags import at_least, description, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Result:
    name: str
    ms: float | None = None  # median ms/step
    best_ms: float | None = None
    state_bytes: int | None = None
    first_s: float | None = None  # the first step (compilation, state allocation)
    note: str = ""


def shapes(dim: int, ffn: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """A Llama-like parameter set: embedding, per layer q/k/v/o, w1/w2/w3 and two norms."""
    out: list[tuple[int, ...]] = [(vocab, dim)]
    for _ in range(layers):
        out += [(dim, dim)] * 4 + [(ffn, dim), (dim, ffn), (ffn, dim), (dim,), (dim,)]
    return [*out, (dim,), (vocab, dim)]


CPU_SHAPES = shapes(dim=512, ffn=1376, layers=3, vocab=640)  # ~10.1M parameters
GPU_SHAPES = shapes(dim=2048, ffn=5504, layers=20, vocab=4096)  # ~1.03B parameters


CPU_NOTES = [
    "Notes:", "",
    "- orch's CPU path is its plain-torch reference (no compiled code): dequantize through "
    "65,536-entry tables of code pairs, the fp32 update, requantize through a table on the bf16 "
    "bit pattern, in row chunks with preallocated buffers. torch's fused AdamW is one C++ "
    "kernel over fp32 moments; bitsandbytes' CPU backend dequantizes, updates with torch ops "
    "and requantizes; torchao compiles its step with torch.compile (inductor C++), and its "
    "first step here found a warm compile cache (cold: ~14 s).",
    "- The machine is shared with other jobs, which moves absolute times by up to 4x between "
    "runs; the optimizers take their steps in turn, so the ratios within one run hold better "
    "than the times.",
]


def make_params(shape_list: list[tuple[int, ...]], device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device).manual_seed(0)
    params = []
    for shape in shape_list:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.02)
        p.grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        params.append(p)
    return params


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor holds, looking inside tensor subclasses (torchao's 8-bit state)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v) for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cases: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]],
            shape_list: list[tuple[int, ...]], device: str, steps: int, warmup: int,
            interleave: bool) -> list[Result]:
    """Time every case. ``interleave`` (CPU): all optimizers exist at once and take their steps
    in turn, so load from other processes on a shared machine falls on all of them alike; on a
    GPU each case runs alone (1B parameters five times over would not fit)."""
    results: dict[str, Result] = {}
    live: dict[str, torch.optim.Optimizer] = {}
    times: dict[str, list[float]] = {}

    def timed(opt: torch.optim.Optimizer) -> float:
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        return time.perf_counter() - start

    def finish(name: str) -> None:
        opt = live.pop(name)
        ts = times[name][1 + warmup:]  # after the first step and the warm-up steps
        results[name] = Result(name, ms=statistics.median(ts) * 1e3, best_ms=min(ts) * 1e3,
                               state_bytes=state_bytes(opt), first_s=times[name][0])
        del opt
        if device == "cuda":
            torch.cuda.empty_cache()

    for name, build in cases.items():
        try:
            live[name] = build(make_params(shape_list, device))
        except ImportError as exc:
            results[name] = Result(
                name, note=f"not installed ({exc.name}): pip install -e \".[bench]\"")
            continue
        times[name] = [timed(live[name])]  # the first step: compilation, state allocation
        if not interleave:
            times[name] += [timed(live[name]) for _ in range(warmup + steps)]
            finish(name)
    for _ in range(warmup + steps):
        for name, opt in live.items():
            times[name].append(timed(opt))
    for name in list(live):
        finish(name)
    return [results[name] for name in cases]


def builders(device: str) -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    hyper = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}

    def orch(params):
        from orch.kernels import AdamW8bit

        return AdamW8bit(params, **hyper)

    def bnb(params):
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **hyper)

    def torchao(params):
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **hyper)

    path = "Triton kernel" if device == "cuda" else "reference"
    return {
        f"orch AdamW8bit ({path})": orch,
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **hyper),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **hyper),
        "bitsandbytes AdamW8bit": bnb,
        "torchao AdamW8bit": torchao,
    }


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for module in ("triton", "bitsandbytes", "torchao"):
        try:
            out.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            out.append(f"{module} not installed")
    return ", ".join(out)


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def table(results: list[Result], shape_list: list[tuple[int, ...]]) -> list[str]:
    n = sum(torch.Size(s).numel() for s in shape_list)
    ours = results[0]
    fused = next(r for r in results if r.name == "torch AdamW fused")
    lines = [f"{n / 1e6:,.1f}M parameters in {len(shape_list)} tensors.", "",
             "| optimizer | ms/step median | best | orch / this (median) | orch / this (best) "
             "| first step s | state MiB | bytes/param | state / torch AdamW |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.ms is None or r.best_ms is None or r.state_bytes is None:
            lines.append(f"| {r.name} | {r.note} | | | | | | | |")
            continue
        lines.append(f"| {r.name} | {r.ms:.1f} | {r.best_ms:.1f} | {(ours.ms or 0) / r.ms:.2f} | "
                     f"{(ours.best_ms or 0) / r.best_ms:.2f} | {r.first_s:.2f} | "
                     f"{r.state_bytes / 2**20:,.1f} | {r.state_bytes / n:.2f} | "
                     f"{r.state_bytes / (fused.state_bytes or 1):.3f} |")
    lines += ["", "orch / this: orch's time per step over this row's (below 1: orch is faster). "
              "State: every tensor the optimizer holds (codes, absmax, moments, step; "
              "bitsandbytes' per-tensor quantization maps included)."]
    return lines


def run(device: str, steps: int, warmup: int) -> list[str]:
    shape_list = CPU_SHAPES if device == "cpu" else GPU_SHAPES
    results = measure(builders(device), shape_list, device, steps, warmup,
                      interleave=device == "cpu")
    header = [f"## {device.upper()}: {machine(device)}", "",
              f"{versions()}; {datetime.date.today()}.", ""]
    return header + table(results, shape_list)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: the CPU section, and the GPU one when CUDA is available")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="timed steps per optimizer, after the first and --warmup")
    parser.add_argument("--warmup", type=at_least(0), default=3,
                        help="untimed steps after the first (which is reported apart)")
    parser.add_argument("--write", type=Path, default=None,
                        help="also write the CPU section as markdown to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device here; "
                     "use --device cpu, or all (the GPU section where there is CUDA)")
    warnings.filterwarnings("ignore")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("## GPU: skipped (no CUDA device)")
            continue
        lines = run(device, args.steps, args.warmup)
        print("\n".join(lines), flush=True)
        if device == "cpu" and args.write:
            given = sys.argv[1:] if argv is None else argv
            command = " ".join(["benchmarks/optim8bit.py", *given])
            args.write.write_text("\n".join([
                "# AdamW8bit: time per optimizer step and state bytes", "",
                f"Command: `.venv/bin/python {command}`", "", *lines, "", *CPU_NOTES, ""]))


if __name__ == "__main__":
    main()
