"""orch's Triton flash attention against torch SDPA's flash backend (and flash-attn if installed).

The claim: ``orch.kernels.flash_attention`` is in the same league as the best outside kernels on
a GPU. For head_dim 64 and 128, sequence lengths 1k..16k (batch = tokens / seq, heads =
model_dim / head_dim, so every case holds the same number of tokens), causal and not, it prints
forward and forward+backward TFLOP/s of each implementation and ours / theirs. All of them read
the same (batch, seq, heads, head_dim) tensors (SDPA through a transposed view, no copy), and the
table's ``max|diff|`` column is our forward's largest difference from SDPA's on that case.

FLOPs counted as FlashAttention does: forward ``4 * batch * heads * seq^2 * head_dim`` (halved
when causal), backward 2.5x the forward.

    .venv/bin/python benchmarks/attention.py [--dtype bf16] [--tokens 16384] [--model-dim 2048]
    .venv/bin/python benchmarks/attention.py --sweep   # time a few tile configs of ours

Without CUDA it says so, and times instead the two paths the model's attention can take on a CPU
(orch's reference and torch's SDPA: ``cpu_paths``), which is why the model runs SDPA there. That
CPU table has two fixed shapes: ``--dtype``, ``--head-dims``, ``--seqs``, ``--tokens``,
``--model-dim`` and ``--sweep`` set the GPU comparison only, and it says which of them it ignored.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from collections.abc import Callable

import torch
from bench_flags import at_least, description, positive_int

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def _implementations(causal: bool) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from orch.kernels.attention import flash_attention

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
        return out.transpose(1, 2)

    impls = {"orch": lambda q, k, v: flash_attention(q, k, v, causal=causal), "sdpa": sdpa}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return impls
    impls["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
    return impls


def _time(fn: Callable, q, k, v, backward: bool) -> float:
    """Milliseconds per call (median, triton.testing.do_bench)."""
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v))
    out = fn(q, k, v)
    grad = torch.randn_like(out)

    def step():
        fn(q, k, v).backward(grad)

    return do_bench(step, grad_to_none=[q, k, v])


def _inputs(batch, seq, heads, head_dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randn(
            batch, seq, heads, head_dim, device="cuda", dtype=dtype, generator=gen
        ).requires_grad_()
        for _ in range(3)
    ]


def _header(dtype: torch.dtype) -> None:
    import triton

    try:
        import flash_attn

        fa = flash_attn.__version__
    except ImportError:
        fa = "not installed"
    print(f"# flash attention, {datetime.date.today().isoformat()}")
    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}) | triton {triton.__version__} | flash-attn {fa} | "
        f"python {platform.python_version()} | dtype {dtype}"
    )


def compare(args: argparse.Namespace, dtype: torch.dtype) -> None:
    print(
        "\n| head_dim | seq | batch x heads | causal | pass | orch TFLOP/s | sdpa TFLOP/s | "
        "orch/sdpa | flash-attn TFLOP/s | orch/flash-attn | max\\|diff\\| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for head_dim in args.head_dims:
        heads = args.model_dim // head_dim
        for seq in args.seqs:
            batch = max(1, args.tokens // seq)
            for causal in (False, True):
                q, k, v = _inputs(batch, seq, heads, head_dim, dtype)
                impls = _implementations(causal)
                with torch.no_grad():
                    diff = impls["orch"](q, k, v).float() - impls["sdpa"](q, k, v).float()
                    diff = diff.abs().max().item()
                for backward in (False, True):
                    flops = _flops(batch, heads, seq, head_dim, causal, backward)
                    tflops = {
                        name: flops / _time(fn, q, k, v, backward) / 1e9
                        for name, fn in impls.items()
                    }
                    ours, fa = tflops["orch"], tflops.get("flash-attn")
                    fa_cols = f"{fa:.1f} | {ours / fa:.2f}" if fa else "- | -"
                    print(
                        f"| {head_dim} | {seq} | {batch} x {heads} | {causal} | "
                        f"{'fwd+bwd' if backward else 'fwd'} | {ours:.1f} | "
                        f"{tflops['sdpa']:.1f} | {ours / tflops['sdpa']:.2f} | {fa_cols} | "
                        f"{diff:.1e} |",
                        flush=True,
                    )
                del q, k, v
                torch.cuda.empty_cache()


def _candidates(default):
    """Forward tiles with the default backward, then backward tiles with the default forward."""
    from dataclasses import replace

    launch = ((4, 3), (8, 2), (4, 2), (8, 3))
    for fwd_m, fwd_n in ((128, 64), (128, 32), (64, 64), (128, 128), (64, 32)):
        for warps, stages in launch:
            yield "fwd", replace(default, fwd_m=fwd_m, fwd_n=fwd_n, warps=warps, stages=stages)
    for block_m, block_n in ((32, 128), (64, 64), (32, 64), (16, 64), (64, 128)):
        for warps, stages in launch:
            yield (
                "bwd",
                replace(
                    default,
                    dkv_m=block_m,
                    dkv_n=block_n,
                    dq_m=block_n,
                    dq_n=block_m,
                    warps=warps,
                    stages=stages,
                ),
            )


def sweep(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Time tile configs of ours at one sequence length, to choose ``default_config``."""
    from orch.kernels.attention.kernels import default_config, flash_attention_triton

    seq = args.seqs[len(args.seqs) // 2]
    batch = max(1, args.tokens // seq)
    print(
        f"\nseq {seq}, batch {batch}; 'fwd' rows vary the forward tiles, 'bwd' rows the "
        "backward's (dq tiles mirror dkv's)"
    )
    print("| head_dim | causal | varied | config | fwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for head_dim in args.head_dims:
        heads = args.model_dim // head_dim
        for causal in (False, True):
            q, k, v = _inputs(batch, seq, heads, head_dim, dtype)
            default = default_config(head_dim, dtype)
            for varied, config in [("default", default), *_candidates(default)]:
                fn = lambda q, k, v, c=config, causal=causal: flash_attention_triton(  # noqa: E731
                    q, k, v, causal, None, c
                )[0]
                try:
                    config.validate()
                    fwd, both = (
                        _flops(batch, heads, seq, head_dim, causal, b) / _time(fn, q, k, v, b) / 1e9
                        for b in (False, True)
                    )
                except Exception as error:  # noqa: BLE001 (out of shared memory, bad tiles)
                    print(
                        f"| {head_dim} | {causal} | {varied} | {config} | failed: "
                        f"{type(error).__name__} | |",
                        flush=True,
                    )
                    continue
                print(
                    f"| {head_dim} | {causal} | {varied} | {config} | {fwd:.1f} | {both:.1f} |",
                    flush=True,
                )


CPU_CASES = ((4, 256, 8, 4, 32), (1, 1024, 8, 4, 64))
"""(batch, seq, heads, kv_heads, head_dim): the tiny model's attention in a micro-batch, and a
longer sequence at head_dim 64."""


def cpu_paths(repeats: int = 10) -> None:
    """Why the model's attention on CPU is torch's SDPA and not orch's reference (the
    specification, which materializes the scores): both timed forward + backward in float32 at
    ``CPU_CASES`` (best of ``repeats`` after a warm-up), with the ratio."""
    import time

    from orch.kernels.attention import attention_reference

    def sdpa(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=True)
        return out.transpose(1, 2)

    paths = {"reference": lambda q, k, v: attention_reference(q, k, v, True)[0], "sdpa": sdpa}
    print(f"# attention paths on CPU, {datetime.date.today().isoformat()}")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__} | float32, causal, forward + backward")
    print("\n| batch x seq | heads / kv heads | head_dim | reference ms | sdpa ms | "
          "reference/sdpa |")
    print("|---|---|---|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for batch, seq, heads, kv_heads, head_dim in CPU_CASES:
        q = torch.randn(batch, seq, heads, head_dim, generator=gen).requires_grad_()
        k, v = (torch.randn(batch, seq, kv_heads, head_dim, generator=gen).requires_grad_()
                for _ in range(2))
        best = {}
        for name, fn in paths.items():
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                fn(q, k, v).sum().backward()
                times.append(time.perf_counter() - start)
            best[name] = min(times[1:]) * 1e3
        print(f"| {batch} x {seq} | {heads} / {kv_heads} | {head_dim} | {best['reference']:.1f} | "
              f"{best['sdpa']:.1f} | {best['reference'] / best['sdpa']:.1f}x |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    gpu = parser.add_argument_group(
        "the GPU comparison (without CUDA the CPU table has two fixed shapes and ignores these)")
    gpu_only = [
        gpu.add_argument("--dtype", choices=sorted(DTYPES), default="bf16"),
        gpu.add_argument("--head-dims", type=at_least(16), nargs="+", default=[64, 128]),
        gpu.add_argument("--seqs", type=positive_int, nargs="+",
                         default=[1024, 2048, 4096, 8192, 16384]),
        gpu.add_argument("--tokens", type=positive_int, default=16384,
                         help="batch x seq in every case"),
        gpu.add_argument("--model-dim", type=positive_int, default=2048, help="heads x head_dim"),
        gpu.add_argument("--sweep", action="store_true", help="time tile configs of ours instead"),
    ]
    args = parser.parse_args(argv)
    if small := [d for d in args.head_dims if args.model_dim < d]:
        parser.error(f"--model-dim {args.model_dim} is smaller than --head-dims {small[0]} "
                     "(heads = model_dim / head_dim); fix: a larger --model-dim")
    if not torch.cuda.is_available():
        print(
            "No CUDA GPU: the Triton kernels cannot be timed here (they are compared with torch "
            "SDPA's flash backend and flash-attn on a GPU). On CPU, the paths the model can take:"
        )
        if ignored := [action.option_strings[0] for action in gpu_only
                       if getattr(args, action.dest) != action.default]:
            print(f"({', '.join(ignored)} set the GPU comparison only, ignored here: the CPU "
                  "table below has two fixed shapes)")
        cpu_paths()
        return 0
    dtype = DTYPES[args.dtype]
    _header(dtype)
    (sweep if args.sweep else compare)(args, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
