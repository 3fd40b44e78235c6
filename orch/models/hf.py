"""The HuggingFace view of orch's ``Transformer``: ``LlamaForCausalLM`` (``Qwen3ForCausalLM``
with ``model.qk_norm``, ``Qwen2ForCausalLM`` with ``model.qkv_bias``) for a dense model,
``MixtralForCausalLM`` (``Qwen3MoeForCausalLM``) for an MoE one.

Our parameter names follow Meta's Llama checkpoints and our RoPE uses HuggingFace's rotate-half
convention, so converting is a rename of state-dict keys: no q/k permutation. The one reshaping
is MoE's: we stack the routed experts' weights (``experts.w1 [E, dim, hidden]``, one grouped
GEMM per weight), where HF's checkpoints store each expert's projections as its own
``nn.Linear`` weight (``experts.{j}.w1.weight [hidden, dim]``), so expert ``j``'s tensor is our
``w1[j]`` transposed. This module holds that mapping (both ways) and the transformers config
fields of a :class:`ModelConfig`; exporting and importing checkpoints build on it.

It is pure torch on purpose: ``transformers`` is an optional dev dependency, so nothing here
imports it. ``LlamaConfig(**hf_config(cfg))`` (the class :func:`hf_family` names) builds the
matching HF config where it is installed. An MoE model that no such class computes (shared
experts, sigmoid routing, dense layers between Mixtral's) raises an
:class:`~orch.errors.OrchError` naming the field.
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
    "attention.wq.bias": "self_attn.q_proj.bias",  # Qwen2's (model.qkv_bias)
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
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
# Older HF Llama checkpoints saved the RoPE frequencies; we compute them from rope_theta.
_HF_IGNORED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")

FAMILIES = {
    (False, False, False): ("LlamaForCausalLM", "llama"),
    (False, True, False): ("Qwen3ForCausalLM", "qwen3"),
    (False, False, True): ("Qwen2ForCausalLM", "qwen2"),
    (True, False, False): ("MixtralForCausalLM", "mixtral"),
    (True, True, False): ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
"""(MoE, QK-norm, q/k/v biases) -> the transformers class and ``model_type`` computing orch's
model: Qwen3's decoder is Llama's with each query and key head normalized, Qwen2's (and
Qwen2.5's) Llama's with biases on the query, key and value projections, Mixtral's Llama's with
every feed-forward a softmax-routed MoE, Qwen3-MoE's Qwen3's with MoE every
``decoder_sparse_step`` layers. Other combinations have no class (Qwen2-MoE gates its shared
expert)."""
FAMILIES_BY_TYPE = {model_type: name for name, model_type in FAMILIES.values()}
TRAITS = {model_type: traits for traits, (_, model_type) in FAMILIES.items()}
"""``model_type`` -> (MoE, QK-norm, q/k/v biases): what a checkpoint of that family computes."""


def family_of(moe: bool, qk_norm: bool, qkv_bias: bool) -> tuple[str, str]:
    """The class and ``model_type`` of :data:`FAMILIES` for these traits; a combination
    without one (q/k/v biases beside QK-norm or MoE) as its family without the biases."""
    return FAMILIES.get((moe, qk_norm, qkv_bias), FAMILIES[(moe, qk_norm, False)])
MOE_BLOCKS = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}
"""Where each MoE family's sparse block sits in ``model.layers.{i}``: its router is
``gate.weight [E, dim]`` (our ``feed_forward.router.weight``), its experts ``experts.{j}.*``."""
_EXPERT_PROJECTIONS = {
    "mixtral": {"w1": "w1", "w2": "w2", "w3": "w3"},
    "qwen3_moe": {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"},
}
"""Our stacked expert weight -> the name of each expert's projection in a family's checkpoint."""
_OUR_STACK = {name: ours for names in _EXPERT_PROJECTIONS.values()
              for ours, name in names.items()}
_HF_ROUTER = re.compile(rf"model\.layers\.(\d+)\.({'|'.join(set(MOE_BLOCKS.values()))})"
                        r"\.gate\.weight")
_HF_EXPERT = re.compile(rf"model\.layers\.(\d+)\.({'|'.join(set(MOE_BLOCKS.values()))})"
                        rf"\.experts\.(\d+)\.({'|'.join(_OUR_STACK)})\.weight")
_OUR_ROUTER = "feed_forward.router.weight"
_OUR_STACKED = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])")
EXPERT_BIAS = re.compile(r"layers\.\d+\.feed_forward\.expert_bias")
"""Our aux-loss-free balancing bias (a saved buffer): HF's routers have none, so a model whose
biases are not all zero routes differently there."""


def hf_ignored(key: str) -> bool:
    """A HuggingFace key with nothing to load: saved RoPE frequencies (we derive them from
    ``rope_theta``)."""
    return _HF_IGNORED.fullmatch(key) is not None


def hf_to_ours(key: str) -> str | None:
    """Our ``Transformer`` name for a HuggingFace key stored as we store it (everything but a
    routed expert's projection: :func:`hf_expert`), or None when it has none (biases, other
    architectures' keys)."""
    ours = _TOP_LEVEL_INV.get(key)
    match = _HF_LAYER.fullmatch(key)
    if ours is None and match is not None:
        index, rest = match.groups()
        if rest in _PER_LAYER_INV:
            ours = f"layers.{index}.{_PER_LAYER_INV[rest]}"
        elif _HF_ROUTER.fullmatch(key):
            ours = f"layers.{index}.{_OUR_ROUTER}"
    return ours


def hf_expert(key: str) -> tuple[str, int] | None:
    """(our stacked weight, expert index) for a HuggingFace routed expert's projection (Mixtral's
    ``block_sparse_moe.experts.{j}.w1.weight``, Qwen3-MoE's ``mlp.experts.{j}.gate_proj.weight``):
    the tensor is our ``[j]`` transposed. None for any other key."""
    match = _HF_EXPERT.fullmatch(key)
    if match is None:
        return None
    layer, _, expert, projection = match.groups()
    return f"layers.{layer}.feed_forward.experts.{_OUR_STACK[projection]}", int(expert)


TIED_HEAD_ABSENT = "as in a checkpoint with tied embeddings"
"""What a missing ``lm_head.weight`` of an untied model most likely means: such checkpoints
store the embedding alone."""


def hf_keys(name: str, family: str = "llama", experts: int = 0) -> list[str]:
    """The HuggingFace keys of our parameter ``name`` in a ``family`` checkpoint
    (:data:`FAMILIES`' model types): one for a tensor stored as we store it, ``experts`` for a
    stacked routed-expert weight (expert ``j``'s key at ``j``, holding our ``[j]``
    transposed), none where HF has no counterpart (wrapper prefixes, the balancing bias, an
    MoE layer in a dense family); the inverse of :func:`hf_to_ours` and :func:`hf_expert`."""
    hf = _TOP_LEVEL.get(name)
    match = _OUR_LAYER.fullmatch(name)
    if hf is not None or match is None:
        return [hf] if hf is not None else []
    layer, rest = match.groups()
    if rest in _PER_LAYER:
        return [f"model.layers.{layer}.{_PER_LAYER[rest]}"]
    block = MOE_BLOCKS.get(family)
    if block is None:
        return []
    if rest == _OUR_ROUTER:
        return [f"model.layers.{layer}.{block}.gate.weight"]
    if (stacked := _OUR_STACKED.fullmatch(name)) is not None:
        projection = _EXPERT_PROJECTIONS[family][stacked.group(2)]
        return [f"model.layers.{layer}.{block}.experts.{j}.{projection}.weight"
                for j in range(experts)]
    return []


def is_expert_stack(name: str) -> bool:
    """Whether our parameter ``name`` is a stacked routed-expert weight (one HF key per
    expert: :func:`hf_keys`)."""
    return _OUR_STACKED.fullmatch(name) is not None


_KEEP_IN_ORCH = "keep this model in orch's own checkpoints"


def hf_family(model: ModelConfig) -> tuple[str, str]:
    """The transformers class and ``model_type`` of ``model``'s HuggingFace view
    (:data:`FAMILIES`); a combination without one (:func:`_unsupported`) is named as its
    family without the biases."""
    return family_of(model.is_moe, model.qk_norm, model.qkv_bias)


def _unsupported(model: ModelConfig) -> list[Problem]:
    """What in ``model`` no class of :data:`FAMILIES` computes: q/k/v biases beside QK-norm or
    MoE layers (Qwen2's alone have them), and in an MoE model shared experts (Qwen2-MoE's is
    gated, DeepSeek's are MLA models), sigmoid routing (DeepSeek-V3's), and, without QK-norm
    (Mixtral's), dense layers between the MoE ones or top-k weights left unnormalized."""
    mixtral = not model.qk_norm
    biased = model.qkv_bias and (model.qk_norm or model.is_moe)
    checks = [("qkv_bias", not biased, "false: Qwen2's attention has q/k/v biases, Qwen3's and "
               "the MoE classes' none")]
    checks += [
        ("shared_experts", model.shared_experts == 0, "0: no HuggingFace class orch writes has "
         "ungated shared experts (Mixtral and Qwen3-MoE have none)"),
        ("score_func", model.score_func == "softmax", "softmax: Mixtral's and Qwen3-MoE's "
         "routers take softmax scores"),
        ("moe_layer_interval", not mixtral or model.moe_layer_interval == 1, "1: every Mixtral "
         "layer is MoE (Qwen3-MoE's decoder_sparse_step needs model.qk_norm: true)"),
        ("norm_topk_prob", not mixtral or model.norm_topk_prob, "true: Mixtral renormalizes its "
         "top-k weights"),
    ] if model.is_moe else []
    return [Problem(f"model.{field}", f"{getattr(model, field)!r}, which "
                    f"{hf_family(model)[0]} cannot compute",
                    f"{_KEEP_IN_ORCH}, or train it with model.{field}: {want}")
            for field, ok, want in checks if not ok]


def hf_config(model: ModelConfig, dtype: torch.dtype | str = "float32") -> dict[str, Any]:
    """The keyword arguments of the transformers config (``LlamaConfig``, ``Qwen3Config``,
    ``MixtralConfig`` or ``Qwen3MoeConfig``: :func:`hf_family`) describing ``model``.

    ``LlamaForCausalLM(LlamaConfig(**hf_config(cfg)))`` computes the same function as
    ``Transformer(cfg)`` once loaded with :func:`to_hf_state_dict`. ``dtype`` is recorded as
    ``torch_dtype`` (the name every transformers version reads); it describes the weights and
    changes nothing here. The byte tokenizer has no special tokens, so bos/eos/pad ids are None.
    Raises an :class:`~orch.errors.OrchError` for a model those classes do not compute
    (:func:`_unsupported`).
    """
    if problems := _unsupported(model):
        raise ProblemsError(problems, title=f"not a {hf_family(model)[0]} model")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    family = hf_family(model)[1]
    no_window = {"use_sliding_window": False, "sliding_window": None}
    extra: dict[str, Any] = {
        "llama": {},
        "qwen3": {**no_window, "max_window_layers": model.layers},
        "qwen2": {**no_window, "max_window_layers": model.layers},
        "mixtral": {"num_local_experts": model.experts, "sliding_window": None,
                    "router_jitter_noise": 0.0},
        "qwen3_moe": {**no_window, "num_experts": model.experts, "mlp_only_layers": [],
                      "decoder_sparse_step": model.moe_layer_interval,
                      "moe_intermediate_size": model.moe_ffn_dim,
                      "norm_topk_prob": model.norm_topk_prob},
    }[family]
    if model.is_moe:
        extra |= {"num_experts_per_tok": model.top_k, "output_router_logits": False,
                  "router_aux_loss_coef": model.aux_loss_coeff}
    return {
        "architectures": [hf_family(model)[0]],
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        # Mixtral's experts' (its only feed-forward); Qwen3-MoE's dense layers'
        "intermediate_size": model.moe_ffn_dim if family == "mixtral" else model.ffn_dim,
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
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": dtype,
        # Llama's flags (both false: true would add o_proj's and the MLP's biases too)
        **({} if family == "qwen2" else {"attention_bias": False, "mlp_bias": False}),
        **extra,
    }


def _state_family(state: dict[str, torch.Tensor]) -> str:
    """The ``model_type`` (:data:`FAMILIES`) of the model a state dict of ours holds, by its
    keys: MoE where a router is, QK-norm where a query norm is, q/k/v biases where the query's
    is."""
    moe = any(key.endswith(_OUR_ROUTER) for key in state)
    qk = any(key.endswith("attention.q_norm.weight") for key in state)
    bias = any(key.endswith("attention.wq.bias") for key in state)
    return family_of(moe, qk, bias)[1]


def expert_bias_problem(name: str) -> Problem:
    """The problem of exporting balancing bias ``name`` (:data:`EXPERT_BIAS`), which is not all
    zero: HF's routers, which have none, would pick other experts than ours."""
    return Problem(name, "is not all zero: the aux-loss-free balancing (model.bias_update_rate) "
                   "moved which experts the router picks, and HuggingFace's routers have no "
                   "such bias", f"{_KEEP_IN_ORCH}, or train it with model.bias_update_rate: 0 "
                   "(the auxiliary loss balances without changing the routing function)")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``Transformer.state_dict()`` to the HuggingFace names of its family
    (:func:`hf_family`, read from its keys).

    The tensors are the same objects (no copies), but for an MoE model's routed experts: each
    expert's projection is a transposed view of its stack (:func:`hf_keys`). A tied model's
    ``output.weight`` becomes ``lm_head.weight``, as in HF's own ``state_dict()``; zero
    balancing biases are left out. Keys that have no HF name (wrapper prefixes such as
    ``_orig_mod.``, a bias that is not zero) raise an :class:`~orch.errors.OrchError` listing
    every one.
    """
    family = _state_family(state)
    out: dict[str, torch.Tensor] = {}
    problems = [expert_bias_problem(key) for key, bias in state.items()
                if EXPERT_BIAS.fullmatch(key) and bias.any()]
    for key, tensor in state.items():
        if EXPERT_BIAS.fullmatch(key):
            continue
        hf = hf_keys(key, family, tensor.shape[0] if is_expert_stack(key) else 0)
        if not hf:
            problems.append(
                Problem(
                    key,
                    "is not a parameter of orch's Transformer",
                    "pass the state_dict() of an unwrapped orch Transformer (no DDP/compile "
                    "prefixes)",
                )
            )
        elif is_expert_stack(key):
            out.update({name: tensor[j].T for j, name in enumerate(hf)})
        else:
            out[hf[0]] = tensor
    if problems:
        raise ProblemsError(problems, title=f"cannot convert to a {FAMILIES_BY_TYPE[family]} "
                            "state dict")
    return out


def from_hf_state_dict(
    state: dict[str, torch.Tensor], tie_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """Rename a HuggingFace state dict (Llama, Mistral, Qwen3, Mixtral, Qwen3-MoE) to our
    ``Transformer`` names; the inverse.

    ``tie_embeddings`` is the checkpoint's ``tie_word_embeddings``. When set, ``output.weight``
    is the embedding tensor itself (tied checkpoints on disk usually omit ``lm_head.weight``;
    one that is present must equal the embedding). When not set, ``lm_head.weight`` must be
    there. Routed experts' projections are stacked (transposed: :func:`hf_keys`; expert ``j``
    at ``j``, every one of the router's experts present) and each MoE layer gets a zero
    balancing bias, so ``load_state_dict`` takes the result strictly. Saved RoPE ``inv_freq``
    buffers are dropped (we derive them from ``rope_theta``). Anything else we cannot load
    (biases, other architectures' keys) raises an :class:`~orch.errors.OrchError` listing every
    key.
    """
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    problems: list[Problem] = []
    for key, tensor in state.items():
        if hf_ignored(key):
            continue
        if (expert := hf_expert(key)) is not None:
            stacks.setdefault(expert[0], {})[expert[1]] = tensor.T
            continue
        ours = hf_to_ours(key)
        if ours is None:
            problems.append(
                Problem(
                    key,
                    "has no counterpart in orch's Transformer",
                    "import only bias-free LlamaForCausalLM checkpoints (attention_bias and "
                    "mlp_bias false) or their Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE "
                    "kin",
                )
            )
            continue
        out[ours] = tensor
    for name, router in ((k, t) for k, t in list(out.items()) if k.endswith(_OUR_ROUTER)):
        out[name.removesuffix("router.weight") + "expert_bias"] = router.new_zeros(len(router))
        for w in ("w1", "w2", "w3"):
            stack = name.removesuffix("router.weight") + f"experts.{w}"
            held = stacks.pop(stack, {})
            if sorted(held) != list(range(len(router))):
                problems.append(Problem(stack, f"has tensors for experts {sorted(held)}, the "
                                        f"router {len(router)}", "import a complete checkpoint"))
            else:
                out[stack] = torch.stack([held[j] for j in range(len(router))])
    problems += [Problem(stack, "has experts but no router", "import a complete checkpoint")
                 for stack in stacks]

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
        raise ProblemsError(problems, title="cannot convert from a HuggingFace state dict")
    return out
