"""Activation memory of one decoder layer: the tensors it saves for backward, as a term list.

Configured as GPT-3 (LayerNorm, GeLU 4h MLP, dropout, materialized attention, 16-bit
activations, Megatron's sequence parallelism) the terms reproduce Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", exactly
(``korthikanti_layer_bytes`` is the paper's formula, for the tests); configured as orch's Llama
they list what ``orch.models.llama`` keeps alive between forward and backward, without recompute
(``layer_terms``) and under orch's op-level selective recompute (``selective_terms``), which the
tests check against the bytes torch holds, on one process and under tensor, context and expert
parallelism, in fp32 and bf16. Pure arithmetic: the planner prices thousands of plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Recompute = Literal["none", "selective", "full"]
RECOMPUTE: tuple[Recompute, ...] = get_args(Recompute)
"""The levels from none to full: each keeps fewer activations and spends more time."""


@dataclass(frozen=True)
class Arch:
    """A decoder layer, as far as the tensors it saves for backward go.

    ``fused_norm`` False is torch's composite RMSNorm (CPU builds), which computes in float32
    and also saves the normalized input; CUDA's fused kernel saves only the input and the
    per-token statistics.
    ``flash`` attention keeps q, k, v, the output and the log-sum-exp (no ``s^2`` term; torch's
    CPU SDPA takes this path too); materialized attention keeps the softmax (and dropout) output.
    ``experts > 0`` replaces the MLP by orch's MoE feed-forward. ``saves_gathered``: under
    sequence parallelism a column-parallel linear saves the input it all-gathered (torch's
    DTensor tensor parallelism, what orch runs), not its sequence shard (Megatron, which gathers
    it again in backward; Korthikanti et al. count that).
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
    saves_gathered: bool = True
    qk_norm: bool = False
    """Qwen3's QK-norm: an RMSNorm over each query and key head before RoPE."""
    ring: bool = False
    """Context parallelism's ring attention, whose op keeps its merged output in float32."""
    autocast: bool = False
    """16-bit compute under ``torch.autocast`` over float32 weights (no FSDP mixed-precision
    policy casts them): the residual stream and the norms stay float32, and each linear casts
    its input itself (no cache for activations: three copies for q, k, v; two for w1, w3)."""

    @property
    def residual_bytes(self) -> int:
        return 4 if self.autocast else self.act_bytes

    def casts(self, linears: int) -> int:
        """Copies of one input that ``linears`` linears reading it keep."""
        return linears if self.autocast else 1


@dataclass(frozen=True)
class Term:
    """One saved tensor per rank and micro-batch.

    ``tag`` "core" marks the attention ``s^2`` tensors that Korthikanti's selective recompute
    drops; "minor" marks what Korthikanti et al. neglect (per-token statistics, indices).
    ``wgrad`` marks inputs of ``nn.Linear`` layers, which a deferred weight-gradient step (2BP,
    ``orch.parallel.pipeline.weight_grads``) still reads; the experts' grouped GEMMs compute
    their weight gradients at once.
    """

    name: str
    elements: int
    bytes_per_element: int
    tag: Literal["", "core", "minor"] = ""
    wgrad: bool = False

    @property
    def nbytes(self) -> int:
        return self.elements * self.bytes_per_element


AUX_LOSS = Term("aux_loss", 1, 4, "minor")
"""An MoE layer keeps its load-balancing loss for the trainer, whatever the recompute."""


def norm_terms(name: str, arch: Arch, rows: int, width: int | None = None,
               input_bytes: int | None = None) -> list[Term]:
    """A norm's input and statistics over ``rows`` of ``width`` (the hidden size: the residual
    stream's, in its bytes; a QK-norm's rows are heads, of the compute dtype); torch's
    composite norm (CPU builds) computes in float32, keeping its input's float32 copy and the
    normalized tensor, whatever the input's dtype. A 16-bit input under autocast (a QK-norm's)
    also keeps its float32 weight's cast to that dtype (``orch.models.llama.RMSNorm``)."""
    stats = 2 if arch.norm == "layernorm" else 1
    width = arch.hidden if width is None else width
    kept = (arch.residual_bytes if input_bytes is None else input_bytes) if arch.fused_norm else 4
    terms = [Term(f"{name}_in", rows * width, kept),
             Term(f"{name}_stats", stats * rows, 4, "minor")]
    if not arch.fused_norm:
        terms.append(Term(f"{name}_normalized", rows * width, 4))
    if arch.autocast and input_bytes is not None and input_bytes < 4:
        terms.append(Term(f"{name}_weight", width, input_bytes, "minor"))
    return terms


def _mlp_terms(prefix: str, kind: str, tokens: int, hidden: int, act: int,
               linear: bool = True) -> list[Term]:
    """An MLP's saved tensors; ``linear``: of ``nn.Linear`` layers (whose down projection's
    input a deferred weight-gradient step reads), not the experts' grouped GEMMs."""
    n = tokens * hidden
    if kind == "gelu":
        return [Term(f"{prefix}gelu_in", n, act),
                Term(f"{prefix}gelu_out", n, act, wgrad=linear)]
    return [Term(f"{prefix}gate", n, act), Term(f"{prefix}silu_out", n, act),
            Term(f"{prefix}up", n, act), Term(f"{prefix}down_in", n, act, wgrad=linear)]


def _moe_terms(arch: Arch, tokens: int, gathered: int, t: int, etp: int) -> list[Term]:
    """orch.models.moe: fp32 router, top-k, and per routed token copy the expert's SwiGLU, on
    the rank's ``tokens`` (under tensor parallelism its part of the sequence: MoE layers need
    sequence parallelism); the shared expert is tensor-parallel like the dense MLP, over the
    ``gathered`` sequence.

    Expert parallelism moves token copies but keeps their number per rank on average; expert
    tensor parallelism gathers its group's copies and splits the expert hidden size.
    """
    h, k, act = arch.hidden, arch.top_k, arch.act_bytes
    copies = tokens * k
    routed = copies * etp
    terms = [Term("router_probs", tokens * arch.experts, 4),
             Term("topk_indices", tokens * k, 8, "minor"),
             Term("topk_weights", tokens * k, 4, "minor"),
             Term("topk_sum", 2 * tokens, 4, "minor"),  # the sum and its clamp
             # each copy's slot, source token and row (the CPU path's, measured)
             Term("expert_index", 3 * copies, 8, "minor"),
             Term("load_fraction", arch.experts, 4, "minor"),
             AUX_LOSS,
             Term("expert_in", routed * h, act)]
    terms += _mlp_terms("expert_", "swiglu", routed, arch.expert_ffn // etp, act, linear=False)
    # back on the rank that routed them (expert tensor parallelism's partial sums added),
    # weighted by the float32 router weights: in float32
    terms += [Term("expert_weight", copies, 4, "minor"),
              Term("expert_out", copies * h, 4),
              # index_add_ keeps its source for backward, so the weighted copy is saved too.
              Term("expert_weighted_out", copies * h, 4)]
    if arch.shared_ffn:
        if (t > 1 and arch.saves_gathered) or arch.autocast:  # else the router's, ``mlp_in``
            terms.append(Term("shared_in", arch.casts(2) * gathered * h, act, wgrad=True))
        terms += _mlp_terms("shared_", "swiglu", gathered, arch.shared_ffn // t, act)
    return terms


@dataclass(frozen=True)
class _Shape:
    """Per-rank sizes of one micro-batch through a layer (see :func:`layer_terms`)."""

    tok: int
    """Tokens each tensor-parallel rank computes attention and the MLP for."""
    tok_sp: int
    """Tokens of the residual stream on a rank (``tok / t`` with sequence parallelism)."""
    tok_in: int
    """Rows a column-parallel linear saves as its input (gathered, or the shard)."""
    heads: int
    q_dim: int
    kv_dim: int

    @classmethod
    def of(cls, arch: Arch, s: int, b: int, t: int, sp: bool, cp: int) -> _Shape:
        tok = s // cp * b
        tok_sp = tok // t if sp else tok
        heads = arch.heads // t
        return cls(tok, tok_sp, tok if arch.saves_gathered else tok_sp, heads,
                   heads * arch.head_dim, max(arch.kv_heads // t, 1) * arch.head_dim)


def layer_terms(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1
) -> list[Term]:
    """Tensors one layer saves for backward without recompute, per rank and micro-batch.

    ``s`` is the full sequence; context parallelism keeps ``s/cp`` tokens per rank (keys of a
    materialized attention still span all ``s``). Tensor parallelism splits heads and the MLP
    hidden size by ``t``; sequence parallelism also splits the tensors between them (norms,
    dropout masks, and with Megatron's the inputs of the column-parallel linears).
    """
    act, h = arch.act_bytes, arch.hidden
    x = _Shape.of(arch, s, b, t, sp, cp)
    terms = norm_terms("attention_norm", arch, x.tok_sp)
    terms += [Term("qkv_in", arch.casts(3) * x.tok_in * h, act, wgrad=True),
              Term("q", x.tok * x.q_dim, act), Term("k", x.tok * x.kv_dim, act),
              Term("v", x.tok * x.kv_dim, act)]
    if arch.qk_norm:  # their inputs (the projections' outputs); "q" and "k" are their outputs
        terms += (norm_terms("q_norm", arch, x.tok * x.q_dim // arch.head_dim, arch.head_dim, act)
                  + norm_terms("k_norm", arch, x.tok * x.kv_dim // arch.head_dim, arch.head_dim,
                               act))
    terms += _attention_core(arch, x, s, b, cp)
    # The output projection's input; flash attention's saved output is the same storage, but
    # under context parallelism the attention's output is laid out by heads and copied.
    terms.append(Term("attn_out", x.tok * x.q_dim, act, wgrad=True))
    if cp > 1:
        terms.append(_attention_output(arch, x, "attn_core_out"))
    if arch.dropout:
        terms.append(Term("attn_dropout_mask", x.tok_sp * h, 1))
    terms += norm_terms("ffn_norm", arch, x.tok_sp)
    if arch.experts:  # the MoE layer routes the rank's own tokens
        terms.append(Term("mlp_in", x.tok_sp * h, act, wgrad=True))
        terms += _moe_terms(arch, x.tok_sp, x.tok, t, etp)
    else:
        linears = 2 if arch.mlp == "swiglu" else 1
        terms.append(Term("mlp_in", arch.casts(linears) * x.tok_in * h, act, wgrad=True))
        terms += _mlp_terms("", arch.mlp, x.tok, arch.ffn // t, act)
    if arch.dropout:
        terms.append(Term("mlp_dropout_mask", x.tok_sp * h, 1))
    return terms


def _attention_core(arch: Arch, x: _Shape, s: int, b: int, cp: int) -> list[Term]:
    """What attention itself saves beside q, k, v and its output: flash's log-sum-exp, or a
    materialized attention's softmax (and dropout) over all ``s`` keys."""
    if arch.flash:
        return [Term("lse", b * x.heads * (s // cp), 4, "minor")]
    scores = b * x.heads * (s // cp) * s
    terms = [Term("softmax_out", scores, arch.act_bytes, "core")]
    if arch.dropout:
        terms += [Term("softmax_dropout_mask", scores, 1, "core"),
                  Term("softmax_dropout_out", scores, arch.act_bytes, "core")]
    return terms


def _attention_output(arch: Arch, x: _Shape, name: str) -> Term:
    return Term(name, x.tok * x.q_dim, 4 if arch.ring else arch.act_bytes)


def selective_terms(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1
) -> list[Term]:
    """Tensors one layer keeps under orch's op-level selective recompute, per rank and
    micro-batch: the layer's input and the output of every matmul and attention call
    (``orch.parallel.recompute``); the elementwise ops' tensors are recomputed from them.

    Names shared with :func:`layer_terms` are the same tensors. A row-parallel linear's output
    is kept before its reduction, a partial sum over the whole sequence, so it is not split by
    tensor parallelism (nor, with expert tensor parallelism, the experts' down projection).
    """
    act, h = arch.act_bytes, arch.hidden
    x = _Shape.of(arch, s, b, t, sp, cp)
    terms = [Term("attention_norm_in", x.tok_sp * h, arch.residual_bytes),
             _attention_output(arch, x, "attn_core_out" if cp > 1 else "attn_out")]
    if arch.flash:
        terms += _attention_core(arch, x, s, b, cp)
    else:  # the scores matmul's output; the softmax is recomputed from it
        terms.append(Term("scores", b * x.heads * (s // cp) * s, act, "core"))
    terms += _linear_outputs(arch, x, t)
    if arch.experts:
        routed = x.tok_sp * arch.top_k * etp
        terms += [AUX_LOSS,
                  Term("expert_gate", routed * arch.expert_ffn // etp, act),
                  Term("expert_up", routed * arch.expert_ffn // etp, act),
                  # a partial sum under expert tensor parallelism; returned as ``expert_out``
                  Term("expert_down_out", routed * h, act)]
    return terms


def _linear_outputs(arch: Arch, x: _Shape, t: int) -> list[Term]:
    """The outputs of a layer's ``nn.Linear`` layers (a row-parallel one's before its
    reduction): what selective recompute keeps of them, and the shapes of the output gradients
    a deferred weight-gradient step holds."""
    act, h = arch.act_bytes, arch.hidden
    terms = [Term("q_proj", x.tok * x.q_dim, act), Term("k_proj", x.tok * x.kv_dim, act),
             Term("v", x.tok * x.kv_dim, act), Term("attn_proj_out", x.tok * h, act)]
    if not arch.experts:
        hidden = arch.ffn // t
        up = [Term("up", x.tok * hidden, act)] if arch.mlp == "swiglu" else []
        return terms + [Term("gate" if up else "gelu_in", x.tok * hidden, act), *up,
                        Term("down_out", x.tok * h, act)]
    terms.append(Term("router_logits", x.tok_sp * arch.experts, act))
    if arch.shared_ffn:
        hidden = arch.shared_ffn // t
        terms += [Term("shared_gate", x.tok * hidden, act), Term("shared_up", x.tok * hidden, act),
                  Term("shared_down_out", x.tok * h, act)]
    return terms


def deferred_weight_grad_bytes(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1
) -> int:
    """Bytes a layer's deferred weight-gradient step holds between the input-gradient pass and
    itself, per rank and micro-batch: every ``nn.Linear``'s input and output gradient."""
    inputs = sum(x.nbytes for x in layer_terms(arch, s, b, t, sp, cp, etp) if x.wgrad)
    outputs = _linear_outputs(arch, _Shape.of(arch, s, b, t, sp, cp), t)
    return inputs + sum(x.nbytes for x in outputs)


def split_weight_grad_bytes(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1
) -> int:
    """Gradients a layer keeps, per rank and micro-batch, between the input-gradient pass and
    the weight-gradient step of torch's split backward (``stage_backward_input``, which orch
    runs under tensor parallelism): the gradient flowing into every node where a parameter
    meets the input's path, kept for ``W`` to start from. Each linear's output gradient (the
    experts' grouped GEMMs' too, which torch defers like the rest) and each norm's output
    gradient; the saved tensors stay as well, the graph being retained (``retain_graph``)."""
    x = _Shape.of(arch, s, b, t, sp, cp)
    grads = sum(y.nbytes for y in _linear_outputs(arch, x, t))
    grads += 2 * x.tok_sp * arch.hidden * arch.residual_bytes  # the two norms' outputs
    if arch.experts:
        routed = x.tok_sp * arch.top_k * etp
        grads += (2 * routed * arch.expert_ffn // etp + routed * arch.hidden) * arch.act_bytes
    return grads


def layer_activation_bytes(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1,
    recompute: Recompute = "none",
) -> int:
    """Bytes one layer keeps between its forward and backward, per rank and micro-batch.

    Full recompute keeps the layer input; selective, :func:`selective_terms`.
    """
    if recompute == "full":
        layer_input = (s // cp * b // (t if sp else 1)) * arch.hidden * arch.residual_bytes
        return layer_input + (AUX_LOSS.nbytes if arch.experts else 0)
    terms = (selective_terms if recompute == "selective" else layer_terms)(
        arch, s, b, t, sp, cp, etp)
    return sum(x.nbytes for x in terms)


def recomputed_bytes(
    arch: Arch, s: int, b: int, t: int = 1, sp: bool = False, cp: int = 1, etp: int = 1
) -> int:
    """Bytes of the saved tensors selective recompute makes again in backward: those of
    :func:`layer_terms` it does not keep (norms, RoPE, SiLU and products, the routing)."""
    kept = {x.name for x in selective_terms(arch, s, b, t, sp, cp, etp)}
    return sum(x.nbytes for x in layer_terms(arch, s, b, t, sp, cp, etp) if x.name not in kept)


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
