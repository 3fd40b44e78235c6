"""The reference Llama/MoE models: shapes, causality, GQA, routing, RoPE and parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from orch.config import ModelConfig, load_config
from orch.models.llama import Attention, Transformer, apply_rope
from orch.models.moe import GroupedExperts, route
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


def test_gqa_matches_explicitly_repeated_kv_heads():
    cfg = small(heads=4, kv_heads=2)
    attn = Attention(cfg)
    x = torch.randn(2, 6, cfg.dim)
    rope = Transformer(cfg).rope
    cos, sin = rope(6, x.dtype)
    b, s, hd = 2, 6, cfg.head_dim
    q = apply_rope(attn.wq(x).view(b, s, 4, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(b, s, 2, hd).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(b, s, 2, hd).transpose(1, 2)
    # Query heads 0,1 share kv head 0; heads 2,3 share kv head 1.
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.wo(ref.transpose(1, 2).reshape(b, s, -1))
    torch.testing.assert_close(attn(x, cos, sin), ref)


def test_rope_follows_huggingface_half_rotation():
    cfg = small(dim=16, heads=2, rope_theta=100.0)  # head_dim 8: pairs (i, i + 4)
    cos, sin = Transformer(cfg).rope(5, torch.float32)
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


def test_route_picks_top_k_distinct_experts_with_unit_weights():
    scores = torch.softmax(torch.randn(50, 8), dim=-1)
    weights, indices = route(scores, 3)
    assert indices.shape == (50, 3)
    assert all(len(set(row.tolist())) == 3 for row in indices)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    chosen = scores.gather(1, indices)
    assert (chosen.min(-1).values >= scores.topk(3).values[:, -1]).all()
    assert torch.bincount(indices.flatten(), minlength=8).sum() == 50 * 3


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
    torch.testing.assert_close(experts(x, weights, indices), ref)


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
], ids=["tiny", "tiny-moe", "tied", "interleaved-moe"])
def test_param_count_matches_closed_form(cfg: ModelConfig):
    assert meta_numel(cfg) == param_counts(cfg).total


def test_llama3_8b_has_8_030_261_248_parameters():
    cfg = load_config("configs/llama3-8b.yaml").model
    assert meta_numel(cfg) == param_counts(cfg).total == 8_030_261_248
