"""Held-out evaluation during training (``eval:``): torchtitan's validation, Megatron's
``--eval-interval`` / ``--eval-iters``.

Every evaluation reads the same sequences: the first ``eval.batches x train.global_batch``
samples of ``eval.path``, or of the part ``data.holdout`` keeps out of training (a blend's parts
drawn from by its weights), in file order, packed as training packs (``PackedSequences``) and split
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

from orch.config.blend import blend_field, parse_blend
from orch.config.schema import Config, DataConfig
from orch.errors import Problem
from orch.runtime.data import (
    DataError,
    PackedSequences,
    StackedSamples,
    blend_picks,
    blend_weights,
    check_source,
    each_blended,
    held_out_start,
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


def size_problems(cfg: Config, count: int, held_out: str | None = None) -> list[Problem]:
    """Whether ``count`` tokens hold one global batch of ``train.seq_len`` sequences, and
    ``eval.batches`` of them (saying the most they allow): ``eval.path``'s, or those of the
    part ``data.holdout`` keeps of the training file ``held_out`` names."""
    ev, t = cfg.eval, cfg.train
    if held_out is None:
        where, named, said, longer = ("eval.path", repr(ev.path), f"eval.path {ev.path!r}",
                                      ("use a longer held-out file", "use a longer eval.path"))
    else:
        where, named, said = "data.holdout", held_out, held_out
        longer = ("raise data.holdout", "raise data.holdout")
    held = packed_samples(count, t.seq_len) // t.global_batch
    if held == 0:
        return [Problem(where, f"{named} holds {count} tokens, fewer than one global batch of "
                        f"train.global_batch={t.global_batch} sequences of "
                        f"train.seq_len={t.seq_len} needs ({t.global_batch * t.seq_len + 1})",
                        f"{longer[0]}, or lower train.global_batch or train.seq_len",
                        ("train.global_batch", "train.seq_len", "data"))]
    if ev.batches > held:
        return [Problem("eval.batches", f"{ev.batches}, but {said} holds "
                        f"{held} global batch{'es' if held > 1 else ''} of "
                        f"{t.global_batch} x {t.seq_len} tokens ({count} tokens)",
                        f"set eval.batches to at most {held}, or {longer[1]}",
                        (where, "train.global_batch", "train.seq_len", "data"))]
    return []


def eval_file_problems(cfg: Config) -> list[Problem]:
    """The launcher's checks of what evaluations read, before any process starts: ``eval.path``
    with ``data.path``'s rules (existence, readability, format, size from its size or header),
    or the part ``data.holdout`` keeps of the training files (its size); none when no evaluation
    is asked for (an empty path with an interval is the config's problem)."""
    if cfg.eval.interval <= 0:
        return []
    if not cfg.eval.path:
        return [] if cfg.data.holdout <= 0 else holdout_problems(cfg, _training_counts(cfg))
    source = read_like_data(cfg.data, cfg.eval.path)
    try:
        check_source(source)
        count = token_count(source)
    except DataError as exc:
        return [problem_of(exc.problem, "eval.path")]
    return [] if count is None else size_problems(cfg, count)


def _training_counts(cfg: Config) -> list[int | None]:
    """Each training file's token count, from its size or header (None: not known before it is
    read, or unreadable: the data checks say why)."""
    data = cfg.data
    if not data.path and not data.blend:
        return [len(load_tokens(data, cfg.model.vocab_size))]  # the shipped corpus: small

    def count(one: DataConfig) -> int | None:
        try:
            return token_count(one)
        except DataError:
            return None

    return each_blended(data, count) if data.blend else [count(data)]


def _training_names(cfg: Config) -> list[str]:
    data = cfg.data
    if data.blend:
        return [f"{blend_field(i)} {path!r}" for i, (_, path) in enumerate(
            parse_blend(data.blend)[0])]
    return [f"data.path {data.path!r}" if data.path else "the shipped corpus"]


def holdout_problems(cfg: Config, counts: list[int | None]) -> list[Problem]:
    """Whether the parts ``data.holdout`` keeps of the training files (of ``counts`` tokens
    each; None: unknown) hold what each evaluation reads: ``eval.batches`` global batches, from
    a blend's files by its weights (:func:`held_out_samples`)."""
    h, names = cfg.data.holdout, _training_names(cfg)
    held = [None if n is None else n - held_out_start(n, h) for n in counts]
    if not cfg.data.blend:
        return [] if held[0] is None else size_problems(
            cfg, held[0], f"the held-out part (data.holdout={h:g}) of {names[0]}")
    needed = _blend_needs(cfg)
    return [Problem("data.holdout", f"{h:g} holds out {have} tokens of {name}, "
                    f"{packed_samples(have, cfg.train.seq_len)} samples, but each evaluation "
                    f"draws {need} from it by the blend's weights ({cfg.eval.batches} global "
                    f"batch(es) of {cfg.train.global_batch})", "raise data.holdout, or lower "
                    "eval.batches", ("eval.batches", "train.global_batch", "train.seq_len",
                                     "data.blend"))
            for name, have, need in zip(names, held, needed, strict=True)
            if have is not None and packed_samples(have, cfg.train.seq_len) < need]


def _blend_needs(cfg: Config) -> np.ndarray:
    """How many held-out samples of each ``data.blend`` file an evaluation reads."""
    weights = np.asarray(blend_weights(cfg.data))
    picks = blend_picks(weights, np.zeros(len(weights), dtype=np.int64),
                        cfg.eval.batches * cfg.train.global_batch)
    return np.bincount(picks, minlength=len(weights))


def held_out_samples(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample an evaluation reads, stacked as ``(inputs, targets)``: the first
    ``eval.batches x train.global_batch`` of ``eval.path``, or of the part ``data.holdout``
    keeps of the training data (a blend's files in its weights' order, each file's held-out
    samples in file order). Raises the launcher's problems for what only reading tells (a large
    gzip file's size, ids beyond the vocabulary)."""
    t, wanted = cfg.train, cfg.eval.batches * cfg.train.global_batch
    if cfg.eval.path:
        source = read_like_data(cfg.data, cfg.eval.path)
        try:
            tokens = load_tokens(source, cfg.model.vocab_size, limit=wanted * t.seq_len + 1)
        except DataError as exc:
            raise DataError.of(problem_of(exc.problem, "eval.path")) from None
        if problems := size_problems(cfg, len(tokens)):
            raise DataError.of(problems[0])
        return PackedSequences(tokens, t.seq_len).gather(np.arange(wanted))
    files = (each_blended(cfg.data, lambda one: load_tokens(one, cfg.model.vocab_size))
             if cfg.data.blend else [load_tokens(cfg.data, cfg.model.vocab_size)])
    if problems := holdout_problems(cfg, [len(tokens) for tokens in files]):
        raise DataError.of(problems[0])
    held = [tokens[held_out_start(len(tokens), cfg.data.holdout):] for tokens in files]
    if not cfg.data.blend:
        return PackedSequences(held[0], t.seq_len).gather(np.arange(wanted))
    weights = np.asarray(blend_weights(cfg.data))
    picks = blend_picks(weights, np.zeros(len(weights), dtype=np.int64), wanted)
    inputs = torch.empty(wanted, t.seq_len, dtype=torch.int64)
    targets = torch.empty_like(inputs)
    for part in np.unique(picks):
        rows = torch.from_numpy(np.flatnonzero(picks == part))
        inputs[rows], targets[rows] = PackedSequences(held[part], t.seq_len).gather(
            np.arange(len(rows)))
    return inputs, targets


def load_eval_batches(cfg: Config, dp_rank: int, dp_size: int) -> list[MicroBatches]:
    """This rank's micro-batches of each of the ``eval.batches`` global batches of
    :func:`held_out_samples`, ``train.global_batch`` a batch in order, each split as training
    splits its own."""
    t = cfg.train
    samples = StackedSamples(*held_out_samples(cfg))
    return [rank_micro_batches(samples, np.arange(b * t.global_batch, (b + 1) * t.global_batch),
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
