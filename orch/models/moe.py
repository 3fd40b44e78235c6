"""Mixture-of-experts feed-forward: a router, top-k routed SwiGLU experts and shared experts.

This is the reference: dropless, a plain loop over experts, no capacity and no all-to-all. The
expert-parallel dispatcher and grouped-GEMM kernels that come later must match it. Routed expert
weights are stacked (``[experts, dim, hidden]``) so that expert parallelism can shard dimension 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orch.config.schema import ModelConfig

INIT_STD = 0.02


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``, no biases (Llama's naming: w1 gate, w3 up)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's ``top_k`` experts from router probabilities ``[tokens, experts]``.

    Returns ``(weights, indices)``, both ``[tokens, top_k]``; the weights are renormalized to sum
    to 1 per token, so a token's output is a convex combination of its experts' outputs.
    """
    weights, indices = scores.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


class GroupedExperts(nn.Module):
    """``experts`` SwiGLU MLPs with stacked weights, applied to the tokens routed to each."""

    def __init__(self, experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02), so a standalone module is usable; the model re-seeds it in init_weights."""
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=INIT_STD)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """``x`` is ``[tokens, dim]``; ``weights``/``indices`` come from :func:`route`."""
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            xe = x[token]
            h = F.silu(xe @ self.w1[e]) * (xe @ self.w3[e])
            out.index_add_(0, token, (h @ self.w2[e]) * weights[token, slot, None])
        return out


class MoEFeedForward(nn.Module):
    """Router + routed experts + shared experts; a drop-in replacement for :class:`FeedForward`.

    The router runs in fp32 (softmax over experts, then top-k renormalized). ``shared_experts``
    always-active experts of size ``moe_ffn_dim`` are one SwiGLU of hidden size
    ``shared_experts * moe_ffn_dim``, which computes the same function as their sum.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.dim, cfg.experts, bias=False)
        self.experts = GroupedExperts(cfg.experts, cfg.dim, cfg.moe_ffn_dim)
        self.shared_expert = (
            FeedForward(cfg.dim, cfg.shared_experts * cfg.moe_ffn_dim)
            if cfg.shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        scores = F.softmax(self.router(tokens).float(), dim=-1)
        weights, indices = route(scores, self.top_k)
        out = self.experts(tokens, weights.to(x.dtype), indices)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view_as(x)
