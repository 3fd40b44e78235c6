"""Parallel degrees: how many ways each dimension splits the model and the batch.

Dense layers see the world as pp x dp_replicate x dp_shard x cp x tp. MoE layers fold the same
ranks of each pipeline stage into ep x etp x edp ("parallel folding"), so the expert layout may
differ from the dense one without moving any rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Degrees:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    etp: int = 1
    virtual_stages: int = 1
    sequence_parallel: bool = False
    """Effective sequence parallelism: only true when tp > 1 and the config asks for it."""

    @property
    def dp(self) -> int:
        """Data-parallel size: ranks that see different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def stage_ranks(self) -> int:
        """Ranks in one pipeline stage; the expert layout must fold into exactly these."""
        return self.dp * self.cp * self.tp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: replicas of each expert shard within a stage."""
        return self.stage_ranks // (self.ep * self.etp)

    @property
    def experts_folded(self) -> bool:
        """Whether an MoE model's experts get their own layout (``ep x etp > 1``, or ``tp > 1``,
        where they are replicated over the tensor-parallel ranks): the runtime then builds the
        expert mesh and shards each layer's experts over its ``edp`` ranks, whatever the dense
        layers do; else they are in the blocks' FSDP units, sharded like the dense weights."""
        return self.ep * self.etp > 1 or self.tp > 1

    @property
    def expert_shard(self) -> int:
        """Ranks an MoE layer's expert weights are sharded over (:attr:`experts_folded`)."""
        return self.edp if self.experts_folded else self.fsdp

    @property
    def fsdp(self) -> int:
        """Ranks a dense parameter is sharded over (FSDP shards over dp_shard x cp)."""
        return self.dp_shard * self.cp

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(dp=self.dp, edp=self.edp, world=self.world)
        return out

    def short(self, schedule: str | None = None) -> str:
        """A compact label such as ``pp2 hsdp4(2x2) tp8`` listing only degrees above 1, then
        the pipeline's ``schedule`` where one is given: ``pp2v2 fsdp2 (zbv schedule)`` (the
        degrees alone read a ZB-V run as any other pipeline of 2).

        fsdp: sharded data parallel; ddp: replicated; hsdp(replicas x shards): both, and
        replicas of context, expert, tensor or pipeline parallel ranks: the runtime wraps those
        in FSDP2 (over dp_shard x cp; one shard a replica), not DDP ("ddp2 ep2" named what did
        not run).
        """
        parts = []
        if self.pp > 1:
            parts.append(
                f"pp{self.pp}" + (f"v{self.virtual_stages}" if self.virtual_stages > 1 else "")
            )
        if self.dp > 1:
            if self.dp_replicate == 1:
                parts.append(f"fsdp{self.dp}")
            elif self.fsdp == 1 and self.ep * self.etp * self.tp == 1 and self.pp == 1:
                parts.append(f"ddp{self.dp}")
            else:
                parts.append(f"hsdp{self.dp}({self.dp_replicate}x{self.dp_shard})")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("+sp" if self.sequence_parallel else ""))
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp > 1:
            parts.append(f"etp{self.etp}")
        label = " ".join(parts) or "single"
        return f"{label} ({schedule} schedule)" if schedule and self.pp > 1 else label
