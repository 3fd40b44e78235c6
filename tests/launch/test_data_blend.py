"""``data.blend`` under ``orch launch``: every entry's file checked before start, and a blended
run resumed onto another number of ranks trains the uninterrupted run's losses and evaluates its
files' held-out parts (``data.holdout``) as it does."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from launch_harness import eval_metrics, launch, metrics, overrides

from orch.errors import OrchError
from orch.launch.launcher import prepare

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def corpus(path: Path, letters: str, size: int = 40_000) -> Path:
    rng = random.Random(letters)
    path.write_text("".join(rng.choice(letters) for _ in range(size)))
    return path


def test_every_blended_file_is_checked_before_start(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short for one sample")
    np.save(tmp_path / "floats.npy", np.zeros(10, np.float32))
    blend = (f'data.blend=["1 {tmp_path}/missing.txt", "1 {short}", "1 {tmp_path}/floats.npy", '
             f'"2 {corpus(tmp_path / "fine.txt", "ab ")}", "0 {tmp_path}/fine.txt"]')
    with pytest.raises(OrchError) as info:
        prepare(["--nproc-per-node", "1", "configs/tiny.yaml", *overrides(tmp_path / "run",
                                                                            blend)])
    said = str(info.value)
    assert f"data.blend[0]: '{tmp_path}/missing.txt' does not exist" in said
    assert "data.blend[1]: the data has 24 tokens to train on, fewer than one sample of " \
        in said
    assert "data.blend[2]: " in said and "1-D integer array" in said
    # regression: a refused weight once hid every file problem (the whole list stood in, empty)
    assert f"data.blend[4]: '0 {tmp_path}/fine.txt': its weight 0 is not a positive" in said
    assert "data.blend[3]" not in said and "data.path" not in said


def test_a_blended_run_resumed_on_other_ranks_trains_the_uninterrupted_losses(tmp_path):
    blend = (f'data.blend=["0.75 {corpus(tmp_path / "a.txt", "abcd ")}", '
             f'"0.25 {corpus(tmp_path / "b.txt", "wxyz ", 5_000)}"]')
    args = [blend, "train.steps=4", "checkpoint.interval=2", "data.holdout=0.05",
            "eval.interval=2"]  # evaluated on the files' held-out parts
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = launch("--nproc-per-node", "1", "configs/tiny.yaml", *overrides(whole, *args))
    assert out.returncode == 0, out.stdout + out.stderr
    first = launch("--nproc-per-node", "2", "configs/tiny.yaml",
                   *overrides(split, *args, "run.stop_at_step=2"))
    assert first.returncode == 0, first.stdout + first.stderr
    second = launch("--nproc-per-node", "1", "configs/tiny.yaml", *overrides(split, *args))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in second.stdout
    assert [m["step"] for m in metrics(split)] == [1, 2, 3, 4]
    # two ranks' reduction order differs from one's in the last bits
    assert [m["loss"] for m in metrics(split)] == pytest.approx(
        [m["loss"] for m in metrics(whole)], rel=1e-5)
    evaluated = [(m["step"], m["eval_tokens"]) for m in eval_metrics(split)]
    assert evaluated == [(m["step"], m["eval_tokens"]) for m in eval_metrics(whole)] == [
        (2, 8 * 64), (4, 8 * 64)]
    assert [m["eval_loss"] for m in eval_metrics(split)] == pytest.approx(
        [m["eval_loss"] for m in eval_metrics(whole)], rel=1e-5)
    # the same files under other spellings and the same weights written otherwise resume (a
    # path respelled was refused as another config); other weights are refused
    respelled = [f'data.blend=["3 {tmp_path}/./a.txt", ".1e1 {tmp_path}/b.txt"]',
                 "train.steps=6", *args[2:]]
    prepare(["--nproc-per-node", "1", "configs/tiny.yaml", *overrides(split, *respelled)])
    with pytest.raises(OrchError, match="data.blend: 2 files of weights \\[0.6667, 0.3333\\], "
                       "but the checkpoint was trained on 2 of weights \\[0.75, 0.25\\]"):
        prepare(["--nproc-per-node", "1", "configs/tiny.yaml", *overrides(
            split, f'data.blend=["2 {tmp_path}/a.txt", "1 {tmp_path}/b.txt"]', *respelled[1:])])
    # each file is checked on resume as data.path is: one rewritten is refused, named
    smaller = tmp_path / "b.txt"
    smaller.write_text(smaller.read_text().upper())
    with pytest.raises(OrchError) as info:
        prepare(["--nproc-per-node", "1", "configs/tiny.yaml",
                 *overrides(split, *args, "train.steps=6")])
    assert (f"data.blend[1]: '{smaller}' is not the data the checkpoint was trained on (the "
            "same size, 5,000 bytes, but other contents)") in str(info.value)


def test_text_in_a_blend_is_refused_with_a_checkpoint_of_another_vocabulary(tmp_path):
    from orch.config.schema import DataConfig, ModelConfig
    from orch.models.hf_load import text_data_problems

    (tmp_path / "config.json").write_text('{"vocab_size": 512}')
    np.save(tmp_path / "ids.npy", np.arange(10, dtype=np.uint16))
    found = text_data_problems(ModelConfig(init_from=str(tmp_path)), DataConfig(
        blend=[f"1 {tmp_path}/ids.npy", f"1 {corpus(tmp_path / 'a.txt', 'ab')}"]))
    assert [p.where for p in found] == ["data.blend[1]"]
    assert "is text tokenized as bytes (ids 0-255), but model.init_from" in found[0].message
    assert "then make data.blend[1] 'WEIGHT DATA.bin'" in found[0].fix
