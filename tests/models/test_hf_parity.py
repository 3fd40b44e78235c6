"""Our Llama equals HuggingFace's ``LlamaForCausalLM`` once weights are renamed by orch.models.hf
(and ``Qwen3ForCausalLM`` with ``model.qk_norm``).

The HF side uses eager attention (an independent implementation, not the SDPA we call), and
every weight, norms included, is randomized, so a swapped or misnamed tensor shows in the logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orch.config import ModelConfig, load_config
from orch.errors import OrchError
from orch.models.hf import from_hf_state_dict, hf_config, to_hf_state_dict
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


def hf_twin(cfg: ModelConfig, ours: Transformer) -> torch.nn.Module:
    """The transformers model ``hf_config`` names (``architectures``), holding ``ours``'s
    weights."""
    fields = hf_config(cfg)
    causal_lm = getattr(transformers, fields["architectures"][0])
    hf_cfg = causal_lm.config_class(**fields, attn_implementation="eager")
    model = causal_lm(hf_cfg).float().eval()
    model.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    return model


CASES = {
    "tiny-gqa": {},  # configs/tiny.yaml: 8 heads, 4 kv heads
    "mha-rope-theta": {"kv_heads": None, "rope_theta": 500000.0, "norm_eps": 1e-6},
    "tied": {"tie_embeddings": True, "kv_heads": 2},
    # Qwen3's attention: heads wider than dim / heads, each query and key head normalized
    "qwen3": {"qk_norm": True, "head_dim": 48, "tie_embeddings": True, "rope_theta": 1e6},
}


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers(changes):
    cfg = tiny(**changes)
    ours = randomized(cfg)
    hf = hf_twin(cfg, ours)
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
def test_round_trip_is_identity(tie, qk_norm):
    state = Transformer(tiny(tie_embeddings=tie, qk_norm=qk_norm)).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state), tie_embeddings=tie)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # Renames only: every tensor still shares its parameter's storage.
    assert all(back[k].data_ptr() == state[k].data_ptr() for k in state)


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
    hf_state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)
    hf_state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(16)  # dropped
    with pytest.raises(OrchError, match=r"q_proj\.bias.*\n.*attention_bias"):
        from_hf_state_dict(hf_state)


def test_moe_model_is_refused_with_a_fix():
    cfg = tiny(experts=4, moe_layer_interval=2)
    with pytest.raises(OrchError, match=r"model\.experts.*\n.*fix: .*experts: 0"):
        hf_config(cfg)
    with pytest.raises(OrchError) as info:
        to_hf_state_dict(Transformer(cfg).state_dict())
    message = str(info.value)
    assert "layers.1.feed_forward: is an MoE layer" in message
    assert "layers.3.feed_forward" in message and "layers.0.feed_forward" not in message
    assert "experts: 0" in message
