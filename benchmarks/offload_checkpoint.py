"""Checkpointing a model whose parameters and optimizer states rest on NVMe: everything brought
into memory around the save and the load (orch's way before 2026-12-03, still
``OffloadEngine.resident``), against a tensor at a time for the save and a unit at a time for
the load (``orch.offload.checkpoint_homes``, what ``orch launch`` does now).

Each way runs in processes of its own: one builds the offloaded model (unit by unit, straight
to NVMe), makes its AdamW states and saves a checkpoint; another builds a fresh one and loads
it. Each reports the growth of its resident set during the save or the load (sampled every
5 ms, over the resident set before it) and the seconds it took. Both checkpoints must hold the
same values (checked). Needs about 6x the model's fp32 bytes of free disk under ``--dir``
(NVMe scratch: parameters and two moments; the checkpoint: the same again).

    .venv/bin/python benchmarks/offload_checkpoint.py [--dim 1024 --layers 16 --ffn 2816]
        [--dir /tmp] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench_flags import add_model_shape, description, model_sets, positive_int
from orch_runs import json_worker

WAYS = ("all in memory", "a tensor / a unit at a time")


def peak_growth(action: Callable[[], object]) -> tuple[float, int]:
    """Seconds ``action`` took and the peak growth of the resident set while it ran."""
    from orch.runtime.telemetry import rss_bytes

    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, max(peak[0], rss_bytes()) - before


def worker(way: str, phase: str, sets: list[str], nvme_dir: str, run_dir: str) -> dict:
    """Build the offloaded model, then save (``phase`` save) or load a checkpoint ``way``."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from orch.config import load_config
    from orch.models.llama import Transformer
    from orch.models.weights import SeededInit
    from orch.offload.engine import offload_transformer
    from orch.offload.host_memory import return_large_frees
    from orch.runtime.checkpoint import CheckpointManager
    from orch.runtime.optim import build_optimizer
    from orch.runtime.train_state import STATE_OPTIONS, TrainState

    # The tiers are overrides, not set after loading: the config is validated with them (a
    # torch CPU step on device-resident optimizer states is refused).
    cfg = load_config(Path(__file__).parents[1] / "configs/tiny.yaml",
                      [*sets, "offload.params=nvme", "offload.grads=cpu",
                       "offload.optimizer=nvme", f"offload.nvme_path={nvme_dir}",
                       "offload.cpu_adam=torch"])
    return_large_frees()  # as the worker does with offload on
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.init_buffers()
    engine = offload_transformer(model, torch.device("cpu"), 1 << 40, 1 << 28, cfg.offload,
                                 weights=SeededInit(model, 1 if phase == "save" else 2))
    optimizer = build_optimizer(model, cfg)
    checkpoints = CheckpointManager(run_dir, cfg, {})
    state = TrainState(model, optimizer, engine)
    path = Path(run_dir) / "checkpoints" / "step-00000001"
    if phase == "save":
        state.homes.prepare()  # the AdamW states, unit by unit (not measured)

        def save() -> None:
            if way == WAYS[0]:
                with engine.resident(optimizer):
                    model_state, optim_state = get_state_dict(model, optimizer,
                                                              options=STATE_OPTIONS)
                    checkpoints.save(1, {"model": model_state, "optim": optim_state}, {})
            else:
                state.save(checkpoints, 1, {})

        seconds, growth = peak_growth(save)
    else:
        def load() -> None:
            if way == WAYS[0]:
                with engine.resident(optimizer):
                    model_state, optim_state = get_state_dict(model, optimizer,
                                                              options=STATE_OPTIONS)
                    both = {"model": model_state, "optim": optim_state}
                    checkpoints.load(path, both)
                    set_state_dict(model, optimizer, options=STATE_OPTIONS,
                                   model_state_dict={}, optim_state_dict=both["optim"])
            else:
                state.load(checkpoints, path)

        seconds, growth = peak_growth(load)
    checksum = 0.0
    with engine.resident(None):  # the values, to check both ways agree (not measured)
        for p in model.parameters():
            checksum += float(p.double().sum())
    params = sum(p.numel() * p.element_size() for u in engine.units for p in u.params)
    engine.close()
    return {"growth": growth, "seconds": seconds, "param_bytes": params, "checksum": checksum}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_model_shape(parser, dim=1024, layers=16, ffn=2816)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="NVMe and checkpoint dir")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sets = model_sets(args)
    if args.worker:
        way, phase, nvme_dir, run_dir = args.worker
        print(json.dumps(worker(way, phase, sets, nvme_dir, run_dir)))
        return 0
    import torch

    shape = ["--dim", str(args.dim), "--layers", str(args.layers), "--ffn", str(args.ffn)]
    runs: dict[tuple[str, str], list[dict]] = {(w, p): [] for w in WAYS for p in ("save", "load")}
    for _ in range(args.rounds):
        for way in WAYS:
            with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
                for phase in ("save", "load"):
                    with tempfile.TemporaryDirectory(dir=args.dir) as nvme_dir:
                        runs[way, phase].append(json_worker(
                            [sys.executable, __file__, *shape, "--worker", way, phase, nvme_dir,
                             run_dir], f"{way} {phase}"))
    sums = {r["checksum"] for rs in runs.values() for r in rs}
    if len(sums) != 1:
        sys.exit(f"the ways disagree on the loaded values: {sorted(sums)}")
    model_gib = runs[WAYS[0], "save"][0]["param_bytes"] / 2**30
    print(f"# checkpoint of NVMe homes: dim {args.dim}, {args.layers} layers, ffn {args.ffn}, "
          f"{model_gib:.2f} GiB of fp32 parameters + {2 * model_gib:.2f} GiB of AdamW moments "
          f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}, {args.rounds} rounds)\n")
    print("| way | save: RSS growth GiB (max) | save s (median) | load: RSS growth GiB (max) "
          "| load s (median) |")
    print("|---|---:|---:|---:|---:|")
    for way in WAYS:
        cells = []
        for phase in ("save", "load"):
            rs = runs[way, phase]
            cells += [f"{max(r['growth'] for r in rs) / 2**30:.2f}",
                      f"{statistics.median(r['seconds'] for r in rs):.1f}"]
        print(f"| {way} | " + " | ".join(cells) + " |")
    for phase in ("save", "load"):
        ratio = (max(r["growth"] for r in runs[WAYS[1], phase])
                 / max(r["growth"] for r in runs[WAYS[0], phase]))
        print(f"\n{phase}: resident-set growth, {WAYS[1]} / {WAYS[0]}: {ratio:.2f}", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
