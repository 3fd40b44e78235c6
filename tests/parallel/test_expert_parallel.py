"""Expert parallelism over 2 and 4 gloo ranks equals the unsharded MoE layer in one process.

Every rank feeds its own tokens. The reference runs the same layer (tiny-moe sizes, fp32) on the
concatenation of all ranks' tokens, with the loss summed over ranks: each rank's output must equal
the reference rows of its tokens, its input gradient likewise, the router gradients summed over
ranks the reference's, and each rank's local expert slice gradient the matching slice of the
reference's (it already holds every token routed to those experts). With a capacity the drop is
per sending rank (local batch), so that reference runs each rank's tokens separately (summing the
gradients), which is the same statement without the concatenation. Routing is forced uneven
through a constant input feature: one expert takes almost every token and one none (with 4
ranks, a rank receives nothing; the "starved" case leaves half the ranks idle). The "switch"
case routes each token to one expert weighted by its raw router probability
(``norm_topk_prob`` false), so the router's gradient comes from the tokens' path alone.

A whole 2-layer Transformer with the plan's expert mesh (ep=2 inside a world of 2 or 4, so with
4 ranks two ep groups run side by side) is compared the same way, with the aux loss in the loss.

One spawn per world size runs every case, one thread per rank (2 cores). Differences are
measured relative to the largest entry of the reference tensor (layer gradients reach ~40 with 96
tokens); worst over both world sizes and all cases (fp32, gloo): outputs 1.7e-8, input gradients
2.5e-8, expert gradients 4.7e-7, router 5.2e-7, shared expert 4.4e-7; Transformer logits 2.6e-7,
loss 8.4e-8, gradients 1.0e-6 (experts 4.3e-7). The tolerance is 1e-5 of the largest entry.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_harness import run_on_gloo
from torch.distributed.tensor import DTensor

from orch.config import load_config
from orch.errors import OrchError
from orch.models.llama import Transformer
from orch.models.moe import (
    MoEFeedForward,
    inject_aux_gradients,
    take_aux_loss,
    update_expert_bias,
)
from orch.parallel.expert_parallel import apply_expert_parallel, build_expert_mesh
from orch.plan.degrees import Degrees
from orch.plan.layout import expert_layout

pytestmark = pytest.mark.dist

CFG = load_config("configs/tiny-moe.yaml").model  # dim 256, 4 experts, top-2, hidden 344, shared 1
REL = 1e-5
WORLDS = (2, 4)
STEER = {  # router weight on the constant feature x[..., 0] = 1, per expert
    "balanced": None,
    "uneven": [3.0, 1.0, 0.5, -8.0],  # expert 0 takes nearly all tokens, expert 3 none
    "starved": [3.0, 3.0, -8.0, -8.0],  # experts 2 and 3 get nothing
}
CASES = {  # name: (steer, changes to tiny-moe's model config)
    "balanced": ("balanced", {}),
    "uneven": ("uneven", {}),
    "starved": ("starved", {}),
    "capacity": ("uneven", {"capacity_factor": 1.0}),
    "sigmoid": ("uneven", {"score_func": "sigmoid"}),
    "switch": ("uneven", {"top_k": 1, "norm_topk_prob": False}),  # raw router probabilities
}
EXPERT_PARAMS = ("experts.w1", "experts.w2", "experts.w3")
HIDDEN_DIM = {"experts.w1": 2, "experts.w3": 2, "experts.w2": 1}
ETP_CASES = ("uneven", "starved", "capacity")
"""Run again with expert tensor parallelism: ep = world / 2, etp = 2 (rank = 2 * ep_rank +
etp_rank), each etp pair gathering its rows and reduce-scattering the partial outputs."""


def close(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Equal within ``REL`` of ``want``'s largest entry (sums of ~100 products differ in order)."""
    atol = REL * max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=msg)


@pytest.fixture(autouse=True)
def one_thread():
    """The references run single-threaded too: 2 OpenMP threads on 2 busy cores crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_layer(case: str) -> MoEFeedForward:
    steer, changes = CASES[case]
    torch.manual_seed(0)
    layer = MoEFeedForward(dataclasses.replace(CFG, **changes))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    # The token path only: each rank's balancing loss covers its own tokens, not the
    # reference's (test_aux_loss_is_the_local_switch_loss checks that loss).
    inject_aux_gradients(layer, 0.0)
    if STEER[steer] is not None:
        with torch.no_grad():
            layer.router.weight[:, 0] = torch.tensor(STEER[steer])
    return layer


def tokens(case: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's own input ``[2, 12, dim]`` and output cotangent."""
    gen = torch.Generator().manual_seed(100 * list(CASES).index(case) + rank)
    x = torch.randn(2, 12, CFG.dim, generator=gen)
    x[..., 0] = 1.0
    return x, torch.randn(2, 12, CFG.dim, generator=gen)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def run_layer(layer: MoEFeedForward, x: torch.Tensor, g: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(g)
    grads = {name: local(p.grad).clone() for name, p in layer.named_parameters()}
    return {
        "out": out.detach(),
        "dx": x.grad,
        "aux": layer.aux_loss.detach(),
        "load": layer.expert_load.clone(),
        **grads,
    }


def model_cfg():
    return dataclasses.replace(CFG, layers=2, max_seq_len=16)


def model_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7 + rank)
    seq = torch.randint(0, CFG.vocab_size, (1, 17), generator=gen)
    return seq[:, :-1], seq[:, 1:]


def model_step(model: Transformer, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = model_batch(rank)
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()  # the MoE layers add their balancing losses' gradients
    return logits.detach(), loss.detach() + take_aux_loss(model)


def _run(rank: int, world: int, results) -> None:
    torch.set_num_threads(1)
    for case in CASES:
        layer = make_layer(case)
        apply_expert_parallel(layer, dist.group.WORLD)
        got = run_layer(layer, *tokens(case, rank))
        got["offset"] = layer.experts.expert_offset
        if case == "uneven":  # the aux-loss-free bias: loads summed over the group
            update_expert_bias(layer, 0.1, dist.group.WORLD)
            got["bias"] = layer.expert_bias.clone()
        results[(world, case, rank)] = got

    deg = Degrees(dp_shard=world, ep=2)
    mesh = build_expert_mesh(deg, "cpu")
    results[(world, "groups", rank)] = {
        dim: dist.get_process_group_ranks(mesh[dim].get_group()) for dim in ("ep", "edp")
    }
    model = Transformer(model_cfg())
    apply_expert_parallel(model, mesh["ep"])
    logits, loss = model_step(model, rank)
    out = {"logits": logits, "loss": loss}
    for name, p in model.named_parameters():
        if name.endswith(EXPERT_PARAMS):
            out[name] = local(p.grad)
        else:  # replicated: what data parallelism would sum over the ep group
            dist.all_reduce(p.grad, group=mesh["ep"].get_group())
            out[name] = p.grad if mesh["ep"].get_local_rank() == 0 else None
    results[(world, "model", rank)] = out

    etp_mesh = build_expert_mesh(Degrees(dp_shard=world, ep=world // 2, etp=2), "cpu")
    for case in ETP_CASES:
        layer = make_layer(case)
        apply_expert_parallel(layer, etp_mesh["ep", "etp"])
        results[(world, f"etp-{case}", rank)] = run_layer(layer, *tokens(case, rank))

    results[(world, "norm", rank)] = sharded_norm(etp_mesh, rank)

    for name, mesh, changes in (
        ("etp", etp_mesh["ep", "etp"], {"expert_ffn_dim": 345}),
        ("indivisible", None, {"experts": 2 * world - 1}),
    ):
        try:
            apply_expert_parallel(MoEFeedForward(dataclasses.replace(CFG, **changes)), mesh)
        except OrchError as exc:
            results[(world, name, rank)] = str(exc)


def sharded_norm(mesh, rank: int) -> tuple[float, list[str]]:
    """The norm of a tensor sharded over ``edp x ep x etp`` (as expert weights' gradients
    are), and what torch logged computing it: DTensor reduced it with one all-reduce per
    dimension and warned on every rank, until ``build_expert_mesh`` flattened them."""
    import logging

    from torch.distributed.tensor import Shard

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    log.addHandler(handler)
    try:
        sub = mesh["edp", "ep", "etp"]
        part = torch.arange(4.0) + 4 * rank
        grad = DTensor.from_local(part, sub, [Shard(0)] * 3)
        norm = torch.nn.utils.get_total_norm([grad])
        return float(norm.full_tensor()), said
    finally:
        log.removeHandler(handler)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    results = {}
    for world in WORLDS:
        results.update(run_on_gloo(_run, world, tmp_path_factory.mktemp(f"ep{world}")))
    return results


def reference(case: str, world: int) -> tuple[MoEFeedForward, list[dict]]:
    """The unsharded layer on all ranks' tokens (per rank with a capacity); per-rank slices."""
    layer = make_layer(case)
    batches = [tokens(case, r) for r in range(world)]
    if "capacity_factor" not in CASES[case][1]:
        x = torch.cat([b[0] for b in batches])
        g = torch.cat([b[1] for b in batches])
        full = run_layer(layer, x, g)
        per_rank = [
            {"out": o, "dx": d}
            for o, d in zip(full["out"].split(2), full["dx"].split(2), strict=True)
        ]
    else:
        per_rank = [run_layer(layer, x, g) for x, g in batches]
    return layer, per_rank


def expert_slice(name: str, world: int, rank: int, etp: int) -> tuple[slice, ...]:
    """The part of the full ``[E, ...]`` weight ``name`` that ``rank`` holds (ranks are
    ``ep_rank * etp + etp_rank``; etp splits the hidden dimension)."""
    local = CFG.experts // (world // etp)
    ep_rank, etp_rank = divmod(rank, etp)
    index = [slice(ep_rank * local, (ep_rank + 1) * local), slice(None), slice(None)]
    width = CFG.moe_ffn_dim // etp
    index[HIDDEN_DIM[name]] = slice(etp_rank * width, (etp_rank + 1) * width)
    return tuple(index)


def check_against_reference(sharded: dict, case: str, world: int, key: str, etp: int) -> None:
    ref, ref_rows = reference(case, world)
    got = [sharded[(world, key, r)] for r in range(world)]
    for rank, (g, want) in enumerate(zip(got, ref_rows, strict=True)):
        for out in ("out", "dx"):
            close(g[out], want[out], f"{rank} {out}")
        for name in EXPERT_PARAMS:
            part = ref.get_parameter(name).grad[expert_slice(name, world, rank, etp)]
            assert g[name].shape == part.shape, name
            close(g[name], part, f"{rank} {name}")
    for name, p in ref.named_parameters():
        if not name.startswith("experts."):  # replicated: gradients sum over ranks
            summed = torch.stack([g[name] for g in got]).sum(0)
            close(summed, p.grad, name)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_equals_unsharded_layer_forward_and_backward(sharded, world, case):
    check_against_reference(sharded, case, world, case, etp=1)
    for rank in range(world):
        assert sharded[(world, case, rank)]["offset"] == rank * CFG.experts // world


@pytest.mark.parametrize("world", WORLDS)
def test_switch_routing_trains_the_router_on_every_layout(sharded, world):
    """The parity above compares a real router gradient there: with one expert per token at its
    raw probability the output's gradient reaches the router (renormalized, the weight is 1)."""
    summed = sum(sharded[(world, "switch", r)]["router.weight"] for r in range(world))
    assert summed.norm() > 1e-3


@pytest.mark.parametrize("case", ETP_CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_expert_tensor_parallel_equals_unsharded(sharded, world, case):
    check_against_reference(sharded, case, world, f"etp-{case}", etp=2)


@pytest.mark.parametrize("world", WORLDS)
def test_routing_is_as_uneven_as_intended(sharded, world):
    load = {
        case: sum(sharded[(world, case, r)]["load"] for r in range(world)).tolist()
        for case in ("uneven", "starved", "capacity")
    }
    assert load["uneven"][3] == 0 and load["uneven"][0] >= 0.9 * 24 * world
    assert load["starved"][2:] == [0, 0]
    # capacity ceil(1.0 * 24 * 2 / 4) = 12 per rank: expert 0's surplus copies are dropped
    ref = [run_layer(make_layer("capacity"), *tokens("capacity", r)) for r in range(world)]
    dropped = make_layer("capacity")
    dropped.capacity_factor = None
    full = [run_layer(dropped, *tokens("capacity", r)) for r in range(world)]
    assert any(not torch.allclose(a["out"], b["out"]) for a, b in zip(ref, full, strict=True))


@pytest.mark.parametrize("case", ["uneven", "sigmoid"])
@pytest.mark.parametrize("world", WORLDS)
def test_aux_loss_is_the_local_switch_loss(sharded, world, case):
    layer = make_layer(case)
    for rank in range(world):
        x = tokens(case, rank)[0].reshape(-1, CFG.dim)
        logits = layer.router(x)
        scores = logits.softmax(-1) if case == "uneven" else logits.sigmoid()
        probs = scores / scores.sum(-1, keepdim=True)
        chosen = scores.topk(2, dim=-1).indices
        f = torch.stack([(chosen == e).sum() for e in range(4)]) / (24 * 2)
        hand = 4 * (f * probs.mean(0)).sum()
        torch.testing.assert_close(
            sharded[(world, case, rank)]["aux"], hand.detach(), rtol=1e-6, atol=0
        )


@pytest.mark.parametrize("world", WORLDS)
def test_bias_update_uses_the_group_load_and_changes_selection(sharded, world):
    load = sum(sharded[(world, "uneven", r)]["load"] for r in range(world)).float()
    want = 0.1 * torch.sign(load.mean() - load)
    for rank in range(world):
        assert torch.equal(sharded[(world, "uneven", rank)]["bias"], want)
    layer = make_layer("uneven")
    x = tokens("uneven", 0)[0].reshape(-1, CFG.dim)
    before = layer.router(x).softmax(-1).topk(2, dim=-1).indices
    layer.expert_bias.copy_(want * 5)
    with torch.no_grad():
        layer(x)
    assert (before != 3).all() and layer.expert_load[3] > 0


@pytest.mark.parametrize("world", WORLDS)
def test_transformer_on_the_expert_mesh_equals_unsharded(sharded, world):
    layout = expert_layout(Degrees(dp_shard=world, ep=2))
    for rank in range(world):
        groups = sharded[(world, "groups", rank)]
        assert groups["ep"] in layout.groups("ep") and rank in groups["ep"]
        assert groups["edp"] in layout.groups("edp") and rank in groups["edp"]
    for ep_group in layout.groups("ep"):
        ref = Transformer(model_cfg())
        want = [model_step(ref, r) for r in ep_group]  # gradients accumulate over the group
        for i, rank in enumerate(ep_group):
            got = sharded[(world, "model", rank)]
            close(got["logits"], want[i][0], "logits")
            close(got["loss"], want[i][1], "loss")
            for name, p in ref.named_parameters():
                if name.endswith(EXPERT_PARAMS):
                    close(got[name], p.grad[2 * i : 2 * i + 2], name)
                elif i == 0:
                    close(got[name], p.grad, name)


@pytest.mark.parametrize("world", WORLDS)
def test_expert_gradient_norms_take_one_reduction_and_no_warning(sharded, world):
    want = float(torch.linalg.vector_norm(torch.arange(4.0 * world)))
    for rank in range(world):
        norm, said = sharded[(world, "norm", rank)]
        assert norm == pytest.approx(want, rel=1e-6)
        assert not [line for line in said if "While redistributing" in line], said


@pytest.mark.parametrize("world", WORLDS)
def test_bad_degrees_are_refused_with_the_field(sharded, world):
    assert "parallel.etp" in sharded[(world, "etp", 0)] and "fix:" in sharded[(world, "etp", 0)]
    message = sharded[(world, "indivisible", 0)]
    assert "parallel.ep" in message and f"model.experts={2 * world - 1}" in message
