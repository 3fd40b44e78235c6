"""Mixture-of-experts feed-forward: a router, top-k routed SwiGLU experts and shared experts.

The token path is Megatron-Core's dispatcher cut into steps, each an op of ``orch.kernels.moe``:

1. route: router logits in fp32 -> scores (softmax, or sigmoid as DeepSeek-V3) -> top-k experts
   per token, chosen on ``scores + expert_bias`` -> weights = the chosen *unbiased* scores,
   renormalized to sum to 1 per token (``norm_topk_prob``, Mixtral's way) or as they are
   (Switch Transformer's, Qwen2-MoE's: with ``top_k`` 1 the only way the language-model loss
   reaches the router, a renormalized single weight being always 1);
2. permute (:func:`moe_permute`): one copy of each token per chosen expert, in expert order; with
   ``capacity_factor`` each expert keeps at most ``ceil(capacity_factor * T * top_k / experts)``
   copies (the lowest token indices) and the rest are dropped, else nothing is dropped;
3. dispatch: with expert parallelism (``orch.parallel.expert_parallel``) the rows travel to the
   rank that owns their expert and come back after step 4; without it this step is empty;
4. expert SwiGLU over the local experts with :func:`grouped_mm` (an expert with no rows is fine);
5. unpermute (:func:`moe_unpermute`): each token's expert outputs times its router weights, summed;
   a dropped copy contributes zero. The shared expert (always active) is added last.

Load balancing, both kinds, so a run can use either or both:

- auxiliary loss (Switch/GShard): every forward stores ``self.aux_loss = E * sum_e f_e * P_e``
  with ``f_e`` the fraction of the ``T * top_k`` routed copies that chose expert ``e`` (before
  capacity drops) and ``P_e`` the mean router probability of ``e`` over the tokens (sigmoid scores
  are normalized per token first). It is 1 for perfectly uniform routing. Its gradient is
  given by the layer itself, in the backward of its output, as if ``aux_loss_coeff *
  aux_grad_scale * aux_loss`` had been added to the loss (Megatron-Core's
  MoEAuxLossAutoScaler): so a caller's loss is the language-model loss alone, whether it is one
  expression (the trainer, scale ``1 / micro-batches``) or per pipeline stage (the executor,
  scale 1, since its runtime divides every gradient by the micro-batch count). Set the scale
  with :func:`inject_aux_gradients`; :func:`take_aux_loss` gives the value for the metrics.
  The value is computed per micro-batch on the tokens this rank sees; under context and
  tensor (sequence) parallelism the loads are summed over the cp x tp ranks first (each holds
  part of the sequences).
- aux-loss-free (DeepSeek-V3): ``expert_bias`` is a non-learned buffer (in the state dict) added
  to the scores for top-k *selection only*. Training forwards accumulate each expert's load in
  ``expert_load`` (not saved); after each optimizer step :func:`update_expert_bias` (or the
  layer's :meth:`MoEFeedForward.update_bias`) moves every bias by ``rate`` towards balance,
  ``bias_e += rate * sign(mean_load - load_e)``, and resets the loads.

Routed expert weights are stacked (``w1/w3 [experts, dim, hidden]``, ``w2 [experts, hidden,
dim]``), so expert parallelism shards dimension 0 and records the global count and offset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from orch.config.schema import ModelConfig
from orch.kernels.moe import grouped_mm, moe_permute, moe_unpermute
from orch.parallel.comm_stats import dimension

INIT_STD = 0.02
ScoreFunc = Literal["softmax", "sigmoid"]
Dispatcher = Callable[
    [torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    torch.Tensor,
]
"""``(permuted rows, tokens_per_expert [E], compute) -> expert outputs in the same row order``."""


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``, no biases (Llama's naming: w1 gate, w3 up)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(
    scores: torch.Tensor, top_k: int, bias: torch.Tensor | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's ``top_k`` experts from router scores ``[tokens, experts]``.

    Selection ranks ``scores + bias`` (``bias``: the aux-loss-free balancing bias, or None); the
    weights are the chosen experts' unbiased ``scores``, with ``normalize`` renormalized to sum
    to 1 per token, so a token's output is a convex combination of its experts' outputs (and
    with ``top_k`` 1 the weight is a constant 1 that passes the router no gradient), else as
    they are. Returns ``(weights, indices)``, both ``[tokens, top_k]``.
    """
    ranked = scores if bias is None else scores + bias
    indices = ranked.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if not normalize:
        return weights, indices
    total = weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return weights / total, indices


def router_scores(logits: torch.Tensor, score_func: ScoreFunc) -> torch.Tensor:
    return F.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)


def expert_capacity(
    capacity_factor: float | None, tokens: int, top_k: int, experts: int
) -> int | None:
    """Copies each expert keeps: ``ceil(capacity_factor * tokens * top_k / experts)``; None =
    dropless. ``tokens`` is the local batch, so under expert parallelism the drop happens on the
    sending rank, before the all-to-all (as Megatron-Core's drop-and-pad does)."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / experts)


def load_balancing_loss(
    probs: torch.Tensor, load: torch.Tensor, top_k: int, total_tokens: int | None = None
) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` (1 when routing is uniform).

    ``probs [T, E]`` sums to 1 per token (differentiable: the gradient reaches the router);
    ``load [E]`` counts the routed copies per expert of ``total_tokens`` tokens (default ``T``;
    more when ``load`` is summed over ranks holding other parts of the same sequences), so
    ``f_e = load_e / (total_tokens * top_k)`` and ``P_e = mean_t probs[t, e]`` over the ``T``.
    """
    tokens, experts = probs.shape
    if tokens == 0:
        return probs.sum() * 0.0
    f = load.to(probs.dtype) / ((total_tokens or tokens) * top_k)
    return experts * (f * probs.mean(dim=0)).sum()


def _local(w: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an expert weight (expert parallelism makes them DTensors)."""
    return w.to_local() if isinstance(w, DTensor) else w


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in value, ``factor * x`` in gradient."""
    if factor == 1:
        return x
    return x.detach() + factor * (x - x.detach())


class _AuxLossGradient(torch.autograd.Function):
    """Identity on the layer output whose backward also hands the balancing loss the gradient
    ``scale``, as if ``scale * aux_loss`` had been added to the loss."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor,  # type: ignore[override]
                scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def, override]
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing recomputes forwards
    there; they must not count the tokens twice). torch.utils.checkpoint asks the same way."""
    return torch._C._current_graph_task_id() != -1


class GroupedExperts(nn.Module):
    """``experts`` SwiGLU MLPs with stacked weights, computed with one grouped GEMM per weight.

    ``num_experts`` is the global count and ``expert_offset`` the first expert held here; the
    offset changes only when expert parallelism shards the stack (the weights then become
    DTensors and :attr:`local_experts` counts the experts held here).
    """

    def __init__(self, experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts = experts
        self.expert_offset = 0
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02), so a standalone module is usable; the model re-seeds it in init_weights."""
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=INIT_STD)

    @property
    def local_experts(self) -> int:
        return _local(self.w1).shape[0]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """SwiGLU of rows sorted by local expert: rows ``[offset_e, offset_e + count_e)`` of ``x``
        go through local expert ``e``. Under autocast both operands take the autocast dtype
        (grouped_mm is a custom op that autocast does not see). Called as a module (also by
        the expert-parallel dispatcher) so FSDP's hooks gather and reduce the expert weights."""
        w1, w2, w3 = _local(self.w1), _local(self.w2), _local(self.w3)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
        gate = grouped_mm(x, w1, tokens_per_expert, check=False)
        up = grouped_mm(x, w3, tokens_per_expert, check=False)
        return grouped_mm(F.silu(gate) * up, w2, tokens_per_expert, check=False)


class MoEFeedForward(nn.Module):
    """Router + routed experts + shared experts; a drop-in replacement for :class:`FeedForward`.

    ``shared_experts`` always-active experts of size ``moe_ffn_dim`` are one SwiGLU of hidden size
    ``shared_experts * moe_ffn_dim``, which computes the same function as their sum. Parameters:
    ``router.weight [E, dim]``, ``experts.w1/w3 [E, dim, hidden]``, ``experts.w2 [E, hidden,
    dim]``, ``shared_expert.w1/w2/w3``; buffers: ``expert_bias [E]`` (saved), ``expert_load [E]``
    (not saved). After each forward, ``aux_loss`` holds the unscaled load-balancing loss of that
    forward and ``aux_loss_coeff`` the weight the trainer should give it.

    ``dispatcher`` is None (all experts here) or set by
    ``orch.parallel.expert_parallel.apply_expert_parallel`` to move rows between ranks.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {cfg.score_func!r}")
        self.num_experts = cfg.experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.score_func: ScoreFunc = cfg.score_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.aux_loss_coeff = cfg.aux_loss_coeff
        self.router = nn.Linear(cfg.dim, cfg.experts, bias=False)
        self.experts = GroupedExperts(cfg.experts, cfg.dim, cfg.moe_ffn_dim)
        self.shared_expert = (
            FeedForward(cfg.dim, cfg.shared_experts * cfg.moe_ffn_dim)
            if cfg.shared_experts
            else None
        )
        self.reset_buffers()
        self.aux_loss: torch.Tensor | None = None
        self.aux_loss_count = 0
        """Training forwards' balancing losses (unweighted) and their count since the last
        :func:`take_aux_loss`, for the metrics (each micro-batch adds one)."""
        self.aux_grad_scale = 1.0
        """The layer gives its balancing loss the gradient ``aux_loss_coeff * aux_grad_scale``
        itself, through its output, in the same backward (set by :func:`inject_aux_gradients`:
        the weight of one forward's loss in the caller's; 0 turns the gradient off)."""
        self.dispatcher: Dispatcher | None = None
        self.sequence_group: dist.ProcessGroup | None = None
        """Context- and tensor-parallel ranks holding the other parts of this rank's sequences
        (set by :func:`set_sequence_group`): the loss sums their loads (as Megatron-Core
        does), so it sees whole sequences and equals the unsplit run's averaged over them."""
        self.sequence_dims = ""
        """The parallel dimensions :attr:`sequence_group` spans, for communication accounting."""
        self.partial_grad_ranks = 1
        """Ranks that route different tokens and *sum* the router's gradients (tensor-parallel
        ranks under sequence parallelism; set by ``orch.parallel.tensor_parallel``): the
        balancing loss keeps its value but passes ``1 / partial_grad_ranks`` of its gradient,
        so the sum is the unsplit run's gradient of the mean."""

    def reset_buffers(self) -> None:
        """Zero the balancing state: the router's expert biases, the load counts and the loss
        sum (on the default device: again on the CPU for a model built on the meta device)."""
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        self.register_buffer(
            "expert_load", torch.zeros(self.num_experts, dtype=torch.int64), persistent=False
        )
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        num_tokens = tokens.shape[0]
        scores = router_scores(self.router(tokens).float(), self.score_func)
        weights, indices = route(scores, self.top_k, self.expert_bias, self.norm_topk_prob)
        load = torch.bincount(indices.flatten(), minlength=self.num_experts)
        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        batch_load, batch_tokens = self._sequence_load(load, num_tokens)
        aux_loss = load_balancing_loss(probs, batch_load, self.top_k, batch_tokens)
        self.aux_loss = _scale_gradient(aux_loss, 1 / self.partial_grad_ranks)
        if self.training and not _in_backward():
            self.expert_load += load
            self.aux_loss_sum += aux_loss.detach()
            self.aux_loss_count += 1

        capacity = expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts)
        permuted, row_map, counts = moe_permute(
            tokens, indices, self.num_experts, capacity, check=False
        )
        if self.dispatcher is None:
            expert_out = self.experts(permuted, counts)
        else:
            expert_out = self.dispatcher(permuted, counts, self.experts)
        out = moe_unpermute(expert_out, row_map, weights, num_tokens, check=False)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        if self.aux_grad_scale and self.aux_loss_coeff and torch.is_grad_enabled():
            out = _AuxLossGradient.apply(out, self.aux_loss,
                                         self.aux_loss_coeff * self.aux_grad_scale)
        return out.view_as(x)

    def _sequence_load(self, load: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """``load`` and ``tokens`` summed over :attr:`sequence_group` (unchanged without one)."""
        if self.sequence_group is None:
            return load, tokens
        total = load.clone()
        with dimension(self.sequence_dims):
            dist.all_reduce(total, group=self.sequence_group)
        return total, tokens * dist.get_world_size(self.sequence_group)

    @torch.no_grad()
    def update_bias(self, rate: float, group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing step: ``expert_bias += rate * sign(mean_load - load)``, then
        reset the load. ``group``: the ranks that route *different* tokens through this layer
        (data, context and expert parallel ranks of the stage); their loads are summed first so
        every replica of the router keeps the same bias. Prefer :func:`update_expert_bias`,
        which does every layer with one all-reduce."""
        update_expert_bias([self], rate, group)


def moe_layers(model: nn.Module | Iterable[nn.Module]) -> list[MoEFeedForward]:
    """Every :class:`MoEFeedForward` in ``model`` (a module, or an iterable of modules)."""
    roots = [model] if isinstance(model, nn.Module) else list(model)
    return [m for root in roots for m in root.modules() if isinstance(m, MoEFeedForward)]


def set_sequence_group(model: nn.Module, group: dist.ProcessGroup, dims: str) -> None:
    """Make every MoE layer of ``model`` sum its balancing loads over ``group``: the ranks that
    hold other parts of the same sequences (context parallel, and tensor parallel under
    sequence parallelism), which span the parallel dimensions ``dims`` (e.g. ``"cp"``)."""
    for layer in moe_layers(model):
        layer.sequence_group, layer.sequence_dims = group, dims


def inject_aux_gradients(model: nn.Module | Iterable[nn.Module], scale: float) -> None:
    """Weight every MoE layer's balancing-loss gradient by ``aux_loss_coeff * scale`` (see
    :attr:`MoEFeedForward.aux_grad_scale`): ``scale`` is the weight one forward's loss has in
    the caller's (``1 / micro-batches`` when their mean is back-propagated, 0 for none)."""
    for layer in moe_layers(model):
        layer.aux_grad_scale = scale


def take_aux_loss(model: nn.Module | Iterable[nn.Module]) -> torch.Tensor | None:
    """``sum(aux_loss_coeff * mean aux_loss)`` over the MoE layers, the mean over the training
    forwards since the last call (the step's micro-batches), and a fresh start; None without MoE
    layers. The value the metrics report beside the language-model loss."""
    layers = [m for m in moe_layers(model) if m.aux_loss_count]
    if not layers:
        return None
    total = sum(m.aux_loss_coeff * m.aux_loss_sum / m.aux_loss_count for m in layers)
    for m in layers:
        m.aux_loss_sum.zero_()
        m.aux_loss_count = 0
    return torch.as_tensor(total)


@torch.no_grad()
def update_expert_bias(
    model: nn.Module | Iterable[nn.Module], rate: float, group: dist.ProcessGroup | None = None
) -> torch.Tensor | None:
    """Close one optimizer step of routing: sum every MoE layer's expert loads over ``group``
    (one all-reduce; None: a single process), move each bias by ``rate`` towards balance
    (:meth:`MoEFeedForward.update_bias`; ``rate`` 0 leaves the bias alone) and reset the loads.
    Returns the step's loads ``[moe layers, experts]`` (tokens routed to each expert over the
    group), or None without MoE layers. Call once per optimizer step."""
    layers = moe_layers(model)
    if not layers:
        return None
    loads = torch.stack([m.expert_load for m in layers]).float()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(loads, group=group)
    for m, load in zip(layers, loads, strict=True):
        if rate:
            m.expert_bias += rate * torch.sign(load.mean() - load)
        m.expert_load.zero_()
    return loads
