"""Two nodes started with different configs stop at once with one message, instead of hanging.

Two ``orch launch`` processes on this machine form a 2-node job (one rank each) through a c10d
rendezvous on localhost. Each validates its own config and plans a world of 2 happily, but the
second was given another learning rate: the workers compare plan fingerprints before building
any mesh, and every rank stops; only rank 0 explains, naming which ranks hold which plan, and
the other node's first worker says where to look.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from gloo_harness import run_on_gloo
from launch_harness import ORCH, REPO, launch, overrides

from orch.cluster.netbed import run_together
from orch.config.schema import DataConfig
from orch.launch.launcher import PLANNED_WORLD, planned_world_problem, prepare

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(port: int, node_args: dict[int, list[str]]) -> dict[str, list[str]]:
    """The ``orch launch`` command of each node of a 2-node job (one rank each) meeting at a
    c10d rendezvous on ``port``; ``node_args`` follow each node's CONFIG."""
    return {f"node {node}": [
        str(ORCH), "launch", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
        "agreement", "configs/tiny.yaml", *args] for node, args in node_args.items()}


def speaker(done: dict[str, tuple[int | None, str]], what: str = "plan") -> str:
    """What rank 0's node said, after checking that every node stopped as bad input (exit 2)
    before training, rank 0 explaining once and the other node pointing there in one line."""
    assert all(code == 2 for code, _ in done.values()), done
    said = [output for _, output in done.values()]
    assert all("step 1/" not in text for text in said)
    speakers = [text for text in said if "ranks disagree (" in text]
    assert len(speakers) == 1 and speakers[0].count("ranks disagree") == 1, done
    other = next(text for text in said if text is not speakers[0])
    assert other.count("ranks disagree") == 1, other
    assert f"orch worker: ranks disagree on the {what}; rank 0's node shows how" in other
    return speakers[0]


def test_nodes_with_different_configs_stop_with_one_message(tmp_path):
    port = free_port()
    commands = two_nodes(port, {node: overrides(tmp_path / "run", f"train.lr={lr}")
                                for node, lr in ((0, "0.001"), (1, "0.002"))})
    done = run_together(commands, REPO, timeout=240)
    # bad input (the nodes' commands disagree), which the workers find: exit 2 on every node
    message = speaker(done)
    for _, text in done.values():  # not silent while the others join; a c10d rendezvous
        # numbers the nodes as they join, so no node claims a rank (each said its --node-rank)
        assert (f"orch launch: this node (one of 2, numbered as they join) waits at "
                f"127.0.0.1:{port} for the others") in text
    # Only rank 0 explains; with a c10d rendezvous that is whichever node joined first. The
    # other node's launcher shows only its own worker, which points there in one line.
    assert "ranks 0 have fsdp2, config " in message and "ranks 1 have fsdp2, config " in message
    assert "differing: train.lr: 0.001 on ranks 0, 0.002 on ranks 1" in message  # which one
    assert "fix: start every node with the same config file, --set overrides" in message
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing recorded for a bad start


def test_nodes_that_disagree_on_resuming_stop_with_one_message(tmp_path):
    """One node given --resume none over a run directory with checkpoints, the other resuming:
    the resume is resolved with collectives, which the two nodes entered differently (both hung
    until gloo's 30-minute timeout, or the resuming one crashed with a TypeError), so the mode
    in effect is compared before it."""
    run = tmp_path / "run"
    first = launch("--nproc-per-node", "1", "configs/tiny.yaml",
                   *overrides(run, "train.steps=2", "checkpoint.interval=2"), timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    commands = two_nodes(free_port(), {0: overrides(run, "train.steps=4"),
                                       1: [*overrides(run, "train.steps=4"), "--resume", "none"]})
    message = speaker(run_together(commands, REPO, timeout=240))
    # c10d numbers the nodes as they join: either may be rank 0
    assert re.search(r'differing: --resume or checkpoint\.resume: ("auto" on ranks 0, "none" '
                     r'on ranks 1|"none" on ranks 0, "auto" on ranks 1)', message), message
    assert message.count("differing:") == 1 and "; train." not in message  # only the resume
    assert "--resume, data and orch version" in message


def test_a_worker_refuses_a_world_its_launcher_did_not_plan(tmp_path, monkeypatch):
    """Nodes given different --nnodes or --nproc-per-node each validated a plan of their own,
    while torchrun formed one world: the launcher gives its workers the world it planned."""
    monkeypatch.setenv(PLANNED_WORLD, "")  # prepare sets both; restored after the test
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    prepare(["--nnodes", "4", "--node-rank", "1", "--master-addr", "127.0.0.1",
             "--nproc-per-node", "1", "configs/tiny.yaml", *overrides(tmp_path / "run")])
    planned = "--nnodes 4 x --nproc-per-node 1 = 4 processes (1 on this node)"
    assert os.environ[PLANNED_WORLD] == f"4 1 {planned}"
    assert planned_world_problem(4, 1) is None
    said = planned_world_problem(2, 1)
    assert said == (
        f"--nnodes, --nproc-per-node: this node's launcher planned {planned}, but torchrun "
        "started 2 processes (1 on this node): the nodes were given different --nnodes or "
        "--nproc-per-node\n    fix: give every node the same --nnodes and --nproc-per-node "
        "(under a cluster description, --nproc-per-node as its node's devices)")
    assert planned_world_problem(4, 2) is not None  # another --nproc-per-node on this node
    monkeypatch.delenv(PLANNED_WORLD)
    assert planned_world_problem(2, 1) is None  # a worker that orch launch did not start


def test_a_node_given_another_nnodes_stops_every_node(tmp_path):
    """torchrun's static rendezvous made a world of 2 with a node given --nnodes 4, whose
    launcher had shown and checked a plan for 4: its worker says so, and both nodes stop."""
    port = free_port()
    commands = {f"node {node}": [
        str(ORCH), "launch", "--nnodes", nnodes, "--node-rank", str(node), "--nproc-per-node",
        "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "configs/tiny.yaml",
        *overrides(tmp_path / "run")] for node, nnodes in ((0, "2"), (1, "4"))}
    message = speaker(run_together(commands, REPO, timeout=240))
    assert ("rank 1: --nnodes, --nproc-per-node: this node's launcher planned --nnodes 4 x "
            "--nproc-per-node 1 = 4 processes (1 on this node), but torchrun started 2 "
            "processes (1 on this node)") in message
    assert "have no plan" not in message and "(1 problem)" in message  # the reason only


def test_the_settings_compared_include_the_data_files_size(tmp_path):
    """Nodes reading different copies of a relative data.path trained together on different
    samples: the size of each node's file is compared with the config."""
    from orch.config import load_config
    from orch.runtime.data import source_identity
    from orch.runtime.parallelize import _differences, _settings

    small, large = tmp_path / "a.txt", tmp_path / "b.txt"
    small.write_text("x" * 10)
    large.write_text("x" * 20)
    configs = [load_config(REPO / "configs/tiny.yaml", [f"data.path={path}"])
               for path in (small, small, large)]
    views = [_settings(cfg, source_identity(cfg.data)) for cfg in configs]
    assert views[0]["data.bytes"] == "10" and views[2]["data.bytes"] == "20"
    said = _differences(views)
    assert "data.bytes: 10 on ranks 0-1, 20 on ranks 2" in said and "data.path" in said
    # a relative eval.path too: nodes evaluating on different held-out files compared numbers
    # that meant nothing together
    held_out = [source_identity(DataConfig(path=str(path))) for path in (small, large)]
    views = [_settings(configs[0], source_identity(configs[0].data), one) for one in held_out]
    assert "eval.bytes: 10 on ranks 0, 20 on ranks 1" in _differences(views)


def _agree_in(rank: int, world: int, results: dict,
              cases: dict[str, tuple[str, list[str]]]) -> None:
    """Each case's agreement (on the ``plan`` or the ``run directory``) with this rank in the
    case's directory for it (a node of its own), reading data.path x.bin and writing run.dir
    run there; what each rank got."""
    from orch.config import load_config
    from orch.runtime.parallelize import RanksDisagree, agree_on_plan, agree_on_run_dir

    for case, (what, directories, *extra) in cases.items():
        cfg = load_config(REPO / "configs/tiny.yaml", ["data.path=x.bin", "run.dir=run",
                                                        *(extra[0] if extra else [])])
        os.chdir(directories[rank])
        try:
            if what == "plan":
                agree_on_plan(None, cfg, "auto")
            else:
                agree_on_run_dir(Path(cfg.run.dir))
            results[(case, rank)] = "agreed"
        except RanksDisagree as exc:
            results[(case, rank)] = str(exc) if exc.speaker else "stopped"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict]:
    """Four node directories (a, b and c hold a 40,000-byte x.bin, b's differing from the
    others' in its last byte; the fourth holds none; each a held.txt of its own, of one size)
    and what two gloo ranks got in each case, run in one process group."""
    root = tmp_path_factory.mktemp("nodes")
    dirs = [root / name for name in ("a", "b", "c", "empty")]
    for node, last in zip(dirs, (b"\0", b"\1", b"\0", None), strict=True):
        node.mkdir()
        if last is not None:
            (node / "x.bin").write_bytes(bytes(39_999) + last)
        (node / "held.txt").write_text(f"held-out text of node {node.name} " * 400)
    a, b, c, empty = (str(d) for d in dirs)
    cases = {"same data": ("plan", [a, c]), "other contents": ("plan", [a, b]),
             "missing": ("plan", [a, empty]), "shared run dir": ("run directory", [a, a]),
             "other held-out": ("plan", [a, c], ["eval.interval=5", "eval.path=held.txt"]),
             "own run dirs": ("run directory", [b, c])}
    return dirs, run_on_gloo(_agree_in, 2, root, cases)


def test_ranks_evaluating_on_different_held_out_files_stop(nodes):
    """A relative eval.path on each node its own copy: every evaluation's loss averaged ranks'
    losses over different texts. Its identity is compared as data.path's is."""
    _, results = nodes
    said = results[("other held-out", 0)]
    assert "eval.sampled_sha256:" in said and results[("other held-out", 1)] == "stopped"


def test_ranks_reading_different_files_of_one_size_stop(nodes):
    """Two nodes each reading its own 40,000-byte file at one relative data.path trained
    together on different samples: only the size was compared. The sampled sha256 (what a
    checkpoint saves of its data) is compared too, and a rank whose file cannot be read stops
    every rank with its reason rather than alone."""
    from orch.runtime.data import source_identity

    dirs, results = nodes
    hashes = [source_identity(DataConfig(path=str(node / "x.bin")))["sampled_sha256"]
              for node in dirs[:2]]
    assert results[("same data", 0)] == results[("same data", 1)] == "agreed"  # copies
    said = results[("other contents", 0)]
    assert results[("other contents", 1)] == "stopped"
    assert said.endswith(f"differing: data.sampled_sha256: {hashes[0]} on ranks 0, {hashes[1]} "
                         "on ranks 1\n        fix: start every node with the same config file, "
                         "--set overrides, --resume, data and orch version"), said
    said = results[("missing", 0)]
    assert results[("missing", 1)] == "stopped"
    assert "rank 1: data.path: 'x.bin' (" in said and "x.bin) does not exist" in said, said


def test_nodes_that_do_not_share_the_run_dir_stop_before_training(nodes):
    """Each node with its own relative run.dir (no shared file system) trained until its first
    save, which failed on node 1 saying "0 bytes free": every rank now stops at start, the
    node that cannot see rank 0's marker file named; the marker is removed either way."""
    dirs, results = nodes
    assert results[("shared run dir", 0)] == results[("shared run dir", 1)] == "agreed"
    said = results[("own run dirs", 0)]
    assert results[("own run dirs", 1)] == "stopped"
    assert said == (
        "ranks disagree (1 problem):\n"
        f"  - rank 1: run.dir: 'run' ({dirs[2] / 'run'} on {socket.gethostname()}) is not the "
        "directory rank 0 writes: every node must see the same run.dir (a shared file system)\n"
        "        fix: put run.dir on a file system every node mounts at the same path (e.g. "
        "--set run.dir=/shared/runs/NAME), and start every node's launcher from the same "
        "directory or give run.dir as an absolute path"), said
    assert list((dirs[0] / "run").iterdir()) == list((dirs[1] / "run").iterdir()) == []
    assert not (dirs[2] / "run").exists()  # rank 1's run.dir: made by its launcher only
