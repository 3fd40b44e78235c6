"""Pipeline stages re-partitioned by their measured speed (Holmes' self-adapting partition).

The plan starts each stage with the layers that even out their FLOPs over its devices' estimated
speed (``orch.plan.plan``); what a stage really does shows only in the run: a slower node, a
busier host, an embedding or head that costs more than its FLOPs say. With
``parallel.pp_rebalance_threshold`` set, global rank 0 sums each rank's compute (the executor's
measured F, B, I and W actions) over ``parallel.pp_rebalance_steps`` logged steps after the
first, and their idle time with the part of it spent waiting for transfers
(:func:`~orch.parallel.pipeline.timeline.exposed_transfers`); when the slowest rank's compute
exceeds the fastest's by more than the threshold, it proposes the plan's split by FLOPs
(:func:`~orch.plan.placement.balanced_split`) at each rank's measured speed: its layers' FLOPs,
and the output head's on the last stage, per measured second (so a last stage slow only because
of its head is not taken for a slow device). If that differs from the current split, every rank
saves a checkpoint, rank 0 writes ``RUN_DIR/rebalance.json`` (the step, the split, compute, idle
and transfer seconds per stage before, and the split after) and the workers exit with
:data:`REBALANCE_EXIT`; the launcher starts them again (as torchrun would with
``--max-restarts``), and every plan built for the run directory from then on, the launcher's and
the workers', takes its stage layers from the file (:func:`apply_rebalance`), resuming from that
checkpoint on the new split. After the restart, the same measurement is written into the file as
``after`` and printed beside ``before``; a run re-partitions once (a second split from noisier
figures could undo the first).

Only plain pipelines (one stage per rank) are re-partitioned: with virtual stages each rank's
layers are spread over several chunks, and the measured time of a chunk is not separable here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from orch.config.schema import Config
from orch.errors import PlanError, Problem
from orch.parallel.pipeline.timeline import exposed_transfers
from orch.parallel.schedules.simulate import Timeline
from orch.plan.placement import balanced_split
from orch.plan.plan import layer_work

REBALANCE_FILE = "rebalance.json"
REBALANCE_EXIT = 75
"""Workers' exit code after a re-partition's checkpoint (EX_TEMPFAIL: run again)."""


def compute_seconds(timeline: Timeline) -> list[float]:
    """Each pipeline rank's busy time in a measured step."""
    return [sum(span.end - span.start for span in rank) for rank in timeline.spans]


@dataclass
class StageMeter:
    """Each pipeline rank's compute summed over measured steps."""

    compute: list[float] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)
    """Per rank, the step's time outside its compute: waits for transfers and the bubble."""
    transfer: list[float] = field(default_factory=list)
    """Per rank, the part of ``idle`` spent waiting for bytes whose producer had finished."""
    steps: int = 0

    def add(self, timeline: Timeline) -> None:
        busy = compute_seconds(timeline)
        idle = [timeline.makespan - seconds for seconds in busy]
        self.compute = _summed(self.compute, busy)
        self.idle = _summed(self.idle, idle)
        self.transfer = _summed(self.transfer, exposed_transfers(timeline))
        self.steps += 1

    def per_step(self, which: str = "compute") -> list[float]:
        """Mean seconds per step of each rank: ``compute``, ``idle`` or ``transfer``."""
        return [round(seconds / max(1, self.steps), 4) for seconds in getattr(self, which)]

    def proposal(self, split: list[int], threshold: float,
                 work: Sequence[float]) -> list[int] | None:
        """The split evening out ``work`` (each layer's FLOPs, the head's on the last) at each
        rank's measured speed, when the slowest rank's compute exceeds the fastest's by more
        than ``threshold`` and the split differs from ``split``; else None."""
        if not self.compute or min(self.compute) <= 0:
            return None
        if max(self.compute) / min(self.compute) <= threshold:
            return None
        bounds = list(itertools.accumulate(split, initial=0))
        speeds = tuple(sum(work[lo:hi]) / seconds for (lo, hi), seconds
                       in zip(itertools.pairwise(bounds), self.compute, strict=True))
        proposed = list(balanced_split(tuple(work), speeds))
        return proposed if proposed != split else None


def _summed(total: list[float], step: list[float]) -> list[float]:
    return [a + b for a, b in zip(total, step, strict=True)] if total else list(step)


class Repartition(Exception):  # noqa: N818 - a request to restart, not an error
    """Raised on every rank once the re-partition's checkpoint is saved: exit and restart."""

    def __init__(self, layers: list[int]) -> None:
        super().__init__(f"re-partition the pipeline to {layers} layers per stage")
        self.layers = layers


class Repartitioner:
    """The trainer's side (see the module docstring): every rank calls :meth:`after_log` after
    each logged step; pipeline rank 0 of the world measures and decides, and the decision is
    broadcast so that every rank saves and restarts together."""

    def __init__(self, cfg: Config, split: list[int], run_dir: Path, rank: int,
                 fits: Callable[[list[int]], bool] = lambda split: True) -> None:
        """``fits``: whether the plan of a split fits in device memory (a split by measured
        speed can give the first stage, which holds the most micro-batches in flight, more
        layers than it has room for; such a proposal is dropped, and the log says so)."""
        p = cfg.parallel
        self.fits = fits
        self.enabled = p.pp_rebalance_threshold > 0
        self.threshold, self.steps = p.pp_rebalance_threshold, p.pp_rebalance_steps
        self.split = split
        self.work = layer_work(cfg)
        self.run_dir, self.rank = run_dir, rank
        self.record = read_rebalance(run_dir) if self.enabled and rank == 0 else None
        self.meter = StageMeter()
        self.warm = False
        """The first logged step of a process (start-up, first-touch allocation) is skipped."""

    def after_log(self, step: int, timeline: Timeline | None, save: Callable[[int], None],
                  last: bool = False) -> None:
        """Measure the logged ``step``; save and raise :class:`Repartition` when a split is
        decided. Not at this run's ``last`` step: the restart would train nothing and measure
        nothing (every rank knows it, so none enters the broadcast)."""
        if not self.enabled or last:
            return
        box = [self._observe(timeline) if self.rank == 0 and timeline is not None else None]
        dist.broadcast_object_list(box, src=0)  # every rank follows rank 0: same collectives
        proposal, done = box[0]
        self.enabled = not done
        if proposal is None:
            return
        save(step)
        if self.rank == 0:
            self.record = {"step": step, "layers_before": self.split,
                           **self._measured("before"),
                           "layers_after": proposal, "compute_after_s": None}
            write_rebalance(self.run_dir, self.record)
            print(f"orch: pipeline stages computed {_slashed(self.meter.per_step())} s per step "
                  f"(idle {_slashed(self.meter.per_step('idle'))} s, of it waiting for "
                  f"transfers {_slashed(self.meter.per_step('transfer'))} s) "
                  f"with {_slashed(self.split)} layers (threshold {self.threshold}): "
                  f"re-partitioning to {_slashed(proposal)} from the checkpoint of step {step}",
                  flush=True)
        raise Repartition(proposal)

    def _observe(self, timeline: Timeline) -> tuple[list[int] | None, bool]:
        """Rank 0: a new split or None, and whether measuring is over for this run."""
        if self.record is not None and self.record.get("compute_after_s") is not None:
            return None, True  # re-partitioned and measured: once per run
        if not self.warm:
            self.warm = True
            return None, False
        self.meter.add(timeline)
        if self.meter.steps < self.steps:
            return None, False
        if self.record is None:  # deciding
            proposal = self.meter.proposal(self.split, self.threshold, self.work)
            if proposal is not None and not self.fits(proposal):
                print(f"orch: pipeline stages computed {_slashed(self.meter.per_step())} s per "
                      f"step with {_slashed(self.split)} layers; {_slashed(proposal)} would "
                      "even them out but does not fit in device memory: not re-partitioning",
                      flush=True)
                proposal = None
            return proposal, True
        self.record |= self._measured("after")  # the new split's
        write_rebalance(self.run_dir, self.record)
        before, after = self.record["compute_before_s"], self.record["compute_after_s"]
        print(f"orch: pipeline re-partitioned at step {self.record['step']}: layers "
              f"{_slashed(self.record['layers_before'])} -> {_slashed(self.split)}, compute per "
              f"step {_slashed(before)} s -> {_slashed(after)} s, idle "
              f"{_slashed(self.record['idle_before_s'])} s -> "
              f"{_slashed(self.record['idle_after_s'])} s, waiting for transfers "
              f"{_slashed(self.record['transfer_before_s'])} s -> "
              f"{_slashed(self.record['transfer_after_s'])} s (compute slowest/fastest "
              f"{max(before) / min(before):.2f} -> {max(after) / min(after):.2f})", flush=True)
        return None, True

    def _measured(self, when: str) -> dict[str, list[float]]:
        """The meter's per-step figures as record fields (``compute_before_s``, ...)."""
        return {f"{which}_{when}_s": self.meter.per_step(which)
                for which in ("compute", "idle", "transfer")}


def _slashed(values: list) -> str:
    return "/".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values)


def read_rebalance(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's re-partition record, or None; a damaged one (the launcher reads it
    before anything starts) is a problem naming the file, not a traceback."""
    path = Path(run_dir) / REBALANCE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"unreadable ({exc})") from None
    split = record.get("layers_after") if isinstance(record, dict) else None
    if not (isinstance(split, list) and split
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in split)):
        raise _damaged(path, f"layers_after is {split!r}, not a list of layer counts of 1 or more")
    return record


def _damaged(path: Path, what: str) -> PlanError:
    return PlanError([Problem(str(path), f"{what}: the pipeline re-partition of this run "
                              "directory, which its plans follow",
                              "delete the file to plan from parallel.stage_layers again (the "
                              "checkpoints load onto any split), or restore it")],
                     title="damaged run directory")


def write_rebalance(run_dir: Path, record: dict[str, Any]) -> None:
    """Write the record atomically (a crash leaves the old file or the new, never half)."""
    path = Path(run_dir) / REBALANCE_FILE
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(part, path)


def rebalance_notice(cfg: Config) -> str | None:
    """What the launcher says when the run directory's re-partition replaces the config's own
    ``parallel.stage_layers`` (it did so silently, the run directory's config.yaml then naming
    a split the run did not use)."""
    given, used = cfg.parallel.stage_layers, apply_rebalance(cfg).parallel.stage_layers
    if not given or used == given:
        return None
    return (f"orch launch: parallel.stage_layers {given} gives way to this run directory's "
            f"pipeline re-partition {used} ({Path(cfg.run.dir) / REBALANCE_FILE}; delete it to "
            "use the config's split)")


def apply_rebalance(cfg: Config) -> Config:
    """``cfg`` with the stage layers of its run directory's re-partition, when there is one for
    this pipeline (same stage count and layers); ``cfg`` itself otherwise."""
    p = cfg.parallel
    if p.pp == 1 or p.virtual_stages != 1:  # no record applies: none is read
        return cfg
    record = read_rebalance(Path(cfg.run.dir))
    if (record is None or len(record["layers_after"]) != p.pp
            or sum(record["layers_after"]) != cfg.model.layers):
        return cfg
    return dataclasses.replace(cfg, parallel=dataclasses.replace(
        p, stage_layers=list(record["layers_after"])))


__all__ = ["REBALANCE_EXIT", "REBALANCE_FILE", "Repartition", "Repartitioner", "StageMeter",
           "apply_rebalance", "compute_seconds", "read_rebalance", "rebalance_notice",
           "write_rebalance"]
