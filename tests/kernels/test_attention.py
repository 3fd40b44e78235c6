"""flash_attention: the reference against torch SDPA, the Triton kernels (interpreter mode on CPU)
against the reference, the log-sum-exp contract ring attention relies on, attention within
documents, and bad input.

Tolerances (float32 on CPU, measured max differences ~1e-6 at these shapes): the reference
against SDPA and the Triton kernels against the reference, out, lse and every gradient, within
``atol=1e-5, rtol=1e-4``. float16 through the interpreter: out/lse within 2e-3, gradients 1e-2
(half a float16 ulp at 1 is 4.9e-4). On a GPU (``gpu`` tests) the kernels' float16/bfloat16/float32
error against a float32 reference must stay within twice torch SDPA's own error, plus 1e-3.
"""

from __future__ import annotations

import dataclasses
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from orch.kernels.attention import AttentionInputError, attention_reference, flash_attention

ATOL, RTOL = 1e-5, 1e-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)")


def make(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device).requires_grad_()

    return (
        rand(batch, seq_q, heads, head_dim),
        rand(batch, seq_k, kv_heads, head_dim),
        rand(batch, seq_k, kv_heads, head_dim),
    )


def grads(fn, q, k, v, seed=1):
    """Outputs and (dq, dk, dv) for a random weighting of both out and lse."""
    out, lse = fn(q, k, v)
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen).to(out.device)
    w_lse = torch.randn(lse.shape, generator=gen).to(lse.device)
    loss = (out.float() * w_out).sum() + (lse.float() * w_lse).sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v))


def close(actual, expected, atol=ATOL, rtol=RTOL, what=""):
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def same_with_gradients(out, expected, inputs):
    """``out`` is ``expected`` within the tolerances, and so are their gradients in ``inputs``
    (q, k, v) under one random weighting."""
    close(out, expected, what="out")
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), inputs)
    want = torch.autograd.grad((expected * w).sum(), inputs)
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, what=f"d{name}")


def sdpa(q, k, v, causal, scale=None):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


# --- the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, causal, scale",
    [
        ((2, 24, 24, 4, 4, 16), False, None),
        ((2, 24, 24, 4, 4, 16), True, None),
        ((1, 19, 19, 6, 2, 32), True, None),
        ((2, 13, 29, 4, 1, 8), False, 0.3),
    ],
    ids=["mha", "causal", "gqa-causal", "gqa-cross-scale"],
)
def test_reference_matches_sdpa(shape, causal, scale):
    q, k, v = make(*shape)
    same_with_gradients(attention_reference(q, k, v, causal, scale)[0],
                        sdpa(q, k, v, causal, scale), (q, k, v))


def test_reference_lse_is_logsumexp_of_scaled_scores():
    q, k, v = make(1, 9, 9, 4, 2, 8)
    lse = attention_reference(q, k, v, causal=True, softmax_scale=0.5)[1]
    assert lse.shape == (1, 4, 9) and lse.dtype == torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * 0.5
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    close(lse, torch.logsumexp(scores, dim=-1), what="lse")


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradcheck_through_out_and_lse(causal):
    q, k, v = make(1, 5, 5, 4, 2, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: attention_reference(*t, causal), (q, k, v))


def test_bfloat16_reference_keeps_float32_lse():
    q, k, v = make(1, 8, 8, 2, 2, 16, dtype=torch.bfloat16)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


# --- the Triton kernels (interpreter mode without a GPU) ----------------------------------------


@pytest.fixture
def triton_path(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", "triton")
    from orch.kernels.attention import kernels

    return kernels


def small(kernels, fwd=(32, 16), dkv=(16, 32), dq=(32, 16)):
    """Small tiles so interpreter runs stay cheap and sequences straddle several blocks."""
    return kernels.BlockConfig(*fwd, *dkv, *dq)


CASES = [  # batch, seq_q, seq_k, heads, kv_heads, head_dim, causal
    pytest.param((2, 37, 37, 4, 2, 32), True, id="causal-gqa2-ragged"),
    pytest.param((2, 37, 37, 4, 2, 32), False, id="gqa2-ragged"),
    pytest.param((1, 64, 64, 3, 1, 16), True, id="causal-gqa3-even"),
    pytest.param((2, 21, 50, 4, 1, 48), False, id="cross-gqa4-d48"),
    pytest.param((1, 80, 80, 2, 2, 64), True, id="causal-d64"),
]


@pytest.mark.parametrize("shape, causal", CASES)
def test_triton_matches_reference(triton_path, shape, causal):
    q, k, v = make(*shape)
    cfg = small(triton_path)
    out, lse, got = grads(
        lambda *t: triton_path.flash_attention_triton(*t, causal, None, cfg), q, k, v
    )
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, causal), q, k, v)
    assert out.shape == q.shape and lse.shape == (shape[0], shape[3], shape[1])
    assert lse.dtype == torch.float32
    close(out, ref_out, what="out")
    close(lse, ref_lse, what="lse")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, what=f"d{name}")


@pytest.mark.parametrize(
    "tiles",
    [((16, 16), (16, 16), (16, 16)), ((64, 32), (32, 64), (64, 16))],
    ids=["all16", "large"],
)
def test_triton_other_tiles(triton_path, tiles):
    q, k, v = make(1, 45, 45, 2, 1, 32)
    cfg = small(triton_path, *tiles)
    out, lse, got = grads(
        lambda *t: triton_path.flash_attention_triton(*t, True, 0.2, cfg), q, k, v
    )
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, True, 0.2), q, k, v)
    close(out, ref_out, what="out")
    close(lse, ref_lse, what="lse")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, what=f"d{name}")


@pytest.mark.parametrize("which", ["out", "lse"])
def test_triton_gradient_of_one_output(triton_path, which):
    """A loss on only one output: the other's gradient is None inside backward."""
    q, k, v = make(1, 20, 20, 2, 1, 16)
    cfg = small(triton_path)
    index = 0 if which == "out" else 1
    got = torch.autograd.grad(
        triton_path.flash_attention_triton(q, k, v, True, None, cfg)[index].sum(), (q, k, v)
    )
    want = torch.autograd.grad(
        attention_reference(q, k, v, True)[index].sum(),
        (q, k, v),
        allow_unused=True,
        materialize_grads=True,
    )  # lse ignores v
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, what=f"d{name}")


def test_triton_float16(triton_path):
    q, k, v = make(1, 40, 40, 2, 1, 32, dtype=torch.float16)
    cfg = small(triton_path)
    out, lse, got = grads(
        lambda *t: triton_path.flash_attention_triton(*t, True, None, cfg), q, k, v
    )
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, True), q, k, v)
    assert out.dtype == torch.float16 and got[1].dtype == torch.float16
    close(out, ref_out, atol=2e-3, rtol=2e-3, what="out")
    close(lse, ref_lse, atol=2e-3, rtol=2e-3, what="lse")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, atol=1e-2, rtol=1e-2, what=f"d{name}")


def test_triton_takes_strided_views(triton_path):
    """Ring attention holds (batch, heads, seq, head_dim); its transpose goes in without a copy."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 24, 16, generator=gen).transpose(1, 2) for _ in range(3))
    out, lse = triton_path.flash_attention_triton(q, k, v, True, None, small(triton_path))
    ref_out, ref_lse = attention_reference(q, k, v, True)
    close(out, ref_out, what="out")
    close(lse, ref_lse, what="lse")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_lse_merges_key_blocks_like_ring_attention(monkeypatch, impl):
    """Queries of chunk 1 see chunk 0 fully (causal=False) and chunk 1 causally: merging the two
    partial results by their log-sum-exps gives full causal attention, values and gradients."""
    if impl == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", impl)
    q, k, v = make(1, 32, 32, 4, 2, 16)
    half = 16

    def merged(q, k, v):
        q1 = q[:, half:]
        out_a, lse_a = flash_attention(q1, k[:, :half], v[:, :half], causal=False, return_lse=True)
        out_b, lse_b = flash_attention(q1, k[:, half:], v[:, half:], causal=True, return_lse=True)
        lse = torch.logaddexp(lse_a, lse_b)
        weight = lambda part: torch.exp(part - lse).transpose(1, 2).unsqueeze(-1)  # noqa: E731
        return out_a * weight(lse_a) + out_b * weight(lse_b), lse

    out, lse, got = grads(merged, q, k, v)
    ref_out, ref_lse, want = grads(
        lambda q, k, v: [
            t[:, half:] if i == 0 else t[..., half:]
            for i, t in enumerate(attention_reference(q, k, v, True))
        ],
        q,
        k,
        v,
    )
    close(out, ref_out, what="out")
    close(lse, ref_lse, what="lse")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, what=f"d{name}")


@pytest.mark.parametrize("within_documents", [False, True], ids=["causal", "documents"])
def test_kernels_are_ops_torch_can_trace(triton_path, within_documents):
    """The forward and backward kernels are torch custom ops whose schemas, fake (shape-only)
    implementations and autograd registration pass ``torch.library.opcheck`` (which also traces
    them with AOT autograd): what ``torch.compile`` and selective recompute rely on; the
    document ids are optional tensors of both."""
    q, k, v = make(1, 20, 20, 4, 2, 16)
    tiles = list(dataclasses.astuple(small(triton_path)))
    ids = documents(20, (3, 11))
    docs = (ids, ids) if within_documents else ()
    ops = torch.ops.orch
    torch.library.opcheck(ops.flash_attention_forward.default, (q, k, v, True, 0.25, tiles, *docs))
    out, lse = ops.flash_attention_forward(*(t.detach() for t in (q, k, v)), True, 0.25, tiles,
                                           *docs)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    for extra in (dlse, None):  # with and without a gradient on lse
        torch.library.opcheck(ops.flash_attention_backward.default,
                              (dout, extra, q.detach(), k.detach(), v.detach(), out, lse, True,
                               0.25, tiles, *docs))


def from_kernel(out: torch.Tensor) -> bool:
    """Whether ``out`` came from the Triton kernels' op (its autograd node is the op's)."""
    return "orch_flash_attention_forward" in type(out.grad_fn).__name__


# --- within documents ---------------------------------------------------------------------------


def documents(seq, *starts):
    """Document ids ``(len(starts), seq)``: row ``r`` starts a document at 0 and at each of
    ``starts[r]`` (a cumulative sum over starts, as packed data numbers them)."""
    ids = torch.zeros(len(starts), seq, dtype=torch.long)
    for row, begins in enumerate(starts):
        ids[row, list(begins)] = 1
    return ids.cumsum(1)


def same_document(q_ids, k_ids, causal):
    """SDPA's boolean mask ``(batch, 1, seq_q, seq_k)``: the same document (and causal)."""
    from orch.kernels.attention import document_mask

    if causal:
        return document_mask(q_ids)
    return (q_ids[:, :, None] == k_ids[:, None, :])[:, None]


def sdpa_masked(q, k, v, mask):
    out = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_reference_within_documents_matches_sdpa_with_the_mask(causal):
    """The reference's ``documents`` is torch SDPA with the boolean document mask, documents of
    one token and grouped-query heads included."""
    q, k, v = make(2, 19, 19, 4, 2, 16)
    ids = documents(19, (1, 2, 9, 18), (10,))
    same_with_gradients(attention_reference(q, k, v, causal, None, (ids, ids))[0],
                        sdpa_masked(q, k, v, same_document(ids, ids, causal)), (q, k, v))


def pair_without_keys():
    """Query and key ids of a ring block's kind: some queries' documents (3 in row 0, 6 in row
    1) have no key here, and some keys' documents no query."""
    q_ids = torch.tensor([[0] * 4 + [1] * 9 + [3] * 8, [2] * 6 + [5] * 12 + [6] * 3])
    k_ids = torch.tensor([[0] * 20 + [1] * 10 + [2] * 20, [2] * 10 + [5] * 30 + [7] * 10])
    return q_ids, k_ids


DOCUMENT_CASES = [  # shape, causal, ids (one tensor: self-attention; or a pair), tiles
    pytest.param((2, 37, 37, 4, 2, 32), True, documents(37, (3, 4, 20, 36), (1,)), None,
                 id="causal-gqa2-ragged"),
    pytest.param((2, 37, 37, 4, 2, 32), False, documents(37, (3, 4, 20, 36), (1,)), None,
                 id="full-gqa2-ragged"),
    pytest.param((1, 64, 64, 2, 1, 16), True, documents(64, (3, 60)), ((16, 16),) * 3,
                 id="causal-over-blocks-all16"),
    pytest.param((2, 21, 50, 4, 1, 48), False, pair_without_keys(), None,
                 id="pair-rows-without-keys"),
]


@pytest.mark.parametrize("shape, causal, ids, tiles", DOCUMENT_CASES)
def test_triton_within_documents_matches_reference(triton_path, shape, causal, ids, tiles):
    """Documents of one token, documents over several blocks (whose inner blocks need no
    mask), blocks across boundaries, a ragged end; and a query/key pair where some queries see
    no key at all: their out is 0, lse -inf, and their gradients 0, never NaN."""
    q, k, v = make(*shape)
    pair = (ids, ids) if isinstance(ids, torch.Tensor) else ids
    cfg = small(triton_path, *(tiles or ()))
    out, lse, got = grads(
        lambda *t: triton_path.flash_attention_triton(*t, causal, None, cfg, pair), q, k, v
    )
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, causal, None, pair), q, k, v)
    close(out, sdpa_masked(q, k, v, same_document(*pair, causal)).nan_to_num(0.0), what="sdpa")
    close(out, ref_out, what="out")
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)  # -inf where ref's is
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.isfinite().all() and b.isfinite().all(), f"d{name}"
        close(a, b, what=f"d{name}")
    blind = ~same_document(*pair, causal).any(-1)[:, 0]  # (batch, seq_q): sees no key
    assert blind.any() == (not isinstance(ids, torch.Tensor))
    assert (out[blind] == 0).all() and (got[0][blind] == 0).all()
    assert (lse.transpose(1, 2)[blind] == -math.inf).all()


def random_ids(rng, batch, seq, names):
    """``(batch, seq)`` ids drawn from ``names`` and sorted: documents of random lengths (one
    token often), numbered with gaps and not from 0, a different layout in every row."""
    return torch.tensor([sorted(rng.choices(names, k=seq)) for _ in range(batch)])


@pytest.mark.parametrize("seed", range(4))
def test_triton_within_random_documents(triton_path, seed):
    """Layouts the cases above miss, drawn at random: query/key pairs under ``causal`` too
    (the ring's diagonal block with ids of its own), queries whose document has no key,
    tiles of every shape the launchers take, head_dim 48 and 64, float16; out, lse and
    gradients through both against the reference."""
    rng = random.Random(seed)
    tiles = [(m, n) for m in (16, 32, 64) for n in (16, 32, 64) if m % n == 0]
    cfg = small(triton_path, rng.choice(tiles), rng.choice(tiles)[::-1], rng.choice(tiles))
    causal, dtype = seed % 2 == 0, (torch.float32, torch.float16)[seed // 2]
    seq_q = rng.randint(1, 70)
    seq_k = seq_q if causal else rng.randint(1, 70)
    names = rng.sample(range(3, 40), rng.randint(1, 6))
    # the keys lack the first document: its queries see nothing
    pair = (random_ids(rng, 2, seq_q, names), random_ids(rng, 2, seq_k, names[1:] or names))
    q, k, v = make(2, seq_q, seq_k, 4, (1, 2, 4, 1)[seed], (16, 48, 64, 48)[seed], dtype)
    out, lse, got = grads(
        lambda *t: triton_path.flash_attention_triton(*t, causal, None, cfg, pair), q, k, v
    )
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, causal, None, pair), q, k, v)
    # the module doc's tolerances: float32's, or float16's for out/lse and for gradients
    tol, grad_tol = ((ATOL, RTOL),) * 2 if dtype == torch.float32 else ((2e-3,) * 2, (1e-2,) * 2)
    close(out, ref_out, *tol, what=f"out {cfg}")
    torch.testing.assert_close(lse, ref_lse, atol=tol[0], rtol=tol[1])  # -inf where ref's is
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.isfinite().all(), f"d{name}"
        close(a, b, *grad_tol, what=f"d{name} {cfg}")


def test_triton_within_one_document_is_plain_causal_exactly(triton_path):
    """One document is plain causal attention, bit for bit: the same blocks in the same order
    (the documents' bounds coincide with the causal ones), out, lse and gradients."""
    q, k, v = make(1, 45, 45, 2, 1, 32)
    cfg = small(triton_path)
    ids = torch.zeros(1, 45, dtype=torch.long)
    results = [grads(lambda *t, d=d: triton_path.flash_attention_triton(*t, True, None, cfg, d),
                     q, k, v) for d in (None, (ids, ids))]
    (out, lse, got), (doc_out, doc_lse, doc_got) = results
    assert torch.equal(out, doc_out) and torch.equal(lse, doc_lse)
    for a, b in zip(got, doc_got, strict=True):
        assert torch.equal(a, b)


def test_triton_never_reads_blocks_no_query_sees(triton_path):
    """The kernels skip whole blocks of other documents: NaN in the keys and values of a
    document no query has (two whole key blocks), and in the queries of a document no key has
    (a whole query block), leave every output and gradient finite and equal to the reference
    on the clean inputs; a block loaded and masked would spread the NaN (0 * NaN)."""
    q, k, v = make(1, 48, 64, 2, 1, 16)
    q_ids = torch.tensor([[0] * 16 + [1] * 16 + [3] * 16])
    k_ids = torch.tensor([[0] * 16 + [2] * 32 + [3] * 16])
    poisoned = [t.detach().clone() for t in (q, k, v)]
    poisoned[0][:, 16:32] = math.nan
    poisoned[1][:, 16:48] = math.nan
    poisoned[2][:, 16:48] = math.nan
    poisoned = [t.requires_grad_() for t in poisoned]
    cfg = small(triton_path, (16, 16), (16, 16), (16, 16))
    pair = (q_ids, k_ids)
    out, lse, got = grads(
        lambda *t: triton_path.flash_attention_triton(*t, False, None, cfg, pair), *poisoned
    )
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, False, None, pair), q, k, v)
    close(out, ref_out, what="out")
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.isfinite().all(), f"d{name}"
        close(a, b, what=f"d{name}")


def test_triton_compares_ids_of_two_dtypes_by_value(triton_path):
    """Query and key ids in different integer dtypes mean what the reference makes of them:
    the query document 300 (int64) has no key among int8 ids, where 300 would wrap to 44."""
    q, k, v = make(1, 16, 16, 2, 1, 16)
    pair = (torch.tensor([[0] * 8 + [300] * 8]),
            torch.tensor([[0] * 8 + [44] * 8], dtype=torch.int8))
    out, lse, got = grads(lambda *t: flash_attention(*t, return_lse=True, documents=pair),
                          q, k, v)
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, False, None, pair), q, k, v)
    assert (lse[..., 8:] == -math.inf).all()
    close(out, ref_out, what="out")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, what=f"d{name}")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_flash_attention_takes_documents(monkeypatch, impl):
    """``flash_attention(..., documents=)`` on either path: one tensor for self-attention."""
    if impl == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", impl)
    q, k, v = make(1, 24, 24, 2, 1, 16)
    ids = documents(24, (5, 6))
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, documents=ids)
    assert from_kernel(out) == (impl == "triton")
    ref_out, ref_lse = attention_reference(q, k, v, True, None, (ids, ids))
    close(out, ref_out, what="out")
    close(lse, ref_lse, what="lse")


def test_causal_attention_within_documents_runs_the_kernel_without_a_mask(
        triton_path, monkeypatch, count_calls):
    """The model's attention within documents (``Documents``) runs orch's kernels with the ids
    where they run, and builds no seq x seq mask there; its result is SDPA's with the mask."""
    from orch.kernels import causal_attention
    from orch.kernels.attention import Documents

    launches = count_calls(triton_path, "forward")
    q, k, v = (t.transpose(1, 2) for t in make(2, 19, 19, 4, 2, 16))  # (batch, heads, seq, dim)
    ids = documents(19, (1, 2, 9, 18), (10,))
    weight = torch.randn(2, 4, 19, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for impl in ("triton", "reference"):
        monkeypatch.setenv("ORCH_KERNELS", impl)
        within = Documents(ids)
        out = causal_attention(q, k, v, documents=within)
        results.append((out, *torch.autograd.grad((out * weight).sum(), (q, k, v))))
        assert (within._masks == {}) == (impl == "triton")
    assert len(launches) == 1
    for got, want in zip(*results, strict=True):
        close(got, want)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("ids, pattern", [
    (documents(19, (4,)).expand(2, -1), r"shape \(2, 19\) is not q's \(batch, seq\) \(2, 20\)"),
    (documents(20, (4,)), r"shape \(1, 20\) is not q's \(batch, seq\) \(2, 20\)"),
    (torch.tensor([[0] * 5 + [1] * 5] * 4).view(2, 20), r"ids decrease along a row"),
], ids=["seq", "batch", "order"])
def test_causal_attention_refuses_ids_that_do_not_fit(monkeypatch, impl, ids, pattern):
    """The model's attention checks its document ids as ``flash_attention`` does, on either
    path: the kernels read one range per query (too few ids: past their end) found by binary
    search (unordered ids: wrong ranges, where SDPA's mask compared ids and gave another
    answer), and SDPA failed on a mask of the wrong size or broadcast a batch of 1."""
    from orch.kernels import causal_attention
    from orch.kernels.attention import Documents

    if impl == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", impl)
    q, k, v = (t.detach().transpose(1, 2) for t in make(2, 20, 20, 2, 1, 16))
    with pytest.raises(AttentionInputError,
                       match=rf"(?s)causal_attention\(documents\): {pattern}.*fix:"):
        causal_attention(q, k, v, documents=Documents(ids))


def test_causal_attention_within_documents_compiles_without_a_graph_break(monkeypatch):
    """The ids' order check on CPU (a data-dependent ``bool``) is left out while torch.compile
    traces, as on a GPU: it split each compiled decoder block's graph in three, every layer."""
    from orch.kernels import causal_attention
    from orch.kernels.attention import Documents

    monkeypatch.setenv("ORCH_KERNELS", "reference")
    q = torch.randn(1, 2, 16, 16)
    within = Documents(documents(16, (8,)))
    explained = torch._dynamo.explain(lambda q: causal_attention(q, q, q, documents=within))(q)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_causal_attention_takes_a_scale_of_zero_or_below(scale):
    """torch's CPU SDPA with is_causal returns all NaN for softmax_scale <= 0, and
    causal_attention ran it there (flash_attention's reference was right): it runs the reference
    for such a scale, forward and backward, grouped-query heads too. Checked against torch's
    SDPA with an explicit boolean causal mask, right on the CPU for any scale (causal_attention
    runs the reference itself here, so the reference would be checked against itself)."""
    from orch.kernels import causal_attention

    q, k, v = make(2, 7, 7, 4, 2, 16)
    heads_first = [t.transpose(1, 2) for t in (q, k, v)]  # (batch, heads, seq, head_dim)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    weight = torch.randn(2, 4, 7, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for out in (causal_attention(*heads_first, softmax_scale=scale),
                F.scaled_dot_product_attention(*heads_first, attn_mask=causal, scale=scale,
                                               enable_gqa=True)):
        results.append((out, *torch.autograd.grad((out * weight).sum(), (q, k, v))))
    for got, want in zip(*results, strict=True):
        assert not got.isnan().any()
        close(got, want)


def test_importing_orch_loads_no_triton():
    """The kernels' modules import triton only when a kernel runs, so a process that runs none
    (every CPU run) never loads triton or torch's compiler stack (``torch._dynamo``)."""
    code = ("import sys, orch.cli, orch.runtime.training_worker, orch.kernels.attention, "
            "orch.kernels.moe; "
            "print([m for m in ('triton', 'torch._dynamo') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_dispatch(monkeypatch):
    q, k, v = make(1, 16, 16, 2, 2, 16)
    monkeypatch.delenv("ORCH_KERNELS", raising=False)
    assert not from_kernel(flash_attention(q, k, v))  # CPU: reference
    monkeypatch.setenv("ORCH_KERNELS", "reference")
    assert not from_kernel(flash_attention(q, k, v))
    pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", "triton")
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert from_kernel(out) and lse.shape == (1, 2, 16)


def test_a_kernel_choice_that_is_not_one_is_an_error(monkeypatch):
    """``ORCH_KERNELS=Reference`` (or any other value) was taken for unset, so on CUDA the
    kernels still ran; ``triton`` without triton fell back to the reference without a word."""
    from orch.errors import ProblemsError
    from orch.kernels import dispatch

    q, k, v = make(1, 16, 16, 2, 2, 16)
    monkeypatch.setenv("ORCH_KERNELS", "Reference")
    with pytest.raises(ProblemsError, match="ORCH_KERNELS: 'Reference' is not one of reference, "
                       "triton"):
        flash_attention(q, k, v)
    monkeypatch.setenv("ORCH_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "_triton", False)  # as if triton did not import
    problem = dispatch.kernel_choice_problem()
    assert problem is not None and "triton does not import" in problem.message
    with pytest.raises(ProblemsError, match="install triton, or unset ORCH_KERNELS"):
        flash_attention(q, k, v)


def test_triton_forced_on_the_cpu_without_its_interpreter_is_an_error(monkeypatch):
    """``ORCH_KERNELS=triton`` on a machine without a GPU passed every check and the first
    step failed inside triton ("0 active drivers"): on the CPU Triton runs only interpreted."""
    pytest.importorskip("triton")
    from orch.errors import ProblemsError
    from orch.kernels import dispatch

    q, k, v = make(1, 16, 16, 2, 2, 16)
    monkeypatch.setenv("ORCH_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ProblemsError, match="ORCH_KERNELS: 'triton' forces the Triton kernels, "
                       "with tensors on the CPU, where Triton runs only in its interpreter"):
        flash_attention(q, k, v)
    problem = dispatch.kernel_choice_problem()  # what orch launch and orch doctor ask
    assert problem is not None and "no CUDA device on this machine" in problem.message
    for on in ("1", "true", "on", "yes", "Y"):  # as Triton reads it
        monkeypatch.setenv("TRITON_INTERPRET", on)
        assert dispatch.kernel_choice_problem() is None, on


def test_default_tiles_are_valid(triton_path):
    for head_dim in range(16, 129, 16):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            triton_path.default_config(head_dim, dtype).validate()
    with pytest.raises(ValueError, match="fwd_m % fwd_n"):
        triton_path.BlockConfig(fwd_m=32, fwd_n=64).validate()


# --- bad input ----------------------------------------------------------------------------------


def _bad(kind):
    q, k, v = (t.detach() for t in make(1, 8, 8, 4, 2, 16))
    match kind:
        case "ndim":
            return dict(q=q[0], k=k, v=v), r"flash_attention\(q\): expected 4 dims.*transpose"
        case "dtype":
            return dict(q=q, k=k.double(), v=v), r"flash_attention\(k\): dtype torch.float64 .*"
        case "int":
            return (
                dict(q=q.long(), k=k.long(), v=v.long()),
                r"flash_attention\(q\): expected a floating dtype",
            )
        case "device":
            return dict(q=q, k=k.to("meta"), v=v), r"flash_attention\(k\): is on meta.*fix"
        case "batch":
            return (
                dict(q=q, k=k.expand(2, -1, -1, -1), v=v),
                r"flash_attention\(k\): batch 2 differs from q's 1",
            )
        case "head_dim":
            return (
                dict(q=q, k=k, v=v[..., :8]),
                r"flash_attention\(v\): head_dim 8 differs from q's 16",
            )
        case "kv":
            return (
                dict(q=q, k=k, v=v[:, :4]),
                r"flash_attention\(v\): shape .* does not match k's",
            )
        case "groups":
            return (
                dict(q=q[:, :, :3], k=k, v=v),
                r"flash_attention\(k\): q has 3 heads, not a multiple of k/v's 2.*heads %",
            )
        case "causal":
            return (
                dict(q=q[:, :5], k=k, v=v, causal=True),
                r"flash_attention\(causal\): causal=True needs seq_q == seq_k, got 5 and 8",
            )
        case "empty":
            return dict(q=q[:, :0], k=k, v=v), r"flash_attention\(q\): has an empty dim"
        case "scale":
            return (
                dict(q=q, k=k, v=v, softmax_scale=math.inf),
                r"flash_attention\(softmax_scale\): must be a finite number",
            )
        case "causal_text":  # the reference took it as True; the kernel raised torch's error
            return (
                dict(q=q, k=k, v=v, causal="no"),
                r"flash_attention\(causal\): must be True or False, got 'no'",
            )
        case "scale_text":  # passed float() in the check, then failed in the matmul
            return (
                dict(q=q, k=k, v=v, softmax_scale="0.5"),
                r"flash_attention\(softmax_scale\): must be a finite number, got '0.5'",
            )
    ids = torch.zeros(1, 8, dtype=torch.long)
    match kind:
        case "documents_kind":
            return (
                dict(q=q, k=k, v=v, documents=[ids, ids, ids]),
                r"flash_attention\(documents\): expected a \(batch, seq\) tensor .* got list",
            )
        case "documents_dtype":
            return (
                dict(q=q, k=k, v=v, documents=ids.float()),
                r"flash_attention\(documents\): expected integer ids .* got torch.float32",
            )
        case "documents_unsigned":  # uint32 ids: torch has no comparison or search for them
            return (
                dict(q=q, k=k, v=v, documents=ids.to(torch.uint32)),
                r"flash_attention\(documents\): expected integer ids of dtype int64, int32, "
                r"int16, int8 or uint8, got torch.uint32.*fix: pass int64 ids \(documents.long",
            )
        case "documents_shape":
            return (
                dict(q=q, k=k, v=v, documents=ids[:, :7]),
                r"flash_attention\(documents\): shape \(1, 7\) is not q's \(batch, seq\) "
                r"\(1, 8\).*fix: give one id per token of q",
            )
        case "documents_one_for_two":
            return (
                dict(q=q[:, :5], k=k, v=v, documents=ids),
                r"flash_attention\(documents\): one tensor of ids is for self-attention.*"
                r"fix: pass a pair",
            )
        case "documents_key_shape":
            return (
                dict(q=q, k=k, v=v, documents=(ids, ids[:, :5])),
                r"flash_attention\(documents\[1\]\): shape \(1, 5\) is not k's",
            )
        case "documents_device":
            return (
                dict(q=q, k=k, v=v, documents=ids.to("meta")),
                r"flash_attention\(documents\): is on meta but q is on cpu",
            )
        case "documents_order":
            return (
                dict(q=q, k=k, v=v, documents=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])),
                r"flash_attention\(documents\): ids decrease along a row.*cumulative sum",
            )
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "ndim",
        "dtype",
        "int",
        "device",
        "batch",
        "head_dim",
        "kv",
        "groups",
        "causal",
        "causal_text",
        "empty",
        "scale",
        "scale_text",
        "documents_kind",
        "documents_dtype",
        "documents_unsigned",
        "documents_shape",
        "documents_one_for_two",
        "documents_key_shape",
        "documents_device",
        "documents_order",
    ],
)
def test_bad_input(kind):
    kwargs, pattern = _bad(kind)
    with pytest.raises(ValueError, match="(?s)" + pattern) as info:
        flash_attention(**kwargs)
    assert isinstance(info.value, AttentionInputError) and "fix:" in str(info.value)


@pytest.mark.parametrize(
    "head_dim, dtype, pattern",
    [
        (40, torch.float32, r"flash_attention\(head_dim\): .*multiple of 16 up to 128, got 40"),
        # over 128: no padding helps (the fix said "pad head_dim to a multiple of 16")
        (144, torch.float32, r"(?s)flash_attention\(head_dim\): .* up to 128 \(a multiple of "
                             r"16\), got 144\n    fix: use heads of at most 128 \(more heads"),
        (256, torch.float32, r"(?s)got 256\n    fix: use heads of at most 128"),
        (16, torch.float64, r"flash_attention\(q\): the Triton kernel takes .* got torch.float64"),
    ],
)
def test_bad_input_for_the_kernel(triton_path, head_dim, dtype, pattern):
    q, k, v = make(1, 8, 8, 2, 2, head_dim, dtype=dtype)
    with pytest.raises(ValueError, match=pattern):
        flash_attention(q, k, v)


def test_more_batch_heads_than_a_launch_takes_is_refused_before_launch(triton_path):
    """The kernels' grid has one row per (batch, head) pair, which CUDA caps at 65,535."""
    q, k, v = make(32768, 1, 1, 2, 1, 16)
    with pytest.raises(ValueError, match=r"(?s)flash_attention\(q\): .* at most 65,535 .* got "
                                         r"batch 32768 x heads 2.*smaller micro-batches"):
        flash_attention(q, k, v)


# --- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape, causal",
    [
        ((2, 1000, 1000, 8, 2, 128), True),
        ((2, 777, 1029, 8, 8, 64), False),
        ((1, 2048, 2048, 4, 4, 96), True),
    ],
)
def test_gpu_kernels_within_sdpa_error(monkeypatch, dtype, shape, causal):
    """Triton's error against a float32 reference is within twice torch SDPA's own error."""
    monkeypatch.delenv("ORCH_KERNELS", raising=False)
    q, k, v = make(*shape, dtype=dtype, device="cuda")
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    assert from_kernel(out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(q32, k32, v32, causal)
    base_out = sdpa(q, k, v, causal)
    err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    assert err(out, ref_out) <= 2 * err(base_out, ref_out) + 1e-3
    assert err(lse, ref_lse) <= 5e-3
    w = torch.randn_like(out)
    mine = torch.autograd.grad((out * w).sum(), (q, k, v), retain_graph=True)
    base = torch.autograd.grad((base_out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * w.float()).sum(), (q32, k32, v32), retain_graph=True)
    for name, a, b, r in zip("qkv", mine, base, ref, strict=True):
        assert err(a, r) <= 2 * err(b, r) + 1e-3, name
    w_lse = torch.randn_like(lse)
    mine = torch.autograd.grad((lse * w_lse).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_lse * w_lse).sum(), (q32, k32, v32))
    for name, a, r in zip("qkv", mine, ref, strict=True):
        assert err(a, r) <= 2e-2 * r.abs().max().item() + 1e-3, f"d{name} through lse"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernels_within_documents_within_sdpa_error(monkeypatch, dtype):
    """Within documents (one-token documents, long ones over many blocks, a ragged end) the
    kernels' error against a float32 reference is within twice that of torch SDPA with the
    block-causal mask, out and gradients."""
    monkeypatch.delenv("ORCH_KERNELS", raising=False)
    q, k, v = make(2, 1000, 1000, 8, 2, 128, dtype=dtype, device="cuda")
    ids = documents(1000, (1, 2, 3, 300, 301, 700), (500,)).cuda()
    out = flash_attention(q, k, v, causal=True, documents=ids)
    assert from_kernel(out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out = attention_reference(q32, k32, v32, True, None, (ids, ids))[0]
    base_out = sdpa_masked(q, k, v, same_document(ids, ids, True))
    err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    assert err(out, ref_out) <= 2 * err(base_out, ref_out) + 1e-3
    w = torch.randn_like(out)
    mine = torch.autograd.grad((out * w).sum(), (q, k, v))
    base = torch.autograd.grad((base_out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * w.float()).sum(), (q32, k32, v32))
    for name, a, b, r in zip("qkv", mine, base, ref, strict=True):
        assert err(a, r) <= 2 * err(b, r) + 1e-3, name


@pytest.mark.gpu
@cuda
def test_gpu_model_attention_runs_on_the_kernel(monkeypatch, count_calls):
    """orch's model on CUDA in bfloat16: its attention runs orch's kernel, and its logits and
    gradients agree with the same model on torch's SDPA (``ORCH_KERNELS=reference``)."""
    from orch.config import ModelConfig
    from orch.kernels.attention import kernels
    from orch.models.llama import Transformer

    launches = count_calls(kernels, "forward")
    cfg = ModelConfig(vocab_size=512, dim=512, layers=2, heads=8, kv_heads=2, ffn_dim=1024)
    tokens = torch.randint(0, 512, (2, 1000), device="cuda")
    results = []
    for impl in ("reference", ""):
        monkeypatch.setenv("ORCH_KERNELS", impl)
        torch.manual_seed(0)
        model = Transformer(cfg).to("cuda", torch.bfloat16)
        logits = model(tokens)
        logits.float().square().mean().backward()
        results.append((logits.float(), torch.cat([p.grad.float().flatten()
                                                   for p in model.parameters()])))
    assert len(launches) == cfg.layers
    (base, base_grads), (mine, grads) = results
    assert (mine - base).abs().max().item() <= 0.05 * base.abs().max().item()
    assert F.cosine_similarity(grads, base_grads, dim=0).item() > 0.999


@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_shipped_gpu_tiles(triton_path, head_dim):
    """The 16-bit GPU tiles (``default_config``, chosen by what the compiler makes of them,
    tests/kernels/test_resources.py) compute the reference too: run here on float32 inputs,
    since the interpreter's bf16 matmuls are wrong (DESIGN.md), over a ragged, causal,
    grouped-query case that straddles their blocks."""
    cfg = triton_path.default_config(head_dim, torch.bfloat16)
    q, k, v = make(1, 150, 150, 4, 2, head_dim)
    out, lse, got = grads(
        lambda *t: triton_path.flash_attention_triton(*t, True, None, cfg), q, k, v
    )
    ref_out, ref_lse, want = grads(lambda *t: attention_reference(*t, True), q, k, v)
    close(out, ref_out, what="out")
    close(lse, ref_lse, what="lse")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a, b, what=f"d{name}")
