"""The search's floor on a step time: never above the step time it stands in for.

``orch plan --auto`` leaves a setting unpriced when its floor (``step_time_floor``, from
``step_time_bound``) is already slower than the plans it would have to beat, so a floor above
the real estimate would drop a plan from the list. These tests price random candidates both
ways.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from orch.config import load_config
from orch.plan import resolve_machine
from orch.plan.cost import estimate_step_time, step_time_bound
from orch.plan.plan import planned_memory, step_time, step_time_floor
from orch.plan.search import MICRO_BATCHES, RECOMPUTE, candidate_degrees

REPO = Path(__file__).resolve().parents[2]
IB = "[{name: m0, type: ib, bandwidth_gbps: 400, network: f}]"


def _mixed_cluster(tmp_path: Path) -> str:
    """Four nodes of two device speeds: pipeline stages of different speeds, two node
    orders."""
    path = tmp_path / "mixed.yaml"
    path.write_text("nodes:\n" + "".join(
        f"  - {{name: n{i}, device: {device}, devices: 8, nics: {IB}}}\n"
        for i, device in enumerate(("a100", "h100", "a100", "h100"))))
    return f"cluster={path}"


def every_layout(cfg, machine):  # type: ignore[no-untyped-def]
    """The layouts the search prices for ``cfg`` without its offload: offloaded it lists only
    replicas of the whole model (what the runtime runs), but a plan given by hand prices any
    layout offloaded, so the floor must hold there too."""
    return list(candidate_degrees(dataclasses.replace(cfg, offload=type(cfg.offload)()),
                                  machine))


CASES = [
    ("llama3-70b", 256, []),
    ("llama3-8b", 64, ["parallel.pp_schedule=gpipe", "train.global_batch=256"]),
    ("mixtral-8x22b", 512, []),
    ("mixtral-8x22b", 64, ["parallel.cp_kind=ulysses", "model.moe_layer_interval=2"]),
    ("qwen2-57b-a14b", 128, ["parallel.pp_schedule=interleaved", "parallel.virtual_stages=2"]),
    ("qwen2-57b-a14b", 64, ["parallel.pp_schedule=zbv", "parallel.virtual_stages=2"]),
    ("llama3-70b", 128, ["parallel.pp_schedule=2bp-1f1b", "offload.optimizer=cpu"]),
    ("llama3-8b", 64, ["offload.params=cpu", "offload.grads=cpu", "train.precision=fp32"]),
    ("mixtral-8x22b", 128, ["parallel.pp_schedule=zb-h1", "optimizer.name=adamw8bit"]),
]


@pytest.mark.parametrize(("name", "world", "overrides"), CASES)
def test_the_floor_is_never_above_the_step_time(name, world, overrides, tmp_path) -> None:
    """Random candidates and settings of each case (every node order of a mixed cluster for
    the first), priced with their own pipeline split: the floor is at most the step time."""
    mixed = name == "llama3-70b" and not overrides
    cfg = load_config(REPO / f"configs/{name}.yaml",
                      [*overrides, *([_mixed_cluster(tmp_path)] if mixed else [])])
    machine = resolve_machine(cfg, None if mixed else world, None, None, problems := [])
    assert machine is not None, problems
    rng = random.Random(f"{name} {world} {overrides}")
    candidates = every_layout(cfg, machine)
    checked = 0
    for deg in rng.sample(candidates, min(40, len(candidates))):
        micro_batch, recompute = rng.choice(MICRO_BATCHES), rng.choice(RECOMPUTE)
        if cfg.train.global_batch % (micro_batch * deg.dp):
            continue
        variant = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, micro_batch=micro_batch, recompute=recompute))
        for order in machine.placements():
            planned, _ = planned_memory(variant, deg, order)
            links = order.links(deg)
            floor = step_time_floor(planned, deg, order, links)
            assert floor <= step_time(planned, deg, order, links).total_s, (deg, order.order)
            checked += 1
    assert checked >= 10


def test_the_bound_holds_for_any_load_and_layers_above_its_own() -> None:
    """``step_time_bound`` at a load and an even share of the layers is at most the estimate
    at any load and any most-loaded rank's layers above them, offload included."""
    rng = random.Random(7)
    for name, overrides in (("mixtral-8x22b", ["offload.optimizer=cpu"]),
                            ("llama3-70b", ["train.recompute=selective"]),
                            ("mixtral-8x22b", ["parallel.cp_kind=ulysses"])):
        cfg = load_config(REPO / f"configs/{name}.yaml", overrides)
        machine = resolve_machine(cfg, 512, None, None, [])
        assert machine is not None
        candidates = [d for d in every_layout(cfg, machine) if d.pp > 1]
        for deg in rng.sample(candidates, 30):
            links, least = machine.links(deg), rng.uniform(0.5, 1.0)
            bound = step_time_bound(cfg, deg, links, machine.device, least)
            even = cfg.model.layers / deg.pp
            for _ in range(5):
                load, layers = least * rng.uniform(1, 2), even * rng.uniform(1, 2)
                step = estimate_step_time(cfg, deg, links, machine.device, stage_load=load,
                                          rank_layers=layers)
                assert bound <= step.total_s * (1 + 1e-12), (deg, load, layers)


def test_without_a_pipeline_or_offload_the_floor_is_the_step_time() -> None:
    """Nothing the split changes, nothing left out: the floor is the estimate less its slack
    (so it prunes all it can)."""
    cfg = load_config(REPO / "configs/mixtral-8x22b.yaml")
    machine = resolve_machine(cfg, 1024, None, None, [])
    assert machine is not None
    for deg in [d for d in candidate_degrees(cfg, machine) if d.pp == 1][:20]:
        links = machine.links(deg)
        floor = step_time_floor(cfg, deg, machine, links)
        total = step_time(cfg, deg, machine, links).total_s
        assert total * (1 - 2e-9) <= floor <= total
