"""orch's MoE dispatch ops against plain torch: permute, unpermute and grouped GEMM.

The claim: on a GPU, orch's Triton kernels (moe_permute, moe_unpermute, grouped_mm: one launch
for all experts) beat the plain-torch way of doing the same steps, as in Megatron-Core's unfused
path: a stable argsort of the expert ids and index_select to permute, index_add to unpermute, and
a Python loop of matmuls over experts (orch.models.moe's loop) for the expert GEMM. Where torch
has ``torch._grouped_mm`` (bf16 on Hopper), it is timed as well: that is the best outside grouped
GEMM. Each op is timed forward, and forward + backward.

On a machine without CUDA, orch dispatches to its plain-torch reference; the script then times
that reference against the same plain-torch version at small sizes, which checks the script and
the reference's overhead, and says that the Triton numbers need a GPU.

    .venv/bin/python benchmarks/moe_dispatch.py [--tokens 8192] [--hidden 4096] [--dtype bf16]

Speedup = alternative ms / orch ms (above 1: orch is faster). Times are medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from bench_flags import description, positive_int

# (name, experts, top_k, ffn) at the --tokens / --hidden given: Mixtral-like and fine-grained.
GPU_CASES = [("E8 K2 ffn14336", 8, 2, 14336), ("E64 K8 ffn1408", 64, 8, 1408)]
CPU_CASES = [("E8 K2 ffn512", 8, 2, 512), ("E64 K8 ffn128", 64, 8, 128)]


# ---------------------------------------------------------------------------- plain torch


def torch_permute(tokens: torch.Tensor, ids: torch.Tensor, experts: int):
    """Megatron-Core's unfused permute: sort the flattened ids, gather the token rows."""
    flat = ids.reshape(-1)
    sorted_idx = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    return tokens.index_select(0, sorted_idx // ids.shape[1]), sorted_idx, counts


def torch_unpermute(expert_out: torch.Tensor, sorted_idx: torch.Tensor, weights: torch.Tensor,
                    tokens: int) -> torch.Tensor:
    """Weight each row by its router weight and scatter-add it back into its token."""
    top_k = weights.shape[1]
    rows = expert_out * weights.reshape(-1)[sorted_idx, None].to(expert_out.dtype)
    out = expert_out.new_zeros(tokens, expert_out.shape[1])
    return out.index_add(0, sorted_idx // top_k, rows)


def torch_loop_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.cat([xe @ w[e] for e, xe in enumerate(torch.split(x, counts))])


# ---------------------------------------------------------------------------- timing


def timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return cpu


def backward(out: torch.Tensor, grad: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.autograd.grad(out, inputs, grad)


def run_case(name: str, tokens_n: int, hidden: int, experts: int, top_k: int, ffn: int,
             dtype: torch.dtype, device: torch.device, bench) -> list[tuple]:
    from orch.kernels.moe import grouped_mm, moe_permute, moe_unpermute

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens_n, experts, device=device, generator=gen)
    logits += torch.linspace(0, 1.5, experts, device=device)  # uneven load, as in training
    ids = logits.topk(top_k, dim=1).indices
    tokens = torch.randn(tokens_n, hidden, device=device, dtype=dtype, generator=gen)
    weights = torch.rand(tokens_n, top_k, device=device, generator=gen)
    w = torch.randn(experts, hidden, ffn, device=device, dtype=dtype, generator=gen) / hidden**0.5
    tokens.requires_grad_()
    weights.requires_grad_()
    w.requires_grad_()

    permuted, row_map, counts = moe_permute(tokens, ids, experts)
    base_perm, sorted_idx, base_counts = torch_permute(tokens, ids, experts)
    assert torch.equal(permuted, base_perm) and torch.equal(counts, base_counts)
    rows = permuted.detach().requires_grad_()
    g_rows = torch.randn_like(rows)
    g_tok = torch.randn_like(tokens)
    count_list = counts.tolist()
    h = torch.randn(rows.shape[0], ffn, device=device, dtype=dtype, generator=gen)
    results = []

    def add(op: str, ours: Callable, alt: Callable, alt_name: str = "torch") -> None:
        results.append((name, op, alt_name, bench(ours), bench(alt)))

    # check=False, as the model calls them: the value checks read the ids back to the host
    # (a synchronization per call the plain-torch versions do not make); checked once above
    add("permute fwd", lambda: moe_permute(tokens, ids, experts, check=False),
        lambda: torch_permute(tokens, ids, experts))
    add("permute fwd+bwd",
        lambda: backward(moe_permute(tokens, ids, experts, check=False)[0], g_rows, [tokens]),
        lambda: backward(torch_permute(tokens, ids, experts)[0], g_rows, [tokens]))
    add("unpermute fwd", lambda: moe_unpermute(rows, row_map, weights, tokens_n, check=False),
        lambda: torch_unpermute(rows, sorted_idx, weights, tokens_n))
    add("unpermute fwd+bwd",
        lambda: backward(moe_unpermute(rows, row_map, weights, tokens_n, check=False), g_tok,
                         [rows, weights]),
        lambda: backward(torch_unpermute(rows, sorted_idx, weights, tokens_n), g_tok,
                         [rows, weights]))
    add("grouped_mm fwd", lambda: grouped_mm(rows, w, counts, check=False),
        lambda: torch_loop_mm(rows, w, count_list), "torch loop")
    add("grouped_mm fwd+bwd",
        lambda: backward(grouped_mm(rows, w, counts, check=False), h, [rows, w]),
        lambda: backward(torch_loop_mm(rows, w, count_list), h, [rows, w]), "torch loop")
    if hasattr(torch, "_grouped_mm"):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        try:
            torch._grouped_mm(rows, w, offs=offs)
        except (RuntimeError, NotImplementedError) as err:  # dtype or arch it does not take
            print(f"# torch._grouped_mm skipped for {name}: {str(err).splitlines()[0]}")
        else:
            add("grouped_mm fwd", lambda: grouped_mm(rows, w, counts, check=False),
                lambda: torch._grouped_mm(rows, w, offs=offs), "torch._grouped_mm")
            add("grouped_mm fwd+bwd",
                lambda: backward(grouped_mm(rows, w, counts, check=False), h, [rows, w]),
                lambda: backward(torch._grouped_mm(rows, w, offs=offs), h, [rows, w]),
                "torch._grouped_mm")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--tokens", type=positive_int, help="tokens per call (GPU 8192, CPU 1024)")
    parser.add_argument("--hidden", type=positive_int, help="model dim (GPU 4096, CPU 256)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                        help="GPU bf16, CPU fp32")
    parser.add_argument("--reps", type=positive_int, default=5,
                        help="CPU repetitions per timing")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokens_n = args.tokens or (8192 if cuda else 1024)  # 0 is refused above
    hidden = args.hidden or (4096 if cuda else 256)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    if cuda:
        import triton

        where = f"{torch.cuda.get_device_name()}, triton {triton.__version__}"
        ours = "orch Triton kernels"
    else:
        where = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        ours = "orch reference (CPU path)"
    print(f"# moe_dispatch: {ours} vs plain torch; {where}, torch {torch.__version__}, "
          f"{datetime.date.today()}")
    print(f"# tokens {tokens_n}, hidden {hidden}, {str(dtype).removeprefix('torch.')}")
    if not cuda:
        print("# no CUDA: orch runs its plain-torch reference here, not the Triton kernels; "
              "the Triton numbers need a GPU")
    print("| case | op | alternative | orch ms | alternative ms | speedup |")
    print("|---|---|---|---:|---:|---:|")
    bench = timer(device, args.reps)
    for name, experts, top_k, ffn in GPU_CASES if cuda else CPU_CASES:
        rows = run_case(name, tokens_n, hidden, experts, top_k, ffn, dtype, device, bench)
        for case, op, alt_name, ours_ms, alt_ms in rows:
            print(f"| {case} | {op} | {alt_name} | {ours_ms:.3f} | {alt_ms:.3f} | "
                  f"{alt_ms / ours_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
