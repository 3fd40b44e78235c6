"""``orch launch`` lists the config's problems beside the plan's and its own, in one round.

A config problem stopped the launch before the plan was built: ``--set train.lr=abc`` with
``parallel.dp_shard=2`` on 3 processes said only the lr; fixed, a second launch said the world
size. What a check finds about a stand-in (a failed value's default) is not said."""

from __future__ import annotations

from pathlib import Path

import pytest

from orch.errors import ConfigError
from orch.launch.launcher import prepare


def _refused(run_dir: Path, *sets: str) -> ConfigError:
    argv = ["--nproc-per-node", "3", "configs/tiny.yaml", "--set", f"run.dir={run_dir}",
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
