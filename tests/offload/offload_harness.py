"""Trains the tiny Llama a few steps, plainly or through the offload engine, for the offload
tests (importable from tests/offload only)."""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

from orch.config import load_config
from orch.models.llama import Transformer
from orch.offload.budget import DeviceBudget
from orch.offload.engine import OffloadEngine, buffers_to, transformer_units
from orch.offload.nvme import NvmeTier
from orch.parallel.recompute import apply_recompute
from orch.runtime.optim import build_optimizer

BUDGET = 7 * 10**6
STEPS, MICRO = 3, 2


def tiny_cfg(*extra: str):
    return load_config("configs/tiny.yaml", ["train.seq_len=32", "train.steps=3",
                                             "train.warmup_steps=1", *extra])


def train(offload: bool, recompute: str = "none", depth: int = 2, budget: int = BUDGET,
           activations: str = "device", optimizer: str = "adamw", nvme: NvmeTier | None = None,
           on_nvme: tuple[str, ...] = (), cpu_adam: str = "", device: str = "cpu",
           transfers: object = None, param_dtype: torch.dtype | None = None,
           evaluate: bool = False):
    """``param_dtype``: the engine's device copies in it; the plain run then computes on a copy
    of the model whose parameters are cast to it, its gradients summed in float32 into the
    model's (FSDP's mixed precision, the engine's reference). ``evaluate``: after each step
    (where the trainer evaluates) the loss of two held-out micro-batches, forwards alone under
    ``torch.no_grad`` (in the engine's :meth:`~OffloadEngine.forward_passes`), into
    ``Run.evals``; the engine's state around them into ``Run.around_evals``."""
    cpu = ["offload.optimizer=cpu", f"offload.cpu_adam={cpu_adam}"] if cpu_adam else []
    cfg = tiny_cfg(f"train.recompute={recompute}", f"optimizer.name={optimizer}", *cpu)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    apply_recompute(model, recompute)
    engine = None
    if offload:
        buffers_to(model, torch.device(device))
        engine = OffloadEngine(transformer_units(model), torch.device(device),
                               DeviceBudget(budget), depth, activations=activations, nvme=nvme,
                               params_on_nvme="params" in on_nvme,
                               optimizer_on_nvme="optimizer" in on_nvme,
                               grads_on_nvme="grads" in on_nvme, param_dtype=param_dtype)
        if transfers is not None:  # a stand-in for the engine's HostTransfers
            engine.transfers = transfers
            if engine.swap is not None:
                engine.swap.transfers = transfers
    else:
        model.to(device)
    compute = model if engine or param_dtype is None else copy.deepcopy(model)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    held_out = torch.randint(0, cfg.model.vocab_size, (MICRO, 2, 33),
                             generator=torch.Generator().manual_seed(2)).to(device)
    losses, norms, peaks, records, evals, around = [], [], [], [], [], []
    for _ in range(STEPS):
        if engine:
            engine.start_step()
        total = 0.0
        for micro in range(MICRO):
            if engine:
                engine.start_micro_batch(last=micro == MICRO - 1)
            tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=gen).to(device)
            if compute is not model:
                for p, c in zip(model.parameters(), compute.parameters(), strict=True):
                    c.data = p.data.to(param_dtype)
            logits = compute(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) / MICRO
            loss.backward()
            if engine:
                engine.finish_backward()
            if compute is not model:
                for p, c in zip(model.parameters(), compute.parameters(), strict=True):
                    p.grad = c.grad.float() if p.grad is None else p.grad.add_(c.grad)
                    c.grad = None
            total += loss.item()
        if engine:
            engine.finish_step()
            peaks.append(engine.budget.peak)
        if engine and engine.grads_on_nvme:  # no gradients in memory: the deferred norm
            norms.append(engine.clip(list(model.parameters()), 0.5))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        if engine:
            engine.step(opt)  # beside the next forward
            records.append(engine.step_record())  # where the trainer takes it: after the step
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(total)
        if evaluate:
            before = engine_state(engine)
            with torch.no_grad(), engine.forward_passes() if engine else contextlib.nullcontext():
                evals.append(sum(F.cross_entropy(compute(tokens[:, :-1]).flatten(0, 1),
                                                 tokens[:, 1:].flatten()).item()
                                 for tokens in held_out) / MICRO)
            around.append((before, engine_state(engine)))
    with engine.resident(opt) if engine else contextlib.nullcontext():
        params = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    return Run(losses, norms, params, peaks, engine, records, opt, model, evals, around)


def engine_state(engine: OffloadEngine | None) -> dict | None:
    """What training reads of the engine between steps: its step record (with every figure of
    the step), what it holds on the device, and its per-step bookkeeping."""
    if engine is None:
        return None
    return {"record": engine.step_record(), "used": engine.budget.used,
            "fetched": [unit.index for unit in engine.units if unit.fetched],
            "in_backward": engine.in_backward, "kept": dict(engine._kept),
            "fresh": len(engine._fresh), "io_marks": engine._io_marks,
            "measuring": engine.auto.measuring if engine.auto else None,
            "measured": dict(engine.swap.measured) if engine.swap else None}


class Run(NamedTuple):
    losses: list[float]
    norms: list[float]
    params: dict[str, torch.Tensor]
    peaks: list[int]
    engine: OffloadEngine | None
    records: list[dict]
    optimizer: torch.optim.Optimizer
    model: torch.nn.Module
    evals: list[float]
    around_evals: list[tuple[dict | None, dict | None]]
