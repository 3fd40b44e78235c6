"""The training loop: gradient accumulation, clipping, the optimizer step, metrics, checkpoints.

One optimizer step consumes one global batch: each data-parallel rank runs its micro-batches,
with gradient synchronization only after the last (FSDP2 accumulates unsharded-free local
gradients until then), so the gradients equal those of the whole batch on one process. Losses
are divided by the number of micro-batches so the step's loss is the global batch's mean.
Under pipeline parallelism the executor runs the step's micro-batches through the stages (its
runtime divides the summed gradients by their number); the loss lives on the last stage and the
gradient norm and MoE figures are summed over the stages before they are reported.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.profiler import record_function

from orch.config.schema import Config
from orch.errors import OrchError, Problem
from orch.models.moe import (
    MoEFeedForward,
    inject_aux_gradients,
    take_aux_loss,
    update_expert_bias,
)
from orch.parallel.comm_stats import CommLedger
from orch.parallel.data_parallel import set_gradient_sync
from orch.parallel.pipeline.rebalance import Repartition
from orch.parallel.pipeline.timeline import exposed_transfers, measured_timeline, write_timeline
from orch.parallel.tensor_parallel import vocab_parallel_loss
from orch.plan import Plan
from orch.runtime.blend import BlendStream
from orch.runtime.comm_timeout import set_comm_timeout
from orch.runtime.data import BatchStream, document_ids
from orch.runtime.drills import maybe_fail, nan_drill
from orch.runtime.evaluation import Evaluation, MicroBatches, isolated
from orch.runtime.metrics import EvalMetrics, MetricsLog, StepMetrics, memory_bytes
from orch.runtime.optim import lr_at, set_lr
from orch.runtime.profiling import StepProfiler
from orch.runtime.rank_log import at_step
from orch.runtime.telemetry import Telemetry

if TYPE_CHECKING:  # types only: parallelize imports the executor (and pipelining) for pp > 1
    from orch.offload.engine import OffloadEngine
    from orch.parallel.pipeline.executor import PipelineExecutor
    from orch.parallel.pipeline.rebalance import Repartitioner
    from orch.parallel.schedules.simulate import Timeline

SaveFn = Callable[[int], None]
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class _Step:
    """What one optimizer step produced, for the metrics (losses still unreduced over ranks)."""

    step: int
    lr: float
    loss: torch.Tensor
    aux_loss: torch.Tensor | None
    grad_norm: float
    loads: torch.Tensor | None
    comm_bytes: dict[str, int]


class NonFiniteStep(OrchError):
    """A step's global gradient norm is NaN or infinite (``train.stop_on_nonfinite``): raised on
    every rank (the norm is the same everywhere) before the update, so the weights, and every
    checkpoint, stay those of the steps before; exit 2, so no restart runs into it again."""

    def __init__(self, step: int, grad_norm: float, position: str) -> None:
        self.speaker = os.environ.get("LOCAL_RANK", "0") == "0"
        problem = Problem(
            "train.stop_on_nonfinite", f"step {step}'s gradient norm is {grad_norm}: the run "
            "stopped before its update reached the weights, and its checkpoints are those of "
            f"the steps before (the step's data: {position})",
            "look at that step's data; or go on from the newest checkpoint with a lower "
            "train.lr, a longer train.warmup_steps or a train.grad_clip in a new run.dir (orch "
            "ckpt export RUN_DIR --to hf OUT, then model.init_from: OUT); "
            "train.stop_on_nonfinite: false trains on such steps")
        super().__init__(str(problem))


@dataclass
class Trainer:
    cfg: Config
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: BatchStream | BlendStream
    metrics: MetricsLog
    device: torch.device
    save: SaveFn
    """Called with the step number whenever a checkpoint is due (every rank calls it)."""
    autocast: torch.dtype | None = None
    """Compute dtype for autocast, when no FSDP mixed-precision policy casts already."""
    positions: torch.Tensor | None = None
    """Under context parallelism, the sequence positions this rank holds (its tokens)."""
    token_group: dist.ProcessGroup | None = None
    """The ranks that see different tokens (MoE expert loads are summed over them)."""
    ledger: CommLedger | None = None
    """Counts the step's communication per parallel dimension (multi-process runs)."""
    pipeline: PipelineExecutor | None = None
    """Under pipeline parallelism, runs this rank's stages for the whole step."""
    pipeline_dir: Path | None = None
    """Where rank 0 writes the measured pipeline timeline of the latest logged step."""
    offload: OffloadEngine | None = None
    """Keeps parameters and gradients at home off the device; the clip and the optimizer step
    then run on those home copies."""
    repartitioner: Repartitioner | None = None
    """Under pipeline parallelism with ``parallel.pp_rebalance_threshold``: measures the stages
    on logged steps and re-partitions them once (:mod:`orch.parallel.pipeline.rebalance`)."""
    finish_saves: Callable[[], None] = lambda: None
    """Called after every step by every rank: completes a background save whose writes have
    ended (:meth:`~orch.runtime.checkpoint.CheckpointManager.poll`)."""
    evaluation: Evaluation | None = None
    """Held-out evaluation (``eval:``), run after the steps it is due at."""
    _timeline: Timeline | None = None
    _telemetry: Telemetry | None = None
    """Rank 0's measured pipeline timeline of the last logged step."""

    def train(self, start_step: int) -> None:
        """Run steps ``start_step + 1`` to ``train.steps`` (or ``run.stop_at_step``), saving a
        checkpoint every ``checkpoint.interval`` steps and at the last step run."""
        # installed across the steps: the offload helpers' collectives between two steps'
        # windows count too (orch.parallel.comm_stats)
        with self.ledger.installed() if self.ledger else contextlib.nullcontext():
            self._train(start_step)

    def _train(self, start_step: int) -> None:
        t, interval = self.cfg.train, self.cfg.checkpoint.interval
        last = self.cfg.run.stop_at_step or t.steps
        rank = dist.get_rank() if dist.is_initialized() else 0
        steps = range(start_step + 1, last + 1)
        profiler = StepProfiler(self.cfg.run.profile, Path(self.cfg.run.dir), rank, self.device,
                                steps)
        for step in steps:
            at_step(step)
            profiler.before(step)
            start = time.perf_counter()
            lr = lr_at(step, t)
            set_lr(self.optimizer, lr)
            with self.ledger.tracking() if self.ledger else contextlib.nullcontext():
                if self.offload is not None:
                    self.offload.start_step()
                with nan_drill(self._runs(), step):  # a fault drill (ORCH_DRILL), when set
                    loss = self._accumulate() if self.pipeline is None else self._pipelined()
                maybe_fail("step", step)  # a fault drill (ORCH_DRILL), when one is set
                if self.offload is not None:
                    self.offload.finish_step()
                aux_loss = take_aux_loss(self.model)
                if aux_loss is None and self.cfg.model.is_moe:  # a stage without MoE layers
                    aux_loss = torch.zeros((), device=self.device)
                grad_norm = self._clip()
                if t.stop_on_nonfinite and not math.isfinite(grad_norm):  # same on every rank
                    profiler.finish(step)  # the trace of the steps before it
                    raise NonFiniteStep(step, grad_norm, self.stream.last_step())
                if self.offload is not None:  # on the CPU, beside the next forward
                    if self.ledger:  # the previous update's broadcasts are this step's
                        self.offload.wait_updates()
                        self.ledger.count_helpers()
                    self.offload.step(self.optimizer)
                else:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                loads = update_expert_bias(self.model, self.cfg.model.bias_update_rate,
                                           self.token_group)
            done = _Step(step, lr, loss, aux_loss, grad_norm, loads,
                         self.ledger.take() if self.ledger else {})
            exporting = profiler.after(step)  # seconds writing a trace: not the step's
            if step == start_step + 1:  # after compiles and first loads (orch.runtime.comm_timeout)
                set_comm_timeout(self.cfg.run.comm_timeout_s)
            self.finish_saves()
            logged = step % self.cfg.run.log_interval == 0 or step == last
            if logged:
                self._log(done, time.perf_counter() - start - exporting)
            if self.evaluation is not None and self.evaluation.due(step):
                self._evaluate(step)  # before a re-partition's or a preemption's save
            if logged:
                if self.repartitioner is not None:  # may save and raise Repartition
                    try:
                        self.repartitioner.after_log(step, self._timeline, self.save,
                                                     last=step == last)
                    except Repartition:  # a restart inside the profiled steps: their trace
                        profiler.finish(step)
                        raise
            if step == last or (interval and step % interval == 0):
                if self.offload is not None:
                    self.offload.wait_updates()
                self.save(step)

    def _accumulate(self) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; returns the mean language-model
        loss, unreduced (MoE layers keep their balancing losses for :func:`take_aux_loss`)."""
        micro_batches = self.stream.next_step()
        inject_aux_gradients(self.model, 1 / len(micro_batches))  # each is 1/n of the loss
        return self._micro_batches(micro_batches, train=True)

    def _micro_batches(self, micro_batches: MicroBatches, train: bool) -> torch.Tensor:
        """This rank's mean loss over ``micro_batches``, unreduced; with ``train``, each one's
        backward too (gradient sync on the last, the offload engine told), else forwards only
        (an evaluation, inside :func:`~orch.runtime.evaluation.isolated`)."""
        total = torch.zeros((), device=self.device)
        for index, (inputs, targets) in enumerate(micro_batches):
            if train:
                last = index == len(micro_batches) - 1
                set_gradient_sync(self.model, last, self.cfg.parallel.grad_reduce)
                if self.offload is not None:
                    self.offload.start_micro_batch(last)
            documents = self._documents(inputs)  # of the whole sequence, before the cp split
            if self.positions is not None:
                inputs, targets = inputs[:, self.positions], targets[:, self.positions]
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            cast = self.autocast
            with torch.autocast(self.device.type, cast) if cast else contextlib.nullcontext():
                logits = self.model(inputs, self.positions, documents)
            # Tensor-parallel logits arrive sharded on the vocabulary: loss_parallel computes
            # the cross-entropy (forward and backward) without gathering them.
            sharded = isinstance(logits, DTensor)
            with loss_parallel() if sharded else contextlib.nullcontext():
                loss = vocab_parallel_loss(logits, targets, tp_mesh=None)
                if train:
                    (loss / len(micro_batches)).backward()  # MoE layers add balancing grads
            if train and self.offload is not None:
                self.offload.finish_backward()
            total += loss.detach() / len(micro_batches)
        return total

    def _pipelined(self, micro_batches: MicroBatches | None = None, train: bool = True
                   ) -> torch.Tensor:
        """The step's forward and backward through the pipeline (``self.pipeline``), or with
        ``train`` false the forwards alone of ``micro_batches`` (an evaluation); returns the
        mean loss on the last stage's ranks and zero on the others."""
        assert self.pipeline is not None
        if micro_batches is None:
            micro_batches = self.stream.next_step()
        inputs = torch.cat([i for i, _ in micro_batches])
        targets = torch.cat([t for _, t in micro_batches])
        documents = self._documents(inputs)  # every stage's, of the whole sequence
        if self.positions is not None:
            inputs, targets = inputs[:, self.positions], targets[:, self.positions]
        run = self.pipeline.step if train else self.pipeline.evaluate
        cast = self.autocast
        with torch.autocast(self.device.type, cast) if cast else contextlib.nullcontext():
            with loss_parallel() if self.plan.degrees.tp > 1 else contextlib.nullcontext():
                return run(inputs.to(self.device), targets.to(self.device), documents)

    def _runs(self) -> list[nn.Module]:
        """The modules this rank calls in a step: its model, or its pipeline stages (a rank of
        several stages calls each stage's view, not the model holding them)."""
        if self.pipeline is None:
            return [self.model]
        return [stage.submod for stage in self.pipeline.stages]

    def _documents(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The document ids of ``inputs`` (whole sequences) on the device where attention keeps
        to documents (``train.document_mask``), else None."""
        if not self.cfg.train.document_mask:
            return None
        return document_ids(inputs, self.cfg.data.eos_id).to(self.device)

    def _evaluate(self, step: int) -> None:
        """Evaluate the weights after ``step`` on the held-out batches (every rank calls it):
        the mean token cross-entropy over all of them, logged on rank 0."""
        assert self.evaluation is not None
        if self.offload is not None:  # the update's broadcasts belong to the next step's record,
            self.offload.wait_updates()  # and its time to no evaluation
        start = time.perf_counter()
        with self.ledger.helpers_left_out() if self.ledger else contextlib.nullcontext(), \
                isolated(self.model, self.device, self.offload), \
                record_function(f"evaluation after step {step}"):  # its own range in a trace
            losses = [self._micro_batches(batch, train=False) if self.pipeline is None
                      else self._pipelined(batch, train=False)
                      for batch in self.evaluation.batches]
            loss = self._global_mean(torch.stack(losses).mean())
        self.metrics.log_eval(EvalMetrics(step=step, eval_loss=float(loss),
                                          eval_tokens=self.evaluation.tokens,
                                          eval_s=time.perf_counter() - start))

    def _global_mean(self, losses: torch.Tensor) -> torch.Tensor:
        """``losses`` (this rank's means of its share of a batch) as the whole batch's means:
        the last pipeline stage's shared with the other stages, then averaged over every rank
        (each holds an equal share of the tokens; tensor-parallel ranks hold the same)."""
        if self.pipeline is not None:  # the last stage's loss
            dist.all_reduce(losses, group=self.pipeline.group)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)  # every rank's share of the batch
        return losses

    def _clip(self) -> float:
        """Clip the global gradient norm (over all shards) and return it before clipping.

        Gradients may be plain tensors (replicated) and DTensors on different meshes at once
        (FSDP over dp, TP over tp, both, or norms replicated beside TP-sharded matrices), and
        DTensor ops refuse to mix meshes: norm each mesh's group, reduce it to the full norm
        over that mesh, then combine the per-group norms; clip each group by the total.
        """
        if self.offload is not None and self.offload.clips_gradients:  # NVMe, replicas
            return self.offload.clip(list(self.model.parameters()), self.cfg.train.grad_clip)
        groups: dict[object, list[torch.Tensor]] = {}  # parameters by their gradient's mesh
        for p in self.model.parameters():
            if p.grad is not None:
                key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                groups.setdefault(key, []).append(p)
        norms = []
        for params in groups.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        if len(norms) == 1:
            total = norms[0]
        else:
            total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if self.pipeline is not None:  # every stage's share
            squared = total.to(self.device) ** 2
            dist.all_reduce(squared, group=self.pipeline.group)
            total = squared.sqrt()
        if self.cfg.train.grad_clip > 0:  # takes parameters (and scales their .grad)
            for params in groups.values():
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.grad_clip, total)
        return float(total)

    def _log(self, done: _Step, secs: float) -> None:
        losses = done.loss if done.aux_loss is None else torch.stack([done.loss, done.aux_loss])
        loads, idle, transfers = done.loads, None, None
        if self.pipeline is not None:  # every stage's MoE layers
            loads = self._pipeline_loads(loads)
            idle, transfers = self._pipeline_timeline(done.step)
        losses = self._global_mean(losses)
        t = self.cfg.train
        tokens = t.global_batch * t.seq_len
        tokens_per_s = tokens / secs
        tflops = self.plan.step.flops_per_token * tokens_per_s / self.plan.world_size / 1e12
        used, total = memory_bytes(self.device)
        offload = None if self.offload is None else self.offload.step_record()
        devices = self._devices(offload)
        self.metrics.log(
            StepMetrics(
                step=done.step, steps=t.steps, loss=float(losses.flatten()[0]), lr=done.lr,
                grad_norm=done.grad_norm,
                aux_loss=None if done.aux_loss is None else float(losses[1]),
                expert_load=None if loads is None else loads.int().tolist(),
                comm_bytes=done.comm_bytes, pipeline_idle=idle, pipeline_transfer_s=transfers,
                offload=offload,
                tokens=tokens, step_time_s=secs, tokens_per_s=tokens_per_s, tflops=tflops,
                mfu=tflops * 1e12 / self.plan.peak_flops, mem_bytes=used, mem_total_bytes=total,
                devices=devices,
            )
        )

    def _devices(self, offload: dict | None) -> list[dict]:
        """Every rank's device reading (``orch.runtime.telemetry``), by rank, with its offload
        figures on several replicas (each has its own budget, and under a partitioned optimizer
        its own units and NVMe traffic; the record's ``offload`` is rank 0's); all ranks call."""
        if self._telemetry is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
            self._telemetry = Telemetry(self.device, rank)
        reading = self._telemetry.read()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [reading]
        if offload is not None:
            reading = {**reading, "offload": offload}
        readings: list[dict] = [{}] * dist.get_world_size()
        dist.all_gather_object(readings, reading)
        return readings

    def _pipeline_loads(self, loads: torch.Tensor | None) -> torch.Tensor | None:
        """Every stage's MoE loads ``[layer, expert]`` in global layer order."""
        assert self.pipeline is not None
        names = [name for name, m in self.model.named_modules() if isinstance(m, MoEFeedForward)]
        mine = [(int(_LAYER_INDEX.search(name)[1]), row)  # type: ignore[index]
                for name, row in zip(names, loads.tolist() if loads is not None else [],
                                     strict=True)]
        gathered: list[list[tuple[int, list[float]]] | None] = [None] * self.pipeline.size
        dist.all_gather_object(gathered, mine, group=self.pipeline.group)
        rows = sorted(row for part in gathered for row in part or [])
        return torch.tensor([load for _, load in rows]) if rows else None

    def _pipeline_timeline(self, step: int) -> tuple[list[float] | None, list[float] | None]:
        """Gather the step's measured pipeline actions; rank 0 writes the timeline files and
        returns each pipeline rank's idle fraction and seconds waiting for transfers."""
        assert self.pipeline is not None
        records = self.pipeline.gather_records()
        if records is None or self.pipeline_dir is None:
            return None, None
        timeline = self._timeline = measured_timeline(records)
        write_timeline(timeline, self.pipeline_dir, step)
        return ([round(fraction, 4) for fraction in timeline.idle_fraction],
                [round(seconds, 5) for seconds in exposed_transfers(timeline)])
