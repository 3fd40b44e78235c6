"""Ring and Ulysses attention on 2 and 4 gloo ranks equal full causal attention on one process,
forward and backward, with grouped-query attention: in plain torch (the CPU path) and on orch's
FlashAttention kernels (``ORCH_KERNELS=triton``, Triton's interpreter here; CUDA's path), also
under selective recompute, which keeps the attention's output instead of running it again, and
within documents on both.
On 4 ranks only the two kernels: autocast and recompute wrap each ring step the same way
whatever the world (2 ranks check them), and on 4 processes over 2 cores they took 22 of the
fixture's 53 s (Triton's interpreter)."""

from __future__ import annotations

import functools
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_harness import run_on_gloo

from orch.kernels.attention import Documents
from orch.parallel.context_parallel import local_positions, ring_attention, ulysses_attention
from orch.parallel.recompute import recompute_once, selective_contexts

pytestmark = pytest.mark.dist

B, HEADS, KV_HEADS, SEQ, DIM = 2, 8, 4, 32, 16
KERNELS = ("reference", "triton")  # ORCH_KERNELS: plain-torch blocks and SDPA, or orch's
IMPLS = (*KERNELS, "autocast", "selective")  # the kernels under autocast, and under recompute
DOCUMENTS = ("documents", "triton-documents")
WORLDS = {2: (*IMPLS, *DOCUMENTS), 4: (*KERNELS, "documents")}
"""``documents``: within documents (train.document_mask), on the plain-torch blocks and SDPA;
``triton-documents`` on orch's kernels (2 ranks: every kind of block is there already, and on 4
they cost 2 ranks' time again): query rows whose document has no key in a whole chunk (its
blocks' rows see nothing; a whole block, where the chunks share no document) must not be NaN."""
ON_KERNELS = ("triton", "autocast", "selective", "triton-documents")
ATOL = 1e-5
AUTOCAST_ATOL = 1e-2  # float16 inputs (values of size 1-4, ten bits of mantissa)


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, SEQ, DIM, generator=gen)
    k = torch.randn(B, KV_HEADS, SEQ, DIM, generator=gen)
    v = torch.randn(B, KV_HEADS, SEQ, DIM, generator=gen)
    grad = torch.randn(B, HEADS, SEQ, DIM, generator=gen)
    return q, k, v, grad


def documents() -> torch.Tensor:
    """Document ids of the whole sequence: documents starting at 5, 17 and 30 in the first
    sequence, at 1 in the second (one token, then one document over every chunk after)."""
    starts = torch.zeros(B, SEQ, dtype=torch.long)
    starts[0, [5, 17, 30]] = 1
    starts[1, 1] = 1
    return starts.cumsum(1)


def reference(within_documents: bool = False) -> dict[str, torch.Tensor]:
    from orch.kernels.attention import document_mask

    q, k, v, grad = inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if within_documents:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(documents()),
                                             enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(grad)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _run(rank: int, world: int, results) -> None:
    from orch.kernels.attention import kernels

    launches = []
    launch = kernels.forward
    # counts kernel runs (by hand: a spawned rank has no pytest fixtures)
    kernels.forward = lambda *args: launches.append(1) or launch(*args)
    # "autocast": the model's dtypes under float16 autocast (q and k float32 out of RoPE, v
    # float16 out of its projection) on the kernels, which autocast does not cast for;
    # "selective": the kernels under op-level selective recompute
    for impl in WORLDS[world]:
        os.environ["ORCH_KERNELS"] = "triton" if impl in ON_KERNELS else "reference"
        for kind, attention in (("ring", ring_attention), ("ulysses", ulysses_attention)):
            pos = local_positions(SEQ, world, rank, kind)
            q, k, v, grad = (t[:, :, pos].clone() for t in inputs())
            if impl == "autocast":
                v = v.half()
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            launches.clear()
            run = functools.partial(attention, group=dist.group.WORLD)
            if impl in DOCUMENTS:
                run = functools.partial(run, documents=Documents(documents()))
            if impl == "selective":
                run = functools.partial(recompute_once, run, selective_contexts)
            with torch.autocast("cpu", torch.float16, enabled=impl == "autocast"):
                out = run(q, k, v)
            out.float().backward(grad)
            results[(impl, kind, world, rank)] = {
                "pos": pos,
                "out": out.detach(),
                "dq": q.grad,
                "dk": k.grad,
                "dv": v.grad,
                "kernel_forwards": len(launches),
            }
    os.environ["ORCH_KERNELS"] = "triton"
    for kind, attention in (("ring", ring_attention), ("ulysses", ulysses_attention)):
        q, k, v, _ = (t[:, :, local_positions(SEQ, world, rank, kind)] for t in inputs())
        local = Documents(documents()[:, local_positions(SEQ, world, rank, kind)])
        try:  # the rank's own ids, not the whole sequence's: the kernels read past them
            attention(q, k, v, group=dist.group.WORLD, documents=local)
        except ValueError as error:
            results[("local ids", kind, world, rank)] = str(error)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    results = {}
    for world in WORLDS:
        results.update(run_on_gloo(_run, world, tmp_path_factory.mktemp(f"cp{world}")))
    return results


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_ids_of_the_local_tokens_are_refused(sharded, kind):
    """Documents of a rank's own tokens instead of the whole sequence's are refused, naming
    them and the shape they need, before the ring's kernels read past them (on the ring's
    later chunks) or Ulysses' attention does."""
    function, side = (("ring_attention", "the whole sequence") if kind == "ring"
                      else ("causal_attention", "q"))
    for world in WORLDS:
        for rank in range(world):
            message = sharded.get(("local ids", kind, world, rank), "")
            assert re.search(rf"(?s){function}\(documents\): shape \({B}, {SEQ // world}\) "
                             rf"is not {side}'s \(batch, seq\) \({B}, {SEQ}\).*fix:",
                             message), message


def test_zigzag_split_balances_the_causal_work():
    positions = [local_positions(16, 2, r, "ring").tolist() for r in range(2)]
    assert positions == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert sum(positions[0]) == sum(positions[1])  # the same number of visible keys


@pytest.mark.parametrize(("world", "impl"), [(w, i) for w, impls in WORLDS.items() for i in impls])
@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_equals_full_attention_forward_and_backward(sharded, kind, world, impl):
    ref = reference(within_documents=impl in DOCUMENTS)
    for rank in range(world):
        got = sharded[(impl, kind, world, rank)]
        # ring: one kernel forward per visible block (query chunk c sees chunks 0..c, and a
        # rank holds chunks r and 2 world - 1 - r: 2 world + 1 in all); Ulysses: one; under
        # selective recompute no more (the ring ran twice, the second time in backward)
        blocks = 2 * world + 1 if kind == "ring" else 1
        assert got["kernel_forwards"] == (blocks if impl in ON_KERNELS else 0)
        for name in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(
                got[name].float(),
                ref[name][:, :, got["pos"]],
                rtol=0,
                atol=AUTOCAST_ATOL if impl == "autocast" else ATOL,
                msg=lambda m, n=name, r=rank: f"{impl} {kind} {n} rank {r}: {m}",
            )
