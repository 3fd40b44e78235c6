"""``orch launch`` refuses the torchrun options that change what each process runs, before any
process starts: it always runs its own worker. ``--run-path`` passed every check and then failed
in each worker (FileNotFoundError '.../orch.runtime.worker'); ``-m`` and ``--no-python`` were
accepted and silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orch.errors import PlanError
from orch.launch.launcher import launch_parser, prepare


@pytest.mark.parametrize("given, named", [("--run-path", "--run-path"), ("-m", "-m/--module"),
                                          ("--module", "-m/--module"),
                                          ("--no-python", "--no-python")])
def test_an_option_that_changes_what_runs_is_refused(tmp_path: Path, given: str, named: str):
    run_dir = tmp_path / "run"
    with pytest.raises(PlanError) as refused:
        prepare(["--nproc-per-node", "1", given, "configs/tiny.yaml", "--set",
                 f"run.dir={run_dir}"])
    [problem] = refused.value.problems
    assert problem.where == named and "orch launch always runs its own worker" in problem.message
    assert problem.fix.startswith(f"leave {named} out") and not run_dir.exists()


def test_torchruns_environment_variable_for_it_is_refused_too(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PET_NO_PYTHON", "1")  # torchrun reads it as --no-python
    with pytest.raises(PlanError, match="leave --no-python out \\(and PET_NO_PYTHON unset\\)"):
        prepare(["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path}"])


def test_the_help_says_so():
    text = launch_parser().format_help()
    assert text.count("refused: orch launch runs its own worker") == 3


@pytest.mark.parametrize("given, said", [
    pytest.param("gpu", "--nproc-per-node: gpu: this machine has no GPU that torch can see",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    ("two", "--nproc-per-node: 'two' is not a positive number"),  # gpu said this too
])
def test_a_process_count_this_machine_cannot_give_is_refused_saying_why(tmp_path: Path,
                                                                        given: str, said: str):
    with pytest.raises(PlanError, match=said):
        prepare(["--nproc-per-node", given, "configs/tiny.yaml", "--set", f"run.dir={tmp_path}"])


def test_a_torchrun_option_after_config_is_said_to_go_before_it(tmp_path: Path, capsys):
    """argparse said only 'unrecognized arguments: --max-restarts 2'."""
    with pytest.raises(SystemExit) as refused:
        prepare(["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path}",
                 "--max-restarts", "2", "--nnode=1", "--bogus", "-h"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --max-restarts 2 --nnode=1 --bogus -h (--max-restarts, " \
        "--nnode=1: torchrun options go before CONFIG: orch launch [torchrun options] " \
        "CONFIG" in err
