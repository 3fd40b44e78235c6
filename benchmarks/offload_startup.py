"""Building an offloaded model: whole in CPU memory and then offloaded, against unit by unit
straight into its homes (built on the meta device, each unit filled and placed before the next:
what ``orch launch`` does since 2026-12-03).

Parameters, gradients and optimizer states all rest in ``--homes``. Each way runs in a process of
its own and reports the growth of its resident set while it builds the engine (peak ``ru_maxrss``
over the resident set before the build; torch's own memory is not counted) and the seconds it took.
With NVMe homes the unit-by-unit build should hold about one unit; the whole build holds the model.
With CPU homes both hold the model (it is their home).

    .venv/bin/python benchmarks/offload_startup.py [--dim 2048 --layers 16 --ffn 5632]
        [--homes nvme] [--dir /tmp] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_flags import add_model_shape, description, model_sets, positive_int
from orch_runs import json_worker

WAYS = ("whole", "unit by unit")


def worker(way: str, sets: list[str], homes: str, nvme_dir: str) -> dict:
    """Build the offloaded engine ``way``; its resident-set growth and seconds."""
    import dataclasses

    import torch

    from orch.config import load_config
    from orch.models.llama import Transformer
    from orch.models.weights import SeededInit
    from orch.offload.engine import offload_transformer
    from orch.offload.host_memory import return_large_frees
    from orch.runtime.telemetry import rss_bytes

    cfg = load_config(Path(__file__).parents[1] / "configs/tiny.yaml", sets)
    off = dataclasses.replace(cfg.offload, params=homes, grads=homes, optimizer=homes,
                              nvme_path=nvme_dir)
    return_large_frees()  # as the worker does with offload on
    if homes == "nvme":  # DeepSpeed's op is imported by either way: not part of the build
        from orch.offload.blockio import load_async_io

        try:
            load_async_io()
        except RuntimeError:
            pass  # the O_DIRECT fallback
    before, start = rss_bytes(), time.perf_counter()
    if way == "whole":  # the worker's way before 2026-12-03
        model = Transformer(cfg.model)
        model.init_weights(cfg.train.seed)
        engine = offload_transformer(model, torch.device("cpu"), 1 << 40, 1 << 28, off)
    else:
        with torch.device("meta"):
            model = Transformer(cfg.model)
        model.init_buffers()
        engine = offload_transformer(model, torch.device("cpu"), 1 << 40, 1 << 28, off,
                                     weights=SeededInit(model, cfg.train.seed))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for u in engine.units for p in u.params)
    engine.close()
    return {"growth": peak - before, "seconds": seconds, "param_bytes": params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_model_shape(parser, dim=2048, layers=16, ffn=5632)
    parser.add_argument("--homes", choices=("cpu", "nvme"), default="nvme")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="NVMe directory")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sets = model_sets(args)
    if args.worker:
        print(json.dumps(worker(args.worker, sets, args.homes, args.dir)))
        return 0
    import torch

    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            with tempfile.TemporaryDirectory(dir=args.dir) as nvme_dir:
                runs[way].append(json_worker(
                    [sys.executable, __file__, "--worker", way, "--homes", args.homes,
                     "--dir", nvme_dir, "--dim", str(args.dim), "--layers", str(args.layers),
                     "--ffn", str(args.ffn)], f"the {way} build"))
    model_gib = runs["whole"][0]["param_bytes"] / 2**30
    print(f"# offloaded model build, {args.homes} homes: dim {args.dim}, {args.layers} layers, "
          f"ffn {args.ffn}, {model_gib:.2f} GiB of fp32 parameters ({platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}, "
          f"{args.rounds} rounds)\n")
    print("| build | resident-set growth GiB (max over rounds) | seconds (median) |")
    print("|---|---:|---:|")
    for way, rs in runs.items():
        growth = max(r["growth"] for r in rs) / 2**30
        print(f"| {way} | {growth:.2f} | {statistics.median(r['seconds'] for r in rs):.1f} |")
    ratio = (max(r["growth"] for r in runs["unit by unit"])
             / max(r["growth"] for r in runs["whole"]))
    print(f"\nunit by unit / whole, resident-set growth: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
