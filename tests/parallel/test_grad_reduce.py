"""``parallel.grad_reduce`` under gradient accumulation, as the trainer runs it
(``set_gradient_sync`` before each micro-batch): ``microbatch`` reduce-scatters every backward
(HSDP: the replicas' all-reduce only in the last), ``step`` reduces once per step; both end
with the gradients of one process over the whole batch (4 gloo ranks, one spawn)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gloo_harness import run_on_gloo
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from orch.launch.launcher import prepare
from orch.models.llama import Transformer
from orch.parallel.data_parallel import set_gradient_sync
from orch.runtime.parallelize import parallelize

pytestmark = pytest.mark.dist

MICRO = 3  # micro-batches per rank
LAYOUTS = {
    "fsdp4": ["parallel.dp_shard=4"],
    "hsdp2x2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
}
MODES = ("microbatch", "step")


def _between(model: torch.nn.Module) -> str:
    """What FSDP2 holds after a backward that was not the step's last: ``shards`` (sharded
    gradients: reduce-scattered), ``partial`` (HSDP's summed reduce-scatter outputs, waiting
    for the all-reduce) or ``whole`` (unsharded accumulators: nothing reduced)."""
    held = set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if group._partial_reduce_output is not None:
                    held.add("partial")
                for param in group.fsdp_params:
                    unsharded = getattr(param, "_unsharded_param", None)
                    if param.unsharded_accumulated_grad is not None or (
                            unsharded is not None and unsharded.grad is not None):
                        held.add("whole")  # (fp32: autograd's own .grad, unsharded)
                    if param.sharded_param.grad is not None:
                        held.add("shards")
    return "+".join(sorted(held))


def _accumulate(rank: int, world: int, results: dict, plans: dict) -> None:
    for (name, mode), (cfg, plan) in plans.items():
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        reference = Transformer(cfg.model)
        reference.load_state_dict(model.state_dict())
        par = parallelize(model, plan, cfg, torch.device("cpu"), cfg.train.precision)
        assert plan.microbatches == MICRO
        rows = cfg.train.micro_batch
        tokens = torch.randint(0, cfg.model.vocab_size, (world * MICRO * rows, cfg.train.seq_len))
        mine = tokens[rank * MICRO * rows:(rank + 1) * MICRO * rows]
        between = []
        for index in range(MICRO):
            last = index == MICRO - 1
            set_gradient_sync(par.model, last, mode)
            batch = mine[index * rows:(index + 1) * rows]
            loss = F.cross_entropy(par.model(batch).flatten(0, 1), batch.flatten())
            (loss / MICRO).backward()
            if not last:
                between.append(_between(par.model))
        # one process over the whole batch
        F.cross_entropy(reference(tokens).flatten(0, 1), tokens.flatten()).backward()
        worst = 0.0
        for (key, p), (ref_key, q) in zip(par.model.named_parameters(),
                                          reference.named_parameters(), strict=True):
            assert key == ref_key
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            worst = max(worst, ((grad - q.grad).abs().max() / q.grad.abs().max()).item())
        results[(rank, name, mode)] = (between, worst)


def test_each_mode_reduces_when_it_says_and_trains_the_single_process_gradients(tmp_path):
    plans = {}
    for name, sets in LAYOUTS.items():
        for mode in MODES:
            items = [*sets, f"parallel.grad_reduce={mode}", "train.precision=fp32",
                     "train.seq_len=32", "train.micro_batch=1", f"train.global_batch={4 * MICRO}",
                     f"run.dir={tmp_path / 'run'}"]
            _, cfg, plan = prepare(["--nproc-per-node", "4", "configs/tiny.yaml",
                                    *(arg for item in items for arg in ("--set", item))])
            assert plan.degrees.dp_replicate == (2 if name == "hsdp2x2" else 1)
            plans[(name, mode)] = (cfg, plan)
    results = run_on_gloo(_accumulate, 4, tmp_path, plans)
    # (FSDP's mesh is always (replicate, shard), of one replica here: FSDP2 sums the shards
    # as HSDP's, for an all-reduce over one rank)
    want = {("fsdp4", "microbatch"): "partial", ("hsdp2x2", "microbatch"): "partial",
            ("fsdp4", "step"): "whole", ("hsdp2x2", "step"): "whole"}
    for rank in range(4):
        for (name, mode), held in want.items():
            between, worst = results[(rank, name, mode)]
            assert between == [held] * (MICRO - 1), (rank, name, mode)
            assert worst < 1e-5, (rank, name, mode, worst)  # measured 8.6e-7
