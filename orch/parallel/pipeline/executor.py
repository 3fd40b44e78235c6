"""Run any orch schedule across the pipeline ranks, on torch.distributed.pipelining's runtime.

The schedule's compute actions (F, B, I, W per stage and micro-batch, in orch's order) are handed
to torch's ``_PipelineScheduleRuntime``, which adds the sends and receives between stages and,
for FSDP stages, the unshard/reshard and the one gradient reduction per step, and runs them on
``PipelineStage`` objects (orch's reduce the FSDP units inside a stage that is not one the same
way: :mod:`orch.parallel.pipeline.late_grads`). Stages split their backward where the work is
(:mod:`orch.parallel.pipeline.weight_grads`): ``I`` is one ordinary backward pass whose linear
layers hold back their weight GEMMs, ``W`` runs those GEMMs, so ``I + W`` cost one backward and
nothing recomputes the forward; under tensor parallelism torch's own split is used (``I``
keeps the autograd nodes that lead to the weights, ``W`` computes through them later). torch's
runtime also brings the FSDP handling (gradients accumulated unsharded over the
micro-batches, reduced once). Stage shapes are given up front (static metadata), so torch does
not run a probing forward and backward on the first step.

The executor times every compute action (:mod:`orch.parallel.pipeline.timeline`), scales the
gradients by ``1 / microbatches`` as the unsplit trainer does, and returns the last stage's mean
loss. Under tensor parallelism the last stage returns its vocabulary shard of the logits as a
plain tensor and the loss wraps it again (``loss_fn``), so no stage exchanges DTensors.

The runtime is a private torch class (torchtitan uses it the same way); the pinned torch is the
one tested.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    _Action,
    _add_send_recv,
    _add_unshard_reshard,
    _PipelineScheduleRuntime,
)

from orch.parallel.pipeline.late_grads import LateGradsStage
from orch.parallel.pipeline.timeline import Record
from orch.parallel.pipeline.weight_grads import SplitBackwardStage
from orch.parallel.schedules.actions import Schedule

_TORCH_KIND = {"F": FORWARD, "B": FULL_BACKWARD, "I": BACKWARD_INPUT, "W": BACKWARD_WEIGHT}
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StageShapes:
    """What crosses stage boundaries for one micro-batch: token ids ``[micro, tokens]`` into
    the first stage, hidden states ``hidden`` between stages, logits ``logits`` out of the last
    (its vocabulary shard under tensor parallelism)."""

    tokens: tuple[int, int]
    hidden: tuple[int, int, int]
    logits: tuple[int, int, int]
    hidden_dtype: torch.dtype = torch.float32
    logits_dtype: torch.dtype = torch.float32

    def stage_args(self, first: bool, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta tensors for a stage's input and output (both take part in autograd: the
        receiver's input gradient comes back)."""
        meta = torch.device("meta")
        into = (torch.empty(self.tokens, dtype=torch.int64, device=meta) if first
                else torch.empty(self.hidden, dtype=self.hidden_dtype, device=meta,
                                 requires_grad=True))
        shape, dtype = (self.logits, self.logits_dtype) if last else (self.hidden,
                                                                       self.hidden_dtype)
        return into, torch.empty(shape, dtype=dtype, device=meta, requires_grad=True)


class ActionClock:
    """Times every compute call of the stages it is attached to, as schedule actions."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._origin = time.perf_counter()
        self.recording = True
        """Off while forward-only passes run (an evaluation): the timeline and the
        re-partitioner measure training steps only."""

    def start(self) -> None:
        """Forget earlier records; times count from now."""
        self.records, self._origin = [], time.perf_counter()

    def attach(self, stage: PipelineStage) -> None:
        """Record each forward (F), backward (B, or I when split) and weight-gradient (W) call
        of ``stage`` with its start and end."""
        forward, backward = stage.forward_one_chunk, stage.backward_one_chunk
        weight = stage.backward_weight_one_chunk
        index = stage.stage_index

        def timed(kind: str, fn: Callable, microbatch: int, *args, **kwargs):  # type: ignore[no-untyped-def]
            if not self.recording:
                return fn(microbatch, *args, **kwargs)
            start = time.perf_counter() - self._origin
            try:
                return fn(microbatch, *args, **kwargs)
            finally:
                end = time.perf_counter() - self._origin
                self.records.append((f"{index}{kind}{microbatch}", start, end))

        stage.forward_one_chunk = (  # type: ignore[method-assign]
            lambda mb, *a, **k: timed("F", forward, mb, *a, **k))
        stage.backward_one_chunk = (  # type: ignore[method-assign]
            lambda mb, *a, **k: timed("B" if k.get("full_backward", True) else "I",
                                      backward, mb, *a, **k))
        stage.backward_weight_one_chunk = (  # type: ignore[method-assign]
            lambda mb, *a, **k: timed("W", weight, mb, *a, **k))


def _forgetting(stage: PipelineStage, forward: Callable) -> Callable:
    """``forward`` (``stage.forward_one_chunk``, the last stage's) dropping what the stage keeps
    of the micro-batch for a backward: its output is returned for the loss, and sent nowhere."""
    def forward_and_forget(microbatch: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return forward(microbatch, *args, **kwargs)
        finally:
            stage.fwd_cache.pop(microbatch, None)
    return forward_and_forget


def transformer_stages(modules: list[nn.Module], stage_ids: list[int], num_stages: int,
                       device: torch.device, shapes: StageShapes, group: dist.ProcessGroup,
                       torch_split: bool = False) -> list[PipelineStage]:
    """torch pipeline stages for this rank's Transformer stages: ``modules[i]`` is global stage
    ``stage_ids[i]`` (``orch.parallel.pipeline.stages``), shapes given up front.

    Each is a :class:`SplitBackwardStage` (``I`` + ``W`` cost one backward), unless
    ``torch_split`` (under tensor parallelism: the linear layers' weights are DTensors in the
    forward): torch's own split then. Either folds late weight gradients into FSDP's float32
    accumulators (:class:`LateGradsStage`). Stages are never DDP modules (DDP reduces from
    autograd's accumulation hooks, which no split backward fires; ``apply_data_parallel``)."""
    stages = []
    for module, stage in zip(modules, stage_ids, strict=True):
        into, out = shapes.stage_args(stage == 0, stage == num_stages - 1)
        kind = LateGradsStage if torch_split else SplitBackwardStage
        stages.append(kind(module, stage, num_stages, device, input_args=into,
                           output_args=out, group=group))
    return stages


class PipelineExecutor:
    """This rank's ``stages`` of one pipeline, run step by step under ``schedule``.

    ``group``: the pipeline ranks; ``loss_fn(last stage output, targets)``: one micro-batch's
    mean loss.
    """

    def __init__(self, stages: list[PipelineStage], schedule: Schedule,
                 group: dist.ProcessGroup, loss_fn: LossFn) -> None:
        self.stages, self.schedule, self.group = stages, schedule, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.runtime = _PipelineScheduleRuntime(stages, schedule.microbatches,
                                                loss_fn=loss_fn, scale_grads=True)
        compute = {rank: [_Action(a.stage, _TORCH_KIND[a.kind], a.microbatch)
                          for a in actions if not a.is_comm]
                   for rank, actions in enumerate(schedule.ranks)}
        self.runtime._prepare_schedule_with_comms(compute)  # adds sends/recvs and FSDP steps
        self._training_order = self.runtime.pipeline_order_with_comms
        # The schedule's forwards alone, in its order (deadlock-free as the whole is: a forward
        # waits only for earlier stages' forwards, and sends do not block), lowered as torch
        # lowers the whole (its validator wants every backward, so its passes are called
        # directly): each FSDP stage unsharded before its first forward and resharded after its
        # last, the sends and receives, and no gradient reduction.
        mapping = self.runtime.stage_index_to_group_rank
        self._forward_order = _add_send_recv(
            {rank: _add_unshard_reshard([a for a in actions if a.computation_type == FORWARD])
             for rank, actions in compute.items()},
            stage_to_rank=lambda stage: mapping[stage], num_stages=self.runtime._num_stages)
        self.clock = ActionClock()
        for stage in stages:
            self.clock.attach(stage)

    @property
    def holds_last(self) -> bool:
        return any(stage.is_last for stage in self.stages)

    @property
    def holds_first(self) -> bool:
        return any(stage.is_first for stage in self.stages)

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None,
             documents: torch.Tensor | None = None) -> torch.Tensor:
        """One training step's forward and backward over all micro-batches: ``inputs`` (first
        stage) and ``targets`` (last stage) are the step's whole batch, micro-batches
        concatenated; ``documents`` (every stage's: its attention keeps to them) their document
        ids, or None. Returns the mean loss on the last stage's rank (zero elsewhere)."""
        dist.barrier(group=self.group)  # a common start, so the ranks' timelines line up
        self.clock.start()
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.holds_first else ()
        self.runtime.step(*args, target=targets if self.holds_last else None,
                          losses=losses, return_outputs=False, **_stage_kwargs(documents))
        if not losses:
            return torch.zeros((), device=self.stages[0].device)
        return torch.stack([loss.detach() for loss in losses]).mean()

    def evaluate(self, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                 documents: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss of one batch's forward passes alone (as :meth:`step` takes and returns
        them), on torch's forward-only path (``eval``: no backward runs) with the schedule's
        forwards; call it under ``torch.no_grad``. Training's actions, and the clock's records
        of the last step, are left as they were.

        torch's stages keep every forward's output until its backward (``fwd_cache``), which
        never comes here: the last stage's, a micro-batch's logits, is dropped as soon as its
        loss is taken (it sends nothing on), the others' once the sends are done, so an
        evaluation holds no more than a step does."""
        self.runtime.pipeline_order_with_comms = self._forward_order
        self.clock.recording = False
        forwards = {stage: stage.forward_one_chunk for stage in self.stages if stage.is_last}
        for stage, forward in forwards.items():
            stage.forward_one_chunk = _forgetting(stage, forward)  # type: ignore[method-assign]
        try:
            losses: list[torch.Tensor] = []
            args = (inputs,) if self.holds_first else ()
            self.runtime.eval(*args, target=targets if self.holds_last else None,
                              losses=losses, return_outputs=False, **_stage_kwargs(documents))
        finally:
            self.runtime.pipeline_order_with_comms = self._training_order
            self.clock.recording = True
            for stage, forward in forwards.items():
                stage.forward_one_chunk = forward  # type: ignore[method-assign]
            for stage in self.stages:  # the runtime waited for the sends that read them
                stage.fwd_cache.clear()
        if not losses:
            return torch.zeros((), device=self.stages[0].device)
        return torch.stack([loss.detach() for loss in losses]).mean()

    def gather_records(self) -> list[list[Record]] | None:
        """Every pipeline rank's records of the last step, on pipeline rank 0 (None elsewhere).
        A collective over the pipeline group: every rank calls it."""
        gathered: list[list[Record] | None] = [None] * self.size
        dist.all_gather_object(gathered, self.clock.records, group=self.group)
        return [r or [] for r in gathered] if self.rank == 0 else None


def _stage_kwargs(documents: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What every stage's forward takes besides its input: torch's runtime splits keyword
    arguments into micro-batches as it splits the inputs, and passes them to every stage."""
    return {} if documents is None else {"documents": documents}


__all__ = ["ActionClock", "LossFn", "PipelineExecutor", "StageShapes", "transformer_stages"]
