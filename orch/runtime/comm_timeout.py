"""``run.comm_timeout_s``: how long a collective waits for the other ranks before the run stops.

torch's default (30 minutes on gloo, 10 on NCCL) is what a rank waits when a peer vanishes
without a connection reset (a network partition, a power loss): a lost node hung the others
for half an hour before the launcher heard of it. Subgroups (FSDP's, a pipeline's, the expert
mesh's) take torch's default whatever the world group was given, so every group this rank is
in is set. Set after the first step, whose compiles and first loads may keep ranks apart for
longer than a step's collectives ever should (as torchtitan separates its init and train
timeouts).
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def set_comm_timeout(seconds: float) -> int:
    """Every process group of this rank waits at most ``seconds`` from now on (0: unchanged);
    returns how many groups were set."""
    if not seconds or not dist.is_initialized():
        return 0
    timeout = timedelta(seconds=seconds)
    groups = [group for group in c10d._world.pg_map if not c10d._rank_not_in_group(group)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


__all__ = ["set_comm_timeout"]
