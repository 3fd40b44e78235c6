"""Held-out evaluation during training (``eval:``): torchtitan's validation, Megatron's
``--eval-interval`` / ``--eval-iters``.

Every evaluation reads the same sequences: the first ``eval.batches x train.global_batch``
samples of ``eval.path``, in file order, packed as training packs (``PackedSequences``) and split
over the data-parallel ranks and context-parallel positions as training splits its batches
(:func:`~orch.runtime.data.rank_micro_batches`). So evaluations compare across steps, and a
resumed run evaluates as the uninterrupted one did. The result is the mean token cross-entropy
over every eval token of every rank.

An evaluation must leave training as it was: the trainer runs its forwards (its own loss, its
autocast, the pipeline's forward-only path) inside :func:`isolated`, which turns gradients off,
puts the model in eval mode (MoE layers then add no loads and no balancing loss to the step's),
keeps torch's random generators' states (the CPU's and the device's), and keeps the pipeline
timeline and the offload engine's accounting to training steps (:meth:`PipelineExecutor.evaluate`,
:meth:`OffloadEngine.forward_passes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from orch.config.schema import Config
from orch.errors import Problem
from orch.runtime.data import (
    DataError,
    PackedSequences,
    check_source,
    load_tokens,
    packed_samples,
    problem_of,
    rank_micro_batches,
    read_like_data,
    token_count,
)

if TYPE_CHECKING:
    from orch.offload.engine import OffloadEngine

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


def size_problems(cfg: Config, count: int) -> list[Problem]:
    """Whether ``count`` tokens of ``eval.path`` hold one global batch of ``train.seq_len``
    sequences, and ``eval.batches`` of them (saying the most they allow)."""
    ev, t = cfg.eval, cfg.train
    held = packed_samples(count, t.seq_len) // t.global_batch
    if held == 0:
        return [Problem("eval.path", f"{ev.path!r} holds {count} tokens, fewer than one global "
                        f"batch of train.global_batch={t.global_batch} sequences of "
                        f"train.seq_len={t.seq_len} needs ({t.global_batch * t.seq_len + 1})",
                        "use a longer held-out file, or lower train.global_batch or "
                        "train.seq_len", ("train.global_batch", "train.seq_len", "data"))]
    if ev.batches > held:
        return [Problem("eval.batches", f"{ev.batches}, but eval.path {ev.path!r} holds "
                        f"{held} global batch{'es' if held > 1 else ''} of "
                        f"{t.global_batch} x {t.seq_len} tokens ({count} tokens)",
                        f"set eval.batches to at most {held}, or use a longer eval.path",
                        ("eval.path", "train.global_batch", "train.seq_len", "data"))]
    return []


def eval_file_problems(cfg: Config) -> list[Problem]:
    """The launcher's checks of ``eval.path`` before any process starts, with ``data.path``'s
    rules (existence, readability, format, size from its size or header); none when no
    evaluation is asked for (an empty path with an interval is the config's problem)."""
    if cfg.eval.interval <= 0 or not cfg.eval.path:
        return []
    source = read_like_data(cfg.data, cfg.eval.path)
    try:
        check_source(source)
        count = token_count(source)
    except DataError as exc:
        return [problem_of(exc.problem, "eval.path")]
    return [] if count is None else size_problems(cfg, count)


def load_eval_batches(cfg: Config, dp_rank: int, dp_size: int) -> list[MicroBatches]:
    """This rank's micro-batches of each of the ``eval.batches`` global batches: the file's
    samples in order, ``train.global_batch`` a batch, each split as training splits its own.
    Raises the launcher's problems for what only reading the file tells (a large gzip file's
    size, ids beyond the vocabulary)."""
    source = read_like_data(cfg.data, cfg.eval.path)
    try:
        tokens = load_tokens(source, cfg.model.vocab_size, limit=cfg.eval.batches
                             * cfg.train.global_batch * cfg.train.seq_len + 1)
    except DataError as exc:
        raise DataError.of(problem_of(exc.problem, "eval.path")) from None
    if problems := size_problems(cfg, len(tokens)):
        raise DataError.of(problems[0])
    t = cfg.train
    dataset = PackedSequences(tokens, t.seq_len)
    return [rank_micro_batches(dataset, np.arange(b * t.global_batch, (b + 1) * t.global_batch),
                               t.micro_batch, dp_rank, dp_size)
            for b in range(cfg.eval.batches)]


@dataclass(frozen=True)
class Evaluation:
    """When to evaluate and on what: ``batches`` is this rank's share of the eval sequences
    (:func:`load_eval_batches`), ``tokens`` the eval tokens of all ranks together."""

    interval: int
    last_step: int
    batches: list[MicroBatches]
    tokens: int

    @classmethod
    def of(cls, cfg: Config, dp_rank: int, dp_size: int) -> Evaluation | None:
        """The run's evaluation, or None where ``eval.interval`` is 0."""
        if cfg.eval.interval <= 0:
            return None
        t = cfg.train
        return cls(cfg.eval.interval, t.steps, load_eval_batches(cfg, dp_rank, dp_size),
                   cfg.eval.batches * t.global_batch * t.seq_len)

    def due(self, step: int) -> bool:
        """Every ``interval`` steps and at ``train.steps`` (not at a ``run.stop_at_step``, a
        preemption drill: the resumed run evaluates where the uninterrupted one does)."""
        return step % self.interval == 0 or step == self.last_step


@contextlib.contextmanager
def isolated(model: nn.Module, device: torch.device, offload: OffloadEngine | None = None
             ) -> Iterator[None]:
    """Forwards that leave training exactly as it was: no gradients, the model in eval mode
    (its MoE layers count no expert loads and no balancing loss: ``MoEFeedForward.forward``),
    torch's CPU and device random generators restored, and the offload engine's forward-only
    passes. (The pipeline's forward-only path is :meth:`PipelineExecutor.evaluate`, which also keeps
    its timeline to training.)"""
    training = model.training
    devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.no_grad())
        if offload is not None:
            stack.enter_context(offload.forward_passes())
        model.eval()
        try:
            yield
        finally:
            model.train(training)


__all__ = ["Evaluation", "eval_file_problems", "isolated", "load_eval_batches", "size_problems"]
