"""orch's Triton flash attention against torch SDPA's flash backend (and flash-attn if installed).

The claim: ``orch.kernels.flash_attention`` is in the same league as the best outside kernels on
a GPU. For head_dim 64 and 128, sequence lengths 1k..16k (batch = tokens / seq, heads =
model_dim / head_dim, so every case holds the same number of tokens), causal and not, it prints
forward and forward+backward TFLOP/s of each implementation and ours / theirs. All of them read
the same (batch, seq, heads, head_dim) tensors (SDPA through a transposed view, no copy), and the
table's ``max|diff|`` column is our forward's largest difference from SDPA's on that case.

FLOPs counted as FlashAttention does: forward ``4 * batch * heads * seq^2 * head_dim`` (halved
when causal), backward 2.5x the forward.

``--documents MEAN_LEN`` compares attention within packed documents instead
(``train.document_mask``): each sequence is filled with documents of seeded random lengths around
that mean, and it times orch's kernels given the document ids against torch SDPA with the
additive block-causal mask (what orch runs where its kernels do not: ``Documents.additive``),
orch's plain causal attention over the same sequences (the cost without documents, for scale)
and flash-attn's varlen kernel over the same documents where flash-attn imports. TFLOP/s count
only the visible pairs (causal within each document, ``length^2 / 2`` per document by the
convention above; the plain causal columns their own causal pairs), and ``orch/sdpa+mask`` is
orch's speed over SDPA's. Before timing a case, orch's forward output (and flash-attn's) is
checked against SDPA's within the dtype's rounding; a case that differs is not timed, and the
script exits 1 naming it.

    .venv/bin/python benchmarks/attention.py [--dtype bf16] [--tokens 16384] [--model-dim 2048]
    .venv/bin/python benchmarks/attention.py --sweep   # time a few tile configs of ours
    .venv/bin/python benchmarks/attention.py --documents 1024 --seqs 8192 16384

Without CUDA it says so, and times instead the two paths the model's attention can take on a CPU
(orch's reference and torch's SDPA: ``cpu_paths``), which is why the model runs SDPA there. That
CPU table has two fixed shapes: ``--dtype``, ``--head-dims``, ``--seqs``, ``--tokens``,
``--model-dim``, ``--sweep`` and ``--documents`` set the GPU comparison only, and it says which of
them it ignored.
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


def _pair_flops(pairs: float, heads: int, head_dim: int, backward: bool) -> float:
    """FLOPs of attention over ``pairs`` (query, key) pairs per head: 4 per pair and head_dim
    element forward, the backward 2.5x that."""
    return 4.0 * pairs * heads * head_dim * (3.5 if backward else 1.0)


def _flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, backward: bool) -> float:
    return _pair_flops(batch * seq * seq * (0.5 if causal else 1.0), heads, head_dim, backward)


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


def packed_documents(batch: int, seq: int, mean: int, seed: int = 0) -> torch.Tensor:
    """Document ids ``(batch, seq)`` as packed data numbers them (0, 1, 2, ... along each row):
    each row filled with documents whose lengths are drawn uniformly from ``mean // 2`` to
    ``mean + mean // 2`` tokens (at least 1) by a generator seeded with ``seed``, the last one
    cut at the row's end."""
    low = max(1, mean // 2)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, mean + mean // 2 + 1, (batch, seq // low + 1), generator=gen)
    positions = torch.arange(seq).repeat(batch, 1)
    return torch.searchsorted(lengths.cumsum(1), positions, right=True)


def document_lengths(ids: torch.Tensor) -> torch.Tensor:
    """The lengths of the documents of ``ids`` (``(batch, seq)``, nondecreasing rows), row
    after row: flash-attn's varlen sequences (each row's first token starts a document)."""
    starts = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = starts.flatten().nonzero().flatten()
    return torch.cat([first, first.new_tensor([ids.numel()])]).diff()


def _document_implementations(ids: torch.Tensor, dtype: torch.dtype) -> dict[str, Callable]:
    """Attention within the documents of ``ids`` by each contender (see the module doc), on
    (batch, seq, heads, head_dim) tensors; "orch causal" ignores the documents."""
    from torch.nn.functional import pad, scaled_dot_product_attention

    from orch.kernels.attention import Documents, flash_attention

    # built once, outside the timing, as orch builds it once per step for every layer
    mask = Documents(ids).additive(dtype, ids.device)

    def sdpa_masked(q, k, v):
        out = scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)

    impls = {
        "orch": lambda q, k, v: flash_attention(q, k, v, causal=True, documents=ids),
        "sdpa+mask": sdpa_masked,
        "orch causal": lambda q, k, v: flash_attention(q, k, v, causal=True),
    }
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return impls
    lengths = document_lengths(ids)
    cu_seqlens = pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())

    def varlen(q, k, v):
        flat = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
        out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, longest, longest,
                                     causal=True)
        return out.view(q.shape)

    impls["flash-attn varlen"] = varlen
    return impls


def _within_rounding(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``out`` is ``expected`` within two units of the last place of their dtype at the
    value, and at 1 for values near 0 (where both are sums of terms of about 1 that cancel)."""
    tolerance = 2 * torch.finfo(out.dtype).eps * (expected.float().abs() + 1)
    return bool(((out.float() - expected.float()).abs() <= tolerance).all())


def within_documents(args: argparse.Namespace, dtype: torch.dtype) -> list[str]:
    """The ``--documents`` comparison (module doc); returns the cases not timed because orch's
    (or flash-attn's) output differed from SDPA's with the mask."""
    print(
        f"\nwithin documents of about {args.documents:,} tokens (seeded random lengths); "
        "TFLOP/s of the visible pairs (orch causal: of all causal pairs, the same sequences "
        "without documents); max|diff|: against sdpa+mask's forward"
    )
    print(
        "| head_dim | seq | batch x heads | documents | visible | pass | orch ms | orch TFLOP/s | "
        "sdpa+mask ms | sdpa+mask TFLOP/s | orch/sdpa+mask | orch causal ms | "
        "orch causal TFLOP/s | flash-attn varlen ms | flash-attn varlen TFLOP/s | "
        "orch/flash-attn | max\\|diff\\| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    differing = []
    for head_dim in args.head_dims:
        heads = args.model_dim // head_dim
        for seq in args.seqs:
            batch = max(1, args.tokens // seq)
            q, k, v = _inputs(batch, seq, heads, head_dim, dtype)
            ids = packed_documents(batch, seq, args.documents).to(q.device)
            lengths = document_lengths(ids)
            pairs = float((lengths.double() ** 2).sum()) / 2
            impls = _document_implementations(ids, dtype)
            case = (f"| {head_dim} | {seq} | {batch} x {heads} | {len(lengths)}, mean "
                    f"{batch * seq / len(lengths):,.0f} | {pairs / (batch * seq * seq / 2):.1%} |")
            with torch.no_grad():
                expected = impls["sdpa+mask"](q, k, v)
                outs = {name: impls[name](q, k, v) for name in ("orch", "flash-attn varlen")
                        if name in impls}
            diffs = "; ".join(f"{name} {(out.float() - expected.float()).abs().max().item():.1e}"
                              for name, out in outs.items())
            if wrong := [name for name, out in outs.items() if not _within_rounding(out, expected)]:
                differing.append(f"head_dim {head_dim}, seq {seq}: {', '.join(wrong)}")
                print(f"{case} - | not timed: {', '.join(wrong)} differs from sdpa+mask beyond "
                      f"{dtype}'s rounding |{' |' * 9} {diffs} |", flush=True)
            for backward in () if wrong else (False, True):
                ms = {name: _time(fn, q, k, v, backward) for name, fn in impls.items()}
                visible = _pair_flops(pairs, heads, head_dim, backward)
                flops = {name: visible for name in impls}
                flops["orch causal"] = _flops(batch, heads, seq, head_dim, True, backward)
                cells = {name: f"{ms[name]:.2f} | {flops[name] / ms[name] / 1e9:.1f}"
                         for name in impls}
                varlen = cells.get("flash-attn varlen", "- | -")
                fa_ratio = (f"{ms['flash-attn varlen'] / ms['orch']:.2f}" if "flash-attn varlen"
                            in ms else "-")
                print(
                    f"{case} {'fwd+bwd' if backward else 'fwd'} | {cells['orch']} | "
                    f"{cells['sdpa+mask']} | {ms['sdpa+mask'] / ms['orch']:.2f} | "
                    f"{cells['orch causal']} | {varlen} | {fa_ratio} | {diffs} |",
                    flush=True,
                )
            del q, k, v
            torch.cuda.empty_cache()
    return differing


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
    ]
    instead = gpu.add_mutually_exclusive_group()
    gpu_only += [
        instead.add_argument("--sweep", action="store_true",
                             help="time tile configs of ours instead"),
        instead.add_argument("--documents", type=positive_int, metavar="MEAN_LEN",
                             help="compare attention within packed documents of about MEAN_LEN "
                                  "tokens instead (orch's kernels with the ids, SDPA with the "
                                  "block-causal mask, flash-attn varlen)"),
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
    if not args.documents:
        (sweep if args.sweep else compare)(args, dtype)
        return 0
    if differing := within_documents(args, dtype):
        print(f"attention within documents differs from torch SDPA's with the mask, so these "
              f"cases were not timed: {'; '.join(differing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
