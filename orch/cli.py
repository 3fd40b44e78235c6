"""The ``orch`` command line: one argparse entry point, a subcommand per job.

Subcommands parse their arguments and call into the packages; user errors (``OrchError``) are
printed without a traceback and exit 2, internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from orch import __version__
from orch.errors import OrchError, PlanError, Problem


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show or search the parallel plan for a config, without starting anything",
        description="Show the hybrid parallel plan for CONFIG (degrees, rank layout, memory per "
        "rank, step time, MFU), or search every valid plan with --auto.",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument(
        "--world-size",
        type=int,
        help="devices in the job (default: the cluster's "
        "device count, or the product of fixed degrees)",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        help="devices per node (default 8, or all devices for --device cpu)",
    )
    p.add_argument(
        "--device",
        help="device type from the catalog, e.g. h100, h200, a100, "
        "rtx4090, cpu (default h100-sxm-80gb, or the cluster's)",
    )
    p.add_argument("--auto", action="store_true", help="search all valid plans; print the best")
    p.add_argument("--top", type=int, default=5, help="plans to list with --auto (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set parallel.tp=2 (repeatable)",
    )
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from orch.config import load_config
    from orch.plan import build_plan, resolve_machine, search
    from orch.plan.render import render_plan, render_search

    cfg = load_config(args.config, args.overrides)
    if not args.auto:
        plan = build_plan(cfg, args.world_size, args.gpus_per_node, args.device)
        print(json.dumps(plan.to_dict(), indent=1) if args.json else render_plan(plan))
        return 0
    problems: list[Problem] = []
    if args.top < 1:
        problems.append(Problem("--top", f"must be at least 1, got {args.top}", "use e.g. 5"))
    machine = resolve_machine(cfg, args.world_size, args.gpus_per_node, args.device, problems)
    if problems or machine is None:
        raise PlanError(problems)
    result = search(cfg, machine, top=args.top)
    if args.json:
        print(
            json.dumps(
                {
                    "world_size": machine.world_size,
                    "device": machine.device.name,
                    "searched": result.evaluated,
                    "fit": result.fit,
                    "over_memory": result.over_memory,
                    "most_common_cause": result.most_common_cause,
                    "plans": [plan.to_dict() for plan in result.best],
                },
                indent=1,
            )
        )
    else:
        print(render_search(result, machine.world_size, machine.device.name))
    return 0 if result.best else 1


def _add_launch_parser(sub: argparse._SubParsersAction) -> None:
    # Listed for `orch --help` only: `orch launch` is parsed by torchrun's own parser (main()).
    sub.add_parser("launch", add_help=False, help="start training: torchrun options, CONFIG, "
                   "--set overrides; see `orch launch --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orch",
        description="Hybrid-parallel training and offloaded fine-tuning for large PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"orch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_launch_parser(sub)
    _add_plan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        from orch.launch.launcher import launch

        command, run = "launch", lambda: launch(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        return run()
    except OrchError as exc:
        print(f"orch {command}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
