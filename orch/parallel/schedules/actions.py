"""Pipeline actions and schedules as plain values.

A schedule is, per pipeline rank, the list of actions that rank runs in order. Keeping it as data
(no torch, no process group) lets one validator, one simulator and one executor serve every
schedule, and lets tests reason about schedules for pipelines nobody here can run.

Stages are global (virtual) stage indices: with ``stages`` ranks and ``virtual`` chunks per rank
there are ``stages * virtual`` of them. Where stage ``s`` lives is the schedule's placement:
``loop``, Megatron's interleaving, puts it on rank ``s % stages`` (rank 0 holds stages 0, P, 2P,
...); ``v``, the zero-bubble V shape, runs the chunks down the ranks and back up (rank 0 holds
stages 0 and 2P - 1, rank P - 1 stages P - 1 and P), so the first rank also computes the loss
and the turn between chunks is a hand-off inside one rank.

Communication actions name the stage that does them, as torch.distributed.pipelining does:
``SEND_F`` on stage s sends its output to stage s + 1, where ``RECV_F`` on stage s + 1 takes it;
``SEND_B`` on stage s sends the input gradient to stage s - 1, where ``RECV_B`` on s - 1 takes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COMPUTE = ("F", "B", "I", "W")
"""Forward, full backward, input-gradient backward (2BP's p1), weight-gradient backward (p2)."""
SENDS = ("SEND_F", "SEND_B")
RECVS = ("RECV_F", "RECV_B")
KINDS = COMPUTE + SENDS + RECVS

_PEER = {
    "SEND_F": ("RECV_F", 1),
    "RECV_F": ("SEND_F", -1),
    "SEND_B": ("RECV_B", -1),
    "RECV_B": ("SEND_B", 1),
}
PLACEMENTS = ("loop", "v")
_TEXT = re.compile(r"(\d+)(SEND_F|SEND_B|RECV_F|RECV_B|F|B|I|W)(\d+)")


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: ``kind`` applied to global ``stage`` for micro-batch ``microbatch``."""

    kind: str
    stage: int
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read the short form ``0F1`` (stage 0, forward, micro-batch 1) or ``1SEND_B0``."""
        match = _TEXT.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"cannot read action {text!r}; expected e.g. '0F1' or '1RECV_F0'")
        stage, kind, microbatch = match.groups()
        return cls(kind, int(stage), int(microbatch))

    @property
    def is_comm(self) -> bool:
        return self.kind in SENDS or self.kind in RECVS

    def peer(self) -> Action:
        """The communication action on the adjacent stage that this send or receive pairs with."""
        if not self.is_comm:
            raise ValueError(f"{self} is a compute action and has no peer")
        return Action(*self.peer_key())

    def peer_key(self) -> tuple[str, int, int]:
        """:meth:`peer` as ``(kind, stage, microbatch)``: what a walk over many actions compares
        (no Action made and hashed per step)."""
        kind, step = _PEER[self.kind]
        return kind, self.stage + step, self.microbatch

    def key(self) -> tuple[str, int, int]:
        """This action as ``(kind, stage, microbatch)``, comparable with :meth:`peer_key`."""
        return self.kind, self.stage, self.microbatch


def stage_rank(stage: int, stages: int, placement: str = "loop") -> int:
    """The pipeline rank of global ``stage`` among ``stages`` ranks under ``placement``."""
    chunk, position = divmod(stage, stages)
    if placement == "v" and chunk % 2:
        return stages - 1 - position
    return position


def rank_stages(rank: int, stages: int, virtual: int, placement: str = "loop") -> list[int]:
    """The global stages pipeline ``rank`` runs under ``placement``, in model order."""
    return [s for s in range(stages * virtual) if stage_rank(s, stages, placement) == rank]


@dataclass
class Schedule:
    """A whole pipeline step: ``ranks[r]`` is what pipeline rank r runs, in order.

    ``stages`` is the number of pipeline ranks P, ``virtual`` the model chunks per rank V,
    ``microbatches`` the micro-batches M of one step and ``placement`` where each stage lives
    (``loop`` or ``v``, see the module docstring).
    """

    name: str
    stages: int
    virtual: int
    microbatches: int
    ranks: list[list[Action]] = field(default_factory=list)
    placement: str = "loop"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; valid: "
                             f"{', '.join(PLACEMENTS)}")

    @property
    def num_stages(self) -> int:
        """Global (virtual) stages: P * V."""
        return self.stages * self.virtual

    def rank_of(self, stage: int) -> int:
        return stage_rank(stage, self.stages, self.placement)

    def stages_of(self, rank: int) -> list[int]:
        """The global stages ``rank`` runs, in model order."""
        return rank_stages(rank, self.stages, self.virtual, self.placement)

    def __str__(self) -> str:
        header = f"{self.name}: P={self.stages} V={self.virtual} M={self.microbatches}"
        if self.placement != "loop":
            header += f" placement={self.placement}"
        rows = [f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.ranks)]
        return "\n".join([header, *rows])

    @classmethod
    def parse(cls, name: str, microbatches: int, rows: list[str], virtual: int = 1,
              placement: str = "loop") -> Schedule:
        """Build a schedule from one whitespace-separated line of short-form actions per rank."""
        ranks = [[Action.parse(word) for word in row.split()] for row in rows]
        return cls(name, len(rows), virtual, microbatches, ranks, placement)
