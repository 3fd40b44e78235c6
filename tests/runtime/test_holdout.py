"""``data.holdout``: the last fraction of each training file kept out of training and evaluated
on instead of an ``eval.path`` (Megatron's ``--split``): training never reads it, evaluations
read its first samples in order, a blend's by its weights, and a held-out part too small for an
evaluation is said before start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orch.config import load_config
from orch.runtime.blend import training_stream
from orch.runtime.data import DataError, PackedSequences, held_out_start
from orch.runtime.evaluation import eval_file_problems, eval_samples

SEQ, BATCH = 8, 4


def ids(tmp_path: Path, name: str, count: int, offset: int = 0) -> Path:
    """A .npy of ``count`` ids that say their place (``offset + position``)."""
    path = tmp_path / name
    np.save(path, (offset + np.arange(count)).astype(np.uint16))
    return path


def held_out_samples(config):
    """Every sample an evaluation reads, in its order, as ``(inputs, targets)``."""
    samples, order = eval_samples(config)
    return samples.gather(order)


def cfg(*sets: str):
    return load_config("configs/tiny.yaml", [f"train.seq_len={SEQ}", f"train.global_batch={BATCH}",
                                             "train.micro_batch=1", "eval.interval=5",
                                             "model.vocab_size=10000", *sets])


def test_training_stops_where_the_held_out_part_starts_and_evaluations_read_it_in_order(
        tmp_path):
    path = ids(tmp_path, "a.npy", 1000)
    config = cfg(f"data.path={path}", "data.holdout=0.1", "eval.batches=2")
    assert held_out_start(1000, 0.1) == 900 and held_out_start(1000, 0.0) == 1000
    assert held_out_start(100, 0.07) == 93  # ceil(100 x 0.07) is 7; in binary floats, 8
    stream = training_stream(config, 0, 1, None)
    assert len(stream.dataset.tokens) == 900  # the sampler cannot reach the held-out tokens
    inputs, targets = held_out_samples(config)
    expected = PackedSequences(np.load(path)[900:], SEQ).gather(np.arange(2 * BATCH))
    assert inputs.tolist() == expected[0].tolist() and targets.tolist() == expected[1].tolist()
    assert inputs[0, 0] == 900


def test_a_blend_evaluates_each_files_held_out_part_by_its_weights(tmp_path):
    a, b = ids(tmp_path, "a.npy", 2000), ids(tmp_path, "b.npy", 4000, offset=5000)
    config = cfg(f'data.blend=["3 {a}", "1 {b}"]', "data.holdout=0.05", "eval.batches=2")
    inputs, _ = held_out_samples(config)
    firsts = inputs[:, 0].tolist()
    # 3:1 -> 6 samples of a's held-out part (from token 1900), 2 of b's (from token 3800)
    a_held = [1900 + SEQ * k for k in range(6)]
    b_held = [5000 + 3800 + SEQ * k for k in range(2)]
    assert sorted(firsts) == sorted(a_held + b_held)
    assert [x for x in firsts if x in a_held] == a_held  # each file's in file order
    assert [x for x in firsts if x in b_held] == b_held


def test_a_held_out_part_too_small_for_an_evaluation_is_said_before_start(tmp_path):
    path = ids(tmp_path, "a.npy", 1000)
    problems = eval_file_problems(cfg(f"data.path={path}", "data.holdout=0.05",
                                      "eval.batches=2"))  # 50 tokens: one batch of 4 x 8
    assert [str(p) for p in problems] == [
        f"eval.batches: 2, but the held-out part (data.holdout=0.05) of data.path '{path}' "
        "holds 1 global batch of 4 x 8 tokens (50 tokens)\n"
        "    fix: set eval.batches to at most 1, or raise data.holdout"]
    small = ids(tmp_path, "small.npy", 200)
    (said,) = eval_file_problems(cfg(f'data.blend=["1 {path}", "1 {small}"]',
                                     "data.holdout=0.05", "eval.batches=2"))
    assert said.where == "data.holdout" and f"data.blend[1] '{small}'" in said.message
    assert "10 tokens of" in said.message and "1 samples, but each evaluation draws 4" in (
        said.message)
    with pytest.raises(DataError, match="data.holdout"):  # as the workers say it
        held_out_samples(cfg(f'data.blend=["1 {path}", "1 {small}"]', "data.holdout=0.05",
                             "eval.batches=2"))


def test_the_training_part_must_still_hold_a_global_batch(tmp_path):
    from orch.launch.launcher import _check_data

    path = ids(tmp_path, "a.npy", 40)  # 4 samples of 8 + 1; held out, 3
    assert _check_data(cfg(f"data.path={path}", "eval.interval=0")) == []
    (said,) = _check_data(cfg(f"data.path={path}", "data.holdout=0.2", "eval.interval=0"))
    assert "but the data has 32 to train on (3 samples)" in said.message
    assert "data.holdout" in said.fix
