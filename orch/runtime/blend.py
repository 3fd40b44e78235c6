"""``data.blend``'s training samples: several files' samples in one index space, dealt out by
weight (Tijdeman's rule), each file walking its own permutation; and the training stream of a
run, one file's (:class:`~orch.runtime.data.BatchStream`) or a blend's (:class:`BlendStream`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from orch.config.blend import blend_weights
from orch.config.schema import Config, DataConfig
from orch.errors import ProblemsError
from orch.runtime.data import (
    FRESH,
    BatchStream,
    DataError,
    GlobalBatches,
    PackedSequences,
    every_blended,
    held_out_start,
    load_tokens,
    packed_samples,
    token_count,
    too_short,
)


def check_blended_file(data: DataConfig, seq_len: int) -> None:
    """The launcher's check of one ``data.blend`` file: readable, of a format orch reads, and
    holding at least one sample where its size tells (every file gives samples in turn, so
    none needs a global batch of its own)."""
    count = token_count(data)
    if count is not None and packed_samples(trained := held_out_start(count, data.holdout),
                                            seq_len) == 0:
        raise too_short(trained, seq_len)


class BlendedSequences:
    """The samples of several files (each :class:`PackedSequences` of one ``seq_len``) in one
    index space, file after file, with each file's share of the training samples
    (``data.blend``'s normalized weights)."""

    def __init__(self, parts: list[PackedSequences], weights: list[float]) -> None:
        if len(parts) != len(weights) or not parts:
            raise ValueError(f"{len(parts)} files for {len(weights)} weights")
        self.parts = parts
        self.weights = np.asarray(weights, dtype=np.float64)
        self.sizes = np.array([len(part) for part in parts], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes)[:-1]))
        self.seq_len = parts[0].seq_len

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``indices`` of the joint index space, stacked in their order, as
        :meth:`PackedSequences.gather` stacks one file's."""
        indices = np.asarray(indices, dtype=np.int64)
        owner = np.searchsorted(self.offsets, indices, side="right") - 1
        inputs = torch.empty(len(indices), self.seq_len, dtype=torch.int64)
        targets = torch.empty_like(inputs)
        for part in np.unique(owner):
            rows = torch.from_numpy(np.flatnonzero(owner == part))
            inputs[rows], targets[rows] = self.parts[part].gather(
                indices[rows.numpy()] - self.offsets[part])
        return inputs, targets


def blend_picks(weights: np.ndarray, taken: np.ndarray, count: int) -> np.ndarray:
    """Which file each of the next ``count`` samples of a blend comes from, after each file
    ``f`` has given ``taken[f]``, by Tijdeman's rule for the chairman assignment problem: of
    the files at least ``c = 1 / (2k - 2)`` below their share ``weights[f]`` of the samples so
    far (``k`` files), the one whose next sample is due first. Every file's count then stays
    within ``1 - c`` of its share after every sample (picking the file furthest below its
    share, Megatron's rule, let one fall more than a sample behind among six files)."""
    taken = taken.copy()
    picks = np.zeros(count, dtype=np.int64)
    if len(weights) == 1:
        return picks
    c = 1.0 / (2 * len(weights) - 2)
    for i in range(count):
        due = weights * (taken.sum() + 1) - taken
        urgency = np.where(due >= c - 1e-12, (taken + 1 - c) / weights, np.inf)
        picks[i] = int(np.argmin(urgency))
        taken[picks[i]] += 1
    return picks


class BlendStream(GlobalBatches):
    """A ``data.blend``'s global batches: each sample's file is dealt by :func:`blend_picks`
    (after ``n`` samples, file ``f`` has given within one of ``weight_f * n``, at every step,
    not only on average), and file ``f``'s ``k``-th sample is entry ``k mod size_f`` of its own
    permutation for epoch ``k // size_f``, from ``default_rng((seed, f, epoch))``: a small file
    repeats in a fresh order while a large one is still in its first epoch. The position is how
    many samples each file has given."""

    def __init__(self, dataset: BlendedSequences, global_batch: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 source: dict[str, Any] | None = None) -> None:
        super().__init__(dataset, global_batch, micro_batch, dp_rank, dp_size, seed, source)
        self.taken = np.zeros(len(dataset.parts), dtype=np.int64)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # file -> (epoch, permutation)

    def _permutation(self, part: int, epoch: int) -> np.ndarray:
        if part not in self._orders or self._orders[part][0] != epoch:
            rng = np.random.default_rng((self.seed, part, epoch))
            self._orders[part] = (epoch, rng.permutation(int(self.dataset.sizes[part])))
        return self._orders[part][1]

    def _position(self) -> str:
        return f"data.blend's files had given {self.taken.tolist()} samples, seed {self.seed}"

    def _next_indices(self) -> np.ndarray:
        picks = blend_picks(self.dataset.weights, self.taken, self.global_batch)
        indices = np.empty_like(picks)
        for part in np.unique(picks):
            rows = np.flatnonzero(picks == part)
            size = int(self.dataset.sizes[part])
            ks = self.taken[part] + np.arange(len(rows))  # the file's k-th samples
            for epoch in np.unique(ks // size):  # a small file may wrap within a step
                now = ks // size == epoch
                indices[rows[now]] = self._permutation(part, int(epoch))[ks[now] % size]
            indices[rows] += self.dataset.offsets[part]
            self.taken[part] += len(rows)
        return indices

    def state_dict(self) -> dict[str, Any]:
        """How many samples each file has given, and each file's sample count (JSON-ready)."""
        return self._state({"blend_taken": self.taken.tolist(),
                            "blend_samples": self.dataset.sizes.tolist()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the step at which ``state`` was saved, on any ``dp_size``."""
        self._check_state(state, {"blend_taken", "blend_samples"})
        sizes = self.dataset.sizes.tolist()
        if list(state["blend_samples"]) != sizes:
            raise DataError(
                "data.blend",
                f"its files now give {sizes} samples of train.seq_len={self.dataset.seq_len}, "
                f"but the checkpoint's gave {state['blend_samples']}",
                f"resume with the same files and train.seq_len as the checkpoint, {FRESH}",
            )
        taken = [int(n) for n in state["blend_taken"]]
        if len(taken) != len(sizes) or min(taken) < 0 or sum(taken) % self.global_batch:
            raise DataError("checkpoint data state", f"blend position {taken} is not one this "
                            "blend reaches", f"the checkpoint is damaged; resume from an "
                            f"earlier one, {FRESH}")
        self.taken = np.asarray(taken, dtype=np.int64)


def training_stream(cfg: Config, dp_rank: int, dp_size: int,
                    source: dict[str, Any] | None) -> BatchStream | BlendStream:
    """The stream of data-parallel rank ``dp_rank``'s training micro-batches: ``data.path``'s,
    or ``data.blend``'s files mixed by their weights."""
    data, t, vocab_size = cfg.data, cfg.train, cfg.model.vocab_size
    args = (t.global_batch, t.micro_batch, dp_rank, dp_size, t.seed, source)

    def trained(one: DataConfig) -> PackedSequences:
        tokens = load_tokens(one, vocab_size)
        return PackedSequences(tokens[:held_out_start(len(tokens), one.holdout)], t.seq_len)

    if not data.blend:
        return BatchStream(trained(data), *args)
    parts, problems = every_blended(data, trained)  # what only reading tells (ids beyond the
    if problems:  # vocabulary), of every file
        raise ProblemsError(problems, title="cannot train on data.blend")
    return BlendStream(BlendedSequences(parts, blend_weights(data.blend)), *args)


