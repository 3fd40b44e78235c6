"""The NVMe tier's I/O against `dd` with O_DIRECT on the same disk, and CPU Adam against torch.

Part 1, I/O: writes then reads ``--size`` bytes in ``--chunk``-byte calls (a large unit's
region) through each of orch's block I/O paths, DeepSpeed's async I/O op (``AsyncIO``, with its
page-locked buffers) and the O_DIRECT thread pool fallback (``DirectIO``), and through
``dd oflag=direct`` / ``iflag=direct`` on a file in the same directory, in alternating rounds
(the disk's speed drifts: page cache of other files, other tenants). dd runs twice: with 1 MiB
blocks, and with blocks of ``--chunk`` bytes, the size of the buffer orch's paths fill. The
buffer's pages matter on their own here: orch's buffers are on 2 MiB pages where the kernel
allows (``orch.offload.host_memory``), which made reads into them 1.8x as fast on this virtual
disk as on 4 KiB pages. It prints GB/s and the ratio to each dd, per round and the median.
Target (issue 8): orch at least 0.8x dd.

Part 2, optimizer: one step of DeepSpeed's CPU Adam (``DeepSpeedCPUAdam``, built on first use)
and of torch's AdamW (foreach and fused) on ``--params`` fp32 parameters in 16 tensors, median
of ``--repeats``: the step the offload engine runs on the CPU for each unit.

    .venv/bin/python benchmarks/offload_io.py [--dir /tmp] [--size 1GiB] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from bench_flags import at_least, byte_size, description, positive_int

from orch.config.schema import OffloadConfig
from orch.offload.blockio import AsyncIO, BlockIO, DirectIO, load_async_io


def _dd(args: list[str]) -> float:
    """Seconds dd reports for its copy (its own clock, so process start-up is not counted)."""
    out = subprocess.run(["dd", *args, "status=progress"], capture_output=True, text=True,
                         check=True).stderr
    return float(re.findall(r"copied, ([0-9.]+) s", out)[-1])


def dd_rates(path: Path, size: int, block: int) -> tuple[float, float]:
    count, bs = size // block, f"{block >> 20}M"
    write = _dd(["if=/dev/zero", f"of={path}", f"bs={bs}", f"count={count}", "oflag=direct",
                 "conv=fsync"])
    read = _dd([f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct"])
    path.unlink()
    return size / write / 1e9, size / read / 1e9


def orch_rates(io: BlockIO, path: Path, size: int, chunk: int) -> tuple[float, float]:
    buffer = io.buffer(chunk)
    buffer.copy_(torch.randint(0, 256, (chunk,), dtype=torch.uint8))
    offsets = range(0, size, chunk)
    start = time.perf_counter()
    for offset in offsets:
        io.write(buffer, offset)
    os.fsync(fd := os.open(path, os.O_RDONLY))  # as dd's conv=fsync (O_DIRECT needs none)
    os.close(fd)
    write = time.perf_counter() - start
    start = time.perf_counter()
    for offset in offsets:
        io.read(buffer, offset)
    read = time.perf_counter() - start
    io.free(buffer)
    io.close()
    path.unlink()
    return size / write / 1e9, size / read / 1e9


def adam_step_seconds(params: int, repeats: int) -> dict[str, float]:
    """Median seconds of one optimizer step over ``params`` parameters, per implementation."""
    torch.manual_seed(0)
    sizes = [params // 16] * 16
    makers = {
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    try:
        from orch.offload.cpu_adam import DeepSpeedAdamW

        makers["DeepSpeed CPU Adam (orch's DeepSpeedAdamW)"] = lambda ps: DeepSpeedAdamW(
            ps, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    except Exception as exc:  # no compiler: say so, measure the rest
        print(f"DeepSpeed CPU Adam unavailable: {exc}")
    out = {}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        for p in ps:
            p.grad = torch.randn_like(p)
        try:
            opt = make(ps)
            opt.step()  # states allocated, op built
        except Exception as exc:
            print(f"{name} unavailable: {exc}")
            continue
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def io_part(args: argparse.Namespace, work: Path, size: int, chunk: int) -> None:
    """Part 1: dd and orch's block I/O paths in alternating rounds, in ``work``."""
    defaults = OffloadConfig()  # what a run uses unless its config says otherwise
    block, depth, threads = defaults.io_block_size, defaults.io_queue_depth, defaults.io_threads
    makers = {"DirectIO (O_DIRECT pool)": lambda p: DirectIO(p, block, threads)}
    try:
        load_async_io()
        makers = {"AsyncIO (DeepSpeed aio)": lambda p: AsyncIO(p, block, depth, threads),
                  **makers}
    except RuntimeError as exc:
        print(exc)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}; {size >> 20} MiB in {chunk >> 20} MiB calls under {work} "
          f"(block {block >> 20} MiB, queue depth {depth}, {threads} threads)")
    dd_big = f"dd bs={chunk >> 20}M"
    rows: dict[str, list[tuple[float, float]]] = {"dd bs=1M": [], dd_big: [],
                                                  **{name: [] for name in makers}}
    for round_ in range(args.rounds):
        rows["dd bs=1M"].append(dd_rates(work / "dd.bin", size, 1 << 20))
        rows[dd_big].append(dd_rates(work / "dd.bin", size, chunk))
        for name, make in makers.items():
            rows[name].append(orch_rates(make(work / "orch.bin"), work / "orch.bin", size, chunk))
        print(f"round {round_ + 1}: " + ", ".join(
            f"{name} w {w:.2f} r {r:.2f} GB/s" for name, (w, r) in
            ((n, v[-1]) for n, v in rows.items())))
    medians = {name: (statistics.median(v[0] for v in values),
                      statistics.median(v[1] for v in values)) for name, values in rows.items()}
    (small_w, small_r), (big_w, big_r) = medians["dd bs=1M"], medians[dd_big]
    print(f"\n| path | write GB/s | read GB/s | write vs dd 1M | read vs dd 1M | write vs "
          f"{dd_big} | read vs {dd_big} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (w, r) in medians.items():
        print(f"| {name} | {w:.2f} | {r:.2f} | {w / small_w:.2f} | {r / small_r:.2f} | "
              f"{w / big_w:.2f} | {r / big_r:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="directory on the disk")
    parser.add_argument("--size", type=byte_size, default="1GiB",
                        help="bytes written and read per case (a whole number of --chunk)")
    parser.add_argument("--chunk", type=byte_size, default="64MiB",
                        help="bytes per call (a unit's region; whole MiB, dd's block size)")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--params", type=at_least(16, "16 tensors"), default=100_000_000)
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args(argv)
    size, chunk = args.size, args.chunk
    if chunk > size:
        parser.error(f"--chunk ({chunk:,} bytes) is larger than --size ({size:,} bytes); "
                     "fix: a --chunk no larger than --size")
    if chunk % (1 << 20):
        parser.error(f"--chunk ({chunk:,} bytes) is not a whole number of MiB (dd runs with "
                     "bs=--chunk in MiB); fix: e.g. --chunk 64MiB")
    if size % chunk:
        parser.error(f"--size ({size:,} bytes) is not a whole number of --chunk ({chunk >> 20} "
                     "MiB) calls; fix: a --size that --chunk divides")
    if not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir} is not a directory; fix: an existing directory on the "
                     "disk to measure")
    if not os.access(args.dir, os.W_OK | os.X_OK):
        parser.error(f"--dir {args.dir} is not writable here; fix: a directory you can write to")
    work = Path(tempfile.mkdtemp(prefix="orch-offload-io-", dir=args.dir))
    try:
        io_part(args, work, size, chunk)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps = adam_step_seconds(args.params, args.repeats)
    print(f"\n| optimizer ({args.params / 1e6:.0f}M fp32 parameters) | step ms | vs torch "
          "AdamW (foreach) |")
    print("|---|---:|---:|")
    base = steps.get("torch AdamW (foreach)")
    for name, seconds in steps.items():
        print(f"| {name} | {seconds * 1e3:.0f} | {base / seconds:.2f} |")


if __name__ == "__main__":
    main()
