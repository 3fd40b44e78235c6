"""``optimizer.name: muon``: Muon for the blocks' matrices, AdamW for the rest
(``orch.runtime.muon``), against torch's own optimizers and its single-process self."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gloo_harness import run_on_gloo
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

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
    """An MLP trained single-process on the whole batch and FSDP2-sharded on a quarter of it
    per rank: the largest parameter difference, in units of the lr."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def mlp() -> nn.Module:
        torch.manual_seed(0)  # [40, 300], [129, 40] (33/33/33/30 row shards), [300, 129]
        return nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 129), nn.Tanh(),
                             nn.Linear(129, 300, bias=False))

    torch.manual_seed(1)
    x, y = torch.randn(8, 300), torch.randn(8, 300)
    single, sharded = mlp(), fully_shard(mlp(), mesh=init_device_mesh("cpu", (WORLD,)))
    opts = [Muon(muon_groups_of(m), lr=LR, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                 ns_steps=5, ns_dtype=torch.float32) for m in (single, sharded)]
    part = slice(2 * rank, 2 * rank + 2)
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


MATRICES = 5
"""Parameters of one layout in a placement case: a full chunk and a partial one over 4 ranks."""
STEPS = 2
"""Steps of a placement case: the second reads the momentum the first left."""


def _shard(tensor: torch.Tensor, mesh, placements: list) -> torch.Tensor:
    """``tensor`` under ``placements``, FSDP2's rows over tensor parallelism's (``[STRIDED,
    Shard(0)]``) cut as FSDP2 cuts them: each tp rank's rows chunked over the FSDP ranks
    (``distribute_tensor`` refuses an uneven strided split)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if placements != [STRIDED, Shard(0)]:
        return distribute_tensor(tensor, mesh, placements)
    rows = tensor.chunk(mesh.size(1))[mesh.get_local_rank(1)].chunk(mesh.size(0))
    local = rows[mesh.get_local_rank(0)] if mesh.get_local_rank(0) < len(rows) else rows[0][:0]
    return DTensor.from_local(local.contiguous(), mesh, placements, shape=tensor.shape,
                              stride=tensor.stride(), run_check=False)


def _placement_case(mesh_shape: tuple[int, ...], placements: list,
                    shape: tuple[int, ...]) -> tuple[bool, int, int]:
    """:data:`MATRICES` parameters of ``shape`` under ``placements`` on a ``mesh_shape`` mesh
    against the same on one process: whether their parameters and momentum buffers are equal
    bit for bit after :data:`STEPS` steps (this rank's shards of them), the matrices this rank
    orthogonalized a step, and the gathers DTensor ran (a ``Shard`` made ``Replicate``; an
    all-to-all, ``Shard`` to ``Shard``, is one too on gloo, but not on a GPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    from orch.runtime import muon

    mesh = init_device_mesh("cpu", mesh_shape)
    ws = [torch.randn(shape, generator=torch.Generator().manual_seed(3 + i))
          for i in range(MATRICES)]
    single = [nn.Parameter(w.clone()) for w in ws]
    sharded = [nn.Parameter(_shard(w, mesh, placements)) for w in ws]
    opts = [_muon(single), _muon(sharded)]
    calls = []
    iterate = muon.newton_schulz

    def counted(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
        calls.append(update.shape)
        return iterate(update, steps, dtype)

    gathers = []
    kinds = {kind: kind._to_replicate_tensor for kind in (Shard, _StridedShard)}

    def gathering(kind: type) -> object:
        def gather(*args: object, **kwargs: object) -> torch.Tensor:
            gathers.append(kind)
            return kinds[kind](*args, **kwargs)
        return gather

    grads = [_grads(shape, STEPS, seed=1 + i) for i in range(MATRICES)]
    for step in range(STEPS):
        for p, q, g in zip(single, sharded, grads, strict=True):
            p.grad, q.grad = g[step].clone(), _shard(g[step], mesh, placements)
        opts[0].step()
        muon.newton_schulz = counted
        for kind in kinds:
            kind._to_replicate_tensor = gathering(kind)
        try:
            opts[1].step()
        finally:
            muon.newton_schulz = iterate
            for kind, gather in kinds.items():
                kind._to_replicate_tensor = gather

    def same(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
        return (ours.placements == tuple(placements)
                and torch.equal(ours.to_local(), _shard(theirs, mesh, placements).to_local()))

    equal = all(same(q.detach(), p.detach()) and same(opts[1].state[q]["momentum_buffer"],
                                                      opts[0].state[p]["momentum_buffer"])
                for p, q in zip(single, sharded, strict=True))
    return equal, len(calls) // STEPS, len(gathers)


def _resume_case(rank: int, directory: str) -> float:
    """Save an FSDP2 run's Muon states through DCP after 3 steps, load them into a fresh run,
    step both 3 more: the largest parameter difference (0: the resume is exact)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))

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


WORLD = 4
STRIDED = _StridedShard(0, split_factor=2)
PLACEMENTS = {  # name: (mesh, placements, shape, matrices each rank orthogonalizes a step)
    "rows": ((4,), [Shard(0)], (10, 24), [2, 1, 1, 1]),  # FSDP2, colwise tensor parallel
    "columns": ((4,), [Shard(1)], (12, 40), [2, 1, 1, 1]),  # rowwise tensor parallel
    "strided rows": ((4,), [STRIDED], (8, 36), [2, 1, 1, 1]),  # FSDP2 over another split
    "experts": ((4,), [Shard(0)], (4, 12, 20), [5] * 4),  # each rank its own expert
    "strided experts": ((4,), [STRIDED], (8, 12, 20), [5] * 4),
    "expert rows": ((4,), [Shard(1)], (2, 12, 20), [2, 1, 1, 1]),
    "replicated": ((4,), [Replicate()], (9, 6), [5] * 4),
    # FSDP2 x TP (dp, tp): colwise rows strided over tp's, rowwise rows and columns
    "fsdp x tp rows": ((2, 2), [STRIDED, Shard(0)], (12, 20), [2, 1, 1, 1]),
    "fsdp x tp uneven rows": ((2, 2), [STRIDED, Shard(0)], (10, 20), [2, 1, 1, 1]),
    "fsdp x tp columns": ((2, 2), [Shard(0), Shard(1)], (12, 20), [2, 1, 1, 1]),
    # HSDP (replicas, shards): each replica shares out its matrices on its own
    "hsdp": ((2, 2), [Replicate(), Shard(0)], (10, 24), [3, 2, 3, 2]),
    # an expert stack over ep x FSDP2 (experts split, kept), over ep x etp (rows split)
    "ep x fsdp experts": ((2, 2), [STRIDED, Shard(0)], (4, 12, 20), [5] * 4),
    "ep x etp experts": ((2, 2), [Shard(0), Shard(1)], (4, 12, 20), [3, 2, 3, 2]),
}


def _cases(rank: int, world: int, results: dict, directory: str) -> None:
    torch.set_num_threads(1)
    results[rank, "fsdp"] = _fsdp_case(rank)
    for name, (mesh, placements, shape, _) in PLACEMENTS.items():
        results[rank, name] = _placement_case(mesh, placements, shape)
    results[rank, "resume"] = _resume_case(rank, directory)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("muon")
    return run_on_gloo(_cases, WORLD, directory, str(directory / "checkpoint"))


def test_fsdp2_shards_step_as_the_whole_matrix_does(sharded):
    """The ranks share out the whole matrices of the momentum-updated gradients, orthogonalize
    them and send each rank its rows back: the single-process run's parameters within float32
    rounding of the gradients' reduction (measured 1e-6 lr)."""
    assert all(sharded[rank, "fsdp"] < 1e-4 for rank in range(WORLD)), sharded


@pytest.mark.parametrize("name", PLACEMENTS)
def test_every_placement_steps_exactly_as_one_process(sharded, name):
    """Rows (FSDP2, colwise tensor parallel), columns (rowwise), FSDP2's strided rows over
    another split, an expert stack split by experts (kept: each rank orthogonalizes its own)
    or by rows, and their 2-D meshes: the same parameters and momentum, placements kept."""
    assert all(sharded[rank, name][0] for rank in range(WORLD))


@pytest.mark.parametrize("name", PLACEMENTS)
def test_the_ranks_that_split_a_matrix_share_out_its_orthogonalization(sharded, name):
    """Five matrices over the ranks that split them (4, or HSDP's and etp's 2): a chunk of one
    each, and the rest to the first (rank 0 did all five on every rank before); splits of
    experts and replicas each orthogonalize their own."""
    assert [sharded[rank, name][1] for rank in range(WORLD)] == PLACEMENTS[name][3]


@pytest.mark.parametrize("name", PLACEMENTS)
def test_the_matrices_travel_by_all_to_alls_not_gathers(sharded, name):
    """Each splitting mesh dim moves from a matrix dim to a stack dim of its own (DTensor's
    ``Shard`` to ``Shard``, an all-to-all on a GPU): no rank gathers a stack whole (one stack
    dim for all of them, or FSDP2's strided rows left strided, made DTensor plan gathers of
    the whole chunk, the FSDP group's size times a matrix)."""
    assert [sharded[rank, name][2] for rank in range(WORLD)] == [0] * WORLD


def test_a_resume_through_dcp_continues_exactly(sharded):
    assert all(sharded[rank, "resume"] == 0.0 for rank in range(WORLD))
