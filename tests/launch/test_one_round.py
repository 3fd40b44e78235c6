"""``orch launch`` lists the config's problems beside the plan's and its own, in one round.

A config problem stopped the launch before the plan was built: ``--set train.lr=abc`` with
``parallel.dp_shard=2`` on 3 processes said only the lr; fixed, a second launch said the world
size. What a check finds about a stand-in (a failed value's default) is not said."""

from __future__ import annotations

from pathlib import Path

import pytest

from orch.errors import ConfigError
from orch.launch.launcher import prepare


def _refused(run_dir: Path, *sets: str, nproc: int = 3) -> ConfigError:
    argv = ["--nproc-per-node", str(nproc), "configs/tiny.yaml", "--set", f"run.dir={run_dir}",
            *[arg for item in sets for arg in ("--set", item)]]
    with pytest.raises(ConfigError) as refused:
        prepare(argv)
    assert refused.value.title == "cannot launch" and not run_dir.exists()
    return refused.value


@pytest.mark.parametrize("setting, said", [
    ("train.lr=abc", "--set train.lr: 'abc' is not a number"),
    ("train.warmup_steps=900", "train.warmup_steps: 900 is not between 0 and train.steps=500"),
])
def test_a_config_problem_and_the_world_size_in_one_error(tmp_path: Path, setting: str,
                                                          said: str):
    error = _refused(tmp_path / "run", "parallel.dp_shard=2", setting)
    first, world = error.problems
    assert str(first).startswith(said)
    assert world.where == "parallel" and "= 2, not the world size 3" in world.message


def test_nothing_is_said_of_a_failed_values_default(tmp_path: Path):
    """tp's default (1) made dp 3 on 3 processes, which global_batch 8 with micro_batch 2 does
    not divide: the user's tp might not; only tp itself is said."""
    error = _refused(tmp_path / "run", "parallel.tp=abc")
    assert [p.where for p in error.problems] == ["--set parallel.tp"]


def test_a_drill_is_not_judged_against_a_failed_values_default(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """steps=abc stood in at its default 100, and the drill at step 300 (the file has 500
    steps) was said to fire after the run's last step, 100."""
    monkeypatch.setenv("ORCH_DRILL", "kill rank=0 step=300")
    error = _refused(tmp_path / "run", "train.steps=abc", nproc=1)
    assert [p.where for p in error.problems] == ["--set train.steps"]


def test_the_world_size_is_said_beside_another_fields_problem_in_its_section(tmp_path: Path):
    """The world-size product, said at ``parallel``, reads the degrees: a failed cp_kind (in
    the same section) dropped it."""
    error = _refused(tmp_path / "run", "parallel.tp=3", "parallel.cp_kind=rinng", nproc=2)
    kind, world, *tp_rules = error.problems
    assert kind.where == "--set parallel.cp_kind"
    assert world.where == "parallel" and "x 3 = 3" in world.message
    assert any("model.heads=8 is not divisible by tp=3" in p.message for p in tp_rules)


def test_a_problem_whose_text_has_a_failed_fields_name_as_a_word_is_said(tmp_path: Path):
    """The offload problem says a process "steps a share" of the model: a failed train.steps
    dropped it, its name being an ordinary word."""
    error = _refused(tmp_path / "run", "offload.params=cpu", "offload.grads=cpu",
                     "offload.optimizer=cpu", "train.steps=abc", nproc=2)
    steps, offload = error.problems
    assert steps.where == "--set train.steps"
    assert offload.where == "offload" and "with 2 processes" in offload.message


def test_a_budget_problem_is_said_beside_a_failed_field_the_memory_model_does_not_read(
        tmp_path: Path):
    """The budget problems read "the whole model, train, optimizer, parallel and offload
    sections": a failed train.lr (or offload.nvme_path) dropped the device_budget problem."""
    error = _refused(tmp_path / "run", "offload.params=cpu", "offload.grads=cpu",
                     "offload.optimizer=cpu", "offload.device_budget=1000", "train.lr=-1", nproc=1)
    assert [p.where for p in error.problems] == ["train.lr", "offload.device_budget"]




@pytest.mark.parametrize("refused, said", [
    (("model.max_seq_len=128", "train.seq_len=256"), ["train.seq_len", "offload.nvme_path"]),
    (("train.steps=1", "train.warmup_steps=2"),
     ["train.warmup_steps", "offload.device_budget", "offload.nvme_path"]),
])
def test_a_refused_value_whose_default_is_refused_too_hides_no_other_problem(
        tmp_path: Path, refused: tuple[str, str], said: list[str]):
    """seq_len's default 256 is still past a max_seq_len of 128 (warmup's default 10 past one
    step): the whole train section stood in, then the whole config, and the launch said only
    the seq_len, not the nvme_path that is not a directory nor the budget below one layer.
    Now the field the rule compared with stands in too, and nothing else (the budget reads
    train.seq_len, for the activations, but not train.steps)."""
    error = _refused(tmp_path / "run", *refused, "offload.params=nvme", "offload.grads=nvme",
                     "offload.optimizer=nvme", f"offload.nvme_path={tmp_path / 'absent'}",
                     "offload.device_budget=10kB", nproc=1)
    assert [p.where for p in error.problems] == said
