"""The HuggingFace ``LlamaForCausalLM`` view of orch's dense Llama ``Transformer``.

Our parameter names follow Meta's Llama checkpoints and our RoPE uses HuggingFace's rotate-half
convention, so converting is a rename of state-dict keys and nothing else: no transposes, no q/k
permutation. This module holds that rename (both ways) and the ``LlamaConfig`` fields of a
:class:`ModelConfig`; exporting and importing checkpoints build on it.

It is pure torch on purpose: ``transformers`` is an optional dev dependency, so nothing here
imports it. ``LlamaConfig(**hf_config(cfg))`` builds the matching HF config where it is
installed. Only dense models map: an MoE layer has no ``LlamaForCausalLM`` counterpart, and asking
for one raises an :class:`~orch.errors.OrchError` that says so.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from orch.config.schema import ModelConfig
from orch.errors import Problem, ProblemsError
from orch.models.moe import INIT_STD

# Keys outside the decoder layers.
_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Keys inside ``layers.{i}.`` (ours) / ``model.layers.{i}.`` (HF).
_PER_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3's QK-norm (model.qk_norm)
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_LEVEL_INV = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_PER_LAYER_INV = {hf: ours for ours, hf in _PER_LAYER.items()}

_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MOE_PARTS = ("feed_forward.router.", "feed_forward.experts.", "feed_forward.shared_expert.")
# Older HF Llama checkpoints saved the RoPE frequencies; we compute them from rope_theta.
_HF_IGNORED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def hf_ignored(key: str) -> bool:
    """A ``LlamaForCausalLM`` key with nothing to load: saved RoPE frequencies (we derive them
    from ``rope_theta``)."""
    return _HF_IGNORED.fullmatch(key) is not None


def hf_to_ours(key: str) -> str | None:
    """Our ``Transformer`` name for a ``LlamaForCausalLM`` key, or None when it has none
    (biases, other architectures' keys)."""
    ours = _TOP_LEVEL_INV.get(key)
    match = _HF_LAYER.fullmatch(key)
    if ours is None and match is not None:
        index, rest = match.groups()
        if rest in _PER_LAYER_INV:
            ours = f"layers.{index}.{_PER_LAYER_INV[rest]}"
    return ours


TIED_HEAD_ABSENT = "as in a checkpoint with tied embeddings"
"""What a missing ``lm_head.weight`` of an untied model most likely means: such checkpoints
store the embedding alone."""


def ours_to_hf(name: str) -> str | None:
    """The ``LlamaForCausalLM`` key of our ``Transformer`` parameter ``name``, or None when it
    has none (MoE layers, wrapper prefixes); the inverse of :func:`hf_to_ours`."""
    hf = _TOP_LEVEL.get(name)
    match = _OUR_LAYER.fullmatch(name)
    if hf is None and match is not None and match.group(2) in _PER_LAYER:
        hf = f"model.layers.{match.group(1)}.{_PER_LAYER[match.group(2)]}"
    return hf


_MOE_FIX = (
    "HuggingFace export/import covers dense Llama models only: keep an MoE model in orch's own "
    "checkpoints (to start from a Llama checkpoint, use a dense config: model.experts: 0)"
)


def hf_family(model: ModelConfig) -> tuple[str, str]:
    """The transformers class and ``model_type`` of ``model``'s HuggingFace view: Qwen3's where
    its attention normalizes each query and key head (``model.qk_norm``: Qwen3's decoder is
    Llama's with that norm), else Llama's."""
    return ("Qwen3ForCausalLM", "qwen3") if model.qk_norm else ("LlamaForCausalLM", "llama")


def hf_config(model: ModelConfig, dtype: torch.dtype | str = "float32") -> dict[str, Any]:
    """The keyword arguments of a transformers ``LlamaConfig`` describing ``model`` (a
    ``Qwen3Config`` with ``model.qk_norm``: :func:`hf_family`).

    ``LlamaForCausalLM(LlamaConfig(**hf_config(cfg)))`` computes the same function as
    ``Transformer(cfg)`` once loaded with :func:`to_hf_state_dict`. ``dtype`` is recorded as
    ``torch_dtype`` (the name every transformers version reads); it describes the weights and
    changes nothing here. The byte tokenizer has no special tokens, so bos/eos/pad ids are None.
    Raises an :class:`~orch.errors.OrchError` for MoE models.
    """
    if model.is_moe:
        raise ProblemsError(
            [
                Problem(
                    "model.experts",
                    f"{model.experts} experts make this an MoE model, which has no "
                    "HuggingFace LlamaConfig",
                    _MOE_FIX,
                )
            ],
            title="not a Llama model",
        )
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    qwen3 = {"use_sliding_window": False, "sliding_window": None,
             "max_window_layers": model.layers} if model.qk_norm else {}
    return {
        "architectures": [hf_family(model)[0]],
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "intermediate_size": model.ffn_dim,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": dtype,
        **qwen3,
    }


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a dense ``Transformer.state_dict()`` to ``LlamaForCausalLM`` names.

    The tensors are the same objects (no copies). A tied model's ``output.weight`` becomes
    ``lm_head.weight``, as in HF's own ``state_dict()``. Keys that are not a dense Llama's (MoE
    layers, wrapper prefixes such as ``_orig_mod.``) raise an :class:`~orch.errors.OrchError`
    listing every one.
    """
    out: dict[str, torch.Tensor] = {}
    problems: list[Problem] = []
    moe_layers: list[str] = []
    for key, tensor in state.items():
        hf_key = ours_to_hf(key)
        match = _OUR_LAYER.fullmatch(key)
        if hf_key is None and match is not None and match.group(2).startswith(_MOE_PARTS):
            layer = f"layers.{match.group(1)}.feed_forward"
            if layer not in moe_layers:
                moe_layers.append(layer)
            continue
        if hf_key is None:
            problems.append(
                Problem(
                    key,
                    "is not a parameter of orch's dense Transformer",
                    "pass the state_dict() of an unwrapped orch Transformer (no DDP/compile "
                    "prefixes)",
                )
            )
            continue
        out[hf_key] = tensor
    problems[:0] = [Problem(layer, "is an MoE layer", _MOE_FIX) for layer in moe_layers]
    if problems:
        raise ProblemsError(problems, title="cannot convert to a HuggingFace Llama state dict")
    return out


def from_hf_state_dict(
    state: dict[str, torch.Tensor], tie_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """Rename a ``LlamaForCausalLM`` state dict to our ``Transformer`` names; the inverse.

    ``tie_embeddings`` is the checkpoint's ``tie_word_embeddings``. When set, ``output.weight``
    is the embedding tensor itself (tied checkpoints on disk usually omit ``lm_head.weight``;
    one that is present must equal the embedding). When not set, ``lm_head.weight`` must be
    there. Saved RoPE ``inv_freq`` buffers are dropped (we derive them from ``rope_theta``).
    Anything else we cannot load (biases, MoE or other architectures' keys) raises an
    :class:`~orch.errors.OrchError` listing every key.
    """
    out: dict[str, torch.Tensor] = {}
    problems: list[Problem] = []
    for key, tensor in state.items():
        if hf_ignored(key):
            continue
        ours = hf_to_ours(key)
        if ours is None:
            problems.append(
                Problem(
                    key,
                    "has no counterpart in orch's Llama Transformer",
                    "import only bias-free LlamaForCausalLM checkpoints (attention_bias and "
                    "mlp_bias false)",
                )
            )
            continue
        out[ours] = tensor

    embed = out.get("tok_embeddings.weight")
    head = out.get("output.weight")
    if tie_embeddings:
        if embed is None:
            problems.append(Problem("model.embed_tokens.weight", "is missing"))
        elif head is not None and head is not embed and not torch.equal(head, embed):
            problems.append(
                Problem(
                    "lm_head.weight",
                    "differs from model.embed_tokens.weight, so the checkpoint is not tied",
                    "import it with tie_embeddings=False (model.tie_embeddings: false)",
                )
            )
        else:
            out["output.weight"] = embed
    elif head is None:
        problems.append(
            Problem(
                "lm_head.weight",
                f"is missing, {TIED_HEAD_ABSENT}",
                "import it with tie_embeddings=True (model.tie_embeddings: true)",
            )
        )
    if problems:
        raise ProblemsError(problems, title="cannot convert from a HuggingFace Llama state dict")
    return out
