"""Rank layout: which global ranks form each parallel group.

Ranks are numbered in Megatron-Core's order ``tp-cp-ep-dp-pp``: tensor-parallel neighbours are
adjacent ranks (so they share a node), pipeline stages are the slowest-varying coordinate. Our
data-parallel coordinate is itself ``dp_shard`` (fast) then ``dp_replicate`` (slow), so FSDP
shard groups stay close and HSDP replicas span further. MoE layers use a second layout over the
same ranks, ``etp-ep-edp-pp`` (Megatron's expert generator), which is parallel folding.

Groups are computed arithmetically, never by enumerating meshes, so a layout for 4,096 ranks is
cheap and ``first_group`` (one group per dimension) is cheaper still for the search.
"""

from __future__ import annotations

from functools import lru_cache
from math import prod

from orch.plan.degrees import Degrees

DENSE_ALIASES = {"dp": ("dp_shard", "dp_replicate")}


class RankLayout:
    """Orthogonal groups over named dimensions; the first dimension varies fastest."""

    def __init__(
        self, dims: list[tuple[str, int]], aliases: dict[str, tuple[str, ...]] | None = None
    ):
        self.names = [name for name, _ in dims]
        self.sizes = [size for _, size in dims]
        self.strides = [prod(self.sizes[:i]) for i in range(len(self.sizes))]
        self.world = prod(self.sizes)
        self.aliases = aliases or {}
        self._key = (tuple(self.names),
                     tuple((alias, tuple(parts)) for alias, parts in self.aliases.items()))

    def _mask(self, dims: str) -> tuple[bool, ...]:
        names, aliases = self._key
        return _dims_mask(names, dims, aliases)

    def _offsets(self, mask: tuple[bool, ...], inside: bool) -> list[int]:
        """Rank offsets spanned by the masked (inside=True) or unmasked dims, first dim fastest."""
        return span([
            (s, st) for s, st, m in zip(self.sizes, self.strides, mask, strict=True) if m == inside
        ])

    def groups(self, dims: str) -> list[list[int]]:
        """Every group of ``dims`` (e.g. ``"tp"``, ``"tp-dp"``), ordered as Megatron orders them."""
        mask = self._mask(dims)
        members = self._offsets(mask, True)
        return [[base + m for m in members] for base in self._offsets(mask, False)]

    def first_group(self, dims: str) -> list[int]:
        """The group holding rank 0; all groups of a dimension are translates of it."""
        return self._offsets(self._mask(dims), True)

    def shape(self, dims: str) -> tuple[tuple[int, int], ...]:
        """``(size, stride)`` of each dimension of ``dims`` above size one, fastest first: the
        :meth:`first_group` they span (:func:`span`), and with it every group of ``dims`` (the
        translates of a group holding rank 0 tile the ranks one way only), without listing
        thousands of ranks."""
        return tuple((size, stride) for size, stride, m in
                     zip(self.sizes, self.strides, self._mask(dims), strict=True)
                     if m and size > 1)

    def coords(self, rank: int) -> dict[str, int]:
        return {
            n: rank // st % s for n, s, st in zip(self.names, self.sizes, self.strides, strict=True)
        }


@lru_cache(maxsize=256)
def _dims_mask(names: tuple[str, ...], dims: str,
               aliases: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[bool, ...]:
    """Which of ``names`` the dimensions ``dims`` (``"tp-dp"``, aliases expanded) span: the
    same few questions for every layout of every candidate the search makes."""
    expand, wanted = dict(aliases), set()
    for part in dims.split("-"):
        for name in expand.get(part, (part,)):
            if name not in names:
                raise KeyError(f"unknown dimension '{name}' (have {list(names)})")
            wanted.add(name)
    return tuple(name in wanted for name in names)


def span(shape: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> list[int]:
    """Rank offsets of dimensions of ``(size, stride)``, the first varying fastest."""
    offsets = [0]
    for size, stride in shape:
        offsets = [o + i * stride for i in range(size) for o in offsets]
    return offsets


def dense_layout(deg: Degrees) -> RankLayout:
    return RankLayout(
        [
            ("tp", deg.tp),
            ("cp", deg.cp),
            ("dp_shard", deg.dp_shard),
            ("dp_replicate", deg.dp_replicate),
            ("pp", deg.pp),
        ],
        DENSE_ALIASES,
    )


def expert_layout(deg: Degrees) -> RankLayout:
    return RankLayout([("etp", deg.etp), ("ep", deg.ep), ("edp", deg.edp), ("pp", deg.pp)])


GROUP_DIMS = {
    "tp": "dense",
    "cp": "dense",
    "dp": "dense",
    "pp": "dense",
    "dp_shard": "dense",
    "dp_replicate": "dense",
    "dp_shard-cp": "dense",
    "ep": "expert",
    "etp": "expert",
    "edp": "expert",
}
"""Every group the plan publishes, and which layout it comes from. ``dp_shard-cp`` is FSDP's."""


def plan_groups(deg: Degrees) -> dict[str, list[list[int]]]:
    """All rank groups of a plan: the dense view and the folded expert view."""
    layouts = {"dense": dense_layout(deg), "expert": expert_layout(deg)}
    return {dim: layouts[view].groups(dim) for dim, view in GROUP_DIMS.items()}


def dim_groups(deg: Degrees, dim: str) -> list[list[int]]:
    """Every group of one published dimension (``plan_groups`` makes all of them, which the
    search, asking for one or two per candidate on thousands of ranks, need not pay for)."""
    layout = dense_layout(deg) if GROUP_DIMS[dim] == "dense" else expert_layout(deg)
    return layout.groups(dim)


def first_groups(deg: Degrees) -> dict[str, list[int]]:
    """The group containing rank 0 for every published dimension (cheap, for the search)."""
    layouts = {"dense": dense_layout(deg), "expert": expert_layout(deg)}
    return {dim: layouts[view].first_group(dim) for dim, view in GROUP_DIMS.items()}


def group_shapes(deg: Degrees) -> dict[str, tuple[tuple[int, int], ...]]:
    """:meth:`RankLayout.shape` of every published dimension: what fixes its groups, for the
    search to know a group it has seen before (at 4,096 ranks a dimension's first group lists
    up to 4,096 ranks; its shape, a pair or two)."""
    layouts = {"dense": dense_layout(deg), "expert": expert_layout(deg)}
    return {dim: layouts[view].shape(dim) for dim, view in GROUP_DIMS.items()}


def rank_coordinates(deg: Degrees) -> list[dict[str, int]]:
    """Per rank, its coordinate in every dense and expert dimension."""
    dense, expert = dense_layout(deg), expert_layout(deg)
    out = []
    for rank in range(deg.world):
        c = dense.coords(rank)
        c.update({k: v for k, v in expert.coords(rank).items() if k != "pp"})
        c["dp"] = c["dp_shard"] + c["dp_replicate"] * deg.dp_shard
        out.append(c)
    return out


__all__ = [
    "RankLayout",
    "dense_layout",
    "dim_groups",
    "expert_layout",
    "first_groups",
    "group_shapes",
    "plan_groups",
    "rank_coordinates",
    "span",
]
