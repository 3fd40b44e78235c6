"""The training loop: gradient accumulation, clipping, the optimizer step, metrics, checkpoints.

One optimizer step consumes one global batch: each data-parallel rank runs its micro-batches,
with gradient synchronization only after the last (FSDP2 accumulates unsharded-free local
gradients until then), so the gradients equal those of the whole batch on one process. Losses
are divided by the number of micro-batches so the step's loss is the global batch's mean.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from orch.config.schema import Config
from orch.models.moe import moe_aux_loss, update_expert_bias
from orch.parallel.comm_stats import CommLedger
from orch.parallel.data_parallel import set_gradient_sync
from orch.plan import Plan
from orch.runtime.data import BatchStream
from orch.runtime.metrics import MetricsLog, StepMetrics, memory_bytes
from orch.runtime.optim import lr_at, set_lr

SaveFn = Callable[[int], None]


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


@dataclass
class Trainer:
    cfg: Config
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
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

    def train(self, start_step: int) -> None:
        """Run steps ``start_step + 1`` to ``train.steps`` (or ``run.stop_at_step``), saving a
        checkpoint every ``checkpoint.interval`` steps and at the last step run."""
        t, interval = self.cfg.train, self.cfg.checkpoint.interval
        last = self.cfg.run.stop_at_step or t.steps
        for step in range(start_step + 1, last + 1):
            start = time.perf_counter()
            lr = lr_at(step, t)
            set_lr(self.optimizer, lr)
            with self.ledger.tracking() if self.ledger else contextlib.nullcontext():
                loss, aux_loss = self._accumulate()
                grad_norm = self._clip()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                loads = update_expert_bias(self.model, self.cfg.model.bias_update_rate,
                                           self.token_group)
            done = _Step(step, lr, loss, aux_loss, grad_norm, loads,
                         self.ledger.take() if self.ledger else {})
            if step % self.cfg.run.log_interval == 0 or step == last:
                self._log(done, time.perf_counter() - start)
            if step == last or (interval and step % interval == 0):
                self.save(step)

    def _accumulate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of this rank's micro-batches; returns the mean language-model
        loss and the mean MoE load-balancing term (None for a dense model), both unreduced."""
        micro_batches = self.stream.next_step()
        total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device) if self.cfg.model.is_moe else None
        for index, (inputs, targets) in enumerate(micro_batches):
            set_gradient_sync(self.model, index == len(micro_batches) - 1)
            if self.positions is not None:
                inputs, targets = inputs[:, self.positions], targets[:, self.positions]
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            cast = self.autocast
            with torch.autocast(self.device.type, cast) if cast else contextlib.nullcontext():
                logits = self.model(inputs, self.positions)
            # Tensor-parallel logits arrive sharded on the vocabulary: loss_parallel computes
            # the cross-entropy (forward and backward) without gathering them.
            sharded = isinstance(logits, DTensor)
            with loss_parallel() if sharded else contextlib.nullcontext():
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                if isinstance(loss, DTensor):  # replicated: the local value is the whole loss,
                    loss = loss.to_local()  # and the MoE term beside it is a plain tensor
                aux = moe_aux_loss(self.model)
                ((loss if aux is None else loss + aux) / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
            if aux is not None and aux_total is not None:
                aux_total += aux.detach() / len(micro_batches)
        return total, aux_total

    def _clip(self) -> float:
        """Clip the global gradient norm (over all shards) and return it before clipping.

        Gradients may be plain tensors (replicated) and DTensors on different meshes at once
        (FSDP over dp, TP over tp, both, or norms replicated beside TP-sharded matrices), and
        DTensor ops refuse to mix meshes: norm each mesh's group, reduce it to the full norm
        over that mesh, then combine the per-group norms; clip each group by the total.
        """
        groups: dict[object, list[torch.Tensor]] = {}
        for p in self.model.parameters():
            if p.grad is not None:
                key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                groups.setdefault(key, []).append(p.grad)
        norms = []
        for grads in groups.values():
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        if len(norms) == 1:
            total = norms[0]
        else:
            total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if self.cfg.train.grad_clip > 0:
            for grads in groups.values():
                torch.nn.utils.clip_grads_with_norm_(grads, self.cfg.train.grad_clip, total)
        return float(total)

    def _log(self, done: _Step, secs: float) -> None:
        losses = done.loss if done.aux_loss is None else torch.stack([done.loss, done.aux_loss])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)  # every rank's share of the batch
        t = self.cfg.train
        tokens = t.global_batch * t.seq_len
        tokens_per_s = tokens / secs
        tflops = self.plan.step.flops_per_token * tokens_per_s / self.plan.world_size / 1e12
        used, total = memory_bytes(self.device)
        self.metrics.log(
            StepMetrics(
                step=done.step, steps=t.steps, loss=float(losses.flatten()[0]), lr=done.lr,
                grad_norm=done.grad_norm,
                aux_loss=None if done.aux_loss is None else float(losses[1]),
                expert_load=None if done.loads is None else done.loads.int().tolist(),
                comm_bytes=done.comm_bytes,
                tokens=tokens, step_time_s=secs, tokens_per_s=tokens_per_s, tflops=tflops,
                mfu=tflops * 1e12 / self.plan.peak_flops, mem_bytes=used, mem_total_bytes=total,
            )
        )
