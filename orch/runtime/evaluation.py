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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from orch.config.blend import blend_field, blend_weights, parse_blend
from orch.config.schema import Config, DataConfig
from orch.errors import Problem
from orch.runtime.blend import BlendedSequences, blend_picks
from orch.runtime.data import (
    DataError,
    PackedSequences,
    Samples,
    check_ids,
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


class HeldOut(NamedTuple):
    """What an evaluation reads, as its size problems name it: the field they are said of,
    the source after that field, the source in another field's problem, and the fix's way to
    more of it."""

    field: str
    named: str
    said: str
    more: str

    @classmethod
    def eval_path(cls, cfg: Config) -> HeldOut:
        path = repr(cfg.eval.path)
        return cls("eval.path", path, f"eval.path {path}", "use a longer eval.path")

    @classmethod
    def part_of(cls, cfg: Config, file: str) -> HeldOut:
        """The part ``data.holdout`` keeps of the training file ``file`` names."""
        part = f"the held-out part (data.holdout={cfg.data.holdout:g}) of {file}"
        return cls("data.holdout", part, part, "raise data.holdout")


def size_problems(cfg: Config, count: int, source: HeldOut | None = None) -> list[Problem]:
    """Whether ``count`` tokens of ``source`` (default ``eval.path``) hold one global batch of
    ``train.seq_len`` sequences, and ``eval.batches`` of them (saying the most they allow)."""
    ev, t = cfg.eval, cfg.train
    source = source or HeldOut.eval_path(cfg)
    held = packed_samples(count, t.seq_len) // t.global_batch
    if held == 0:
        return [Problem(source.field, f"{source.named} holds {count} tokens, fewer than one "
                        f"global batch of train.global_batch={t.global_batch} sequences of "
                        f"train.seq_len={t.seq_len} needs ({t.global_batch * t.seq_len + 1})",
                        f"{source.more}, or lower train.global_batch or train.seq_len",
                        ("train.global_batch", "train.seq_len", "data"))]
    if ev.batches > held:
        return [Problem("eval.batches", f"{ev.batches}, but {source.said} holds "
                        f"{held} global batch{'es' if held > 1 else ''} of "
                        f"{t.global_batch} x {t.seq_len} tokens ({count} tokens)",
                        f"set eval.batches to at most {held}, or {source.more}",
                        (source.field, "train.global_batch", "train.seq_len", "data"))]
    return []


def eval_file_problems(cfg: Config) -> list[Problem]:
    """The launcher's checks of what evaluations read, before any process starts: ``eval.path``
    with ``data.path``'s rules (existence, readability, format, size from its size or header,
    or for gzip text by decompressing the part evaluations read),
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
        if count is None:  # gzip text past its sniffed head: decompress as far as evaluations
            # read (a file that ends sooner is then counted whole), or every rank stopped on it
            count = len(load_tokens(source, cfg.model.vocab_size, limit=eval_tokens(cfg),
                                    checked=False))
    except DataError as exc:
        return [problem_of(exc.problem, "eval.path")]
    return size_problems(cfg, count)


def eval_tokens(cfg: Config) -> int:
    """The tokens of ``eval.path`` that evaluations read: ``eval.batches`` global batches of
    ``train.seq_len``-token samples packed back to back (each sharing its last token with the
    next one's first), the first of them alone."""
    t = cfg.train
    return cfg.eval.batches * t.global_batch * t.seq_len + 1


def _training_counts(cfg: Config) -> list[int | None]:
    """Each training file's token count, from its size or header (None: not known before it is
    read, or unreadable: the data checks say why)."""
    data = cfg.data
    if not data.path and not data.blend:  # the shipped corpus: small, read (its ids: not here)
        return [len(load_tokens(data, cfg.model.vocab_size, checked=False))]

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
    a blend's files by its weights (:func:`eval_samples`)."""
    h, names = cfg.data.holdout, _training_names(cfg)
    held = [None if n is None else n - held_out_start(n, h) for n in counts]
    if not cfg.data.blend:
        return [] if held[0] is None else size_problems(cfg, held[0],
                                                        HeldOut.part_of(cfg, names[0]))
    needed = np.bincount(_blend_picks(cfg), minlength=len(counts))
    return [Problem("data.holdout", f"{h:g} holds out {have} tokens of {name}, "
                    f"{packed_samples(have, cfg.train.seq_len)} samples, but each evaluation "
                    f"draws {need} from it by the blend's weights ({cfg.eval.batches} global "
                    f"batch(es) of {cfg.train.global_batch})", "raise data.holdout, or lower "
                    "eval.batches", ("eval.batches", "train.global_batch", "train.seq_len",
                                     "data.blend"))
            for name, have, need in zip(names, held, needed, strict=True)
            if have is not None and packed_samples(have, cfg.train.seq_len) < need]


def _blend_picks(cfg: Config) -> np.ndarray:
    """Which ``data.blend`` file each sample of an evaluation comes from, by the weights."""
    weights = np.asarray(blend_weights(cfg.data.blend))
    return blend_picks(weights, np.zeros(len(weights), dtype=np.int64),
                       cfg.eval.batches * cfg.train.global_batch)


def eval_samples(cfg: Config) -> tuple[Samples, np.ndarray]:
    """What evaluations read and in which order: the first ``eval.batches x
    train.global_batch`` samples of ``eval.path``, or of the part ``data.holdout`` keeps of the
    training data (a blend's files in its weights' order, each file's held-out samples in file
    order). Only what is used is read for ids (a token file's training part is mapped, not
    scanned: training scans it). Raises the launcher's problems for what only reading tells (a
    large gzip file's size, ids beyond the vocabulary)."""
    t, vocab, wanted = cfg.train, cfg.model.vocab_size, cfg.eval.batches * cfg.train.global_batch
    if cfg.eval.path:
        source = read_like_data(cfg.data, cfg.eval.path)
        try:
            tokens = load_tokens(source, vocab, limit=eval_tokens(cfg))
        except DataError as exc:
            raise DataError.of(problem_of(exc.problem, "eval.path")) from None
        if problems := size_problems(cfg, len(tokens)):
            raise DataError.of(problems[0])
        return PackedSequences(tokens, t.seq_len), np.arange(wanted)

    def held_part(one: DataConfig) -> tuple[int, np.ndarray]:
        """The file's token count and its held-out part, whose ids are checked."""
        tokens = load_tokens(one, vocab, checked=False)
        held = tokens[held_out_start(len(tokens), one.holdout):]
        check_ids(held, vocab, one)
        return len(tokens), held

    read = each_blended(cfg.data, held_part) if cfg.data.blend else [held_part(cfg.data)]
    if problems := holdout_problems(cfg, [count for count, _ in read]):
        raise DataError.of(problems[0])
    parts = [part for _, part in read]
    if not cfg.data.blend:
        return PackedSequences(parts[0], t.seq_len), np.arange(wanted)
    picks = _blend_picks(cfg)
    used = list(np.unique(picks))  # a file the evaluation draws nothing from may hold none
    weights = blend_weights(cfg.data.blend)
    data = BlendedSequences([PackedSequences(parts[f], t.seq_len) for f in used],
                            [weights[f] for f in used])
    order = np.empty(wanted, dtype=np.int64)
    for slot, part in enumerate(used):
        rows = np.flatnonzero(picks == part)
        order[rows] = data.offsets[slot] + np.arange(len(rows))
    return data, order


def load_eval_batches(cfg: Config, dp_rank: int, dp_size: int) -> list[MicroBatches]:
    """This rank's micro-batches of each of the ``eval.batches`` global batches of
    :func:`eval_samples`, ``train.global_batch`` a batch in order, each split as training
    splits its own (each rank gathers its share alone)."""
    g = cfg.train.global_batch
    samples, order = eval_samples(cfg)
    return [rank_micro_batches(samples, order[b * g:(b + 1) * g], cfg.train.micro_batch,
                               dp_rank, dp_size)
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


__all__ = ["Evaluation", "HeldOut", "eval_file_problems", "eval_samples", "isolated",
           "load_eval_batches", "size_problems"]
