"""``train.document_mask`` under ``orch launch``: documents end at ``data.eos_id`` (here the
shipped corpus's newline: every line a document), and the losses and held-out losses of one
process equal those of tensor + sequence parallel (the attention's input layouts take the
document ids), of a two-stage pipeline (every stage's forward takes them; ZB-V: two stages a rank
and a split backward), of ring context parallelism (each rank's blocks mask by the
whole sequence's ids) and of an offloaded model, and differ from plain causal attention's.
Ulysses is checked against one process in tests/parallel/test_context_parallel.py."""

from __future__ import annotations

import pytest
from launch_harness import ONE_THREAD, eval_metrics, launch, metrics, overrides, two_at_a_time

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MASKED = ["train.document_mask=true", "data.eos_id=10", "train.steps=3", "train.precision=fp32",
          "eval.interval=3", "eval.path=README.md"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[tuple[float, ...]]]:
    root = tmp_path_factory.mktemp("documents")
    layouts = {"one": (1, []), "tp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
               "cp": (2, ["parallel.cp=2"]),
               "zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.dp_shard=1"]),
               "offload": (1, ["offload.params=cpu", "offload.grads=cpu",
                               "offload.optimizer=cpu"]),
               "causal": (1, ["train.document_mask=false"])}
    found = {}

    def run(name: str) -> None:
        nproc, extra = layouts[name]
        out = launch("--nproc-per-node", str(nproc), "configs/tiny.yaml",
                     *overrides(root / name, *MASKED, *extra), env=ONE_THREAD)
        assert out.returncode == 0, out.stdout + out.stderr
        found[name] = ([m["loss"] for m in metrics(root / name)]
                       + [m["eval_loss"] for m in eval_metrics(root / name)])

    two_at_a_time(run, layouts)
    return found


@pytest.mark.parametrize("layout", ["tp", "cp", "zbv", "offload"])
def test_every_layout_trains_and_evaluates_the_one_process_losses(runs, layout):
    assert len(runs[layout]) == 4  # three steps and an evaluation
    assert runs[layout] == pytest.approx(runs["one"], rel=1e-5)


def test_the_mask_changes_what_is_trained(runs):
    assert runs["causal"][0] != pytest.approx(runs["one"][0], rel=1e-4)
