"""``optimizer.name: muon``: Muon for the blocks' matrices, AdamW for the rest
(``orch.runtime.muon``), against torch's own optimizers and its single-process self."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gloo_harness import run_on_gloo
from torch import nn

from orch.config import load_config
from orch.models.llama import Transformer
from orch.runtime.muon import Muon, muon_groups, newton_schulz
from orch.runtime.optim import build_optimizer

LR = 0.02


def _muon(params, ns_dtype=torch.float32, **group) -> Muon:
    return Muon([{"params": list(params), "weight_decay": 0.1, "muon": True, **group}], lr=LR,
                betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5, ns_dtype=ns_dtype)


def _grads(shape: tuple[int, ...], steps: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def test_a_matrix_steps_as_torch_muon_with_adamw_matched_rms():
    """bf16 iterations, Nesterov momentum 0.95, decoupled decay and Moonlight's lr scaling:
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw") bit for bit, wide and tall."""
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(40, 8))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opts = [_muon(ours, torch.bfloat16),
            torch.optim.Muon(theirs, lr=LR, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")]
    for step in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))


def test_a_stack_of_matrices_is_orthogonalized_matrix_by_matrix():
    """An expert stack (experts, rows, cols): each expert's matrix on its own, as it would be
    alone; the result is close to orthogonal (singular values within the quintic's band)."""
    stack = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(2))
    each = torch.stack([newton_schulz(m, 5, torch.float32) for m in stack])
    assert torch.equal(newton_schulz(stack, 5, torch.float32), each)
    singular = torch.linalg.svdvals(each)
    assert float(singular.min()) > 0.6 and float(singular.max()) < 1.25


def test_the_adamw_part_is_torch_adamw():
    """The embedding, head and norms step as torch.optim.AdamW would, bit for bit, decay on
    matrices only, as orch's AdamW runs."""
    cfg = load_config("configs/tiny.yaml", ["optimizer.name=muon"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    twin = copy.deepcopy(model)
    ours = build_optimizer(model, cfg)
    groups = muon_groups(twin, cfg.optimizer.weight_decay)
    theirs = torch.optim.AdamW(groups[1:], lr=ours.param_groups[1]["lr"], betas=(0.9, 0.95),
                               eps=1e-8)
    names = {id(p): n for n, p in model.named_parameters()}
    assert isinstance(ours, Muon)
    muon, decayed, plain = ([names[id(p)] for p in g["params"]] for g in ours.param_groups)
    assert decayed == ["tok_embeddings.weight", "output.weight"] or (
        cfg.model.tie_embeddings and decayed == ["tok_embeddings.weight"])
    assert all(n.startswith("layers.") for n in muon) and all(".norm" in n or "norm" in n
                                                               for n in plain)
    wrapped = nn.ModuleDict({"module": twin})  # as DDP names them: module.layers.0...
    assert [[id(p) for p in g["params"]] for g in muon_groups(wrapped, 0.1)] == [
        [id(p) for p in g["params"]] for g in groups]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17))
    for m in (model, twin):
        F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    ours.step()
    theirs.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if not name.startswith("layers.") or p.ndim < 2:
            assert torch.equal(p, q), name


def test_a_pipeline_stage_without_embedding_or_head_resumes():
    """A middle pipeline stage (or ZB-V's second rank) holds no embedding and no head: its
    optimizer state, keyed by parameter names as checkpoints hold it, loads back (an empty
    param group made torch's loader fail with an IndexError)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from orch.parallel.pipeline.stages import prune_to_rank, stage_layers
    from orch.runtime.train_state import STATE_OPTIONS

    cfg = load_config("configs/tiny.yaml", ["optimizer.name=muon"])

    def middle_stage() -> tuple[nn.Module, Muon]:
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        prune_to_rank(model, stage_layers([1, 1, 1, 1]), [1])
        return model, build_optimizer(model, cfg)

    model, opt = middle_stage()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    _, saved = get_state_dict(model, opt, options=STATE_OPTIONS)
    fresh, fresh_opt = middle_stage()
    set_state_dict(fresh, fresh_opt, model_state_dict={}, optim_state_dict=saved,
                   options=STATE_OPTIONS)
    loaded = [fresh_opt.state[p] for p in fresh.parameters()]
    assert [s.keys() for s in loaded] == [opt.state[p].keys() for p in model.parameters()]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(
        loaded, (opt.state[p] for p in model.parameters()), strict=True) for k in a)


# --- sharded parameters (gloo ranks) ---------------------------------------------------------


def _fsdp_case(rank: int) -> float:
    """An MLP trained single-process on the whole batch and FSDP2-sharded on half of it per
    rank: the largest parameter difference, in units of the lr."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def mlp() -> nn.Module:
        torch.manual_seed(0)  # [40, 300], [129, 40] (65/64 row shards), [300, 129]
        return nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 129), nn.Tanh(),
                             nn.Linear(129, 300, bias=False))

    torch.manual_seed(1)
    x, y = torch.randn(8, 300), torch.randn(8, 300)
    single, sharded = mlp(), fully_shard(mlp(), mesh=init_device_mesh("cpu", (2,)))
    opts = [Muon(muon_groups_of(m), lr=LR, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                 ns_steps=5, ns_dtype=torch.float32) for m in (single, sharded)]
    part = slice(4 * rank, 4 * rank + 4)
    for _ in range(6):
        F.mse_loss(single(x), y).backward()
        F.mse_loss(sharded(x[part]), y[part]).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        return max(float((q.full_tensor() - p).abs().max()) / LR
                   for p, q in zip(single.parameters(), sharded.parameters(), strict=True))


def muon_groups_of(model: nn.Module) -> list[dict]:
    """Muon for the matrices, AdamW for the biases (a plain MLP has no embedding or head)."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim == 2], "weight_decay": 0.1, "muon": True},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _placement_case(placements: list, shape: tuple[int, ...]) -> bool:
    """One parameter under ``placements`` (on 2 ranks) against the same on one process:
    whether their parameters and momentum buffers are equal bit for bit after 3 steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    single, sharded = nn.Parameter(w.clone()), nn.Parameter(distribute_tensor(w, mesh, placements))
    opts = [_muon([single]), _muon([sharded])]
    for g in _grads(shape, 3):
        single.grad, sharded.grad = g.clone(), distribute_tensor(g, mesh, placements)
        for opt in opts:
            opt.step()
    buffer = opts[1].state[sharded]["momentum_buffer"]
    return (sharded.placements == tuple(placements) and buffer.placements == tuple(placements)
            and torch.equal(sharded.detach().full_tensor(), single.detach())
            and torch.equal(buffer.full_tensor(), opts[0].state[single]["momentum_buffer"]))


def _resume_case(rank: int, directory: str) -> float:
    """Save an FSDP2 run's Muon states through DCP after 3 steps, load them into a fresh run,
    step both 3 more: the largest parameter difference (0: the resume is exact)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))

    def run() -> tuple[nn.Module, Muon]:
        torch.manual_seed(0)
        model = fully_shard(nn.Sequential(nn.Linear(30, 41), nn.Tanh(), nn.Linear(41, 30)),
                            mesh=mesh)
        return model, Muon(muon_groups_of(model), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                           momentum=0.95, ns_steps=5, ns_dtype=torch.float32)

    def train(model: nn.Module, opt: Muon, steps: range) -> None:
        for step in steps:
            x = torch.randn(4, 30, generator=torch.Generator().manual_seed(10 * step + rank))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    from orch.runtime.train_state import STATE_OPTIONS  # as orch's checkpoints: keyed by name

    model, opt = run()
    train(model, opt, range(3))
    model_state, optim_state = get_state_dict(model, opt, options=STATE_OPTIONS)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    train(model, opt, range(3, 6))
    fresh, fresh_opt = run()
    model_state, optim_state = get_state_dict(fresh, fresh_opt, options=STATE_OPTIONS)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=STATE_OPTIONS)
    train(fresh, fresh_opt, range(3, 6))
    return max(float((p.full_tensor() - q.full_tensor()).abs().max())
               for p, q in zip(model.parameters(), fresh.parameters(), strict=True))


def _cases(rank: int, world: int, results: dict, directory: str) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    torch.set_num_threads(1)
    results[rank, "fsdp"] = _fsdp_case(rank)
    for name, placements, shape in (
            ("rows", [Shard(0)], (10, 24)), ("columns", [Shard(1)], (12, 40)),
            ("strided rows", [_StridedShard(0, split_factor=2)], (8, 36)),
            ("experts", [Shard(0)], (4, 12, 20)),
            ("strided experts", [_StridedShard(0, split_factor=2)], (4, 12, 20)),
            ("expert rows", [Shard(1)], (2, 12, 20)), ("replicated", [Replicate()], (9, 6))):
        results[rank, name] = _placement_case(placements, shape)
    results[rank, "resume"] = _resume_case(rank, directory)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("muon")
    return run_on_gloo(_cases, 2, directory, str(directory / "checkpoint"))


def test_fsdp2_shards_step_as_the_whole_matrix_does(sharded):
    """Each rank gathers a matrix's momentum-updated gradient, orthogonalizes the whole and
    keeps its rows: the single-process run's parameters within float32 rounding of the
    gradients' reduction (measured 1e-6 lr)."""
    assert all(sharded[rank, "fsdp"] < 1e-4 for rank in (0, 1)), sharded


@pytest.mark.parametrize("name", ["rows", "columns", "strided rows", "experts",
                                  "strided experts", "expert rows", "replicated"])
def test_every_placement_steps_exactly_as_one_process(sharded, name):
    """Rows (FSDP2, colwise tensor parallel), columns (rowwise), FSDP2's strided rows over
    another split, an expert stack split by experts (kept: each rank orthogonalizes its own)
    or by rows: the same parameters and momentum, placements kept."""
    assert sharded[0, name] and sharded[1, name]


def test_a_resume_through_dcp_continues_exactly(sharded):
    assert sharded[0, "resume"] == 0.0 and sharded[1, "resume"] == 0.0
