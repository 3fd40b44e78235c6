"""How long ``orch plan --auto`` takes: 8B, 70B and Mixtral-8x22B at 64, 1,024 and 4,096 GPUs.

The claim: searching every valid plan for 1,024 GPUs takes under one second, so the planner can
run inside ``orch launch`` and in interactive use. There is no outside planner to race (torchtitan
and Megatron-Core take degrees by hand), so the reference is the one-second budget itself.
Each case is timed twice: the search in-process (best of ``--repeat``, after a warm-up), and the
whole ``orch plan CONFIG --world-size N --auto`` command as a user runs it (interpreter start,
config loading, search and printing; one run).

    .venv/bin/python benchmarks/plan_search.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_flags import description, positive_int

from orch.config import load_config
from orch.plan import resolve_machine, search

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("llama3-8b", "llama3-70b", "mixtral-8x22b")
WORLDS = (64, 1024, 4096)
BUDGET_S = 1.0


def time_search(config: str, world: int, repeat: int) -> tuple[float, int, str]:
    cfg = load_config(REPO / "configs" / f"{config}.yaml")
    machine = resolve_machine(cfg, world, None, None, problems := [])
    assert machine is not None, problems
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = search(cfg, machine)
        best = min(best, time.perf_counter() - start)
    top = result.best[0].degrees.short() if result.best else "none fits"
    return best, result.evaluated, top


def time_command(config: str, world: int) -> float:
    orch = Path(sys.executable).parent / "orch"
    start = time.perf_counter()
    subprocess.run(
        [str(orch), "plan", f"configs/{config}.yaml", "--world-size", str(world), "--auto"],
        cwd=REPO, check=True, capture_output=True,
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--repeat", type=positive_int, default=3)
    args = parser.parse_args(argv)
    time_search("llama3-8b", 64, 1)  # warm imports and caches
    print(
        f"# plan search ({platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {datetime.date.today()})"
    )
    print("| config | GPUs | plans searched | search s | command s | budget s | ratio | best |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for config in CONFIGS:
        for world in WORLDS:
            seconds, evaluated, top = time_search(config, world, args.repeat)
            command = time_command(config, world)
            print(
                f"| {config} | {world} | {evaluated} | {seconds:.3f} | {command:.2f} | "
                f"{BUDGET_S:.1f} | {command / BUDGET_S:.2f} | {top} |"
            )


if __name__ == "__main__":
    main()
