"""The ``orch`` command line: one argparse entry point, a subcommand per job.

Subcommands parse their arguments and call into the packages; user errors (``OrchError``) are
printed without a traceback and exit 2, internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from orch import __version__
from orch.cli_ckpt import add_ckpt_parser
from orch.cli_data import add_data_parser
from orch.errors import OrchError, PlanError, Problem

if TYPE_CHECKING:
    from orch.config import Config
    from orch.plan import Machine, Plan
    from orch.plan.cluster import ClusterSpec


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
    p.add_argument("--top", type=int, help="plans to list with --auto (default 5)")
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


def with_launch_refusals(plan: Plan, cfg: Config) -> Plan:
    """``plan`` with a note per feature this version's runtime cannot run for it, which
    ``orch launch`` refuses (the plan prices what a later runtime could run)."""
    from orch.plan.render import LAUNCH_REFUSES
    from orch.plan.support import layout_refusals

    refused = tuple(f"{LAUNCH_REFUSES}: {p.where}: {p.message}; fix: {p.fix}"
                    for p in layout_refusals(cfg, plan.degrees, plan.world_size))
    return dataclasses.replace(plan, notes=plan.notes + refused) if refused else plan


def _set_paths(overrides: Sequence[str]) -> list[str]:
    """The dotted paths ``--set`` items give: ``parallel.tp`` of ``parallel.tp=2``, and of
    ``parallel={tp: 2}`` too (not the section's other fields, which the file gives)."""
    import yaml

    paths = []
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, TypeError, RecursionError):  # (said by the load)
            value = text
        stack = [(key.strip(), value)]
        while stack:
            path, value = stack.pop()
            if isinstance(value, dict):
                stack += [(f"{path}.{name}", inner) for name, inner in value.items()]
            else:
                paths.append(path)
    return paths


def excluded(cfg: Config, machine: Machine, fixed: dict[str, int | str],
             args: argparse.Namespace) -> None:
    """Where ``--auto`` found no valid plan keeping ``fixed`` (the values given with --set)
    and some without them: a PlanError naming the constraints that leave nothing (each that
    does alone, else all together), with the rules the config's own layout breaks through them;
    else nothing (the config's layout is the limit, said as before)."""
    from orch.plan import build_plan, search

    def valid(kept: dict[str, int | str]) -> bool:
        return search(cfg, machine, top=1, fixed=kept).evaluated > 0

    if not valid({}):
        return
    alone = [path for path in fixed if not valid({path: fixed[path]})]
    culprits = alone or list(fixed)
    on = machine.topology.description
    if len(culprits) == 1:
        (path,) = culprits
        problems = [Problem(f"--set {path}", f"{fixed[path]}: --auto keeps it as given, and no "
                            f"valid plan on {on} has {path}={fixed[path]}",
                            f"choose another {path}, or leave it out for --auto to choose")]
    else:
        said = ", ".join(f"{path}={fixed[path]}" for path in culprits)
        problems = [Problem("--set", f"{said}: --auto keeps them as given, and no valid plan on "
                            f"{on} has them together",
                            "change one, or leave one out for --auto to choose")]
    try:
        build_plan(cfg, args.world_size, args.gpus_per_node, args.device)
    except PlanError as exc:  # what the config's own layout breaks through the constraints
        problems += [p for p in exc.problems
                     if any(p.where == path or path in p.reads for path in culprits)]
    raise PlanError(problems)


def cmd_plan(args: argparse.Namespace) -> int:
    from orch.config import load_config_lenient
    from orch.plan import build_plan, resolve_machine, search
    from orch.plan.render import render_plan, render_search
    from orch.plan.search import MICRO_BATCHES, constraints

    if args.top is not None and not args.auto:  # was ignored
        raise PlanError([Problem("--top", f"{args.top}: lists the plans --auto finds",
                                 "add --auto, or leave --top out")], title="bad arguments")
    # the config's problems and the plan's in one round (a bad key hid tp=3's four)
    overrides = list(args.overrides)
    if args.auto and "train.micro_batch" not in _set_paths(overrides):
        # searched: the file's micro-batch is no bound of global_batch (7 at world 7 was
        # refused as 'not a multiple of train.micro_batch=2', where the search tries 1)
        overrides.append(f"train.micro_batch={min(MICRO_BATCHES)}")
    loaded = load_config_lenient(args.config, overrides)
    cfg = loaded.config
    problems: list[Problem] = []
    if not args.auto:
        plan = None
        try:
            plan = build_plan(cfg, args.world_size, args.gpus_per_node, args.device)
        except PlanError as exc:
            problems = exc.problems
        loaded.check(problems)
        assert plan is not None
        plan = with_launch_refusals(plan, cfg)
        print(json.dumps(plan.to_dict(), indent=1) if args.json else render_plan(plan))
        return 0
    top = 5 if args.top is None else args.top
    if top < 1:
        problems.append(Problem("--top", f"must be at least 1, got {top}", "use e.g. 5"))
    machine = resolve_machine(cfg, args.world_size, args.gpus_per_node, args.device, problems)
    loaded.check(problems)
    assert machine is not None  # (else a problem said why)
    # degrees, micro-batch and recompute given with --set are kept (the file's are searched)
    fixed = constraints(cfg, _set_paths(args.overrides))
    result = search(cfg, machine, top=top, fixed=fixed)
    result.best = [with_launch_refusals(plan, cfg) for plan in result.best]
    if not result.evaluated and fixed:  # the --set values may be what leaves nothing
        excluded(cfg, machine, fixed, args)
    if not result.evaluated:  # no valid degrees at all: the config's own layout says which
        # rule, at the least micro-batch the search tried unless one was given (above: the
        # file's 2 said 'use a multiple of 14' of a batch where 7 does at micro-batch 1)
        build_plan(cfg, args.world_size, args.gpus_per_node, args.device)  # (a PlanError)
    if args.json:
        print(
            json.dumps(
                {
                    "world_size": machine.world_size,
                    "device": machine.device.name,
                    "devices": machine.topology.description,
                    "searched": result.evaluated,
                    "kept": result.fixed,
                    "fit": result.fit,
                    "over_memory": result.over_memory,
                    "most_common_cause": result.most_common_cause,
                    "plans": [plan.to_dict() for plan in result.best],
                },
                indent=1,
            )
        )
    else:
        print(render_search(result, machine.topology.description))
    return 0 if result.best else 1


def _add_schedule_parser(sub: argparse._SubParsersAction) -> None:
    from orch.parallel.schedules import SCHEDULES

    p = sub.add_parser(
        "schedule",
        help="simulate a pipeline schedule: makespan, idle time, activation peaks, timeline",
        description="Build the pipeline schedule NAME for P stages and M micro-batches, check it "
        "(dependencies, deadlock), simulate it with the given per-action costs and print the "
        "makespan, each rank's idle fraction and peak in-flight activations, and a timeline.",
    )
    p.add_argument("name", choices=list(SCHEDULES), metavar="NAME",
                   help=f"one of {', '.join(SCHEDULES)}")
    p.add_argument("--stages", type=int, required=True, help="pipeline ranks P")
    p.add_argument("--microbatches", type=int, required=True, help="micro-batches M per step")
    p.add_argument("--virtual", type=int,
                   help="model chunks per rank (default 2 for interleaved and zbv, else 1)")
    p.add_argument("--max-deferred", type=int,
                   help="2bp-*: most weight-gradient steps waiting per rank (default: r on rank r)")
    for kind, default in (("f", 1.0), ("i", 1.0), ("w", 1.0), ("comm", 0.0)):
        p.add_argument(f"--{kind}", type=float, default=default,
                       help=f"cost of {kind.upper()} (default {default:g})")
    p.add_argument("--b", type=float, help="cost of a fused backward B (default I + W)")
    p.add_argument("--json", action="store_true", help="print JSON (with every span)")
    p.add_argument("--png", metavar="FILE", help="also draw the timeline into this PNG file")
    p.set_defaults(func=cmd_schedule)


SCHEDULE_MOST_WORK = 1 << 16
"""The most stage micro-batches (stages x chunks x micro-batches) ``orch schedule`` builds: 128
stages of 512 micro-batches, or 65,536 stages of one, each built in 7-12 s on 2 shared cores;
beyond, it ran for minutes and GBs."""

ZBV_MOST_WORK, ZBV_MOST_STAGES = 1 << 15, 64
"""ZB-V's own limits: its order search simulates up to 33 candidate orders step by step, so its
time grows with the square of the stages where the others' grows with the work (2 shared cores:
P = 128 of one micro-batch took 15 s, P = 256 a minute; 16 stages of 2,048 micro-batches 22 s).
Within them its slowest take 6-12 s (P = 64, M = 4 and 256; P = 16, M = 1,024), as long as the
others' slowest."""


def _schedule_size_problems(args: argparse.Namespace, virtual: int) -> list[Problem]:
    """A schedule too large to build in seconds (refused before it is built)."""
    zbv = args.name == "zbv"
    most = ZBV_MOST_WORK if zbv else SCHEDULE_MOST_WORK
    problems = []
    if zbv and args.stages > ZBV_MOST_STAGES:
        problems.append(Problem("--stages", f"{args.stages}: zbv builds up to "
                                f"{ZBV_MOST_STAGES} stages (its order search grows with the "
                                "square of the stages)", f"give {ZBV_MOST_STAGES} stages or "
                                "fewer, or another schedule"))
    work = args.stages * max(1, virtual) * args.microbatches
    if work > most:
        problems.append(Problem(
            "--stages x --virtual x --microbatches" if virtual > 1 else
            "--stages x --microbatches",
            f"{args.stages} x {virtual} chunks x {args.microbatches} micro-batches = {work:,} "
            f"stage micro-batches, over the {most:,} orch schedule builds"
            f"{' for zbv' if zbv else ''}", "give fewer stages or micro-batches"))
    return problems


_SCHEDULE_FLAGS = {"name": "NAME", "stages": "--stages", "microbatches": "--microbatches",
                   "virtual": "--virtual", "max_deferred": "--max-deferred"}
"""The flag of each argument a schedule's problems are about (``ScheduleProblem.argument``)."""

PNG_MOST_RANKS = 256
"""The most ranks ``--png`` draws, one 34-pixel band each under a legend: 8,732 pixels tall.
4,096 ranks drew a 1,200 x 139,270 image through 1.6 GB of memory, of bands one pixel in 116 of a
screen's height."""


def _schedule_argument_problems(args: argparse.Namespace) -> list[Problem]:
    """The costs must be finite (compute positive, communication 0 or more: NaN made the
    makespan NaN and --json invalid JSON), the PNG's place writable and its ranks few enough to
    see, checked before the simulation rather than failing after it."""
    import math
    import os
    from pathlib import Path

    problems = []
    for kind in ("f", "b", "i", "w", "comm"):
        value, transfer = getattr(args, kind), kind == "comm"
        if value is None or (math.isfinite(value) and (value >= 0 if transfer else value > 0)):
            continue
        what = "a transfer between stages" if transfer else f"one {kind.upper()} action"
        problems.append(Problem(f"--{kind}", f"{value:g}: a cost must be finite and "
                                f"{'0 or more' if transfer else 'above 0'}",
                                f"give the time of {what}, e.g. 1"))
    if args.png is not None:
        png = Path(args.png)
        parent = png.parent if str(png.parent) else Path(".")
        if not args.png or png.is_dir():
            problems.append(Problem("--png", f"{args.png!r} is not a file name",
                                    "give a file such as timeline.png"))
        elif not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(Problem("--png", f"{str(parent)!r} is not a writable directory",
                                    "give a file in an existing writable directory"))
        if args.stages > PNG_MOST_RANKS:
            problems.append(Problem("--png", f"draws up to {PNG_MOST_RANKS} ranks, one band "
                                    f"each; --stages is {args.stages}",
                                    f"leave out --png (--json gives every span), or give "
                                    f"{PNG_MOST_RANKS} stages or fewer"))
    return problems


def cmd_schedule(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from orch.errors import ProblemsError
    from orch.parallel.schedules import (
        CHUNKED,
        Costs,
        build_schedule,
        schedule_problems,
        simulate,
    )
    from orch.parallel.schedules.render import LEGEND, chart, write_png

    virtual = args.virtual if args.virtual is not None else 2 if args.name in CHUNKED else 1
    problems = [Problem(_SCHEDULE_FLAGS[p.argument], p.message, p.fix)
                for p in schedule_problems(args.name, args.stages, args.microbatches, virtual,
                                           args.max_deferred)]
    problems += _schedule_size_problems(args, virtual) + _schedule_argument_problems(args)
    if problems:
        raise ProblemsError(problems, title=f"cannot build the schedule {args.name}")
    schedule = build_schedule(args.name, args.stages, args.microbatches, virtual,
                              args.max_deferred)
    costs = Costs(f=args.f, b=args.b, i=args.i, w=args.w, comm=args.comm)
    timeline = simulate(schedule, costs)
    if not math.isfinite(timeline.makespan):  # each cost finite, their sum past the largest
        raise ProblemsError([Problem("--f/--b/--i/--w/--comm", "the costs add up to more than "
                                     "the largest float (the makespan was infinite and --json "
                                     "invalid JSON)", "give smaller costs: any unit will do, "
                                     "e.g. milliseconds")], title="cannot simulate the schedule")
    if args.png:
        try:
            write_png(timeline, Path(args.png))
        except OSError as exc:
            raise ProblemsError([Problem("--png", f"{args.png!r} could not be written "
                                         f"({exc.strerror})", "give a file in a writable "
                                         "directory with room")], title="cannot draw") from None
    if args.json:
        print(json.dumps({
            "name": schedule.name, "stages": schedule.stages, "virtual": schedule.virtual,
            "placement": schedule.placement,
            "microbatches": schedule.microbatches,
            "costs": vars(costs) | {"b": costs.compute("B")},  # B's cost, given or I + W
            "makespan": timeline.makespan, "bubble_fraction": timeline.bubble_fraction,
            "idle_fraction": timeline.idle_fraction,
            "peak_activations": timeline.peak_activations,
            "ranks": [[{"action": str(s.action), "start": s.start, "end": s.end} for s in spans]
                      for spans in timeline.spans],
        }, indent=1))
        return 0
    b = costs.compute("B")
    shape = " in a V" if schedule.placement == "v" else ""
    def count(n: int, one: str, many: str = "") -> str:
        return f"{n} {one if n == 1 else many or one + 's'}"

    print(f"schedule {schedule.name}: {count(schedule.stages, 'stage')} x "
          f"{count(schedule.virtual, 'chunk')}{shape}, "
          f"{count(schedule.microbatches, 'micro-batch', 'micro-batches')} "
          f"(F {costs.f:g}, B {b:g}, I {costs.i:g}, "
          f"W {costs.w:g}, comm {costs.comm:g})")
    print(f"makespan {timeline.makespan:g}, bubble {timeline.bubble_fraction:.1%}")
    print("rank  idle    peak activations")
    for rank, (idle, peak) in enumerate(zip(timeline.idle_fraction, timeline.peak_activations,
                                            strict=True)):
        print(f"{rank:<5d} {idle:6.1%}  {peak}")
    print(chart(timeline))
    print(f"({LEGEND}{'; PNG: ' + args.png if args.png else ''})")
    return 0


def _add_cluster_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster",
        help="write cluster descriptions from what the machines report",
        description="Cluster descriptions (the files a config's cluster: names) from the "
        "machines themselves; one action per job.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_cluster_detect_parser(actions)
    _add_cluster_probe_parser(actions)


def _add_cluster_detect_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "detect",
        help="this node's entry: its NICs (sysfs) and GPUs (NVML)",
        description="Detect this node's NICs from sysfs and its GPUs through NVML and print its "
        "entry of a cluster description, with notes on what was left out as comments; or write "
        "it to a cluster file that is checked to load.",
    )
    p.add_argument("--name", help="node name (default: the host name)")
    p.add_argument("--out", metavar="FILE",
                   help="write a cluster description file (named after FILE) with this node")
    p.add_argument("--append", action="store_true",
                   help="with --out: add this node to FILE (created if missing), or update the "
                   "entry of the same name (or split it out of a count: entry) with what was "
                   "detected, keeping what detect does not write or did not find; FILE is "
                   "rewritten without its comments")
    p.set_defaults(func=cmd_cluster_detect)


def cmd_cluster_detect(args: argparse.Namespace) -> int:
    import socket
    from pathlib import Path

    from orch.cluster.detect import detect_node
    from orch.cluster.write import render_cluster, write_node
    from orch.errors import ProblemsError

    problems: list[Problem] = []
    if args.name is not None and not args.name.strip():
        problems.append(Problem("--name", f"{args.name!r} is empty", "pass this node's name as "
                                "the description should list it, or leave --name out for the "
                                f"host name ({socket.gethostname()})"))
    if args.append and not args.out:
        problems.append(Problem("--append", "adds to the file given by --out", "add --out FILE"))
    if problems:
        raise ProblemsError(problems, title="invalid arguments")
    node = detect_node(args.name)
    if not args.out:
        print(render_cluster({"nodes": [node.entry]}, node), end="")
        return 0
    cluster, merged = write_node(Path(args.out), node, args.append)
    nodes = f"{len(cluster.nodes)} node" + ("" if len(cluster.nodes) == 1 else "s")
    print(f"wrote node {node.entry['name']} to {args.out}: cluster {cluster.name}, {nodes}, "
          f"{cluster.world_size} devices")
    for note in [*merged, *node.notes, *_unconnected_note(cluster)]:
        print(f"note: {note}")
    return 0


def _unconnected_note(cluster: ClusterSpec) -> list[str]:
    """A note when the nodes written so far share no network (one detected without a NIC whose
    speed it could read, or on another subnet): every plan over more than one of them would be
    refused, which the file itself does not say."""
    from orch.plan.topology import Topology

    if len(cluster.nodes) < 2 or Topology.from_cluster(cluster).network_link(
            range(len(cluster.nodes))).kind != "unreachable":
        return []
    bare = [n.name for n in cluster.nodes if not n.nics]
    why = f" (no NIC listed on {', '.join(bare)})" if bare else ""
    return [f"the {len(cluster.nodes)} nodes in the file share no network{why}: a plan over more "
            "than one node will be refused until they do; add each node's NICs by hand where "
            "detect could not (name, type, bandwidth_gbps, network)"]


PROBE_TIMEOUT_S = 120
"""How long a probing node waits for the others (``--timeout``): the probe is started by hand on
every node, so longer than a launch's workers need, yet far shorter than torch's 5 minutes."""


def _add_cluster_probe_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "probe",
        help="measure each network between the nodes; write the figures into the description",
        description="Run on every node of CLUSTER at once (one process each): for each network "
        "with two or more nodes, time point-to-point transfers and an all-reduce over that "
        "network's interfaces, print the figures, and (on the first node listed) write them "
        "into the description as measured_gbps per NIC, which the planner then uses.",
    )
    p.add_argument("cluster", help="cluster description YAML")
    p.add_argument("--master-addr", required=True,
                   help="address of the first node listed, where the rendezvous store runs")
    p.add_argument("--master-port", type=int, default=29510, help="its port (default 29510)")
    p.add_argument("--node-name", help="this machine's node (default: $ORCH_NODE, or the host "
                   "name)")
    p.add_argument("--mbytes", type=int, default=16, help="buffer size in MiB (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--timeout", type=int, default=PROBE_TIMEOUT_S, metavar="SECONDS",
                   help="how long each node waits for the others to join "
                   f"(default {PROBE_TIMEOUT_S})")
    p.add_argument("--out", metavar="FILE", help="write the measured description here "
                   "instead of over CLUSTER (which is rewritten without its comments)")
    p.set_defaults(func=cmd_cluster_probe)


def cmd_cluster_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orch.cluster.probe import probe, probe_problems, report, write_measurements
    from orch.launch.nodes import check_node, this_node
    from orch.plan.cluster import load_cluster

    cluster = load_cluster(args.cluster)
    problems: list[Problem] = []
    if args.mbytes < 1 or args.repeats < 1:
        problems.append(Problem("--mbytes/--repeats", f"{args.mbytes} MiB x {args.repeats}",
                                "use at least 1 of each"))
    if args.timeout < 1:
        problems.append(Problem("--timeout", f"{args.timeout} s", "pass at least 1 second"))
    node = this_node(cluster, args.node_name, problems)
    if node is not None:
        check_node(cluster, node, len(cluster.nodes), node.devices, problems)
    problems += probe_problems(cluster, args.cluster)
    if problems:
        raise PlanError(problems, title="cannot probe")
    assert node is not None
    nbytes = args.mbytes * 2**20
    figures = probe(cluster, node, args.master_addr, args.master_port, args.timeout, nbytes,
                    args.repeats)
    if figures is None:
        print(f"orch cluster probe: node {node.name} done")
        return 0
    print(report(figures, nbytes))
    out = Path(args.out or args.cluster)
    write_measurements(Path(args.cluster), figures, out)
    print(f"wrote measured_gbps to {out}")
    return 0


def _add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine for what each orch feature needs",
        description="Print versions, GPUs (memory, NVLink), NICs, free space at the NVMe path "
        "and, per feature, ok / fallback / MISSING with the fix. Exit 0 when nothing is "
        "missing (a machine without a GPU is healthy in CPU mode), 1 otherwise.",
    )
    p.add_argument("config", nargs="?", help="a run config: check its offload.nvme_path too")
    p.add_argument("--nvme-path", help="check this directory for the NVMe tier")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    import dataclasses

    from orch.doctor import examine, render

    nvme = args.nvme_path
    if args.config and not nvme:
        from orch.config import load_config

        nvme = load_config(args.config).offload.nvme_path or None
    report = examine(nvme)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=1))
    else:
        print(render(report))
    return 1 if report.missing else 0


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plots and a markdown summary of a run directory",
        description="Write loss, throughput and MFU, memory per rank, communication and "
        "pipeline timeline plots (PNG) and summary.md from RUN_DIR's metrics, plan and "
        "checkpoints, into RUN_DIR/report (or --out).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (run.dir)")
    p.add_argument("--out", help="directory for the report (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from orch.report import write_report

    files = write_report(args.run_dir, args.out)
    print(f"wrote {len(files)} files to {files[0].parent}: " + ", ".join(f.name for f in files))
    return 0


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
    _add_schedule_parser(sub)
    _add_cluster_parser(sub)
    add_ckpt_parser(sub)
    add_data_parser(sub)
    _add_doctor_parser(sub)
    _add_report_parser(sub)
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
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print(f"\norch {command}: stopped by SIGINT", file=sys.stderr)
        return 130  # as a shell reports a process ended by SIGINT
    except BrokenPipeError:  # the reader left (``orch ... --json | head``): stop, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # as a shell reports a process ended by SIGPIPE


def entry() -> NoReturn:
    """The ``orch`` command: :func:`main`, then an exit without Python's interpreter teardown.
    With torch imported that teardown (freeing every module, then torch's C++ statics) took 0.5
    to 1.5 s on 2 cores after the work was done and said: every ``orch launch`` paid it once
    its workers had finished. The atexit handlers still run (logging, temporary directories),
    and the output is flushed first. Python's normal exit stays where it has more to do: after
    an exception out of :func:`main` (a bug: its traceback), and while a thread the interpreter
    would wait for still runs (a non-daemon thread, an executor's workers)."""
    code = main()
    if any(thread is not threading.main_thread() and not thread.daemon
           for thread in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter's own exit would run first
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with the descriptor closed (``>&-``)
                stream.flush()
        except (OSError, ValueError):  # the reader left, the disk is full, the stream closed
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
