"""``orch launch [torchrun options] CONFIG [--set key=value ...] [--resume auto|none|PATH]``.

Reuses torchrun's own argument parser and runs ``torch.distributed.run`` in this process (as
torchtune does), so every torchrun option works: ``--nnodes``, ``--node-rank``, rendezvous,
``--max-restarts``, log redirection (but those that change what runs: see
``REFUSED_TORCHRUN_OPTIONS``). Before anything is spawned it loads the config, builds the
plan for ``nnodes x nproc-per-node`` devices, checks the run directory and the checkpoint to resume
from, and reports every problem at once. Workers run ``python -m orch.runtime.worker`` with the
same config and overrides, so each rebuilds the identical plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orch.config import Config, LoadedConfig, load_config_lenient
from orch.config.rules import renormalized_top1
from orch.config.schema import WORLD_DEGREES
from orch.errors import OrchError, PlanError, Problem, ProblemsError, reading
from orch.kernels.dispatch import kernel_choice_problem
from orch.launch.attempts import Attempts, consulted_on_restarts
from orch.launch.lifeline import mark_launcher
from orch.launch.nodes import NODE_ENV, NodeSettings, check_node, node_settings, this_node
from orch.launch.run_lock import run_dir_lock
from orch.launch.waiting import stopped_at_once
from orch.offload.sizes import aio_events_problem, aio_handles, async_io_may_load
from orch.offload.stale_scratch import stale_scratch_files
from orch.parallel.pipeline.rebalance import (
    REBALANCE_EXIT,
    apply_rebalance,
    rebalance_notice,
)
from orch.plan import Plan, build_plan
from orch.plan.cluster import ClusterSpec, NodeSpec, load_cluster
from orch.plan.degrees import Degrees
from orch.plan.memory import MEMORY_READS
from orch.plan.support import unsupported_features
from orch.runtime.checkpoint.files import CHECKPOINTS
from orch.runtime.checkpoint.resharding import adamw8bit_resharding_problems
from orch.runtime.optim import (
    checkpoint_peak_until,
    decay_change,
    decay_end,
    saved_decay_end,
    wsd_phases,
)
from orch.runtime.rank_log import LOGS

if TYPE_CHECKING:
    from orch.runtime.checkpoint.manifest import Manifest

WORKER_MODULE = "orch.runtime.worker"


class RunFailed(OrchError):
    """A worker failed after a valid launch: exit 1; or 2 where every failed worker stopped on
    bad input that only the workers could find (a checkpoint's bytes, which they hash), as a
    launch refused before start exits."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunStopped(OrchError):
    """The launcher was signalled (Ctrl-C, Slurm's SIGTERM before a time limit): exit 128 +
    the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, signal_name: str, number: int) -> None:
        super().__init__(f"stopped by {signal_name}: the workers were ended; --resume auto (the "
                         "default) continues from the newest complete checkpoint")
        self.exit_code = 128 + number


def worker_parser() -> argparse.ArgumentParser:
    """The options after CONFIG, shared by the launcher and the worker."""
    parser = argparse.ArgumentParser(prog="orch launch ... CONFIG", add_help=False)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", default=None, metavar="auto|none|PATH",
                        help="checkpoint to resume from (default: checkpoint.resume, 'auto')")
    parser.add_argument("--node-name", default=None, metavar="NAME",
                        help="this machine's node in the config's cluster description "
                        "(default: $ORCH_NODE, or the host name)")
    return parser


REFUSED_TORCHRUN_OPTIONS = {"run_path": "--run-path", "module": "-m/--module",
                            "no_python": "--no-python"}
"""torchrun options (by dest) that change what each process runs, which orch launch refuses:
it always runs its own worker. --run-path ran the worker's module name as a file and failed in
every worker (FileNotFoundError); -m and --no-python were accepted and ignored."""


def launch_parser() -> argparse.ArgumentParser:
    """torchrun's parser, with its positional arguments renamed to what orch launch takes."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "orch launch"
    parser.description = (
        "Start an orch training run: every torchrun option works; CONFIG is a run config, "
        "followed by --set key=value overrides and --resume auto|none|PATH."
    )
    for action in parser._actions:
        if action.dest == "training_script":
            action.metavar, action.help = "CONFIG", "run config YAML"
        elif action.dest == "training_script_args":
            action.metavar = "--set KEY=VALUE | --resume auto|none|PATH | --node-name NAME"
            action.help = ("config overrides (repeatable), the checkpoint to resume from, and "
                           "this machine's node in the cluster description")
        elif action.dest in REFUSED_TORCHRUN_OPTIONS:
            action.help = f"refused: orch launch runs its own worker ({WORKER_MODULE})"
        elif action.dest == "nproc_per_node":
            action.default = os.environ.get("PET_NPROC_PER_NODE")
            action.help = "processes per node (default: this node's devices in the cluster "
            action.help += "description, what the plan needs on one node, or the visible GPUs; "
            action.help += "1 on CPU when the degrees leave it open)"
    return parser


def device_name() -> str:
    """The catalog device for this machine's accelerator, or ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key, device in (("h200", "h200"), ("h100", "h100-sxm-80gb"), ("a100", "a100-80gb"),
                        ("4090", "rtx4090")):
        if key in name:
            return device
    return "h100-sxm-80gb"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, which Slurm's CPU binding, a
    cgroup cpuset or ``taskset`` narrow, rather than every core of the machine
    (``os.cpu_count``). Workers' OpenMP threads sized to the machine on a job given a share of
    it outnumber its cores and wait on each other's barriers: two such runs sharing 2 cores
    took 0.5-8.2 s a step where one thread each took 0.15."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _nnodes(value: str, problems: list[Problem]) -> int:
    """The number of nodes ``--nnodes`` fixes (1 where it is not usable, with the problem):
    orch plans for one world size, so torchrun's elastic ``MIN:MAX`` ranges, with which it waits
    for nodes that may never come, are refused."""
    from torch.distributed.run import parse_min_max_nnodes

    fix = "give the number of nodes, e.g. --nnodes 2"
    try:
        least, most = parse_min_max_nnodes(value)
    except (ValueError, AssertionError):
        problems.append(Problem("--nnodes", f"{value!r} is not a number of nodes", fix))
        return 1
    if least != most:
        problems.append(Problem("--nnodes", f"{value}: orch plans for one world size, not an "
                                "elastic range", fix))
    if most < 1:
        problems.append(Problem("--nnodes", f"must be at least 1, got {value}", fix))
        return 1
    return most


def _nproc_per_node(value: str | None, cfg: Config, nnodes: int, problems: list[Problem]) -> int:
    import torch

    if value is None:
        p = cfg.parallel
        if p.dp_shard != -1:  # the degrees fix the world size
            world = p.pp * p.dp_replicate * p.dp_shard * p.cp * p.tp
            if world % nnodes == 0:
                return world // nnodes
        return torch.cuda.device_count() or 1
    if value in ("gpu", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    if value in ("cpu", "auto"):
        return usable_cores()
    if value == "gpu":
        problems.append(Problem("--nproc-per-node", "gpu: this machine has no GPU that torch "
                                "can see", "pass a process count, or cpu (one per usable core); "
                                "orch doctor says what is missing"))
        return 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        problems.append(Problem("--nproc-per-node", f"{value!r} is not a positive number",
                                "pass a process count such as 2, or gpu / cpu / auto"))
    return max(count, 1)


def parse_launch(argv: Sequence[str]
                 ) -> tuple[argparse.Namespace, argparse.Namespace, LoadedConfig]:
    """torchrun's options, the options after CONFIG, and the config with its overrides, read
    leniently: its problems are reported with the plan's and the launch's, in one round."""
    parser = launch_parser()
    args = parser.parse_args(list(argv))
    after = worker_parser()
    extra, unknown = after.parse_known_args(args.training_script_args)
    if unknown:  # argparse's own message, and where a torchrun option given after CONFIG goes
        misplaced = [word for word in unknown if _torchrun_option(parser, word.split("=")[0])]
        after.error(f"unrecognized arguments: {' '.join(unknown)}" + (
            f" ({', '.join(misplaced)}: torchrun options go before CONFIG: orch launch "
            "[torchrun options] CONFIG [--set KEY=VALUE ...] [--resume ...])" if misplaced else ""))
    return args, extra, load_config_lenient(args.training_script, extra.overrides)


def _torchrun_option(parser: argparse.ArgumentParser, word: str) -> bool:
    """Whether ``word`` names one of torchrun's options (or abbreviates one, as argparse lets
    it before CONFIG); help is not one here: after CONFIG it asks for nothing."""
    helps = {option for action in parser._actions if isinstance(action, argparse._HelpAction)
             for option in action.option_strings}
    options = set(parser._option_string_actions) - helps
    return word in options or (word.startswith("--") and len(word) > 2
                               and any(option.startswith(word) for option in options))


def prepare(argv: Sequence[str]) -> tuple[argparse.Namespace, Config, Plan]:
    """Parse and validate everything; return torchrun's args rewritten to start the workers
    (with ``finished``: the checkpoint the run would resume when it is already at
    ``train.steps`` or ``run.stop_at_step``, else None; and ``resume``: ``--resume``, if
    given)."""
    # A new launch, before resolving its resume: kept by torchrun's restarts and our own reruns
    os.environ[LAUNCH_ID] = uuid.uuid4().hex
    args, extra, loaded = parse_launch(argv)
    problems = [Problem(option, "changes what each process runs, but orch launch always runs "
                        f"its own worker (python -m {WORKER_MODULE} CONFIG)",
                        f"leave {option} out (and PET_{dest.upper()} unset)")
                for dest, option in REFUSED_TORCHRUN_OPTIONS.items() if getattr(args, dest)]
    cfg = loaded.config
    max_nodes = _nnodes(args.nnodes, problems)
    cluster, node = _cluster_node(cfg, extra.node_name, problems)
    if node is not None and args.nproc_per_node is None:
        nproc = node.devices
    else:
        nproc = _nproc_per_node(args.nproc_per_node, cfg, max_nodes, problems)
    world = cluster.world_size if cluster is not None else max_nodes * nproc
    # what the checks given the world read through it: the cluster description, and the degrees
    # where neither it nor --nproc-per-node gave this node's processes
    world_reads = ("cluster", *(WORLD_DEGREES if node is None and args.nproc_per_node is None
                                else ()))
    if cluster is not None:
        check_node(cluster, node, max_nodes, nproc, problems, _visible_gpus())
    plan = None
    try:
        plan = launch_plan(cfg, world, nproc)
    except PlanError as exc:
        problems += [_explain_world(p, world, max_nodes, nproc, cfg.cluster)
                     for p in reading(exc.problems, world_reads)]
    problems += reading(unsupported_features(cfg, world), world_reads)
    problems += _check_data(cfg)
    problems += _check_eval(cfg)
    problems += reading(_check_nvme(cfg, plan), world_reads)
    init_from: list[Problem] = []  # reported unless the run resumes (its weights come from there)
    if cfg.model.init_from:
        from orch.models.hf_load import init_from_problems, text_data_problems

        init_from = init_from_problems(cfg.model) + text_data_problems(cfg.model, cfg.data)
        if cfg.eval.interval > 0 and cfg.eval.path:  # held-out text is byte-tokenized too
            from orch.runtime.data import read_like_data

            held_out = read_like_data(cfg.data, cfg.eval.path)
            init_from += text_data_problems(cfg.model, held_out, "eval.path")
    problems += _check_run_dir(Path(cfg.run.dir))
    problems += reading(_check_drill(cfg, world), world_reads)
    problems += _check_tensorboard(cfg)
    if (kernels := kernel_choice_problem()) is not None:
        problems.append(kernels)
    args.finished, args.resume, args.decay_note = None, extra.resume, None
    # with problems, whether the run resumes is not known, and init_from's are told too
    if not problems and not loaded.problems:
        assert plan is not None
        refused, resumed, args.finished = _check_resume(cfg, plan, extra.resume)
        problems += refused
        if resumed:
            from orch.runtime.checkpoint.manifest import read_manifest

            init_from = []
            manifest = read_manifest(resumed)
            problems += _check_drill(cfg, world, manifest.step)
            args.decay_note = decay_change(manifest.config.get("train") or {}, cfg.train,
                                           manifest.step)
    problems += init_from
    loaded.check(problems, "cannot launch")  # the config's problems and these, in one round
    assert plan is not None
    if cluster is not None and node is not None:
        settings = node_settings(cluster, plan, node, backend())
        os.environ.update(settings.env)  # the workers inherit it through torchrun
        print(settings.describe(), flush=True)
        if (local := local_address(args, settings)) is not None:
            args.local_addr = local
            print(f"orch launch: --local-addr {local} (node {node.name}'s address on the "
                  "network every node shares)", flush=True)
    args.nproc_per_node = str(nproc)
    planned = (f"the cluster description's {world} processes" if cluster is not None
               else f"--nnodes {max_nodes} x --nproc-per-node {nproc} = {world} processes")
    os.environ[PLANNED_WORLD] = f"{world} {nproc} {planned} ({nproc} on this node)"
    # torchrun would set 1 and warn; share this node's cores between its workers instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
    args.module, args.no_python = True, False
    resume = ["--resume", extra.resume] if extra.resume else []
    sets = [f"--set={item}" for item in extra.overrides]
    args.training_script_args = [str(args.training_script), *sets, *resume]
    args.training_script = WORKER_MODULE
    return args, cfg, plan


def local_address(args: argparse.Namespace, settings: NodeSettings) -> str | None:
    """The ``--local-addr`` torchrun gets where the user gave none: under a dynamic (c10d)
    rendezvous torch hands the workers the rank-0 agent's ``--local-addr``, else its host
    name, and a head whose name resolves to loopback (Debian's ``127.0.1.1 hostname``) sent the
    other nodes' workers to their own loopback for 30 minutes. The cluster description names
    this node's interface on the network every node shares: its address is reachable."""
    if args.local_addr or args.rdzv_backend == "static":
        return None
    return settings.address


PLANNED_WORLD = "ORCH_PLANNED_WORLD"
"""The world the launcher validated, which its workers inherit: ``WORLD NPROC DESCRIPTION``."""


LAUNCH_ID = "ORCH_LAUNCH_ID"
"""One id per ``orch launch``, which its workers inherit through every restart (torchrun's
``--max-restarts``, a re-partitioned pipeline's rerun) and record in the checkpoints they save:
a restart resumes from its own launch's newest, not from ``--resume PATH`` or ``none`` again.
On several nodes rank 0's node's id counts (rank 0 finds and writes the checkpoints)."""


def planned_world_problem(world: int, local_world: int) -> str | None:
    """What is wrong where torchrun gave this worker another world (``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``) than its launcher planned and validated; None where it is the same,
    or where no orch launch started the worker.

    Nodes started with different --nnodes or --nproc-per-node each validate their own plan, but
    torchrun forms one world: a node given --nnodes 4 beside nodes given 2 showed a plan for 4
    while its workers trained as ranks of 2, and different --nproc-per-node failed on the plan
    of an odd world, naming global_batch."""
    if not (value := os.environ.get(PLANNED_WORLD)):
        return None
    planned, nproc, description = value.split(" ", 2)
    if (int(planned), int(nproc)) == (world, local_world):
        return None
    return str(Problem(
        "--nnodes, --nproc-per-node",
        f"this node's launcher planned {description}, but torchrun started {world} processes "
        f"({local_world} on this node): the nodes were given different --nnodes or "
        "--nproc-per-node",
        "give every node the same --nnodes and --nproc-per-node (under a cluster description, "
        "--nproc-per-node as its node's devices)"))


CPU_BF16 = "ORCH_CPU_BF16"
"""Set to 1 to keep ``train.precision: bf16`` on CPU, which runs the bf16 paths (FSDP's mixed
precision, bf16 activations between pipeline stages, the offload engine's bf16 copies) without
a GPU; the tests use it."""


def run_precision(cfg: Config, device: str) -> str:
    """The precision a run on ``device`` (:func:`device_name`) computes in: bf16 falls back to
    fp32 on CPU (CPU training here is for tests and small runs, where fp32 is the reference)
    unless ``ORCH_CPU_BF16=1`` asks for it."""
    if cfg.train.precision == "bf16" and device == "cpu" and os.environ.get(CPU_BF16) != "1":
        return "fp32"
    return cfg.train.precision


def launch_plan(cfg: Config, world: int, nproc: int) -> Plan:
    """The plan the launcher validates and every worker rebuilds: for ``world`` processes,
    ``nproc`` a node of this machine's device, or with a cluster description for its nodes and
    devices (which fix all three, so that every node plans alike whatever its own device: an
    A100 node and an H200 node of one job planned different node orders and splits); with the
    stage layers of the run directory's pipeline re-partition, when it had one; for the
    precision the run computes in (:func:`run_precision`: the offload engine's device copies
    are in it)."""
    cfg = apply_rebalance(cfg)
    device = _described_device(cfg.cluster) if cfg.cluster else device_name()
    if (precision := run_precision(cfg, device)) != cfg.train.precision:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    if cfg.cluster:
        return build_plan(cfg)
    return build_plan(cfg, world, nproc, device)


def _described_device(cluster: str) -> str:
    """``cpu`` where every node of the description computes on the CPU (bf16 then falls back
    as on one CPU machine), else the name of the first node's device; "" for a description
    that does not load (the plan reports why)."""
    try:
        nodes = load_cluster(cluster).nodes
    except OrchError:
        return ""
    return "cpu" if all(node.device.name == "cpu" for node in nodes) else nodes[0].device.name


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def backend() -> str:
    """The process-group backend the workers use."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _cluster_node(cfg: Config, given: str | None, problems: list[Problem]
                  ) -> tuple[ClusterSpec | None, NodeSpec | None]:
    """The config's cluster description and this machine's node in it (``None`` for each
    without one; a description that does not load is the plan's problem to report)."""
    if not cfg.cluster:
        if given:
            problems.append(Problem("--node-name", f"{given!r} given, but the config names no "
                                    "cluster description", "set cluster: in the config, or "
                                    "leave --node-name out", ("cluster",)))
        return None, None
    try:
        cluster = load_cluster(cfg.cluster)
    except OrchError:
        return None, None
    return cluster, this_node(cluster, given, problems, after="CONFIG")


def _explain_world(problem: Problem, world: int, nodes: int, nproc: int, cluster: str
                   ) -> Problem:
    """Plan problems about the world size point at what set it: the launch options, or the
    cluster description (whose nodes may differ in size, and which the options must match)."""
    if "world size" not in problem.message:
        return problem
    if cluster:
        return dataclasses.replace(problem, message=f"{problem.message} (the {world} devices "
                                   f"of cluster {cluster})",
                                   fix=problem.fix + ", or edit the cluster description")
    return dataclasses.replace(problem, message=f"{problem.message} (--nnodes {nodes} x "
                               f"--nproc-per-node {nproc} = {world} processes)",
                               fix=problem.fix + ", or --nproc-per-node")


def _check_data(cfg: Config) -> list[Problem]:
    """The data file's existence, format and size (enough tokens for a global batch, from its
    size or header; each ``data.blend`` file's, every one said); the shipped corpus is small
    enough to load whole (its ids are checked against the vocabulary too). Workers scan a user
    file's ids, which may be many GB."""
    from orch.runtime.blend import check_blended_file
    from orch.runtime.data import (
        DataError,
        check_token_count,
        every_blended,
        held_out_start,
        load_tokens,
        token_count,
    )

    if cfg.data.blend:
        return every_blended(cfg.data, lambda one: check_blended_file(one, cfg.train.seq_len))[1]
    try:
        if cfg.data.path:
            count = token_count(cfg.data)
        else:
            count = len(load_tokens(cfg.data, cfg.model.vocab_size))
        if count is not None:
            check_token_count(held_out_start(count, cfg.data.holdout), cfg.train.global_batch,
                              cfg.train.seq_len)
    except DataError as exc:
        return [exc.problem]
    return []


def _check_eval(cfg: Config) -> list[Problem]:
    """The held-out file (``eval.path``) as the data file is checked, and its size against
    ``eval.batches`` (:func:`orch.runtime.evaluation.eval_file_problems`)."""
    from orch.runtime.evaluation import eval_file_problems

    return eval_file_problems(cfg)


def _check_nvme(cfg: Config, plan: Plan | None) -> list[Problem]:
    """An NVMe tier's directory: it exists, takes files, and has room for what the plan puts
    there (``plan.memory.nvme`` bytes per rank, times the ranks on this node)."""
    off = cfg.offload
    if not off.nvme_path or "nvme" not in (off.params, off.grads, off.optimizer, off.activations):
        return []
    path = Path(off.nvme_path)
    if not path.is_dir():
        return [Problem("offload.nvme_path", f"{off.nvme_path!r} is not a directory",
                        "create it on an SSD, or point offload.nvme_path at one")]
    if not os.access(path, os.W_OK | os.X_OK):
        return [Problem("offload.nvme_path", f"{off.nvme_path!r} is not writable",
                        "choose a directory this user can write")]
    if plan is None:
        return []
    problems = []
    if async_io_may_load():
        # the handles every rank on this node opens over the run (DeepSpeed's op's, one a
        # thread); the O_DIRECT fallback, where the op cannot load, needs no AIO events
        handles = aio_handles(off.params, off.grads, off.optimizer, off.activations)
        if (events := aio_events_problem(off.io_queue_depth, off.io_threads,
                                         handles * plan.gpus_per_node)) is not None:
            problems.append(events)
    need = plan.memory.nvme * plan.gpus_per_node
    # Named scratch files an older orch's killed run left, of the ranks this run has: its
    # workers remove those before they write their own (this version's have no name and go with
    # their process). On one node every rank is here; across nodes, which land here is settled
    # only at rendezvous, so none are counted.
    ranks = range(plan.world_size) if plan.nodes == 1 else range(0)
    stale = sum(f.stat().st_blocks * 512 for rank in ranks
                for f in stale_scratch_files(path, rank) if f.exists())
    free = shutil.disk_usage(path).free + stale
    if free < need:
        left = f" (with {stale:,} of a killed run's scratch files, removed at start)" if stale \
            else ""
        problems.append(Problem(
            "offload.nvme_path", f"{off.nvme_path!r} has {free:,} bytes free{left}; the plan "
            f"puts {need:,} bytes there ({plan.memory.nvme:,} per rank, {plan.gpus_per_node} on "
            "a node)", "free space, choose a larger disk, or keep more groups on cpu",
            MEMORY_READS))
    return problems


def _check_drill(cfg: Config, world: int, resumed_at: int = 0) -> list[Problem]:
    """A fault drill in the environment (``ORCH_DRILL``) must parse, and be one this run can
    fire (a rank it has, a step it runs, a save it makes, after ``resumed_at``, the step of
    the checkpoint it resumes), before workers start: one that cannot fire ran the job through
    and showed nothing."""
    from orch.runtime.drills import DRILL_ENV, parse_drill

    if not (text := os.environ.get(DRILL_ENV)):
        return []
    try:
        drill = parse_drill(text)
    except ProblemsError as exc:
        return exc.problems
    last, interval = _last_step(cfg), cfg.checkpoint.interval
    steps = ("run.stop_at_step", "train.steps")  # what _last_step reads
    whys: list[str] = []
    reads: list[str] = []
    if drill.rank >= world:
        whys.append(f"rank {drill.rank} is not one of this run's {world}")
    if drill.step > last:
        whys.append(f"step {drill.step} is after the run's last, {last}")
        reads += steps
    elif drill.step <= resumed_at:
        whys.append(f"the run resumes after step {drill.step}, from its checkpoint of step "
                    f"{resumed_at}")
        reads += steps
    elif drill.during == "save" and drill.step != last and not (
            interval and drill.step % interval == 0):
        whys.append(f"no checkpoint is saved at step {drill.step} (checkpoint.interval="
                    f"{interval}, last step {last})")
        reads += [*steps, "checkpoint.interval"]
    if not whys:
        return []
    return [Problem(DRILL_ENV, f"{text!r} would never fire: {'; '.join(whys)}",
                    "choose a rank, step and save this run has, or unset it", tuple(reads))]


def _check_tensorboard(cfg: Config) -> list[Problem]:
    """``run.tensorboard`` needs the tensorboard package, which orch does not require."""
    if not cfg.run.tensorboard:
        return []
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return [Problem("run.tensorboard", "true, but the tensorboard package is not installed",
                        "pip install tensorboard, or set run.tensorboard: false")]
    return []


RUN_DIR_ENTRIES = {CHECKPOINTS: True, LOGS: True, "metrics.jsonl": False, "plan.json": False,
                   "config.yaml": False}
"""What a run writes in its directory: name -> a directory (else a file)."""


def _check_run_dir(run_dir: Path) -> list[Problem]:
    """The run directory takes files, or can be made (not here: a refused launch leaves
    nothing behind; :func:`launch` makes it), and what the run writes there has the right kind
    where it exists (a file named ``checkpoints`` failed the first save, steps in). The test
    file's name is this process's own: every node's launcher checks the same shared directory
    at about the same time, and with one name for all, one launcher's unlink removed the file
    another had just written, which then failed as "not writable (No such file or directory)"
    while the other nodes waited for it in the rendezvous."""
    fix = "choose a writable directory with --set run.dir=PATH"
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        return [Problem("run.dir", f"{str(run_dir)!r}: {str(existing)!r} is a file", fix)]
    if existing != run_dir:
        if not os.access(existing, os.W_OK | os.X_OK):
            return [Problem("run.dir", f"{str(run_dir)!r} cannot be made: {str(existing)!r} "
                            "is not writable", fix)]
        return []
    try:
        fd, probe = tempfile.mkstemp(prefix=".orch-write-test-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return [Problem("run.dir", f"{str(run_dir)!r} is not writable ({exc.strerror})", fix)]
    return [Problem("run.dir", f"{str(run_dir / name)!r} is a "
                    f"{'file' if is_dir else 'directory'}, where the run writes its "
                    f"{'directory' if is_dir else 'file'} {name}",
                    "move it out of the way, or choose another run.dir")
            for name, is_dir in RUN_DIR_ENTRIES.items()
            if (run_dir / name).exists() and (run_dir / name).is_dir() != is_dir]


def _last_step(cfg: Config) -> int:
    """The step this launch trains up to: ``run.stop_at_step`` when set, else ``train.steps``."""
    return cfg.run.stop_at_step or cfg.train.steps


def _check_resume(cfg: Config, plan: Plan,
                  resume: str | None) -> tuple[list[Problem], Path | None, Path | None]:
    """Refuse another config's checkpoints and verify the one to resume, loading nothing; the
    checkpoint the run resumes (None when it starts afresh), and that checkpoint again when it
    is already at ``train.steps`` (or ``run.stop_at_step``) and intact (nothing to train)."""
    from orch.runtime.checkpoint import CheckpointError, CheckpointManager
    from orch.runtime.checkpoint.manifest import read_manifest

    if resume is not None and not resume.strip():  # was taken for auto
        return [Problem("--resume", "is empty", "give auto, none, or a checkpoint directory")
                ], None, None
    manager = CheckpointManager(Path(cfg.run.dir), cfg, plan.to_dict(with_groups=False), 0, 1,
                                os.environ.get(LAUNCH_ID))
    try:
        # Sizes and the index here (cheap); the workers hash every file, split among them.
        path = manager.resolve_resume(resume or cfg.checkpoint.resume, hashes=False,
                                      report=False)
    except CheckpointError as exc:
        return [Problem("--resume" if resume else "checkpoint.resume", str(exc), "")], None, None
    if path is None:
        return [], None, None
    manifest = read_manifest(path)
    if manifest.step > cfg.train.steps:
        return [Problem("train.steps", f"{cfg.train.steps} is below step {manifest.step} of the "
                        f"checkpoint the run resumes ({path})",
                        f"set train.steps above {manifest.step} to train further; --resume PATH "
                        "for an earlier checkpoint, or --resume none to start over (the "
                        "checkpoints are moved aside, not deleted)")], path, None
    # at train.steps (or past run.stop_at_step): nothing to train, once every byte is as saved
    # (a damaged one sends the workers back to an earlier checkpoint, which they hash and say)
    finished = manifest.step >= _last_step(cfg) and not manager.verify(path)
    return resume_problems(cfg, plan.degrees, path), path, path if finished else None


def resume_problems(cfg: Config, degrees: Degrees, path: Path,
                    source: dict[str, Any] | None = None) -> list[Problem]:
    """What stops the checkpoint at ``path`` from resuming under ``cfg`` and ``degrees``
    beyond its config fingerprint: AdamW8bit states that cannot reshard onto the degrees, and
    a data file that is not the one it was trained on. The launcher asks of the checkpoint it
    checks by sizes, the workers of the one they resume after hashing (an older one when the
    newest is damaged; a newer one after a restart). ``source``: the data file's identity,
    where the caller has it already (read here otherwise)."""
    from orch.runtime.checkpoint.manifest import read_manifest
    from orch.runtime.data import source_change, source_identity

    manifest = read_manifest(path)
    problems = adamw8bit_resharding_problems(cfg, degrees, path,
                                             manifest.plan.get("degrees", {}))
    saved = manifest.data.get("source") if isinstance(manifest.data, dict) else None
    if changed := source_change(saved, source or source_identity(cfg.data), cfg.data):
        problems.append(changed)
    return problems


def launch(argv: Sequence[str]) -> int:
    """Validate, then run torchrun in this process; 0 when every worker succeeded."""
    from torch.distributed.run import parse_min_max_nnodes

    args, cfg, plan = prepare(argv)
    if args.finished is not None:  # loading it onto every device would train nothing
        from orch.runtime.checkpoint import read_manifest

        stop = cfg.run.stop_at_step
        until = f"run.stop_at_step={stop}" if stop else f"train.steps={cfg.train.steps}"
        where = "at" if read_manifest(args.finished).step == _last_step(cfg) else "past"
        print(f"orch launch: nothing to train: {args.finished} is {where} {until}", flush=True)
        print(summary(cfg, args.resume, args.finished), flush=True)
        return 0
    run_dir = Path(cfg.run.dir)
    mark_launcher()  # the workers end with this process, even if it is killed outright
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(run_dir, _lock_name(args, cfg)):
        print(f"orch launch: {plan.device_summary}, {plan.degrees.short(plan.schedule)}, "
              f"run dir {cfg.run.dir}", flush=True)
        for note in start_notes(cfg, plan, args.decay_note):
            print(note, flush=True)
        if (nodes := parse_min_max_nnodes(args.nnodes)[1]) > 1:  # else silent until all joined
            print(waiting_line(args, nodes), flush=True)
            if (warning := rendezvous_host_warning(args)) is not None:
                print(warning, flush=True)
            host_c10d_store(args)
        with stopped_at_once():  # until torchrun's own handlers, while the nodes meet
            _run_workers(args, cfg, plan, run_dir)
    print(summary(cfg, args.resume), flush=True)
    return 0


def _run_workers(args: argparse.Namespace, cfg: Config, plan: Plan, run_dir: Path) -> None:
    """torchrun, again after each re-partition of the pipeline; RunStopped, RunFailed."""
    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_min_max_nnodes, run

    attempts = Attempts(run_dir, _node_name(args), parse_min_max_nnodes(args.nnodes)[1],
                        args.max_restarts)
    torch_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    filters = (attempts.forced, _QuietRepartitionExit())  # on torchrun's log for this run only
    for each in filters:
        torch_log.addFilter(each)
    try:
        while True:
            attempts.start()
            args.max_restarts = attempts.restarts_left
            try:
                with consulted_on_restarts(attempts.restart):
                    run(args)
                return
            except SignalException as exc:  # torchrun has ended the workers; no traceback
                raise RunStopped(exc.sigval.name, int(exc.sigval)) from None
            # ~230 lines of traceback before; DistNetworkError: a node whose node 0 never came
            # (static rendezvous: its store client timed out connecting, 90 lines)
            except (RendezvousError, DistStoreError, DistNetworkError) as exc:
                raise RunFailed(_rendezvous_failure(args, exc)) from None
            except ChildFailedError as exc:
                if not attempts.repartitioned(exc.failures):
                    code = attempts.final(exc.failures)
                    raise RunFailed(f"{len(exc.failures)} worker(s) failed (above)",
                                    code) from None
            plan = launch_plan(cfg, plan.world_size, int(args.nproc_per_node))
            print(f"orch launch: restarting on the re-partitioned pipeline "
                  f"({'/'.join(map(str, plan.layers_per_stage))} layers per stage)", flush=True)
    finally:
        for each in filters:
            torch_log.removeFilter(each)


class _QuietRepartitionExit(logging.Filter):
    """torchrun logs a worker's exit as a failure, with its pid and binary (an "E" line between
    orch's own); an exit with ``REBALANCE_EXIT`` is the restart orch asked for, which the
    launcher says itself, so that line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"(exitcode: {REBALANCE_EXIT})" not in record.getMessage()


def start_notes(cfg: Config, plan: Plan, decay_note: str | None) -> list[str]:
    """The lines a launch prints under its first: what the plan warns of, the re-partition's
    notice, a wsd schedule's phases, how a resume changes the lr decay, a routing that trains
    its router on the balancing loss alone."""
    routing = renormalized_top1(cfg.model)
    phases = cfg.train.lr_schedule == "wsd" and f"orch launch: {wsd_phases(cfg.train)}"
    return [note for note in (
        memory_warning(plan), rebalance_notice(cfg), phases,
        decay_note and f"orch launch: {decay_note}",
        routing and f"orch launch: warning: {routing}") if note]


def memory_warning(plan: Plan) -> str | None:
    """What the launch says when the plan's memory estimate per rank is over the device's
    usable memory: a warning, not a refusal, since the estimate is a model (``orch plan``)."""
    if plan.fits:
        return None
    from orch.plan.render import gib

    return (f"orch launch: warning: the plan estimates {gib(plan.memory.total)} per rank, over "
            f"the {gib(plan.memory_limit_bytes)} usable; the run may run out of memory "
            f"(orch plan CONFIG --world-size {plan.world_size} --auto lists plans that fit)")


def _lock_name(args: argparse.Namespace, cfg: Config) -> str:
    """Whose launch lock this is: with a cluster description the node's name alone (it fixes
    the node's ranks: two launches claiming one node both took its ranks and hung in the
    rendezvous), else the host and node rank."""
    return _node_name(args) if cfg.cluster else f"{_node_name(args)}-{args.node_rank}"


def _node_name(args: argparse.Namespace) -> str:
    """This machine's name in reports: its node in the cluster description, else the host."""
    extra = worker_parser().parse_known_args(args.training_script_args)[0]
    return extra.node_name or os.environ.get(NODE_ENV) or socket.gethostname()


def waiting_line(args: argparse.Namespace, nodes: int) -> str:
    """What a node says while it waits for the others (else silent until all joined)."""
    endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
    static = args.rdzv_backend == "static" and not args.rdzv_endpoint
    # a dynamic rendezvous numbers the nodes as they join: this one has no rank yet (every node
    # said "node 0")
    who = (f"node {args.node_rank} of {nodes}" if static else
           f"this node (one of {nodes}, numbered as they join)")
    return (f"orch launch: {who} waits at {endpoint} for the others (the same command on each "
            f"node{' with its --node-rank' if static else ''}); torchrun gives up after its "
            "rendezvous timeout")


def rendezvous_host_warning(args: argparse.Namespace) -> str | None:
    """Under torchrun's static rendezvous node 0 hosts it at ``--master-addr``: a node 0 for
    which that is another machine's address waited in silence (nodes given swapped ranks, or
    two nodes both rank 0), so it is said. Only node 0 can tell: a node on the same host as
    node 0 may rightly be another rank."""
    if args.rdzv_endpoint or args.rdzv_backend != "static" or args.node_rank != 0:
        return None
    if _is_this_machine(args.master_addr):
        return None
    return (f"orch launch: warning: --node-rank 0 hosts the rendezvous, but --master-addr "
            f"{args.master_addr} is not an address of this machine: the other nodes will look "
            "for node 0 there (give node 0 its own address as --master-addr on every node, or "
            "--node-rank 0 to the machine that has it)")


def host_c10d_store(args: argparse.Namespace) -> None:
    """Under a c10d rendezvous the endpoint's machine hosts its store, but torch knows that
    machine by its host name and the addresses that resolves to: given one of the head's own
    IP addresses that the name does not resolve to (Debian's ``127.0.1.1 hostname``, a second
    NIC), no node hosted it, and every node failed after ~100 s with "could not meet". So the
    machine the endpoint is an address of, where torch would not host and the user did not
    say (``is_host`` in ``--rdzv-conf``), hosts it (``is_host=1``); unless the port is taken
    there already (another launcher of the job on the same machine hosts it: with ``is_host``
    set, torch does not fall back to joining as a client)."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import DEFAULT_PORT
    from torch.distributed.elastic.rendezvous.utils import (
        _matches_machine_hostname,
        _parse_rendezvous_config,
        parse_rendezvous_endpoint,
    )

    if args.rdzv_backend != "c10d" or not args.rdzv_endpoint:
        return
    if "is_host" in _parse_rendezvous_config(args.rdzv_conf or ""):
        return
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=DEFAULT_PORT)
    if _matches_machine_hostname(host) or not _is_this_machine(host) or not _port_free(host,
                                                                                        port):
        return
    args.rdzv_conf = ",".join(filter(None, (args.rdzv_conf, "is_host=1")))


def _port_free(host: str, port: int) -> bool:
    """Whether a TCP server could listen on ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


def _is_this_machine(host: str) -> bool:
    """Whether ``host`` resolves to an address of this machine (one a socket can bind)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
                return True
            except OSError:
                continue
    return False


def _rendezvous_failure(args: argparse.Namespace, exc: Exception) -> str:
    """One line for a rendezvous that could not form: where it was, torchrun's reason (its
    first line), and what to check."""
    endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if args.rdzv_backend == "static":
        check = ("the address is node 0's, reachable from this node, that its launcher runs, "
                 "and that every node has the same --nnodes and its own --node-rank")
    else:  # the nodes are numbered as they join: a --node-rank is no one's concern
        check = ("the address is one of the nodes' (the one that hosts the store), reachable "
                 "from this node, that its launcher runs, and that every node has the same "
                 "--nnodes and --rdzv-id")
    return (f"the nodes could not meet at {endpoint} ({type(exc).__name__}: {reason}); fix: "
            f"check that {check}")


def summary(cfg: Config, resume: str | None = None, finished: Path | None = None) -> str:
    """Where a finished run left its results, and how to go on from its last checkpoint.

    That checkpoint is the run directory's newest, or ``finished``, the one a launch found
    nothing to train after (taken with ``--resume PATH``, it may be another run's, and this run
    directory may hold nothing yet). ``resume`` is the launch's ``--resume`` (None when not
    given: ``checkpoint.resume``); once this run directory holds checkpoints of its own, a next
    launch with a path or ``none`` there would start from that path or from scratch again, so
    the hints say to take ``auto`` instead.
    """
    from orch.runtime.checkpoint import CHECKPOINTS, CheckpointManager, read_manifest
    from orch.runtime.checkpoint.files import of_run

    run_dir = Path(cfg.run.dir)
    kept = CheckpointManager(run_dir, cfg, {}).own()  # this config's, oldest first
    newest = finished or (kept[-1].path if kept else None)
    manifest = read_manifest(newest) if newest else None
    step = manifest.step if manifest else 0
    own = newest is not None and of_run(newest, run_dir)
    lines = [f"orch launch: done at step {step} of {cfg.train.steps}"]
    for name, path in (("metrics", run_dir / "metrics.jsonl"),
                       ("checkpoints", run_dir / CHECKPOINTS)):
        if path.exists():  # a launch that trained nothing may have written neither
            lines.append(f"  {name:<12} {path}")
    if newest is not None and not own:
        lines.append(f"  checkpoint   {newest}")
    mode = resume or cfg.checkpoint.resume
    switch = "" if mode == "auto" or not own else (
        f", with --resume auto in place of --resume {mode}" if resume
        else f", with --set checkpoint.resume=auto in place of {mode}")
    if step < cfg.train.steps:
        without = " without run.stop_at_step" if cfg.run.stop_at_step else ""
        lines.append(f"  to resume, run the same command{without}{switch}: it continues from the "
                     "newest checkpoint")
    else:
        # the decay the checkpoint was trained under (this launch may have changed it)
        saved = (manifest.config.get("train") or {}) if manifest else {}
        end = saved_decay_end(saved) or decay_end(cfg.train)
        keep = ("" if cfg.train.lr_schedule == "constant" or cfg.train.decay_steps else
                f"; the lr decay then ends at step N, unless --set "
                f"train.decay_steps={end} keeps this run's")
        lines.append(f"  to train further, run it again with --set train.steps=N (N > {step})"
                     f"{switch}{keep}")
    if cfg.train.lr_schedule == "wsd":
        lines += _stable_phase_hint(kept, cfg, manifest, _resumed_manifest(resume))
    return "\n".join(lines)


def _resumed_manifest(resume: str | None) -> Manifest | None:
    """The manifest of the checkpoint ``--resume PATH`` named (None for auto, none, or one that
    cannot be read: the launch said why already)."""
    from orch.runtime.checkpoint.manifest import CheckpointError, read_manifest

    if resume in (None, "auto", "none"):
        return None
    try:
        return read_manifest(Path(resume))
    except CheckpointError:
        return None


def _stable_phase_hint(own: list[Manifest], cfg: Config, manifest: Manifest | None,
                       resumed: Manifest | None) -> list[str]:
    """Where a ``wsd`` run that has begun its cooldown can go on at the peak lr: from one of its
    checkpoints (``own``: the run directory's of this config, oldest first; ``manifest``: the
    newest's, maybe another run's; ``resumed``: the one ``--resume PATH`` named) of the stable
    phase (what the schedule is for), into a new run directory, where ``--resume auto`` will not
    take the cooled-down checkpoints for newer progress. None where the run is still in its
    stable phase (or has no checkpoint, or no step at the peak).

    Each manifest records the last step its weights trained at the peak across the resumes
    that led to it (``Manifest.lr``, ``orch.runtime.optim.peak_until``): a resume may have moved
    the cooldown later (a run stopped inside it went on with more train.cooldown_steps or
    train.steps), and retention may have removed the checkpoints that showed the first one
    (seen: step 30 named as at the peak, though steps 21-25 had cooled its weights, once steps
    20 and 25 were gone). The stable phase ended at the earliest such step, and the checkpoints
    of it are those whose history never left the peak."""
    if manifest is None:
        return []
    candidates = [*own, *([resumed] if resumed is not None else [])]
    peaks = {m.path: checkpoint_peak_until(m, cfg.train) for m in (*candidates, manifest)}
    last = min((peak for peak in peaks.values() if peak is not None), default=None)
    if not last:  # still stable, or cooling down from step 1 (no warmup, no stable phase)
        return []
    stable = sorted((m for m in candidates if peaks[m.path] is None), key=lambda m: m.step)
    source = (f"--resume {stable[-1].path}" if stable else "none is kept here "
              "(checkpoint.keep_every keeps some)")
    return [f"  to go on at the peak lr instead (the stable phase ended at step {last}), resume "
            f"a checkpoint of it into a new run.dir with more train.steps: {source}"]


__all__ = ["LAUNCH_ID", "PLANNED_WORLD", "backend", "launch", "launch_parser", "launch_plan",
           "planned_world_problem", "prepare", "worker_parser"]
