"""Activation memory of one decoder layer: the tensors it saves for backward, as a term list.

Configured as GPT-3 (LayerNorm, GeLU 4h MLP, dropout, materialized attention, 16-bit
activations) the terms reproduce Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", exactly (``korthikanti_layer_bytes`` is the paper's formula, for the
tests); configured as orch's Llama they list what ``orch.models.llama`` saves, which the tests
check against torch's saved-tensor hooks. Pure arithmetic: the planner prices thousands of plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class Arch:
    """A decoder layer, as far as the tensors it saves for backward go.

    ``fused_norm`` False is torch's composite RMSNorm (CPU builds), which also saves the
    normalized input; CUDA's fused kernel saves only the input and the per-token statistics.
    ``flash`` attention keeps q, k, v, the output and the log-sum-exp (no ``s^2`` term; torch's
    CPU SDPA takes this path too); materialized attention keeps the softmax (and dropout) output.
    ``experts > 0`` replaces the MLP by orch's MoE feed-forward.
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    fused_norm: bool = True
    dropout: bool = False
    flash: bool = True
    act_bytes: int = 2
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0


@dataclass(frozen=True)
class Term:
    """One saved tensor per rank and micro-batch.

    ``tag`` "core" marks the attention ``s^2`` tensors that selective recompute drops; "minor"
    marks what Korthikanti et al. neglect (per-token statistics, indices). ``wgrad`` marks inputs
    of linear layers, which a deferred weight-gradient step (2BP) still reads.
    """

    name: str
    elements: int
    bytes_per_element: int
    tag: Literal["", "core", "minor"] = ""
    wgrad: bool = False

    @property
    def nbytes(self) -> int:
        return self.elements * self.bytes_per_element


def norm_terms(name: str, arch: Arch, tokens: int) -> list[Term]:
    stats = 2 if arch.norm == "layernorm" else 1
    terms = [Term(f"{name}_in", tokens * arch.hidden, arch.act_bytes),
             Term(f"{name}_stats", stats * tokens, 4, "minor")]
    if not arch.fused_norm:
        terms.append(Term(f"{name}_normalized", tokens * arch.hidden, arch.act_bytes))
    return terms


def _mlp_terms(prefix: str, kind: str, tokens: int, hidden: int, act: int) -> list[Term]:
    n = tokens * hidden
    if kind == "gelu":
        return [Term(f"{prefix}gelu_in", n, act), Term(f"{prefix}gelu_out", n, act, wgrad=True)]
    return [Term(f"{prefix}gate", n, act), Term(f"{prefix}silu_out", n, act),
            Term(f"{prefix}up", n, act), Term(f"{prefix}down_in", n, act, wgrad=True)]


def _moe_terms(arch: Arch, tokens: int, t: int, sp: bool, etp: int) -> list[Term]:
    """orch.models.moe: fp32 router, top-k, and per routed token copy the expert's SwiGLU.

    Expert parallelism moves token copies but keeps their number per rank on average; expert
    tensor parallelism gathers its group's tokens and splits the expert hidden size.
    """
    h, k, act = arch.hidden, arch.top_k, arch.act_bytes
    routed = tokens * k * (etp if sp else max(1, etp // t))
    terms = [Term("router_probs", tokens * arch.experts, 4),
             Term("topk_indices", tokens * k, 8, "minor"),
             Term("topk_weights", tokens * k, 4, "minor"),
             Term("topk_sum", tokens, 4, "minor"),
             Term("expert_index", 2 * routed, 8, "minor"),
             Term("expert_in", routed * h, act, wgrad=True)]
    terms += _mlp_terms("expert_", "swiglu", routed, arch.expert_ffn // etp, act)
    terms += [Term("expert_weight", routed, act, "minor"),
              Term("expert_out", routed * h, act),
              # index_add_ keeps its source for backward, so the weighted copy is saved too.
              Term("expert_weighted_out", routed * h, act)]
    if arch.shared_ffn:
        terms += _mlp_terms("shared_", "swiglu", tokens, arch.shared_ffn // t, act)
    return terms


def layer_terms(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1
) -> list[Term]:
    """Tensors one layer saves for backward without recompute, per rank and micro-batch.

    ``s`` is the full sequence; context parallelism keeps ``s/cp`` tokens per rank (keys of a
    materialized attention still span all ``s``). Tensor parallelism splits heads and the MLP
    hidden size by ``t``; sequence parallelism also splits the tensors between them (norms,
    dropout masks, the inputs of the column-parallel linears, which are re-gathered in backward).
    """
    act, h = arch.act_bytes, arch.hidden
    tok = s // cp * b
    tok_sp = tok // t if sp else tok
    heads = arch.heads // t
    q_dim = heads * arch.head_dim
    kv_dim = max(arch.kv_heads // t, 1) * arch.head_dim
    terms = norm_terms("attention_norm", arch, tok_sp)
    terms += [Term("qkv_in", tok_sp * h, act, wgrad=True),
              Term("q", tok * q_dim, act), Term("k", tok * kv_dim, act),
              Term("v", tok * kv_dim, act)]
    if arch.flash:
        terms.append(Term("lse", b * heads * (s // cp), 4, "minor"))
    else:
        scores = b * heads * (s // cp) * s
        terms.append(Term("softmax_out", scores, act, "core"))
        if arch.dropout:
            terms += [Term("softmax_dropout_mask", scores, 1, "core"),
                      Term("softmax_dropout_out", scores, act, "core")]
    # The output projection's input; flash attention's saved output is the same storage.
    terms.append(Term("attn_out", tok * q_dim, act, wgrad=True))
    if arch.dropout:
        terms.append(Term("attn_dropout_mask", tok_sp * h, 1))
    terms += norm_terms("ffn_norm", arch, tok_sp)
    terms.append(Term("mlp_in", tok_sp * h, act, wgrad=True))
    if arch.experts:
        terms += _moe_terms(arch, tok_sp, t, sp, etp)
    else:
        terms += _mlp_terms("", arch.mlp, tok, arch.ffn // t, act)
    if arch.dropout:
        terms.append(Term("mlp_dropout_mask", tok_sp * h, 1))
    return terms


def layer_activation_bytes(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1,
    recompute: Recompute = "none",
) -> int:
    """Bytes one layer keeps between its forward and backward, per rank and micro-batch.

    Selective recompute (Korthikanti's) recomputes the attention core and drops its ``s^2``
    tensors, so with flash attention it saves nothing more. Full recompute keeps the layer input.
    """
    if recompute == "full":
        return (s // cp * b // (t if sp else 1)) * arch.hidden * arch.act_bytes
    terms = layer_terms(arch, s, b, t, sp, cp, etp)
    return sum(x.nbytes for x in terms if recompute == "none" or x.tag != "core")


def korthikanti_layer_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, recompute: Recompute = "none"
) -> float:
    """Activation bytes per GPT layer from Korthikanti et al. 2022 (Table 2), 16-bit activations.

    No parallelism ``34sbh + 5as^2b``; tensor parallel ``sbh(10 + 24/t + 5as/(ht))``; with
    sequence parallel ``sbh/t (34 + 5as/h)``; selective recompute drops the ``5as`` terms; full
    recompute keeps ``2sbh`` (``/t`` with sequence parallel).
    """
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    core = 0.0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return sbh / t * (34 + core)
    return sbh * (10 + 24 / t + core / t)
