"""The reference Llama/MoE models: shapes, causality, GQA, routing, RoPE and parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from orch.config import ModelConfig, load_config
from orch.kernels.moe import moe_permute, moe_unpermute
from orch.models.llama import Attention, Transformer, apply_rope
from orch.models.moe import (
    GroupedExperts,
    MoEFeedForward,
    expert_capacity,
    inject_aux_gradients,
    load_balancing_loss,
    route,
    take_aux_loss,
)
from orch.plan.memory import param_counts


def small(**changes: object) -> ModelConfig:
    base = ModelConfig(vocab_size=64, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=48)
    return dataclasses.replace(base, **changes)


def test_forward_shape_and_dtype():
    model = Transformer(small())
    tokens = torch.randint(0, 64, (3, 10))
    logits = model(tokens)
    assert logits.shape == (3, 10, 64)
    assert logits.dtype == torch.float32


def test_causal_later_tokens_do_not_change_earlier_logits():
    model = Transformer(small(experts=4, top_k=2, shared_experts=1, moe_layer_interval=2))
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_packed_documents_under_the_document_mask_give_each_documents_own_logits():
    """Block-causal attention (train.document_mask): a document packed after another gives the
    logits it gives alone (RoPE sees only relative positions), and the first document's end
    (its EOS) belongs to it; without the mask the second reads the first."""
    from orch.runtime.data import document_ids

    model = Transformer(small())
    eos = 63
    first, second = torch.randint(0, 63, (1, 7)), torch.randint(0, 63, (1, 9))
    first[0, -1] = eos
    packed = torch.cat([first, second], dim=1)
    documents = document_ids(packed, eos)
    assert documents.tolist() == [[0] * 7 + [1] * 9]
    within = model(packed, documents=documents)
    torch.testing.assert_close(within[:, :7], model(first), rtol=0, atol=1e-5)
    torch.testing.assert_close(within[:, 7:], model(second), rtol=0, atol=1e-5)
    assert not torch.allclose(model(packed)[:, 7:], model(second), atol=1e-3)


def test_every_layer_keeps_one_shared_document_mask_for_its_backward():
    """A boolean mask became a float copy inside SDPA in each layer, each kept for backward:
    8 GiB at 8,192 tokens over 32 layers. One additive mask serves them all."""
    from orch.runtime.data import document_ids

    model = Transformer(small(layers=3))
    tokens = torch.randint(0, 63, (2, 16))
    tokens[:, 5] = 63
    masks = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4 and tensor.shape[-2:] == (16, 16):
            masks.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens, documents=document_ids(tokens, 63)).sum().backward()
    assert len(masks) == 1


@pytest.mark.parametrize("head_dim", [None, 12], ids=["dim-over-heads", "wider"])
def test_gqa_matches_explicitly_repeated_kv_heads(head_dim):
    """Heads dim / heads wide (8), and wider (12, ``model.head_dim``: projections of 48 from a
    hidden size of 32, as Mistral NeMo's 4096 from 5120)."""
    cfg = small(heads=4, kv_heads=2, head_dim=head_dim)
    attn = Attention(cfg)
    x = torch.randn(2, 6, cfg.dim)
    rope = Transformer(cfg).rope
    cos, sin = rope(torch.arange(6), x.dtype)
    b, s, hd = 2, 6, cfg.head_size
    q = apply_rope(attn.wq(x).view(b, s, 4, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(b, s, 2, hd).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(b, s, 2, hd).transpose(1, 2)
    # Query heads 0,1 share kv head 0; heads 2,3 share kv head 1.
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.wo(ref.transpose(1, 2).reshape(b, s, -1))
    torch.testing.assert_close(attn(x, cos, sin), ref)


def test_attention_runs_on_orchs_kernel_where_it_can(monkeypatch, caplog, count_calls):
    """Where orch's attention kernels run (CUDA tensors; here ``ORCH_KERNELS=triton`` in Triton's
    interpreter) the model's attention is theirs, and its logits and gradients equal the SDPA
    path's; a head_dim the kernels cannot take (8) stays on SDPA, and the log says so once."""
    pytest.importorskip("triton")
    from orch.kernels import dispatch
    from orch.kernels.attention import kernels

    dispatch.warn_once.cache_clear()  # "once" per process: whatever ran before is forgotten
    launches = count_calls(kernels, "forward")
    tokens = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0))
    for dim, runs in ((64, 2), (32, 0)):  # head_dim 16 on the kernels; head_dim 8 on SDPA
        results = []
        for impl in ("reference", "triton"):
            monkeypatch.setenv("ORCH_KERNELS", impl)
            torch.manual_seed(0)
            model = Transformer(small(dim=dim))
            launches.clear()
            logits = model(tokens)
            logits.square().mean().backward()
            results.append((logits.detach(), [p.grad for p in model.parameters()], len(launches)))
        (want, want_grads, _), (got, got_grads, kernel_runs) = results
        assert kernel_runs == runs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    fallbacks = [m for r in caplog.records if "using torch's scaled_dot" in (m := r.getMessage())]
    assert len(fallbacks) == 1 and "head_dim a multiple of 16 up to 128, got 8" in fallbacks[0]


def test_attention_kernel_under_autocast_gets_one_dtype(monkeypatch, count_calls):
    """Under autocast (float16 here: Triton's interpreter computes bfloat16 matmuls wrongly) the
    model's q and k leave RoPE in float32 while v leaves its projection in float16; autocast
    casts SDPA's inputs but not those of orch's kernels, which then failed in the backward
    ("Both operands must be same dtype"). They get float16 now, and match SDPA's run."""
    pytest.importorskip("triton")
    from orch.kernels.attention import kernels

    launches = count_calls(kernels, "forward")
    tokens = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("reference", "triton"):
        monkeypatch.setenv("ORCH_KERNELS", impl)
        torch.manual_seed(0)
        model = Transformer(small(dim=64))
        with torch.autocast("cpu", torch.float16):
            logits = model(tokens)
        logits.float().square().mean().backward()
        results.append((logits.float(), [p.grad for p in model.parameters()]))
    assert len(launches) == 2  # one per layer, on the kernel's run
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    for a, b in zip(got_grads, want_grads, strict=True):  # within 5% of each tensor's largest
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())


def test_qk_norms_under_autocast_take_the_fused_norm_and_train_their_weights():
    """Qwen3's query and key norms get bf16 projections under autocast and held an fp32 weight:
    torch cannot fuse a mixed pair, so it warned on every call and ran the composite norm
    (float32 copies of the queries and keys saved). The weight is now cast to the input's
    dtype, which the gradient crosses back to the fp32 parameter."""
    import warnings

    model = Transformer(small(qk_norm=True, head_dim=16))
    tokens = torch.randint(0, 64, (2, 12))
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", torch.bfloat16):
        warnings.simplefilter("always")
        model(tokens).float().square().mean().backward()
    assert not [w for w in caught if "Mismatch dtype" in str(w.message)], caught
    norm = model.layers["0"].attention.q_norm.weight
    assert norm.dtype == torch.float32 and norm.grad is not None and norm.grad.abs().sum() > 0


def test_blocks_on_orchs_kernels_compile_without_graph_breaks(monkeypatch):
    """A decoder block on orch's attention kernel (``ORCH_KERNELS=triton``) compiles as one graph
    (``fullgraph=True``; AOT autograd over the ops' shape-only implementations, the eager
    backend: no code generation) and computes what it computes uncompiled."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", "triton")
    torch.manual_seed(0)
    model = Transformer(small(dim=64))
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        if compiled:
            for block in model.layers.values():
                block.compile(backend="aot_eager", fullgraph=True)
        model.zero_grad()
        logits = model(tokens)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads, strict=True))


def test_rope_follows_huggingface_half_rotation():
    cfg = small(dim=16, heads=2, rope_theta=100.0)  # head_dim 8: pairs (i, i + 4)
    cos, sin = Transformer(cfg).rope(torch.arange(5), torch.float32)
    x = torch.randn(1, 1, 5, 8)
    out = apply_rope(x, cos, sin)
    for pos in range(5):
        for i in range(4):
            angle = torch.tensor(pos / 100.0 ** (2 * i / 8))
            x1, x2 = x[0, 0, pos, i], x[0, 0, pos, i + 4]
            rot1 = x1 * angle.cos() - x2 * angle.sin()
            rot2 = x2 * angle.cos() + x1 * angle.sin()
            torch.testing.assert_close(out[0, 0, pos, i], rot1)
            torch.testing.assert_close(out[0, 0, pos, i + 4], rot2)


def test_route_without_normalizing_keeps_the_chosen_scores():
    scores = torch.softmax(torch.randn(50, 8), dim=-1)
    weights, indices = route(scores, 2, normalize=False)
    torch.testing.assert_close(weights, scores.topk(2).values, rtol=0, atol=0)
    assert torch.equal(indices, route(scores, 2)[1])
    assert (weights.sum(-1) < 1).all()


def test_route_picks_top_k_distinct_experts_with_unit_weights():
    scores = torch.softmax(torch.randn(50, 8), dim=-1)
    weights, indices = route(scores, 3)
    assert indices.shape == (50, 3)
    assert all(len(set(row.tolist())) == 3 for row in indices)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    chosen = scores.gather(1, indices)
    assert (chosen.min(-1).values >= scores.topk(3).values[:, -1]).all()
    assert torch.bincount(indices.flatten(), minlength=8).sum() == 50 * 3


def routed(experts: GroupedExperts, x: torch.Tensor, weights, indices) -> torch.Tensor:
    """Route ``x`` through ``experts`` as the MoE layer does: permute, compute, combine."""
    permuted, row_map, counts = moe_permute(x, indices, experts.num_experts)
    return moe_unpermute(experts(permuted, counts), row_map, weights, x.shape[0])


def test_experts_apply_exactly_the_routed_experts():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 12)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(20, 8)
    weights, indices = route(torch.softmax(torch.randn(20, 4), -1), 2)
    # Dense reference: every expert on every token, masked to each token's top-k.
    gate = torch.zeros(20, 4).scatter(1, indices, weights)
    every = torch.stack([
        (F.silu(x @ experts.w1[e]) * (x @ experts.w3[e])) @ experts.w2[e] for e in range(4)
    ], dim=1)
    ref = (gate.unsqueeze(-1) * every).sum(1)
    torch.testing.assert_close(routed(experts, x, weights, indices), ref)


def test_init_is_deterministic_per_seed():
    a, b = Transformer(small()), Transformer(small())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    b.init_weights(seed=1)
    assert not torch.equal(a.output.weight, b.output.weight)
    assert torch.equal(a.norm.weight, torch.ones(32))


def test_tied_embeddings_share_one_tensor():
    model = Transformer(small(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight


def meta_numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg", [
    load_config("configs/tiny.yaml").model,
    load_config("configs/tiny-moe.yaml").model,
    small(tie_embeddings=True),
    small(experts=4, top_k=1, shared_experts=2, moe_layer_interval=2, expert_ffn_dim=24),
    small(head_dim=12),
    load_config("configs/mistral-nemo-12b.yaml").model,
    load_config("configs/qwen3-8b.yaml").model,
    small(qkv_bias=True),
], ids=["tiny", "tiny-moe", "tied", "interleaved-moe", "head-dim", "mistral-nemo", "qwen3-8b",
        "qkv-bias"])
def test_param_count_matches_closed_form(cfg: ModelConfig):
    assert meta_numel(cfg) == param_counts(cfg).total


def test_llama3_8b_has_8_030_261_248_parameters():
    cfg = load_config("configs/llama3-8b.yaml").model
    assert meta_numel(cfg) == param_counts(cfg).total == 8_030_261_248


def test_qwen3_models_have_their_published_parameters():
    """Qwen3-8B's model card: 8.2B parameters, 6.95B of them outside the two embeddings;
    Qwen3-30B-A3B's: 30.5B, 3.3B of them active (8 of 128 experts a token: 3.35B here)."""
    pc = param_counts(load_config("configs/qwen3-8b.yaml").model)
    assert pc.total == 8_190_735_360 and round((pc.total - pc.embedding - pc.head) / 1e9, 2) \
        == 6.95
    cfg = load_config("configs/qwen3-30b-a3b.yaml").model
    moe = param_counts(cfg)
    assert (moe.total, moe.active) == (30_532_122_624, 3_353_032_704)
    assert meta_numel(cfg) == moe.total


def test_qwen2_5_7b_has_its_published_parameters_and_zero_biases():
    """Qwen2.5-7B's model card: 7.61B parameters, 6.53B outside the embeddings, its q/k/v
    biases among them; orch's init starts biases at zero (as transformers' does)."""
    cfg = load_config("configs/qwen2.5-7b.yaml").model
    pc = param_counts(cfg)
    assert meta_numel(cfg) == pc.total == 7_615_616_512
    assert pc.total - pc.embedding - pc.head == 6_525_621_760
    model = Transformer(small(qkv_bias=True))
    model.init_weights(seed=0)
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    assert len(biases) == 3 * 2 and all(not b.any() for b in biases)
    plain = Transformer(small())
    plain.init_weights(seed=0)  # the weights draw the same numbers: biases draw none
    assert torch.equal(plain.layers["1"].attention.wq.weight,
                       model.layers["1"].attention.wq.weight)


# ------------------------------------------------------------------------------- the MoE layer


def moe_cfg(**changes: object) -> ModelConfig:
    return small(**{"experts": 4, "top_k": 2, "expert_ffn_dim": 24, "shared_experts": 1,
                    **changes})


def loop_moe(layer: MoEFeedForward, x: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """The old plain-loop math: route, then each expert's kept copies (lowest token index, then
    slot, up to ``capacity``) through its SwiGLU, weighted (by the chosen scores, renormalized
    per token where the layer says so) and summed, plus the shared expert."""
    logits = layer.router(x).float()
    scores = logits.softmax(-1) if layer.score_func == "softmax" else logits.sigmoid()
    indices = (scores + layer.expert_bias).topk(layer.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if layer.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    w = layer.experts
    out = torch.zeros_like(x)
    for e in range(layer.num_experts):
        token, slot = torch.where(indices == e)  # row-major: by token, then slot
        token, slot = token[:capacity], slot[:capacity]
        if token.numel():
            xe = x[token]
            h = (F.silu(xe @ w.w1[e]) * (xe @ w.w3[e])) @ w.w2[e]
            out = out.index_add(0, token, h * weights[token, slot, None])
    return out + layer.shared_expert(x)


def moe_layer(seed: int = 0, **kwargs: object) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(moe_cfg(**{"capacity_factor": None, **kwargs}))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def assert_matches_the_plain_loop(layer: MoEFeedForward, capacity: int | None) -> dict:
    """The layer's output and gradients (the balancing loss's off) equal :func:`loop_moe`'s on
    random ``[2, 15, 32]`` tokens; returns the layer's gradients by name (``x`` the input's)."""
    inject_aux_gradients(layer, 0.0)  # the loop has no balancing loss
    x = torch.randn(2, 15, 32, requires_grad=True)
    grad = torch.randn(2, 15, 32)
    out = layer(x)
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    ref = loop_moe(layer, x.view(30, 32), capacity).view_as(x)
    want = torch.autograd.grad(ref, [x, *layer.parameters()], grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    names = ["x", *dict(layer.named_parameters())]
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-5, msg=name)
    return dict(zip(names, got, strict=True))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_moe_layer_matches_the_plain_loop(score_func, capacity_factor):
    layer = moe_layer(score_func=score_func, capacity_factor=capacity_factor)
    capacity = expert_capacity(capacity_factor, 30, 2, 4)
    assert capacity in (None, 9)  # ceil(0.6 * 30 * 2 / 4): some copies are dropped
    assert_matches_the_plain_loop(layer, capacity)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_unnormalized_weights_are_the_raw_scores_and_train_the_router(score_func, top_k):
    """``norm_topk_prob=false`` combines with the chosen experts' scores as they are (Switch
    Transformer's routing), so the output's gradient reaches the router even with one expert
    per token; renormalized, that one weight is a constant 1 and the router gets nothing."""
    layer = moe_layer(score_func=score_func, top_k=top_k, norm_topk_prob=False)
    router = assert_matches_the_plain_loop(layer, None)["router.weight"].norm()
    assert router > 1e-3
    if top_k == 1:  # renormalized: the weight is w / w = 1, its gradient rounding residue
        layer = moe_layer(score_func=score_func, top_k=1)
        assert assert_matches_the_plain_loop(layer, None)["router.weight"].norm() < 1e-4 * router


def test_aux_loss_is_switch_formula_and_reaches_the_router():
    layer = moe_layer()
    x = torch.randn(40, 32)
    layer(x)
    probs = layer.router(x).softmax(-1)
    indices = probs.topk(2, dim=-1).indices
    f = torch.stack([(indices == e).sum() for e in range(4)]) / (40 * 2)
    hand = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss, hand, rtol=1e-6, atol=0)
    (got,) = torch.autograd.grad(layer.aux_loss, layer.router.weight)
    (want,) = torch.autograd.grad(hand, layer.router.weight)
    torch.testing.assert_close(got, want)
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.full((4,), 4), 2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_layers_add_their_balancing_gradient_to_the_loss_gradient(scale):
    """The gradient of the language-model loss alone equals that of the loss plus ``scale *
    aux_loss_coeff * aux_loss`` per layer written out by hand (with the layers' own gradient
    turned off), differs from the loss's gradient without the balancing term, and
    :func:`take_aux_loss` reports the balancing term's value."""
    tokens = torch.randint(0, 64, (2, 8))
    model = Transformer(moe_cfg(moe_layer_interval=1))

    def grads(injected: float, by_hand: float) -> dict[str, torch.Tensor]:
        model.zero_grad()
        inject_aux_gradients(model, injected)
        loss = model(tokens).logsumexp(-1).mean()
        terms = sum(m.feed_forward.aux_loss * 0.01 for m in model.layers.values())
        (loss + by_hand * terms).backward()
        torch.testing.assert_close(take_aux_loss(model), terms.detach())
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    injected, by_hand, without = grads(scale, 0.0), grads(0.0, scale), grads(0.0, 0.0)
    for name in injected:
        torch.testing.assert_close(injected[name], by_hand[name], msg=name)
    router = "layers.0.feed_forward.router.weight"
    assert (injected[router] - without[router]).abs().max() > 1e-6


def test_bias_steers_selection_but_not_weights():
    layer = moe_layer(score_func="sigmoid")
    x = torch.randn(30, 32)
    scores = layer.router(x).sigmoid()
    layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # everyone picks expert 3
    with torch.no_grad():
        layer.train()(x)
    assert layer.expert_load.tolist()[3] == 30
    weights, indices = route(scores, 2, layer.expert_bias)
    assert (indices == 3).any(-1).all()
    chosen = scores.gather(1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    assert "expert_bias" in layer.state_dict() and "expert_load" not in layer.state_dict()


def test_update_bias_moves_towards_balance_and_changes_selection():
    layer = moe_layer()
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([2.0, 0.0, 0.0, -2.0])
    x = torch.randn(64, 32)
    x[:, 0] = 1.0  # a constant feature the router weighs: expert 0 favoured, expert 3 shunned
    spreads = []
    for step in range(30):
        with torch.no_grad():
            layer(x)
        load = layer.expert_load.clone()
        spreads.append(int(load.max() - load.min()))
        layer.update_bias(0.01)
        if step == 0:
            want = 0.01 * torch.sign(load.float().mean() - load.float())
            torch.testing.assert_close(layer.expert_bias, want)
            assert load.argmax() == 0 and load.sum() == 128
        assert layer.expert_load.sum() == 0
    assert spreads[0] >= 40 and max(spreads[-5:]) <= 10  # measured: 48 -> 3 in 30 steps
    biased = route(layer.router(x).softmax(-1), 2, layer.expert_bias)[1]
    assert not torch.equal(biased, route(layer.router(x).softmax(-1), 2)[1])


def test_an_expert_without_tokens_gets_zero_rows_and_zero_gradient():
    layer = moe_layer()
    layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, -10.0]))
    x = torch.randn(12, 32)
    out = layer(x)
    out.square().sum().backward()
    assert layer.expert_load.tolist()[3] == 0
    assert layer.experts.w1.grad[3].abs().max() == 0 and layer.experts.w1.grad[:3].abs().max() > 0
    torch.testing.assert_close(out, loop_moe(layer, x, None), rtol=0, atol=1e-5)


def test_recompute_does_not_count_tokens_twice_and_autocast_runs():
    layer = moe_layer()
    x = torch.randn(10, 32, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()
    assert layer.expert_load.sum() == 20
    with torch.autocast("cpu", torch.bfloat16):
        low = layer(x.detach())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), layer(x.detach()), rtol=0.05, atol=0.05)


def test_compiled_blocks_share_one_graph_and_keep_their_parameter_names():
    """``train.compile`` compiles each block's forward in place: the state dict's names are the
    uncompiled model's, and identical blocks share one graph (their parameters are graph inputs),
    so a deep model compiles once."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from orch.runtime.block_compile import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Transformer(small(layers=3))
    names = list(model.state_dict())
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    want = model(tokens)
    assert compile_blocks(model, "aot_eager") == 3
    assert torch.equal(model(tokens), want)
    assert list(model.state_dict()) == names
    assert counters["stats"]["unique_graphs"] == 1
