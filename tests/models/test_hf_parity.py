"""Our Transformer equals HuggingFace's ``LlamaForCausalLM`` once weights are renamed by
orch.models.hf (``Qwen3ForCausalLM`` with ``model.qk_norm``, ``Qwen2ForCausalLM`` with
``model.qkv_bias``; ``MixtralForCausalLM`` and
``Qwen3MoeForCausalLM`` for MoE models, each expert's weights unstacked).

The HF side uses eager attention (an independent implementation, not the SDPA we call), and
every weight, norms included, is randomized, so a swapped or misnamed tensor shows in the logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from orch.config import ModelConfig, load_config
from orch.errors import OrchError
from orch.models.hf import from_hf_state_dict, hf_config, hf_family, to_hf_state_dict
from orch.models.llama import Transformer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5


def tiny(**changes: object) -> ModelConfig:
    return dataclasses.replace(load_config("configs/tiny.yaml").model, **changes)


@torch.no_grad()
def randomized(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Our model with every weight random: norms around 1, the rest N(0, 0.05)."""
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.05 * noise)
    return model.eval()


def hf_twin(cfg: ModelConfig, ours: Transformer, where: Path) -> torch.nn.Module:
    """The transformers model ``hf_config`` names (``architectures``), holding ``ours``'s
    weights: saved in ``where`` as save_pretrained writes them and loaded by transformers
    (which fuses each MoE layer's experts as it loads), every key taken."""
    from safetensors.torch import save_file

    fields = hf_config(cfg)
    (where / "config.json").write_text(json.dumps({"model_type": hf_family(cfg)[1], **fields}))
    state = {key: t.contiguous() for key, t in to_hf_state_dict(ours.state_dict()).items()}
    if cfg.tie_embeddings:
        del state["lm_head.weight"]  # safetensors keeps one copy, as save_pretrained does
    save_file(state, str(where / "model.safetensors"), metadata={"format": "pt"})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        where, attn_implementation="eager", output_loading_info=True)
    assert type(model).__name__ == fields["architectures"][0]
    assert not any(info.values()), info  # no key missing, unexpected or of another shape
    return model.float().eval()


CASES = {
    "tiny-gqa": {},  # configs/tiny.yaml: 8 heads, 4 kv heads
    "mha-rope-theta": {"kv_heads": None, "rope_theta": 500000.0, "norm_eps": 1e-6},
    "tied": {"tie_embeddings": True, "kv_heads": 2},
    # Qwen3's attention: heads wider than dim / heads, each query and key head normalized
    "qwen3": {"qk_norm": True, "head_dim": 48, "tie_embeddings": True, "rope_theta": 1e6},
    # Qwen2's (Qwen2.5's) attention: biases on the query, key and value projections
    "qwen2": {"qkv_bias": True, "kv_heads": 2, "rope_theta": 1e6},
    # Mixtral: every layer's feed-forward 4 softmax-routed experts, top-2 renormalized
    "mixtral": {"experts": 4, "top_k": 2, "rope_theta": 1e6},
    # Qwen3-MoE: Qwen3's attention, MoE every other layer with narrower experts, top-3 weights
    # as they are (Qwen3-MoE's norm_topk_prob false)
    "qwen3-moe": {"qk_norm": True, "head_dim": 48, "experts": 4, "top_k": 3,
                  "moe_layer_interval": 2, "expert_ffn_dim": 96, "norm_topk_prob": False},
}


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers(changes, tmp_path):
    cfg = tiny(**changes)
    ours = randomized(cfg)
    hf = hf_twin(cfg, ours, tmp_path)
    if cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        actual = ours(tokens)
    assert actual.shape == expected.shape == (2, 64, cfg.vocab_size)
    assert expected.std() > 0.1  # logits large enough that a wrong mapping could not hide
    diff = (actual - expected).abs().max().item()
    print(f"max |logits diff| {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("experts", [0, 4])
def test_round_trip_is_identity(tie, qk_norm, experts):
    cfg = tiny(tie_embeddings=tie, qk_norm=qk_norm, experts=experts,
               moe_layer_interval=2 if qk_norm else 1)
    state = Transformer(cfg).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state), tie_embeddings=tie)
    assert set(back) == set(state)  # the balancing biases too (zero), so loads are strict
    assert all(torch.equal(back[k], state[k]) for k in state)
    # Renames only: every tensor but the restacked experts still shares its storage.
    assert all(back[k].data_ptr() == state[k].data_ptr() for k in state
               if ".experts." not in k and not k.endswith("expert_bias"))


def test_config_fields():
    cfg = tiny()
    fields = hf_config(cfg, dtype=torch.bfloat16)
    hf_cfg = transformers.LlamaConfig(**fields)
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.intermediate_size) == (256, 4, 688)
    assert (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim) == (8, 4, 32)
    assert hf_cfg.rms_norm_eps == cfg.norm_eps
    assert hf_cfg.max_position_embeddings == cfg.max_seq_len
    assert fields["torch_dtype"] == "bfloat16"


def test_tied_checkpoint_without_lm_head_needs_tie_flag():
    hf_state = to_hf_state_dict(Transformer(tiny(tie_embeddings=True)).state_dict())
    del hf_state["lm_head.weight"]  # how tied checkpoints are saved to disk
    with pytest.raises(OrchError, match="tie_embeddings=True"):
        from_hf_state_dict(hf_state)
    ours = from_hf_state_dict(hf_state, tie_embeddings=True)
    assert ours["output.weight"] is ours["tok_embeddings.weight"]


def test_unknown_hf_keys_are_listed():
    hf_state = to_hf_state_dict(Transformer(tiny()).state_dict())
    hf_state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(256)  # Llama's, not Qwen2's
    hf_state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(16)  # dropped
    with pytest.raises(OrchError, match=r"o_proj\.bias.*\n.*attention_bias"):
        from_hf_state_dict(hf_state)


def test_moe_models_no_hf_class_computes_are_refused_with_a_fix():
    """Mixtral's and Qwen3-MoE's classes have no ungated shared experts and no sigmoid router,
    and Mixtral no dense layers or unnormalized top-k weights: each such field named, at once."""
    cfg = tiny(experts=4, moe_layer_interval=2, norm_topk_prob=False, shared_experts=1,
               score_func="sigmoid")
    with pytest.raises(OrchError) as info:
        hf_config(cfg)
    message = str(info.value)
    assert "not a MixtralForCausalLM model (4 problems)" in message, message
    for field, want in [("shared_experts", 0), ("score_func", "softmax"),
                        ("moe_layer_interval", 1), ("norm_topk_prob", "true")]:
        assert f"model.{field}: " in message and f"model.{field}: {want}" in message, field
    # with Qwen3's QK-norm, the dense layers and top-k weights are Qwen3-MoE's to compute
    message = str(pytest.raises(OrchError, hf_config, dataclasses.replace(cfg, qk_norm=True)
                                ).value)
    assert "not a Qwen3MoeForCausalLM model (2 problems)" in message, message


def test_qkv_biases_beside_qk_norm_or_experts_have_no_hf_class():
    with pytest.raises(OrchError, match=r"model\.qkv_bias: True, which Qwen3ForCausalLM cannot "
                       r"compute\n.*fix: .*model\.qkv_bias: false"):
        hf_config(tiny(qkv_bias=True, qk_norm=True))
    with pytest.raises(OrchError, match="not a MixtralForCausalLM model"):
        hf_config(tiny(qkv_bias=True, experts=4))


def test_balancing_biases_that_route_differently_are_refused():
    model = Transformer(tiny(experts=4))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in to_hf_state_dict(
        model.state_dict())  # zero biases route as HF's routers do: left out
    with torch.no_grad():
        model.layers["1"].feed_forward.expert_bias[0] = 0.5
    with pytest.raises(OrchError, match=r"layers\.1\.feed_forward\.expert_bias: is not all zero"):
        to_hf_state_dict(model.state_dict())


def test_an_expert_missing_from_a_hf_state_dict_is_named():
    state = to_hf_state_dict(Transformer(tiny(experts=4)).state_dict())
    del state["model.layers.2.block_sparse_moe.experts.1.w3.weight"]
    with pytest.raises(OrchError, match=r"layers\.2\.feed_forward\.experts\.w3: has tensors for "
                       r"experts \[0, 2, 3\], the router 4"):
        from_hf_state_dict(state)
