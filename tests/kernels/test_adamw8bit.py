"""AdamW8bit: the dynamic maps, block-wise quantization, the reference step against torch's AdamW,
the Triton kernel against the reference (interpreter mode), the state format and its round trip,
memory, a 300-step training run of the tiny Llama, and FSDP2-sharded parameters on 2 gloo ranks.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from orch.errors import ProblemsError
from orch.kernels import AdamW8bit
from orch.kernels.adamw8bit.optimizer import QUANTIZED_KEYS
from orch.kernels.adamw8bit.quant import (
    BLOCK,
    Scratch,
    codes_into,
    dequantize_blockwise,
    dynamic_map,
    midpoints,
    quantize_blockwise,
    tables,
    zero_code,
)

LR = 1e-2


def _pair(shape: tuple[int, ...], seed: int = 0, **kw):
    """The same parameter twice, with AdamW8bit and with torch's AdamW."""
    torch.manual_seed(seed)
    base = torch.randn(*shape)
    ours, theirs = nn.Parameter(base.clone()), nn.Parameter(base.clone())
    hyper = {"lr": LR, "weight_decay": 0.1, **kw}
    return ours, theirs, AdamW8bit([ours], **hyper), torch.optim.AdamW([theirs], **hyper)


def _grads(shape: tuple[int, ...], steps: int, seed: int = 1) -> list[torch.Tensor]:
    """Gradients whose scale spans six decades across rows and two within a row.

    Within one block the dynamic map resolves about 3.2 decades of gradient (6.5 of its square,
    the second moment, down to the unsigned map's smallest code, 3.25e-7): an element more than
    ~1,750x (``1 / sqrt(3.25e-7)``) smaller than its block's largest has its second moment
    rounded up to that code, and steps less than AdamW would. Two decades within a row keep the
    comparison about quantization error, not that."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 0, shape[-1]) * torch.logspace(-6, 0, shape[0]).view(
        -1, *[1] * (len(shape) - 1))
    return [torch.randn(*shape, generator=gen) * scale for _ in range(steps)]


# --- maps and quantization ---------------------------------------------------------------------


def test_dynamic_maps_have_the_papers_structure():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    for code in (signed, unsigned):
        assert code.shape == (256,) and code.dtype == torch.float32
        assert bool((code[1:] > code[:-1]).all()) and code[-1] == 1.0 and (code == 0).sum() == 1
    assert (signed < 0).sum() == 127 and (signed > 0).sum() == 128  # 127 each side, plus 1.0
    assert bool((unsigned >= 0).all())
    # the largest exponent has 64 (signed) / 128 (unsigned) linear codes in [0.1, 1]
    assert ((signed > 0.1) & (signed < 1)).sum() == 64
    assert ((unsigned > 0.1) & (unsigned < 1)).sum() == 128
    assert torch.isclose(unsigned[1], torch.tensor(0.325e-6)) and signed[0] == -signed[-2]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantization_rounds_to_the_nearest_code_with_bounded_error(signed):
    torch.manual_seed(0)
    x = torch.randn(37, 700) * torch.logspace(-7, 0, 700)  # partial last blocks, wide range
    if not signed:
        x = x.square()
    codes, absmax = quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (37, 3)  # blocks of 256, 256 and 188 per row
    blocks = [x[:, i * BLOCK : (i + 1) * BLOCK].abs().amax(1) for i in range(3)]
    assert torch.equal(absmax, torch.stack(blocks, 1))

    scale = absmax.repeat_interleave(BLOCK, 1)[:, :700]
    code = dynamic_map(signed)
    error = (dequantize_blockwise(codes, absmax, signed) - x).abs() / scale
    normalized = x / scale
    # the nearest code, but never 0 for a positive second moment (see quant.midpoints)
    allowed = code if signed else code[1:]
    nearest = (normalized.unsqueeze(-1) - allowed).abs().amin(-1)
    nearest = torch.where(normalized == 0, 0.0, nearest)
    assert bool((error <= nearest + 1e-6).all())  # nearest code (up to the final fp32 rounding)
    if not signed:
        assert bool((codes[x > 0] != 0).all()) and bool((normalized < 1.6e-7).any())
    worst = 0.9 / (64 if signed else 128) / 2  # half the widest gap: top decade, linear part
    assert error.max() <= worst + 1e-6
    assert error.max() > worst / 2  # the bound is tight, not vacuous
    top = normalized.abs() >= 0.1  # the top decade: relative error at most ~7% (3.5%)
    assert (error[top] / normalized[top].abs()).max() <= (0.0704 if signed else 0.0352)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_lookup_tables_give_bucketize_exactly(signed):
    """The CPU path's bf16 tables are an exact stand-in for bucketize over the midpoints, down
    to the unsigned map's threshold 0 against the smallest positive floats (1e-40 and 1e-45
    share bf16's zero, whose interval holds that threshold)."""
    mids = midpoints(signed)[:-1]
    torch.manual_seed(0)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    x = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down),
                   torch.rand(200_000) * 2 - 1, (torch.rand(50_000) * 2 - 1) * 1e-6,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-40, 1e-45])])
    x = x if signed else x.abs()
    codes = torch.empty(x.shape, dtype=torch.uint8)
    codes_into(x, codes, tables(signed, x.device), Scratch(len(x), x.device))
    assert torch.equal(codes.long(), torch.bucketize(x, mids))


# --- the update ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 300), (8, 2, 512)])
def test_reference_step_tracks_torch_adamw(shape):
    ours, theirs, opt, ref = _pair(shape)
    start = ours.detach().clone()
    for g in _grads(shape, 5):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert opt.state[ours]["exp_avg"].dtype == torch.uint8
    diff = (ours - theirs).abs()
    moved = (theirs - start).abs().mean()
    # measured: max 0.51 / 0.22 lr, mean 0.033 / 0.026 lr after 5 steps (moved ~2.2 lr)
    assert diff.max() < 1.0 * LR and diff.mean() < 0.05 * LR, (diff.max(), diff.mean())
    assert diff.mean() < 0.03 * moved


def test_chunked_cpu_path_equals_one_chunk(monkeypatch):
    """The CPU path walks row chunks (pairs of codes at even offsets, single codes otherwise);
    any chunking gives the same bits. Odd row length, a short last block per row."""
    from orch.kernels.adamw8bit import reference

    shape = (37, 301)
    results = []
    for chunk in (1 << 20, 1000, 200):  # one chunk; 2 rows per chunk; 1 row (odd offsets)
        monkeypatch.setattr(reference, "CHUNK", chunk)
        ours, _, opt, _ = _pair(shape)
        for g in _grads(shape, 3):
            ours.grad = g
            opt.step()
        results.append((ours.detach(), opt.state[ours]))
    for p, state in results[1:]:
        assert torch.equal(p, results[0][0])
        for key, value in state.items():
            assert torch.equal(value, results[0][1][key]), key


def test_small_and_1d_tensors_keep_fp32_moments():
    for shape in [(32, 64), (5000,)]:  # under 4096 elements; 1-D of any size
        ours, theirs, opt, ref = _pair(shape)
        for g in _grads(shape, 5):
            ours.grad, theirs.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        state = opt.state[ours]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == shape
        torch.testing.assert_close(state["exp_avg"], ref.state[theirs]["exp_avg"])
        torch.testing.assert_close(state["exp_avg_sq"], ref.state[theirs]["exp_avg_sq"])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_triton_kernel_matches_reference(monkeypatch):
    """Without a GPU (interpreter mode) the states are bit-exact and parameters differ by an ulp
    or so (torch's CPU sqrt is not correctly rounded, the kernel's is). Compiled for a GPU,
    Triton may fuse multiply-adds, so a moment at a rounding boundary can take the neighbouring
    code: there the states are compared within one code step (of the map's top decade)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in [(6, 300), (2, 2, 512)]:  # a short last block; two full blocks per row
        base = torch.randn(*shape, device=device)
        ref_p, tri_p = nn.Parameter(base.clone()), nn.Parameter(base.clone())
        hyper = {"lr": LR, "weight_decay": 0.1, "min_8bit_size": 1024}
        ref_opt, tri_opt = AdamW8bit([ref_p], **hyper), AdamW8bit([tri_p], **hyper)
        for g in _grads(shape, 3):
            ref_p.grad, tri_p.grad = g.to(device), g.to(device)
            monkeypatch.setenv("ORCH_KERNELS", "reference")
            ref_opt.step()
            monkeypatch.setenv("ORCH_KERNELS", "triton")
            tri_opt.step()
        ref, tri = ref_opt.state[ref_p], tri_opt.state[tri_p]
        if device == "cpu":
            for key, value in ref.items():
                assert torch.equal(value, tri[key]), key
            torch.testing.assert_close(tri_p, ref_p, rtol=1e-6, atol=1e-7)
            continue
        for key, signed, step in (("exp_avg", True, 0.9 / 64), ("exp_avg_sq", False, 0.9 / 128)):
            a, b = ref[key + "_absmax"], tri[key + "_absmax"]
            torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
            values = [dequantize_blockwise(s[key], s[key + "_absmax"], signed) for s in (ref, tri)]
            scale = a.repeat_interleave(BLOCK, 1)[:, : values[0][0].numel()].reshape(base.shape)
            assert ((values[0] - values[1]).abs() <= 1.01 * step * scale).all(), key
        torch.testing.assert_close(tri_p, ref_p, rtol=1e-5, atol=1e-3 * LR)


def _adamw_step_bound(step: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The largest step, in units of ``lr``, that AdamW's update (no weight decay, eps aside)
    can take at ``step`` over any gradients: ``|m_hat| / sqrt(v_hat)`` with ``m`` and ``v`` sums
    of ``a_i g_i`` and ``w_i g_i^2``, at most ``sqrt(sum a_i^2 / w_i)`` times the bias
    corrections' ratio (Cauchy-Schwarz, reached by some gradients): 1.0 at step 1, 1.0014 at 2,
    5.8 after 1,000 steps."""
    terms = sum(((1 - beta1) * beta1 ** (step - i)) ** 2 / ((1 - beta2) * beta2 ** (step - i))
                for i in range(1, step + 1))
    return math.sqrt(terms * (1 - beta2**step)) / (1 - beta1**step)


def _largest_steps(p: nn.Parameter, opt: torch.optim.Optimizer, grads: list[torch.Tensor | None],
                   path: str, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Step ``opt`` once per gradient (None: ``zero_grad(set_to_none=False)``, a zero gradient)
    on kernel ``path``; the largest change of ``p`` per step, in units of its group's lr."""
    moves = []
    for g in grads:
        if g is None:
            opt.zero_grad(set_to_none=False)
        else:
            p.grad = g.clone()
        before = p.detach().clone()
        monkeypatch.setenv("ORCH_KERNELS", path)
        opt.step()
        monkeypatch.delenv("ORCH_KERNELS")
        moves.append((p.detach() - before).abs().max().item() / opt.param_groups[0]["lr"])
    return moves


def _device_of(path: str) -> str:
    """Where kernel ``path`` runs here: the Triton kernel on a GPU if there is one, else in the
    interpreter on the CPU (skipped without triton)."""
    if path == "triton":
        pytest.importorskip("triton")
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _assert_within_adamw_bound(moves: list[float]) -> None:
    """Each step at most twice AdamW's bound: the factor is room for the moments' rounding
    (measured: 1.05x at most on these gradients; a second moment stored as 0 gave 80,000x)."""
    for step, move in enumerate(moves, start=1):
        assert move <= 2 * _adamw_step_bound(step), (step, moves)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_a_zero_gradient_step_stays_within_adamw_bound(path, monkeypatch):
    """A gradient under ~4e-4 of its block's largest had its second moment rounded to code 0
    while its first moment kept a nonzero code, so the next step with a zero gradient (after
    ``zero_grad(set_to_none=False)``, or for an embedding row of a token absent from the batch)
    divided that first moment by eps alone: steps of thousands of lr."""
    device = _device_of(path)
    shape = (8, 512)  # two blocks per row, 4,096 elements: 8-bit moments
    torch.manual_seed(0)
    p = nn.Parameter((torch.randn(*shape) * 0.02).to(device))
    opt = AdamW8bit([p], lr=1e-4, weight_decay=0.0)
    spread = torch.logspace(-6, 0, BLOCK).repeat(2)  # six decades within each block
    g = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * spread).to(device)
    _assert_within_adamw_bound(_largest_steps(p, opt, [g, None, None, g, None], path, monkeypatch))
    assert (opt.state[p]["exp_avg_sq"][g != 0] != 0).all()  # no positive v stored as 0


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_an_expert_without_tokens_stays_within_adamw_bound(path, monkeypatch):
    """The grouped GEMM gives an expert that got no tokens an exact zero weight gradient (orch's
    MoE does so for some expert on most steps): its weights, 0.02 in size, jumped by up to 8 at
    lr 1e-4 (80,000 lr) on such steps, where torch's AdamW moves them by under lr."""
    from orch.kernels import grouped_mm

    device = _device_of(path)
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 64, 128) * 0.02)
    grads = []  # on the CPU (the GEMMs' reference)
    for step, counts in enumerate(([16, 16, 16, 16], [32, 16, 16, 0], [32, 16, 16, 0])):
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(step))
        w.grad = None
        grouped_mm(x, w, torch.tensor(counts)).square().sum().backward()
        grads.append(w.grad.to(device))
    assert (grads[1][3] == 0).all()  # expert 3's gradient on the steps without its tokens
    w = nn.Parameter(w.detach().to(device))
    opt = AdamW8bit([w], lr=1e-4, weight_decay=0.0)
    _assert_within_adamw_bound(_largest_steps(w, opt, grads, path, monkeypatch))


def _as_saved_before_rounding_up(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """The second-moment codes ``q2`` as a version before positive second moments were rounded
    up would have stored them: code 0 where today's smallest code sits beside a nonzero
    first-moment code (an old state has them where the gradient was under ~4e-4 of its
    block's largest)."""
    orphans = (q2 == 1) & (q1 != zero_code(True))
    assert orphans.any()
    return torch.where(orphans, 0, q2).to(torch.uint8)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_a_state_saved_with_zero_second_moments_is_repaired_at_load(path, monkeypatch):
    """A state saved before the fix keeps a second moment of code 0 beside a nonzero first
    moment; loaded as it was, the next zero-gradient step moved such an element by
    ``lr * m / eps`` (thousands of lr). Loading gives those codes the smallest nonzero code,
    what today's quantizer stores: the codes equal a fresh save's, and the step stays within
    the bound of the zero-gradient tests above."""
    device = _device_of(path)
    shape = (8, 512)
    torch.manual_seed(0)
    start = (torch.randn(*shape) * 0.02).to(device)
    p = nn.Parameter(start.clone())
    opt = AdamW8bit([p], lr=1e-4, weight_decay=0.0)
    spread = torch.logspace(-6, 0, BLOCK).repeat(2)  # six decades within each block
    p.grad = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * spread).to(device)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    state = saved["state"][0]
    state["exp_avg_sq"] = _as_saved_before_rounding_up(state["exp_avg"], state["exp_avg_sq"])

    q = nn.Parameter(p.detach().clone())
    loaded = AdamW8bit([q], lr=1e-4, weight_decay=0.0)
    loaded.load_state_dict(saved)
    assert torch.equal(loaded.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    (move,) = _largest_steps(q, loaded, [torch.zeros_like(q)], path, monkeypatch)
    assert move <= 2 * _adamw_step_bound(2), move


def test_state_dict_round_trip_is_exact():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 16))
    opt = AdamW8bit(model.parameters(), lr=LR)
    torch.manual_seed(0)
    x = torch.randn(8, 64)

    def train(m: nn.Module, o: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()

    train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    twin = copy.deepcopy(model)
    twin.load_state_dict(saved["model"])
    twin_opt = AdamW8bit(twin.parameters(), lr=LR)
    twin_opt.load_state_dict(saved["optim"])
    before = copy.deepcopy(saved["optim"]["state"])
    for (p, q) in zip(model.parameters(), twin.parameters(), strict=True):
        a, b = opt.state[p], twin_opt.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8  # torch would cast to fp32
    assert float(twin_opt.state[twin[0].weight]["step"]) == 3.0
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], twin_opt.state[q][key])
    for index, state in saved["optim"]["state"].items():  # loading copied, never aliased
        for key, value in state.items():
            assert torch.equal(value, before[index][key])


def test_states_of_another_shape_are_refused_at_load():
    """(64, 128) states loaded into a (32, 256) parameter (as many elements) were taken without a
    word and stepped on misaligned blocks; torch's AdamW raises. Every mismatch is named at
    once, and nothing is loaded."""
    a, b = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(8))
    source = AdamW8bit([a, b], lr=LR)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    source.step()
    other = nn.Parameter(torch.randn(32, 256))
    target = AdamW8bit([other, nn.Parameter(torch.randn(4, 2))], lr=LR)
    with pytest.raises(ValueError) as refused:
        target.load_state_dict(source.state_dict())
    text = str(refused.value)
    assert "parameter 0 (shape (32, 256)) needs {'exp_avg': (32, 256)" in text
    assert "'exp_avg_absmax': (64, 1)" in text  # what the state dict has
    assert "parameter 1 (shape (4, 2)) needs {'exp_avg': (4, 2), 'exp_avg_sq': (4, 2)}" in text
    assert not target.state  # nothing loaded


def _three_params() -> list[nn.Parameter]:
    """Two 8,192-element matrices and a bias."""
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(128)),
            nn.Parameter(torch.randn(32, 256))]


def _stepped(make: type[torch.optim.Optimizer], **kw) -> tuple[list[nn.Parameter], dict]:
    """``_three_params`` after one step of ``make``, and its state dict."""
    params = _three_params()
    opt = make(params, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt.state_dict()


def _refusal(state_dict: dict, **kw) -> str:
    """What a fresh AdamW8bit over ``_stepped``'s parameters says loading ``state_dict``; it
    loads nothing."""
    opt = AdamW8bit(_three_params(), **kw)
    with pytest.raises(ValueError) as refused:
        opt.load_state_dict(state_dict)
    assert not opt.state
    return str(refused.value)


def test_a_state_dict_of_another_optimizer_is_named_at_load():
    """torch's AdamW state dict, or AdamW8bit's with another ``min_8bit_size``, was refused as
    "states of other parameters" with the shapes alone: the state dict's origin and the fix
    are said, from ``min_8bit_size`` recorded in the state dict, or, in one saved before it
    was, from which parameters have 8-bit states."""
    _, saved = _stepped(torch.optim.AdamW)
    text = _refusal(saved)
    assert "the state dict is torch.optim.AdamW's (fp32 exp_avg and exp_avg_sq)" in text
    assert "fix: load it into torch.optim.AdamW (optimizer.name: adamw), or start" in text
    assert "construct it with min_8bit_size=8193" in text

    _, saved = _stepped(AdamW8bit, min_8bit_size=10**9)
    assert saved["min_8bit_size"] == 10**9
    assert "fix: construct this AdamW8bit with min_8bit_size=1000000000" in _refusal(saved)
    del saved["min_8bit_size"]  # as saved before it was recorded: told from the states
    text = _refusal(saved)
    assert "an AdamW8bit's with a min_8bit_size over 8192, or torch.optim.AdamW's" in text
    assert "if AdamW8bit saved it, construct this one with min_8bit_size=8193" in text
    AdamW8bit(_three_params(), min_8bit_size=8193).load_state_dict(saved)  # which then loads

    _, saved = _stepped(AdamW8bit)
    text = _refusal(saved, min_8bit_size=10**9)
    assert "saved by AdamW8bit(min_8bit_size=4096)" in text
    assert "fix: construct this AdamW8bit with min_8bit_size=4096" in text
    del saved["min_8bit_size"]
    text = _refusal(saved, min_8bit_size=10**9)
    assert "a min_8bit_size of at most 8192, not 1000000000" in text
    assert "fix: construct this AdamW8bit with min_8bit_size=8192" in text


def test_state_dtypes_are_checked_and_a_number_step_is_taken_at_load():
    """Codes cast to float (``.float()`` of every tensor) loaded and the step failed on a size
    mismatch; a step saved as a number (as older torch saved it) loaded and the step failed on
    ``.item()``, where torch's AdamW takes it."""
    params, saved = _stepped(AdamW8bit)
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].float()
    text = _refusal(saved)
    assert "parameter 0: exp_avg is torch.float32, needs torch.uint8 (8-bit codes)" in text
    assert "fix: load the state dict as AdamW8bit.state_dict() gave it" in text
    saved["state"][0]["step"] = "one"
    assert "parameter 0: step='one' is not a number" in _refusal(saved)

    params, saved = _stepped(AdamW8bit)
    saved["state"][0]["step"] = 1
    saved["state"][1]["exp_avg"] = saved["state"][1]["exp_avg"].bfloat16()  # fp32 moments
    opt = AdamW8bit(params)
    opt.load_state_dict(saved)
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [2.0, 2.0, 2.0]


def test_small_low_precision_parameters_keep_fp32_moments():
    """A small bf16 parameter's moments were bf16, where ``v *= 0.999`` rounds back to ``v``:
    its second moment never decayed (9.99e-4 after 500 steps of gradient 1e-3 where fp32
    gives 6.07e-4)."""
    p = nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = AdamW8bit([p], weight_decay=0.0)
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    for _ in range(500):
        p.grad = torch.full((8,), 1e-3, dtype=torch.bfloat16)
        opt.step()
    v = opt.state[p]["exp_avg_sq"]
    assert v.dtype == torch.float32
    want = 0.001 * 0.999**500 + sum(0.001 * 0.999**k * 1e-6 for k in range(500))
    torch.testing.assert_close(v, torch.full((8,), want), rtol=1e-2, atol=0)


def test_bad_hyperparameters_and_complex_parameters_are_refused():
    """lr=nan and eps=nan passed the ``< 0`` checks and turned every parameter to NaN; a complex
    parameter lost its imaginary part on the 8-bit path."""
    for bad, said in (({"lr": float("nan")}, "lr=nan"), ({"eps": float("nan")}, "eps=nan"),
                      ({"weight_decay": -1.0}, "weight_decay=-1.0"),
                      ({"weight_decay": float("inf")}, "weight_decay=inf")):
        with pytest.raises(ValueError, match=f"AdamW8bit: {said} is not a finite number >= 0"):
            AdamW8bit([nn.Parameter(torch.zeros(2))], **bad)
    z = nn.Parameter(torch.randn(64, 64, dtype=torch.cfloat))
    opt = AdamW8bit([z])
    z.grad = torch.randn_like(z)
    with pytest.raises(ValueError, match="does not support complex parameters"):
        opt.step()
    real = nn.Parameter(torch.ones(64, 64))
    real.grad = torch.ones_like(real)
    opt = AdamW8bit([{"params": [real]}, {"params": [z]}])
    with pytest.raises(ValueError, match="does not support complex parameters"):
        opt.step()
    assert torch.equal(real, torch.ones_like(real)) and not opt.state  # nothing stepped first


def test_a_bad_min_8bit_size_is_refused():
    """``min_8bit_size='big'`` was taken and failed in the first step with a TypeError, ``-5``
    was taken without a word."""
    for bad in ("big", -5, 4096.0, True, None):
        with pytest.raises(ValueError, match=f"AdamW8bit: min_8bit_size={bad!r} is not an int "
                                             r">= 0 .*fix: give a count of elements as an int"):
            AdamW8bit([nn.Parameter(torch.zeros(2))], min_8bit_size=bad)
    assert AdamW8bit([nn.Parameter(torch.zeros(2))], min_8bit_size=np.int64(0)).min_8bit_size == 0


def test_bad_hyperparameters_of_a_group_are_refused_wherever_they_come_from():
    """Only the constructor's defaults were checked: a group's NaN ``lr`` (or one added later,
    or set by a scheduler) turned its parameters to NaN without a word, ``betas`` of one value
    failed in the step on an unpacking error and ``(0.9, 1.0)`` on a division by zero."""
    p = nn.Parameter(torch.randn(64, 64))
    p.grad = torch.ones_like(p)
    for group, said in (({"lr": float("nan")}, "lr=nan is not a finite number >= 0"),
                        ({"betas": (0.9,)}, r"betas=\(0.9,\) is not two numbers in \[0, 1\)"),
                        ({"betas": (0.9, 1.0)}, r"betas=\(0.9, 1.0\) is not two numbers")):
        with pytest.raises(ValueError, match=f"AdamW8bit param group 0: {said}"):
            AdamW8bit([{"params": [p], **group}])
    AdamW8bit([p], lr=np.float32(1e-3)).step()  # any real number, numpy's too
    AdamW8bit([p], betas=np.array([0.9, 0.95])).step()  # two of them in any sequence, as AdamW
    assert AdamW8bit([p], betas=iter((0.9, 0.95))).defaults["betas"] == (0.9, 0.95)  # read once
    opt = AdamW8bit([p])
    with pytest.raises(ValueError, match="param group 1: weight_decay=nan"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(4))],
                             "weight_decay": float("nan")})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="state dict's param group 0: lr=nan"):
        opt.load_state_dict(saved)
    second = nn.Parameter(torch.randn(8, 8))
    second.grad = torch.ones_like(second)
    opt.add_param_group({"params": [second]})
    opt.param_groups[1]["lr"] = float("nan")  # as a scheduler may set it
    before = p.detach().clone()
    with pytest.raises(ValueError, match="param group 1: lr=nan"):
        opt.step()
    assert torch.equal(p, before) and not opt.state  # group 0 was not stepped before the refusal


def test_a_step_refused_for_its_kernel_choice_changes_nothing(monkeypatch):
    """``ORCH_KERNELS=triton`` on the CPU without the interpreter was refused by the 8-bit
    weight's update, after the fp32 bias before it had stepped and the weight's step count had
    advanced (a retry then ran a step with the wrong bias correction)."""
    torch.manual_seed(0)
    bias, weight = nn.Parameter(torch.randn(128)), nn.Parameter(torch.randn(64, 128))
    opt = AdamW8bit([bias, weight])
    for refuse in (False, True):  # the refused step both before and after a good one
        bias.grad, weight.grad = torch.randn_like(bias), torch.randn_like(weight)
        before = [bias.detach().clone(), weight.detach().clone()]
        states = copy.deepcopy(opt.state_dict()["state"])
        monkeypatch.setenv("ORCH_KERNELS", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ProblemsError, match="cannot choose a kernel") as refused:
            opt.step()
        assert "ORCH_KERNELS" in str(refused.value)
        assert torch.equal(bias, before[0]) and torch.equal(weight, before[1])
        after = opt.state_dict()["state"]
        assert after.keys() == states.keys()
        for index, state in after.items():
            assert all(torch.equal(v, states[index][k]) for k, v in state.items()), index
        monkeypatch.setenv("ORCH_KERNELS", "reference")
        if not refuse:
            opt.step()
            assert [int(opt.state[p]["step"]) for p in (bias, weight)] == [1, 1]

    # an update that fails in the middle (out of memory, say) leaves its step uncounted
    def fail(*args: object) -> None:
        raise RuntimeError("out of memory")

    from orch.kernels.adamw8bit import optimizer

    monkeypatch.setattr(optimizer, "step_8bit_", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step()
    assert int(opt.state[weight]["step"]) == 1


def test_narrow_rows_keep_fp32_moments():
    """A (8192, 1) tensor's 8-bit moments took 10 bytes per element (an fp32 absmax per
    one-element row for each), more than AdamW's 8; rows under 16 now keep fp32 moments."""
    narrow, wide = nn.Parameter(torch.zeros(8192, 1)), nn.Parameter(torch.zeros(256, 16))
    opt = AdamW8bit([narrow, wide])
    assert not opt.quantized(narrow) and opt.quantized(wide)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def test_state_is_at_most_26_percent_of_adamw():
    model = nn.Sequential(nn.Embedding(4096, 256), nn.Linear(256, 1024), nn.Linear(1024, 300),
                          nn.LayerNorm(300))
    opts = [cls(model.parameters(), lr=LR) for cls in (AdamW8bit, torch.optim.AdamW)]
    model(torch.arange(8)).sum().backward()
    for opt in opts:
        opt.step()
    ours, theirs = (_state_bytes(o) for o in opts)
    assert ours / theirs <= 0.26, ours / theirs  # 2 + 8/256 bytes per element vs 8: ~25.5%


@pytest.mark.parametrize("sets, saved_tp, refused", [
    (["model.dim=256"], 1, "the attention.wo weights (256 wide"),  # 128-wide slices at tp 2
    (["model.dim=256"], 2, None),  # the same degree: the same blocks
    (["model.dim=1024", "model.ffn_dim=2048", "model.heads=8", "model.kv_heads=8"], 1, None),
    (["model.dim=1024", "model.ffn_dim=1536", "model.heads=8", "model.kv_heads=8"], 4,
     "the feed_forward.w2 weights (1536 wide"),  # 384 at tp 4, 768 at tp 2
])
def test_8bit_states_that_cannot_be_resharded_are_refused_before_start(sets, saved_tp, refused):
    """A checkpoint's AdamW8bit states of row-parallel weights reshard between tensor-parallel
    degrees only when both split the rows into multiples of 256 (the blocks then are the
    unsharded tensor's); otherwise DCP failed on the absmax shapes, in the workers."""
    from types import SimpleNamespace

    from orch.config import load_config
    from orch.runtime.checkpoint.resharding import adamw8bit_resharding_problems

    cfg = load_config("configs/tiny.yaml", ["optimizer.name=adamw8bit", "parallel.tp=2", *sets])
    degrees = SimpleNamespace(tp=2, etp=1)
    problems = adamw8bit_resharding_problems(cfg, degrees,  # type: ignore[arg-type]
                                             Path("ckpt"), {"tp": saved_tp, "etp": 1})
    if refused is None:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.where == "parallel.tp" and refused in problem.message
        assert f"resume with parallel.tp={saved_tp}" in problem.fix


def test_8bit_states_of_the_shared_expert_are_checked_too():
    """The shared expert's w2 is split like the dense MLP's but is shared_experts x
    expert_ffn_dim wide: 344 at tp 1 is blocks of 256 and 88, at tp 2 one of 172 a rank, the
    same absmax shape, so DCP loaded it without a word onto the wrong elements (the resumed
    run's losses left the uninterrupted ones at step 4)."""
    from types import SimpleNamespace

    from orch.config import load_config
    from orch.runtime.checkpoint.resharding import adamw8bit_resharding_problems

    cfg = load_config("configs/tiny-moe.yaml", [
        "optimizer.name=adamw8bit", "model.dim=512", "model.ffn_dim=512",
        "model.expert_ffn_dim=344"])
    degrees = SimpleNamespace(tp=2, etp=1)
    (problem,) = adamw8bit_resharding_problems(cfg, degrees,  # type: ignore[arg-type]
                                               Path("ckpt"), {"tp": 1, "etp": 1})
    assert "the feed_forward.shared_expert.w2 weights (344 wide" in problem.message
    cfg.model.expert_ffn_dim = 512  # 256 a rank at tp 2: the unsharded tensor's blocks
    assert adamw8bit_resharding_problems(cfg, degrees, Path("ckpt"), {"tp": 1, "etp": 1}) == []


@pytest.mark.parametrize("saved_etp, new_etp", [(1, 2), (2, 1)])
def test_8bit_expert_states_are_not_resharded_across_expert_tensor_parallelism(saved_etp,
                                                                              new_etp):
    """Expert tensor parallelism cuts each expert's w1/w3 row (dim x hidden) in every stretch of
    hidden: a rank's 256-element blocks are none of the unsharded tensor's. DCP loaded such a
    checkpoint without a word, onto the wrong elements (the resumed run drifted)."""
    from types import SimpleNamespace

    from orch.config import load_config
    from orch.runtime.checkpoint.resharding import adamw8bit_resharding_problems

    cfg = load_config("configs/tiny-moe.yaml", ["optimizer.name=adamw8bit"])
    degrees = SimpleNamespace(tp=1, etp=new_etp)
    (problem,) = adamw8bit_resharding_problems(cfg, degrees,  # type: ignore[arg-type]
                                               Path("ckpt"), {"tp": 1, "etp": saved_etp})
    assert problem.where == "parallel.etp" and f"saved at etp={saved_etp}" in problem.message
    assert problem.fix == f"resume with parallel.etp={saved_etp}"
    cfg.optimizer.name = "adamw"  # full-precision states reshard
    assert adamw8bit_resharding_problems(cfg, degrees, Path("ckpt"), {"etp": saved_etp}) == []


# --- training ---------------------------------------------------------------------------------


def _loss_curve(name: str, steps: int) -> list[float]:
    """The tiny model's losses over ``steps`` steps with optimizer ``name`` (one thread: the
    test runs both curves side by side, one per core)."""
    from orch.config import load_config
    from orch.models.llama import Transformer
    from orch.plan.support import unsupported_features
    from orch.runtime.data import BatchStream, PackedSequences, load_tokens
    from orch.runtime.optim import build_optimizer, lr_at, set_lr

    torch.set_num_threads(1)
    sets = [f"train.steps={steps}", "train.seq_len=32", "train.global_batch=4",
            "train.micro_batch=4", f"optimizer.name={name}"]
    cfg = load_config("configs/tiny.yaml", sets)
    assert not any(p.where == "optimizer.name" for p in unsupported_features(cfg, 1))
    tokens = load_tokens(cfg.data, cfg.model.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg)
    assert type(opt).__name__ == ("AdamW8bit" if name == "adamw8bit" else "AdamW")
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optimizer.weight_decay, 0.0]
    stream = BatchStream(PackedSequences(tokens, 32), 4, 4, seed=cfg.train.seed)
    losses = []
    for step in range(1, steps + 1):
        set_lr(opt, lr_at(step, cfg.train))
        ((inputs, targets),) = stream.next_step()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # ~45 s: 2 x 300 steps of a 3M-parameter model, one process per optimizer
def test_tiny_llama_trains_like_adamw():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    names = ("adamw8bit", "adamw")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        losses = dict(zip(names, pool.map(_loss_curve, names, [300, 300]), strict=True))
    ours, theirs = (sum(losses[n][-20:]) / 20 for n in names)
    assert theirs < 0.8 * losses["adamw"][0]  # it trained
    assert abs(ours - theirs) / theirs < 0.02, (ours, theirs)  # measured: 2.0549 vs 2.0541


# --- FSDP2 and tensor parallel (2 gloo ranks) ------------------------------------------------

STEPS = 8


def _mlp() -> nn.Module:
    # weights [40, 300] (a full and a short block per row), [129, 40] (odd rows: 65/64 shards),
    # [300, 129]; biases stay fp32 (1-D)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 129), nn.Tanh(),
                         nn.Linear(129, 300))


def _fsdp_run(rank: int, split: bool) -> tuple[dict, nn.Module, AdamW8bit]:
    """Train ``_mlp`` single-process (whole batch) and FSDP2-sharded, each rank on its half of
    the batch (``split``) or on the whole batch; compare parameters and states."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    torch.manual_seed(1)
    x, y = torch.randn(8, 300), torch.randn(8, 300)
    single = _mlp()
    sharded = fully_shard(_mlp(), mesh=init_device_mesh("cpu", (2,)))
    opts = [AdamW8bit(m.parameters(), lr=LR, weight_decay=0.1) for m in (single, sharded)]
    part = slice(4 * rank, 4 * rank + 4) if split else slice(None)
    for _ in range(STEPS):
        F.mse_loss(single(x), y).backward()  # the whole batch on one process
        F.mse_loss(sharded(x[part]), y[part]).backward()  # FSDP2 averages over the ranks
        for opt in opts:
            opt.step()
            opt.zero_grad()
    out = {"param_diff": 0.0, "codes_equal": 1.0, "value_diff": {}, "absmax_diff": 0.0}
    with torch.no_grad():
        for p, q in zip(single.parameters(), sharded.parameters(), strict=True):
            assert isinstance(q, DTensor) and q.placements == (Shard(0),)
            full = q.full_tensor()
            out["param_diff"] = max(out["param_diff"], float((full - p).abs().max()) / LR)
            a, b = opts[0].state[p], opts[1].state[q]
            if "exp_avg_absmax" not in a:
                continue
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                assert isinstance(b[key], DTensor) and b[key].dtype == torch.uint8
                assert b[key].to_local().shape == q.to_local().shape
                codes, absmax = b[key].full_tensor(), b[key + "_absmax"].full_tensor()
                assert absmax.shape == a[key + "_absmax"].shape
                equal = float((codes == a[key]).float().mean())
                out["codes_equal"] = min(out["codes_equal"], equal)
                rel = (absmax - a[key + "_absmax"]).abs() / a[key + "_absmax"].clamp_min(1e-30)
                out["absmax_diff"] = max(out["absmax_diff"], float(rel.max()))
                # value difference in units of the block's absmax
                scale = a[key + "_absmax"].repeat_interleave(BLOCK, 1)[:, : p.shape[1]]
                diff = (dequantize_blockwise(codes, absmax, signed)
                        - dequantize_blockwise(a[key], a[key + "_absmax"], signed)).abs()
                worst = float((diff / scale.clamp_min(1e-30)).max())
                out["value_diff"][key] = max(out["value_diff"].get(key, 0.0), worst)
    return out, sharded, opts[1]


def _tp_run() -> dict:
    """A row-parallel weight (sharded on dim 1, tensor parallel's layout) against the same weight
    on one process: 512-wide local slices hold the unsharded tensor's blocks, so it is exact."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(2)
    w = torch.randn(8, 1024)
    single, sharded = nn.Parameter(w.clone()), nn.Parameter(distribute_tensor(w, mesh, [Shard(1)]))
    narrow = nn.Parameter(distribute_tensor(torch.randn(8, 600), mesh, [Shard(1)]))
    opts = [AdamW8bit([single], lr=LR), AdamW8bit([sharded, narrow], lr=LR)]
    for g in _grads((8, 1024), 3):
        single.grad = g.clone()
        sharded.grad = distribute_tensor(g, mesh, [Shard(1)])
        narrow.grad = distribute_tensor(g[:, :600], mesh, [Replicate()])  # redistributed
        for opt in opts:
            opt.step()
    a, b = opts[0].state[single], opts[1].state[sharded]
    exact = bool(torch.equal(sharded.detach().full_tensor(), single.detach()))
    for key in QUANTIZED_KEYS:
        assert b[key].placements == (Shard(1),), (key, b[key].placements)
        exact &= bool(torch.equal(b[key].full_tensor(), a[key]))
    # 300-wide local slices: blocks of 256 + 44 per rank; absmax [8, 2] local, [8, 4] global
    absmax = opts[1].state[narrow]["exp_avg_absmax"]
    return {"exact": exact, "narrow_absmax": [list(absmax.to_local().shape), list(absmax.shape)]}


def _strided_run() -> bool:
    """FSDP2's strided dim-0 sharding (on top of expert or tensor parallelism's dim-0 split;
    torch 2.13's ``_StridedShard`` is no ``Shard``) keeps rows whole: exact, as dim 0. It was
    refused as a split of a later dim, stopping adamw8bit with ep=2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh, strided = init_device_mesh("cpu", (2,)), [_StridedShard(0, split_factor=2)]
    torch.manual_seed(3)
    w = torch.randn(8, 600)
    single, sharded = nn.Parameter(w.clone()), nn.Parameter(distribute_tensor(w, mesh, strided))
    opts = [AdamW8bit([single], lr=LR), AdamW8bit([sharded], lr=LR)]
    for g in _grads((8, 600), 3):
        single.grad, sharded.grad = g.clone(), distribute_tensor(g, mesh, strided)
        for opt in opts:
            opt.step()
    exact = bool(torch.equal(sharded.detach().full_tensor(), single.detach()))
    for key in QUANTIZED_KEYS:  # codes and their absmax
        exact &= bool(torch.equal(opts[1].state[sharded][key].full_tensor(),
                                  opts[0].state[single][key]))
    return exact


def _old_form_repaired_on_shards(sharded: nn.Module, opt: AdamW8bit) -> bool:
    """Load ``opt``'s FSDP2-sharded states in the form older versions saved (second-moment code 0
    beside a nonzero first-moment code, every third such element of each rank's shard) through
    DCP's ``set_optimizer_state_dict``, as orch's checkpoints load: whether each rank's local
    codes come out with the smallest nonzero code there and are otherwise unchanged."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    saved = get_optimizer_state_dict(sharded, opt)
    saved["state"] = {name: {k: v.clone() for k, v in state.items()}
                      for name, state in saved["state"].items()}
    wanted = {}
    for name, state in saved["state"].items():
        if "exp_avg_absmax" not in state:
            continue
        q1, q2 = state["exp_avg"].to_local(), state["exp_avg_sq"].to_local()
        every_third = (torch.arange(q2.numel()) % 3 == 0).view(q2.shape)
        orphans = every_third & (q1 != zero_code(True))
        q2.masked_fill_(orphans, 0)  # in place: the DTensor's local shard
        assert bool(orphans.any()) and bool((state["exp_avg_sq"].to_local()[orphans] == 0).all())
        wanted[name] = torch.where(orphans, 1, q2).to(torch.uint8)
    fresh = fully_shard(_mlp(), mesh=init_device_mesh("cpu", (2,)))
    fresh_opt = AdamW8bit(fresh.parameters(), lr=LR, weight_decay=0.1)
    set_optimizer_state_dict(fresh, fresh_opt, saved)
    params = dict(fresh.named_parameters())
    return bool(wanted) and all(
        torch.equal(fresh_opt.state[params[name]]["exp_avg_sq"].to_local(), codes)
        for name, codes in wanted.items())


def _fsdp_worker(rank: int, root: str) -> None:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    out: dict = {}
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    try:
        out["same_batch"], _, _ = _fsdp_run(rank, split=False)
        out["split_batch"], sharded, opt = _fsdp_run(rank, split=True)
        out["tensor_parallel"] = _tp_run()
        out["strided_exact"] = _strided_run()

        # torch.distributed.checkpoint saves each rank's shard and loads it back exactly
        state = {"optim": get_optimizer_state_dict(sharded, opt)}
        dcp_save(state, storage_writer=FileSystemWriter(f"{root}/dcp"))
        fresh = fully_shard(_mlp(), mesh=init_device_mesh("cpu", (2,)))
        fresh_opt = AdamW8bit(fresh.parameters(), lr=LR, weight_decay=0.1)
        loaded = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
        dcp_load(loaded, storage_reader=FileSystemReader(f"{root}/dcp"))
        set_optimizer_state_dict(fresh, fresh_opt, loaded["optim"])
        exact = True
        for p, q in zip(sharded.parameters(), fresh.parameters(), strict=True):
            for key, value in opt.state[p].items():
                other = fresh_opt.state[q][key]
                local = value.to_local() if isinstance(value, DTensor) else value
                other = other.to_local() if isinstance(other, DTensor) else other
                exact &= local.dtype == other.dtype and torch.equal(local, other)
        out["dcp_exact"] = exact
        out["old_form_repaired"] = _old_form_repaired_on_shards(sharded, opt)
    except Exception:  # noqa: BLE001 - reported to the test
        out["error"] = traceback.format_exc()
    Path(root, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort at interpreter exit (DESIGN.md, known traps)


@pytest.mark.dist
def test_sharded_parameters_match_one_process(tmp_path):
    """Blocks lie within rows and FSDP2 shards rows (here 65/64 of 129, and rows of 300 with a
    short last block), so each rank quantizes exactly the blocks the unsharded tensor has; no
    padding is needed.

    - Same batch on both ranks: the reduced gradient equals one process's bit for bit, so the
      sharded run must equal the single-process run exactly: parameters, codes and absmax.
    - Each rank its half (data parallel): the reduced gradients differ from one process's in
      the last bits; a value at a rounding boundary then lands on the neighbouring code, and
      the parameters drift apart a little and feed that back. Compared loosely: parameters
      within 0.2 lr after 8 steps (measured 0.063; torch's AdamW 1.5e-4), 99.8% of codes equal,
      every dequantized moment within one code step of the map's top decade (0.9/64 and
      0.9/128 of its block's absmax).
    - DCP: each rank's shard of the states saves and loads back exactly; one in the form older
      versions saved is repaired on each rank's shard as it loads.
    - Tensor parallel's row-parallel layout (sharded on dim 1), see ``_tp_run``.
    """
    mp.start_processes(_fsdp_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in out, out.get("error")
        same, split = out["same_batch"], out["split_batch"]
        assert same["param_diff"] == 0 and same["codes_equal"] == 1, same
        assert same["absmax_diff"] == 0 and max(same["value_diff"].values()) == 0, same
        assert split["param_diff"] < 0.2 and split["codes_equal"] > 0.99, split
        # one code step, plus the drift of absmax itself (measured 1.001 steps, 2e-4 drift)
        assert split["value_diff"]["exp_avg"] <= 1.1 * 0.9 / 64, split
        assert split["value_diff"]["exp_avg_sq"] <= 1.1 * 0.9 / 128, split
        assert split["absmax_diff"] < 1e-2, split
        assert out["dcp_exact"], out
        assert out["old_form_repaired"], out
        assert out["strided_exact"], out
        assert out["tensor_parallel"] == {"exact": True, "narrow_absmax": [[8, 2], [8, 4]]}, out
