"""Reference Llama-style decoder in plain torch, readable top to bottom.

Parallelism is applied to this model from outside (tensor, sequence, pipeline, FSDP), so every
layer is its own ``nn.Module`` with the names later code shards by. Names follow Meta's Llama
checkpoints, which makes the HuggingFace mapping a rename: ``tok_embeddings`` -> ``embed_tokens``,
``layers.{i}.attention.wq`` -> ``self_attn.q_proj``, ``feed_forward.w1/w3/w2`` ->
``mlp.gate_proj/up_proj/down_proj``, ``attention_norm`` -> ``input_layernorm``, ``ffn_norm`` ->
``post_attention_layernorm``, ``norm`` -> ``norm``, ``output`` -> ``lm_head``. RoPE uses
HuggingFace's convention (rotate the two halves of each head), so no q/k permutation is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from orch.config.schema import ModelConfig
from orch.kernels.attention import Documents, causal_attention
from orch.models.moe import FeedForward, MoEFeedForward
from orch.models.weights import SeededInit, fill_all


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, in the input's dtype.

    The weight is taken in the input's dtype: under autocast, Qwen3's per-head query and key
    norms (``model.qk_norm``) get bf16 projections and hold an fp32 weight, and a mixed pair
    cannot use the fused kernel: torch falls back to the composite op (fp32 copies of the
    queries and keys saved for backward, and a warning per call), where FSDP's bf16 weights,
    as torchtitan runs Qwen3, take the fused one. The fused kernel accumulates in fp32 either
    way; the cast itself is differentiable (the gradient reaches the fp32 weight)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given token positions; frequencies ``theta^(-2i/head_dim)``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the frequencies (on the default device: again on the CPU for a model built
        on the meta device)."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        self.register_buffer("inv_freq", 1.0 / self.theta**exponent, persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(positions.to(self.inv_freq.device, torch.float32), self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[batch, heads, seq, head_dim]`` by the position tables ``[seq, head_dim]``."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (``kv_heads`` <= ``heads``).

    Head counts are read from the projections' outputs, so a tensor-parallel rank holding
    ``heads/tp`` query and ``kv_heads/tp`` key/value heads runs the same code (same ratio).
    The local causal attention is ``orch.kernels.attention.causal_attention``: orch's
    FlashAttention kernels on a GPU, torch's SDPA elsewhere. ``attention_fn`` replaces it, taking
    and returning ``(batch, heads, seq, head_dim)`` tensors (and ``documents=``, the whole
    sequence's document ids, where attention keeps to documents): context parallelism installs
    ring or Ulysses attention there (``orch.parallel.context_parallel``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.head_size
        # Qwen2's q, k and v (not o) add a bias (model.qkv_bias)
        self.wq = nn.Linear(cfg.dim, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.heads * self.head_dim, cfg.dim, bias=False)
        # Qwen3's QK-norm: each head's query and key normalized over its head_dim (one weight
        # for every head), before RoPE
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attention_fn: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Documents | None = None) -> torch.Tensor:
        """``documents``: the whole sequence's document ids for a block-causal mask
        (``train.document_mask``), or None for plain causal attention."""
        b, s, _ = x.shape
        # -1, not self.heads: under tensor parallelism each rank holds heads/tp of them.
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        attention = self.attention_fn if self.attention_fn is not None else causal_attention
        out = attention(q, k, v) if documents is None else attention(q, k, v, documents=documents)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: nn.Module = (
            MoEFeedForward(cfg) if cfg.is_moe_layer(layer_id) else FeedForward(cfg.dim, cfg.ffn_dim)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Documents | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, documents)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids ``[batch, seq]`` -> logits ``[batch, seq, vocab]``.

    Weights are initialized by :meth:`init_weights` (seed 0) on construction unless the model is
    built on the meta device, where there is nothing to fill; call it again to re-seed.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.head_size, cfg.rope_theta)
        # Keyed by global index, so a pipeline stage holding layers 4-7 keeps their names.
        self.layers = nn.ModuleDict((str(i), TransformerBlock(cfg, i)) for i in range(cfg.layers))
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.positions: torch.Tensor | None = None
        """Positions for calls that pass none (pipeline stages: the runtime passes only the
        hidden states, whose sequence may be a tensor-parallel shard)."""
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if not self.output.weight.is_meta:
            self.init_weights(seed=0)

    def init_weights(self, seed: int) -> None:
        """Norm weights 1, biases 0, everything else N(0, 0.02), drawn in parameter order on the CPU
        (:class:`~orch.models.weights.SeededInit`, which can also fill a meta-built model unit
        by unit)."""
        fill_all(self, SeededInit(self, seed))

    def init_buffers(self) -> None:
        """Compute the buffers (RoPE frequencies, MoE balancing state) on the CPU, for a model
        built on the meta device, whose parameters are then filled from a
        :class:`~orch.models.weights.WeightSource`."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding | MoEFeedForward):
                module.reset_buffers()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` are the tokens' places in the sequence (default :attr:`positions`, else
        ``0..seq-1``); under context parallelism a rank holds a subset of the sequence and says
        which. A pipeline stage without the embedding takes the previous stage's hidden states
        ``[batch, seq, dim]`` as ``tokens``, and one without the head returns hidden states.
        ``documents``: the document id of every token of the whole sequence ``[batch, seq]``
        (all of it under context parallelism too), nondecreasing along it (as
        ``orch.runtime.data.document_ids`` numbers them; checked on CPU ids), for attention
        within documents (``train.document_mask``); None attends causally across them."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            positions = self.positions
        if positions is None:
            positions = torch.arange(tokens.shape[1])
        cos, sin = self.rope(positions, h.dtype)
        within = Documents(documents) if documents is not None else None  # one mask, every layer
        for layer in self.layers.values():
            h = layer(h, cos, sin, within)
        if self.output is None:
            return h
        assert self.norm is not None
        return self.output(self.norm(h))
