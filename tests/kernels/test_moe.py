"""MoE dispatch ops: the references against naive loops (and gradcheck in float64), the Triton
kernels (interpreter mode without a GPU) against the references, forward and backward, and the
bad-input messages. Shapes stay small: the interpreter runs each Triton program in Python."""

from __future__ import annotations

import pytest
import torch

from orch.errors import OrchError
from orch.kernels.moe import (
    MoEInputError,
    grouped_mm,
    grouped_mm_reference,
    moe_permute,
    moe_unpermute,
    permute_reference,
    routing,
    unpermute_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the Triton tests run in interpreter mode on CPU
T, H, E, K = 64, 64, 8, 2
FP32 = {"rtol": 1e-5, "atol": 1e-5}  # Triton vs reference, float32 sums and products


# ---------------------------------------------------------------------------- helpers


def naive_routing(ids: torch.Tensor, experts: int, capacity: int | None):
    """The specification as loops: rows expert by expert, then token, then slot."""
    tokens, top_k = ids.shape
    row_map = torch.full((tokens, top_k), -1, dtype=torch.int64)
    counts = [0] * experts
    row = 0
    for e in range(experts):
        for t in range(tokens):
            for k in range(top_k):
                if ids[t, k] == e and (capacity is None or counts[e] < capacity):
                    row_map[t, k] = row
                    counts[e] += 1
                    row += 1
    return row_map, torch.tensor(counts, dtype=torch.int64)


def naive_unpermute(expert_out, row_map, weights, tokens):
    out = torch.zeros(tokens, expert_out.shape[1], dtype=torch.float64)
    for t in range(tokens):
        for k in range(row_map.shape[1]):
            if row_map[t, k] >= 0:
                out[t] += weights[t, k].double() * expert_out[row_map[t, k]].double()
    return out


def naive_grouped_mm(x, w, counts):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    expert_of_row = torch.repeat_interleave(torch.arange(w.shape[0]), counts)
    for r in range(x.shape[0]):
        out[r] = x[r].double() @ w[expert_of_row[r]].double()
    return out


def make_ids(kind: str, tokens: int = T, experts: int = E, top_k: int = K, seed: int = 0):
    """Routings: ``uniform``; ``uneven`` (experts 1 and 5 empty, expert 2 takes 3/4 of the
    tokens' first slot); ``duplicates`` (a token may pick one expert twice)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.stack([torch.randperm(experts, generator=gen)[:top_k]
                            for _ in range(tokens)])
    if kind == "duplicates":
        return torch.randint(0, experts, (tokens, top_k), generator=gen)
    assert kind == "uneven" and experts == 8
    first = torch.where(torch.rand(tokens, generator=gen) < 0.75, 2, 6)
    cols = [first]
    if top_k > 1:
        others = torch.tensor([0, 3, 4, 7])
        cols.append(others[torch.randint(0, 4, (tokens,), generator=gen)])
    return torch.stack(cols, dim=1)


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton kernels (interpreter mode on CPU, set by tests/conftest.py)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", "triton")


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("ORCH_KERNELS", "reference")


def pipeline(tokens, ids, weights, w, capacity):
    """permute -> grouped_mm -> unpermute, and its gradients for a fixed upstream gradient."""
    permuted, row_map, counts = moe_permute(tokens, ids, w.shape[0], capacity)
    expert_out = grouped_mm(permuted, w, counts)
    out = moe_unpermute(expert_out, row_map, weights, tokens.shape[0])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    grads = torch.autograd.grad(out, [tokens, weights, w], grad)
    return (permuted, row_map, counts, expert_out, out, *grads)


# ---------------------------------------------------------------------------- routing


@pytest.mark.parametrize("kind", ["uniform", "uneven", "duplicates"])
@pytest.mark.parametrize("capacity", [None, 0, 1, 5, 1000])
def test_routing_matches_naive_loop(kind, capacity):
    ids = make_ids(kind, tokens=24)
    row_map, counts, kept = routing(ids, E, capacity)
    want_map, want_counts = naive_routing(ids, E, capacity)
    assert torch.equal(row_map, want_map)
    assert torch.equal(counts, want_counts)
    assert kept == int(want_counts.sum()) == int((row_map >= 0).sum())


def test_capacity_keeps_lowest_token_indices():
    ids = torch.tensor([[1, 0], [1, 2], [0, 1], [1, 0]])
    row_map, counts, kept = routing(ids, 3, capacity=2)
    assert counts.tolist() == [2, 2, 1] and kept == 5
    # expert 0: tokens 0 and 2 kept, token 3 dropped; expert 1: tokens 0 and 1, token 2 and 3 not
    assert row_map.tolist() == [[2, 0], [3, 4], [1, -1], [-1, -1]]


# ---------------------------------------------------------------------------- references


@pytest.mark.parametrize("capacity", [None, 3])
def test_references_match_naive_loops(capacity):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(16, 8, dtype=torch.float64, generator=gen)
    ids = make_ids("uneven", tokens=16)
    weights = torch.rand(16, K, dtype=torch.float64, generator=gen)
    w = torch.randn(E, 8, 5, dtype=torch.float64, generator=gen)
    row_map, counts, kept = routing(ids, E, capacity)
    permuted = permute_reference(tokens, row_map, kept)
    for t in range(16):
        for k in range(K):
            if row_map[t, k] >= 0:
                assert torch.equal(permuted[row_map[t, k]], tokens[t])
    expert_out = grouped_mm_reference(permuted, w, counts)
    torch.testing.assert_close(expert_out, naive_grouped_mm(permuted, w, counts))
    out = unpermute_reference(expert_out, row_map, weights, 16)
    torch.testing.assert_close(out, naive_unpermute(expert_out, row_map, weights, 16))


@pytest.mark.parametrize("capacity", [None, 2])
def test_references_gradcheck_float64(capacity):
    gen = torch.Generator().manual_seed(2)
    ids = torch.tensor([[0, 2], [2, 0], [0, 3], [3, 2], [2, 0], [0, 2]])  # expert 1 empty
    tokens = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    row_map, counts, kept = routing(ids, 4, capacity)
    assert torch.autograd.gradcheck(lambda x: permute_reference(x, row_map, kept), (tokens,))
    rows = torch.randn(kept, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = torch.rand(6, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, p: unpermute_reference(y, row_map, p, 6), (rows, weights))
    w = torch.randn(4, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: grouped_mm_reference(x, v, counts), (rows, w))


def test_reference_pipeline_matches_model_experts(reference_path):
    """SwiGLU via grouped_mm on permuted rows equals orch.models.moe.GroupedExperts."""
    from orch.models.moe import GroupedExperts

    torch.manual_seed(3)
    experts = GroupedExperts(E, 16, 24).double()
    x = torch.randn(32, 16, dtype=torch.float64)
    ids = make_ids("uneven", tokens=32)
    permuted, _, counts = moe_permute(x, ids, E)
    gate = grouped_mm(permuted, experts.w1, counts)
    up = grouped_mm(permuted, experts.w3, counts)
    down = grouped_mm(torch.nn.functional.silu(gate) * up, experts.w2, counts)
    torch.testing.assert_close(down, experts(permuted, counts))


# ---------------------------------------------------------------------------- Triton vs reference


@pytest.mark.parametrize(("kind", "capacity"),
                         [("uneven", None), ("uniform", None), ("uneven", 5)])
def test_triton_pipeline_matches_reference(monkeypatch, triton_path, kind, capacity):
    """Every op, forward and backward, with experts empty, overloaded, and over capacity."""
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(T, H, generator=gen).to(DEVICE).requires_grad_()
    weights = torch.rand(T, K, generator=gen).to(DEVICE).requires_grad_()
    w = (torch.randn(E, H, 48, generator=gen) / 8).to(DEVICE).requires_grad_()
    ids = make_ids(kind).to(DEVICE)
    got = pipeline(tokens, ids, weights, w, capacity)
    assert "orch_grouped_mm" in type(got[3].grad_fn).__name__  # the kernels ran
    assert "orch_moe_gather_rows" in type(got[4].grad_fn).__name__
    monkeypatch.setenv("ORCH_KERNELS", "reference")
    want = pipeline(tokens, ids, weights, w, capacity)
    names = ["permuted", "row_map", "counts", "expert_out", "out", "d_tokens", "d_weights", "d_w"]
    for name, a, b in zip(names, got, want, strict=True):
        if name in ("permuted", "row_map", "counts"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, **FP32, msg=lambda m, n=name: f"{n}: {m}")
    counts = got[2].tolist()
    if kind == "uneven":  # the case the test is for: empty experts and an overloaded one
        assert counts[1] == counts[5] == 0
        assert counts[2] == capacity if capacity else counts[2] > T // 2


def test_triton_row_ops_gradcheck_float64(triton_path):
    """The Triton permute/unpermute autograd functions (no tl.dot, so float64 works); fast mode
    (random projections) as each evaluation launches interpreted kernels."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([[0, 2], [2, 0], [0, 3], [3, 2], [2, 0]]).to(DEVICE)
    tokens = torch.randn(5, 4, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_()
    for capacity in (None, 2):
        assert torch.autograd.gradcheck(lambda x, c=capacity: moe_permute(x, ids, 4, c)[0],
                                        (tokens,), fast_mode=True)
        _, row_map, counts = moe_permute(tokens, ids, 4, capacity)
        rows = torch.randn(int(counts.sum()), 4, dtype=torch.float64, generator=gen)
        rows = rows.to(DEVICE).requires_grad_()
        weights = torch.rand(5, 2, dtype=torch.float64, generator=gen).to(DEVICE)
        assert torch.autograd.gradcheck(lambda y, p, r=row_map: moe_unpermute(y, r, p, 5),
                                        (rows, weights.requires_grad_()), fast_mode=True)
        assert torch.autograd.gradcheck(lambda y, r=row_map: moe_unpermute(y, r, None, 5),
                                        (rows,), fast_mode=True)


def test_triton_unpermute_bf16_rows_fp32_weights(monkeypatch, triton_path):
    gen = torch.Generator().manual_seed(6)
    ids = make_ids("uneven", tokens=32).to(DEVICE)
    tokens = torch.randn(32, 40, generator=gen).to(DEVICE, torch.bfloat16)
    weights = torch.rand(32, K, generator=gen).to(DEVICE).requires_grad_()
    results = []
    for mode in ("triton", "reference"):
        monkeypatch.setenv("ORCH_KERNELS", mode)
        permuted, row_map, _ = moe_permute(tokens, ids, E, capacity=10)
        rows = permuted.detach().requires_grad_()
        out = moe_unpermute(rows, row_map, weights, 32)
        out.float().square().sum().backward()
        results.append((permuted, out, rows.grad, weights.grad.clone()))
        weights.grad = None
    (p1, o1, g1, w1), (p2, o2, g2, w2) = results
    assert torch.equal(p1, p2)
    assert o1.dtype == torch.bfloat16 and w1.dtype == torch.float32
    torch.testing.assert_close(o1, o2)  # bf16 defaults: one rounding of an fp32 sum
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(w1, w2, rtol=1e-2, atol=1e-2)  # fp32 dots of bf16 products


def test_triton_grouped_mm_strided_weights_and_empty(triton_path):
    gen = torch.Generator().manual_seed(8)
    counts = torch.tensor([0, 17, 0, 1, 40, 0, 6, 0])
    x = torch.randn(64, 32, generator=gen).to(DEVICE).requires_grad_()
    w_t = torch.randn(E, 24, 32, generator=gen).to(DEVICE).requires_grad_()
    w = w_t.transpose(1, 2)  # [E, 32, 24], not contiguous
    out = grouped_mm(x, w, counts)
    want = naive_grouped_mm(x.detach().cpu(), w.detach().cpu(), counts)
    torch.testing.assert_close(out.double().cpu(), want, **FP32)
    dx, dw = torch.autograd.grad(out.sum(), [x, w_t])
    rx, rw = torch.autograd.grad(grouped_mm_reference(x, w, counts).sum(), [x, w_t])
    torch.testing.assert_close(dx, rx, **FP32)
    torch.testing.assert_close(dw, rw, **FP32)
    assert dw[[0, 2, 5, 7]].abs().max() == 0


def test_kernels_are_ops_torch_can_trace(triton_path):
    """Every MoE kernel is a torch custom op whose schema, shape-only implementation and autograd
    registration pass ``torch.library.opcheck`` (with AOT autograd tracing): what
    ``torch.compile`` and selective recompute rely on. Weights with and without a gradient."""
    from orch.kernels.moe import triton_moe

    gen = torch.Generator().manual_seed(11)
    counts = torch.tensor([3, 0, 9, 4])
    x = torch.randn(16, 8, generator=gen).requires_grad_()
    w = torch.randn(4, 8, 16, generator=gen).requires_grad_()
    torch.library.opcheck(triton_moe.grouped_mm_op, (x, w, counts))
    g = torch.randn(16, 16, generator=gen)
    torch.library.opcheck(torch.ops.orch.grouped_mm_weight_grad.default,
                          (x.detach(), g, counts, 4))
    tokens = torch.randn(T, H, generator=gen).requires_grad_()
    weights = torch.rand(T, K, generator=gen)
    row_map, counts, kept = routing(make_ids("uneven"), E, 5)
    rows = torch.randn(kept, H, generator=gen).requires_grad_()
    for w in (None, weights, weights.clone().requires_grad_()):
        torch.library.opcheck(triton_moe.scatter_op, (tokens, row_map, w, kept, tokens.dtype))
        torch.library.opcheck(triton_moe.gather_op, (rows, row_map, w, rows.dtype))
    torch.library.opcheck(torch.ops.orch.moe_row_dots.default,
                          (rows.detach(), tokens.detach(), row_map, torch.float32))


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_round_trip_sums_copies(monkeypatch, mode):
    """permute -> unpermute with weights 1 gives each token times its number of kept copies."""
    if mode == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", mode)
    tokens = torch.randn(T, H, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ids = make_ids("uneven").to(DEVICE)
    for capacity in (None, 7, 0):
        permuted, row_map, _ = moe_permute(tokens, ids, E, capacity)
        ones = torch.ones(T, K, device=DEVICE)
        out = moe_unpermute(permuted, row_map, ones, T)
        copies = (row_map >= 0).sum(1, keepdim=True).to(tokens.dtype)
        torch.testing.assert_close(out, tokens * copies)
        torch.testing.assert_close(moe_unpermute(permuted, row_map, None, T), out)
    assert permuted.shape == (0, H) and not out.any()


def test_lazy_export():
    import orch.kernels

    assert orch.kernels.moe_permute is moe_permute
    assert orch.kernels.grouped_mm is grouped_mm


# ---------------------------------------------------------------------------- bad input

_tok = torch.randn(4, 8)
_ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
_perm, _map, _counts = moe_permute(_tok, _ids, 3)
_wts = torch.rand(4, 2)
_w = torch.randn(3, 8, 5)

BAD = {
    "tokens 1-D": (lambda: moe_permute(_tok[0], _ids, 3), "tokens must have 2 dimensions"),
    "tokens int": (lambda: moe_permute(_tok.long(), _ids, 3), "tokens has dtype torch.int64"),
    "ids float": (lambda: moe_permute(_tok, _ids.float(), 3), "expert_ids has dtype"),
    "ids rows": (lambda: moe_permute(_tok, _ids[:3], 3), "expert_ids has 3 rows"),
    "ids too big": (lambda: moe_permute(_tok, _ids, 2), r"expert_ids holds 2, outside \[0, 2\)"),
    "ids negative": (lambda: moe_permute(_tok, -_ids, 3), "expert_ids holds -2"),
    "ids device": (lambda: moe_permute(_tok, _ids.to("meta"), 3), "expert_ids is on meta"),
    "num_experts": (lambda: moe_permute(_tok, _ids, 0), "num_experts must be an int >= 1"),
    "num_experts bool": (lambda: moe_permute(_tok, _ids, True), "num_experts must be an int"),
    "capacity": (lambda: moe_permute(_tok, _ids, 3, -1), "capacity must be an int >= 0"),
    "out 3-D": (lambda: moe_unpermute(_perm[None], _map, _wts, 4), "expert_out must have 2"),
    "out rows": (lambda: moe_unpermute(torch.cat([_perm, _perm]), _map, _wts, 4),
                 "expert_out has 16 rows, more than the 8"),
    "out too few": (lambda: moe_unpermute(_perm[:5], _map, _wts, 4), "row_map does not fit"),
    "map dtype": (lambda: moe_unpermute(_perm, _map.int(), _wts, 4), "row_map has dtype"),
    "map tokens": (lambda: moe_unpermute(_perm, _map, _wts, 5), "row_map has 4 rows but num"),
    "map values": (lambda: moe_unpermute(_perm, _map + 3, _wts, 4), "row_map does not fit"),
    # a row kept twice, another never: the result read unset memory (or an index error)
    "map repeats": (lambda: moe_unpermute(_perm, _map.clone().index_fill_(0, torch.tensor([1]),
                                                                          0), _wts, 4),
                    r"8 kept copies \(2 of them repeated\)"),
    # a stray huge entry: refused by its range, not counted (a bincount of 10^11 entries)
    "map huge": (lambda: moe_unpermute(_perm, _map.clone().index_fill_(0, torch.tensor([1]),
                                                                       10**11), _wts, 4),
                 r"entries span \[0, 100000000000\]"),
    "weights shape": (lambda: moe_unpermute(_perm, _map, _wts[:, :1], 4), "weights has shape"),
    "weights device": (lambda: moe_unpermute(_perm, _map, _wts.to("meta"), 4),
                       "weights is on meta"),
    "num_tokens": (lambda: moe_unpermute(_perm, _map, _wts, -1), "num_tokens must be an int"),
    "x 3-D": (lambda: grouped_mm(_perm[None], _w, _counts), "x must have 2 dimensions"),
    "w dtype": (lambda: grouped_mm(_perm, _w.double(), _counts), "w has dtype torch.float64"),
    "w shape": (lambda: grouped_mm(_perm, _w[:, :4], _counts), r"w has shape \[3, 4, 5\]"),
    "w device": (lambda: grouped_mm(_perm, _w.to("meta"), _counts), "w is on meta"),
    "counts sum": (lambda: grouped_mm(_perm, _w, _counts + 1), "tokens_per_expert sums to 11"),
    "counts negative": (lambda: grouped_mm(_perm, _w, torch.tensor([9, -1, 0])),
                        r"sums to 8 \(smallest -1\)"),
    "counts length": (lambda: grouped_mm(_perm, _w, _counts[:2]),
                      "tokens_per_expert has 2 entries for 3 experts"),
    "counts float": (lambda: grouped_mm(_perm, _w, _counts.float()),
                     "tokens_per_expert has dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_argument_and_fix(reference_path, case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert isinstance(info.value, MoEInputError) and isinstance(info.value, OrchError)
    assert "\n    fix: " in str(info.value)


def test_check_false_skips_value_checks(reference_path):
    """check=False trusts the counts (no host sync); shape checks still run."""
    out = grouped_mm(_perm, _w, _counts, check=False)
    torch.testing.assert_close(out, grouped_mm_reference(_perm, _w, _counts))
    with pytest.raises(ValueError, match="w has shape"):
        grouped_mm(_perm, _w[:, :4], _counts, check=False)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA: compiled Triton kernels at bf16")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_match_reference(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(10)
    tokens_n, hidden, experts, top_k = 2048, 512, 16, 4
    scores = torch.rand(tokens_n, experts, generator=gen)
    scores[:, 0] += 0.5  # expert 0 overloaded
    scores[:, [3, 9]] = -1.0  # experts 3 and 9 empty
    ids = scores.topk(top_k, dim=1).indices.cuda()
    tokens = torch.randn(tokens_n, hidden, generator=gen).cuda().to(dtype).requires_grad_()
    weights = torch.rand(tokens_n, top_k, generator=gen).cuda().requires_grad_()
    w = (torch.randn(experts, hidden, 384, generator=gen) / 16).cuda().to(dtype)
    w.requires_grad_()
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-4  # of the largest magnitude; chained ops
    for capacity in (None, 300):
        monkeypatch.delenv("ORCH_KERNELS", raising=False)
        got = pipeline(tokens, ids, weights.to(dtype), w, capacity)
        assert "orch_grouped_mm" in type(got[3].grad_fn).__name__
        monkeypatch.setenv("ORCH_KERNELS", "reference")
        want = pipeline(tokens, ids, weights.to(dtype), w, capacity)
        for a, b in zip(got, want, strict=True):
            if a.dtype == torch.int64:
                assert torch.equal(a, b)
            else:
                err = (a.float() - b.float()).abs().max()
                assert err <= rel * b.float().abs().max(), (capacity, err)
