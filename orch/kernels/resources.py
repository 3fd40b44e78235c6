"""What orch's Triton kernels ask of a GPU, found on a machine without one.

A kernel's registers per thread, the bytes it spills to local memory and the shared memory a
program needs are settled by the compiler, not by the GPU: a launch whose shared memory passes
the device's per-block limit fails ("out of resource: shared memory"), and a kernel that spills
registers moves its accumulators through local memory inside its inner loop. Triton compiles for
an architecture it is only told about, so both can be checked before any GPU time is spent:
the real launchers run on CPU tensors with their kernels replaced by recorders
(:func:`recording`), and each recorded launch, its arguments, tile sizes, warps and stages as
the GPU path would pass them, is compiled for sm_80 or sm_90 (:func:`compile_for`); ptxas's
verdict is read back from the binary with the ``cuobjdump`` that ships with Triton.

    python -m orch.kernels.resources [--target sm_90] [--op attention] [--dtype bf16]
                                     [--documents only] [--json]

prints that table for every kernel at its shipped tiles (attention's with and without the ids
of packed documents: ``HAS_DOCS`` kernels keep each row's document range in registers too); the
tests hold it (no launch over a limit, no spills on the 16-bit paths on sm_90). These are
compile-time facts, not timings: ``benchmarks/attention.py --sweep`` on a GPU decides between
tiles that pass.

Needs Triton's compiler, not its interpreter: the kernel modules must be imported with
``TRITON_INTERPRET`` unset (the command line refuses otherwise; the tests, which run the
interpreter, run it as a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import torch

from orch.kernels.dispatch import interpreting

TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}
"""Target name -> (compute capability, shared memory a block may opt in to, in bytes): A100's
163 KiB and H100's (and H200's) 227 KiB, the limit Triton checks a launch against."""

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher made it: the kernel, its positional arguments and its
    keyword arguments (constexprs and launch options)."""

    kernel: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def source(self, target: str) -> tuple[Any, dict[str, Any]]:
        """(source, options) for ``triton.compile``, specialized as Triton's launcher would
        specialize this launch on a ``target`` GPU: argument types, constexprs, and the
        alignment and divisibility facts (pointers 16-byte aligned, integers multiples of 16)
        without which the compiler cannot use asynchronous copies or pipeline a loop. Uses
        the JIT's own binder (``create_function_from_signature``, ``_pack_args``), so it
        follows Triton's rules rather than restating them."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", TARGETS[target][0], 32))
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params,
                                                backend)
        bound, specialization, options = binder(*self.args, **self.kwargs)
        options, signature, constexprs, attrs = self.kernel._pack_args(
            backend, self.kwargs, bound, specialization, options)
        return ASTSource(self.kernel, signature, constexprs, attrs), options.__dict__

    def key(self) -> tuple[str, str, str]:
        """Launches with equal keys compile to the same binary."""
        source, options = self.source("sm_90")
        return (self.name, repr((source.signature, source.constants, source.attrs)),
                repr(sorted(options.items())))


@contextlib.contextmanager
def recording(module: ModuleType, *names: str) -> Iterator[list[Launch]]:
    """Within the block, ``module.NAME[grid](...)`` records a :class:`Launch` instead of
    launching, for each kernel NAME; the list fills as the launchers run."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Callable[..., None]:
            def launch(*args: Any, **kwargs: Any) -> None:
                launches.append(Launch(self.kernel, args, kwargs))

            return launch

    kernels = {name: getattr(module, name) for name in names}
    for name, kernel in kernels.items():
        _require_compiler(kernel)
        setattr(module, name, Recorder(kernel))
    try:
        yield launches
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def _require_compiler(kernel: Any) -> None:
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{getattr(kernel, '__name__', kernel)} was built for Triton's interpreter: import "
            "the kernels with TRITON_INTERPRET unset to compile them for a GPU "
            "(python -m orch.kernels.resources does)"
        )


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel needs per program: ``registers`` per thread, ``local_bytes``
    per thread (register spills and stack), ``shared_bytes`` of shared memory; and its
    ``matmul``: the tensor-core instruction its ``tl.dot`` became (``wgmma`` is Hopper's
    asynchronous warpgroup one, ``mma`` the synchronous one of Ampere; ``-`` for none)."""

    kernel: str
    registers: int
    local_bytes: int
    shared_bytes: int
    matmul: str

    def problems(self, target: str) -> list[str]:
        """What stops or slows this kernel on ``target``, in words (empty when nothing)."""
        limit = TARGETS[target][1]
        out = []
        if self.shared_bytes > limit:
            out.append(f"needs {self.shared_bytes:,} bytes of shared memory, over {target}'s "
                       f"{limit:,}: the launch would fail")
        if self.local_bytes:
            out.append(f"spills {self.local_bytes:,} bytes per thread to local memory "
                       f"({self.registers} registers)")
        return out


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)")


def compile_for(launch: Launch, target: str) -> Resources:
    """Compile ``launch`` for ``target`` (no GPU needed) and read what ptxas allotted it."""
    import triton
    from triton.backends.compiler import GPUTarget

    source, options = launch.source(target)
    compiled = triton.compile(source, target=GPUTarget("cuda", TARGETS[target][0], 32),
                              options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    found = _RES_USAGE.search(usage)
    if found is None:
        raise RuntimeError(f"{launch.name}: no resource usage in cuobjdump's output:\n{usage}")
    registers, stack, local = map(int, found.groups())
    ptx = compiled.asm["ptx"]
    matmul = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    return Resources(launch.name, registers, stack + local, compiled.metadata.shared, matmul)


# --- the shipped launches -----------------------------------------------------------------------


def attention_launches(dtype: torch.dtype, head_dim: int, causal: bool,
                       config: Any = None, documents: bool = False) -> list[Launch]:
    """The forward and backward launches of flash attention (grouped-query, a gradient on lse)
    at ``config`` (default: the shipped tiles for this dtype and head_dim), on a sequence of
    a multiple of 16 tokens as training uses (Triton specializes on that); with ``documents``,
    those of packed documents (``HAS_DOCS``: the kernels that also load each row's document
    range, more registers than without)."""
    from orch.kernels.attention import kernels

    config = config or kernels.default_config(head_dim, dtype)
    q = torch.zeros(1, 256, 4, head_dim, dtype=dtype)
    kv = torch.zeros(1, 256, 2, head_dim, dtype=dtype)
    ids = torch.arange(256).reshape(1, 256) // 100  # documents of 100 tokens, the last of 56
    pair = (ids, ids) if documents else None
    names = ("_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel")
    with recording(kernels, *names) as launches:
        out, lse = kernels.forward(q, kv, kv, causal, 0.125, config, pair)
        kernels.backward(q, kv, kv, out, lse, out, lse, causal, 0.125, config, pair)
    return launches


def adamw8bit_launches(dtype: torch.dtype) -> list[Launch]:
    """The fused 8-bit AdamW step on a parameter of ``dtype``."""
    from orch.kernels.adamw8bit import triton_kernel
    from orch.kernels.adamw8bit.quant import blocks_per_row
    from orch.kernels.adamw8bit.reference import Hyper

    p = torch.zeros(64, 1000, dtype=dtype)
    codes = torch.zeros(p.shape, dtype=torch.uint8)
    absmax = torch.zeros(64, blocks_per_row(1000))
    hyper = Hyper.at(1, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    with recording(triton_kernel, "_adamw8bit_kernel") as launches:
        triton_kernel.step_8bit_triton_(p, p, codes, codes, absmax, absmax, hyper)
    return launches


def moe_launches(dtype: torch.dtype) -> list[Launch]:
    """Permute, unpermute and the grouped GEMM, forward and backward, on ``dtype`` tokens."""
    from orch.kernels.moe import triton_moe as moe

    tokens, hidden, experts, top_k, ffn = 64, 512, 8, 2, 384
    x = torch.zeros(tokens, hidden, dtype=dtype)
    row_map = torch.arange(tokens * top_k).reshape(tokens, top_k)
    weights = torch.zeros(tokens, top_k)
    w = torch.zeros(experts, hidden, ffn, dtype=dtype)
    counts = torch.full((experts,), tokens * top_k // experts)
    rows = torch.zeros(tokens * top_k, hidden, dtype=dtype)
    grad = torch.zeros(tokens * top_k, ffn, dtype=dtype)
    names = ("_scatter_rows", "_gather_rows", "_row_dots", "_grouped_mm", "_grouped_mm_dw")
    with recording(moe, *names) as launches:
        moe.scatter_rows(x, row_map, weights, tokens * top_k, dtype)
        moe.gather_rows(rows, row_map, weights, dtype)
        moe.row_dots(rows, x, row_map, weights.dtype)
        moe.grouped_mm_forward(rows, w, counts)
        moe.grouped_mm_forward(grad, w.transpose(1, 2), counts)
        moe.grouped_mm_weight_grad(rows, grad, counts, experts)
    return launches


HALF_DTYPES = (torch.bfloat16, torch.float16)
"""The dtypes the GPU paths train in: their kernels must not spill on ``TUNED_FOR`` (float32
runs on a GPU only in tests, where a spill costs nothing that matters)."""
OPS = {"attention": attention_launches, "adamw8bit": adamw8bit_launches, "moe": moe_launches}


@dataclass(frozen=True)
class Case:
    """One distinct kernel binary of an op at one dtype, as the op's launcher makes it."""

    op: str
    dtype: torch.dtype
    detail: str
    launch: Launch

    @property
    def label(self) -> str:
        return " ".join(filter(None, (self.op, _DTYPE_NAMES[self.dtype], self.detail)))


DOCUMENTS = {"both": (False, True), "none": (False,), "only": (True,)}
"""``--documents``: which attention launches to compile, without the packed documents' ids,
with them (``HAS_DOCS``, the kernels of ``train.document_mask``), or both."""


def shipped_cases(ops: tuple[str, ...] = tuple(OPS),
                  dtypes: tuple[torch.dtype, ...] = (*HALF_DTYPES, torch.float32),
                  documents: tuple[bool, ...] = DOCUMENTS["both"]) -> list[Case]:
    """Every op's launches at every dtype at the shipped tiles, one per distinct binary;
    attention's without and with document ids as ``documents`` lists."""
    cases: list[Case] = []
    for dtype in dtypes:
        for op in ops:
            if op == "attention":
                for head_dim, causal, docs in itertools.product((64, 128), (False, True),
                                                                documents):
                    detail = f"d={head_dim}{' causal' if causal else ''}"
                    detail += " documents" if docs else ""
                    cases += [Case(op, dtype, detail, one) for one in
                              attention_launches(dtype, head_dim, causal, documents=docs)]
            else:
                cases += [Case(op, dtype, "", one) for one in OPS[op](dtype)]
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for case in cases:
        if case.launch.key() not in seen:
            seen.add(case.launch.key())
            unique.append(case)
    return unique


TUNED_FOR = "sm_90"
"""The architecture the tiles are chosen for (H100, H200: issue 7's targets). Elsewhere spills
are reported, not held against the tiles: on sm_80 the dK/dV kernel at head_dim 64 spills 16
bytes per thread, a cost too small to give up Hopper's tiles for."""


def failing(case: Case, used: Resources, target: str) -> bool:
    """Whether ``used`` breaks what orch holds its kernels to: no launch over the target's
    shared memory, and no spills on the 16-bit paths where the tiles are tuned."""
    return used.shared_bytes > TARGETS[target][1] or (
        target == TUNED_FOR and case.dtype in HALF_DTYPES and used.local_bytes > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orch.kernels.resources",
        description="Compile orch's Triton kernels at their shipped tiles for a GPU "
                    "architecture (no GPU needed) and print what each needs; exit 1 when a "
                    f"launch would fail or a 16-bit kernel spills on {TUNED_FOR}.")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append",
                        help="architecture (repeatable; default: both)")
    parser.add_argument("--op", choices=sorted(OPS), action="append",
                        help="kernels of this op only (repeatable; default: all)")
    parser.add_argument("--dtype", choices=sorted(_DTYPE_NAMES.values()), action="append",
                        help="this dtype only (repeatable; default: all)")
    parser.add_argument("--documents", choices=sorted(DOCUMENTS), default="both",
                        help="attention's launches with packed documents' ids, without them, "
                             "or both (default)")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("TRITON_INTERPRET is set, so the kernels would be built for Triton's "
                     "interpreter: run with TRITON_INTERPRET unset (or 0)")
    names = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
    dtypes = tuple(names[name] for name in args.dtype) if args.dtype else tuple(names.values())
    cases = shipped_cases(tuple(args.op or OPS), dtypes, DOCUMENTS[args.documents])
    if not args.json:
        print("| target | case | kernel | registers | local bytes | shared bytes | matmul "
              "| problems |")
        print("|---|---|---|---:|---:|---:|---|---|")
    bad = 0
    for target in args.target or sorted(TARGETS):
        for case in cases:
            used = compile_for(case.launch, target)
            bad += failing(case, used, target)
            row = {"target": target, "case": case.label, **asdict(used),
                   "problems": used.problems(target), "failing": failing(case, used, target)}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"| {target} | {case.label} | {used.kernel} | {used.registers} | "
                      f"{used.local_bytes:,} | {used.shared_bytes:,} | {used.matmul} | "
                      f"{'; '.join(row['problems'])} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
