"""Communication accounting: bytes this rank hands to collectives, per parallel dimension.

The runtime's traffic comes from three places, and each is counted where it enters
torch.distributed, while a :class:`CommLedger` is active:

- c10d calls made from Python (FSDP2's all-gather and reduce-scatter, expert dispatch and
  Ulysses all-to-alls, ring attention's batched send/recv, pipeline stages' sends, loss and
  load all-reduces): the ``torch.distributed`` functions (and the pipelining runtime's batch
  of sends) are wrapped for the duration;
- DTensor redistributions (tensor parallelism, loss parallelism, norms of sharded gradients),
  which use the functional collectives (``torch.distributed._functional_collectives``);
- DDP's bucketed all-reduce, through torch's Python default hook (:meth:`CommLedger.attach_ddp`).

A collective counts the bytes of the tensor this rank contributes (an all-reduce's or a reduce's
buffer, an all-gather's or reduce-scatter's input, the rows an all-to-all sends, the tensors sent
point to point, a broadcast's tensor on its source only), not the wire traffic of the algorithm
(a ring all-reduce moves about twice that).

When: the collectives issued while :meth:`CommLedger.tracking` a step, by the training thread
(and autograd's), and those of orch's helper threads (named ``orch-...``,
:mod:`orch.offload.threads`) whenever the ledger is :meth:`~CommLedger.installed`, between two
steps' windows too. Offloaded replicas' owners broadcast each unit they stepped from the CPU
optimizer's thread beside the next step's forward, often before that step's window opens:
counted only inside windows, those bytes were lost or not by the timing. The helpers' bytes wait
apart until :meth:`~CommLedger.count_helpers` adds them to the step's: the trainer calls it once
the previous update has finished, before it starts the step's own, so a step's record holds
exactly the previous step's update's broadcasts (and the shared parameters' broadcasts of its own
forward and backward); the last step's update, which runs after the last record, is in none,
and neither are an evaluation's broadcasts (:meth:`~CommLedger.helpers_left_out`).

Which dimension: orch's own collectives say it (:func:`dimension`: expert dispatch is ``ep``,
its gather ``etp``, ring and Ulysses attention ``cp``), since torch hands one process group to
every mesh dimension that spans the same ranks (with 2 ranks, dp, cp and ep are all the world
group). Other collectives are named after their group's mesh dimension: c10d calls (FSDP, DDP)
prefer data-parallel names, functional ones (DTensor: tensor, sequence and loss parallelism)
the others, so with tp=2 on 2 ranks the experts' FSDP traffic is ``dp`` and the TP traffic on
the same group ``tp``. Every data-parallel group (replicate, shard, shard x cp, the experts'
edp, the MoE token group) counts as ``dp``, and unnamed groups as ``other``. Groups of one rank
are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.nn.parallel import DistributedDataParallel

from orch.offload.threads import PREFIX as HELPER_PREFIX

DIMENSION_OF = {"dp_replicate": "dp", "dp_shard": "dp", "dp_shard_cp": "dp", "dp_cp": "dp",
                "dp_cp_tp": "dp", "edp": "dp", "edp_ep_etp": "dp"}
"""Mesh dimension -> reported dimension (others report under their own name): the flattened
meshes over which gradient norms are summed (``dp_cp_tp``, the experts' ``edp_ep_etp``) count
as dp, with the other reductions of gradients."""
_LABEL: ContextVar[str | None] = ContextVar("orch_comm_dimension", default=None)


@contextlib.contextmanager
def dimension(name: str) -> Iterator[None]:
    """Count the collectives issued inside the block under ``name``, whatever their group."""
    token = _LABEL.set(name)
    try:
        yield
    finally:
        _LABEL.reset(token)

# entry point -> the parameter holding the tensor this rank contributes
_C10D = {"all_reduce": "tensor", "all_gather_single": "input_tensor",
         "all_gather_into_tensor": "input_tensor", "reduce_scatter_single": "input",
         "reduce_scatter_tensor": "input", "all_to_all_single": "input", "all_gather": "tensor",
         "batch_isend_irecv": "p2p_op_list", "reduce": "tensor", "broadcast": "tensor"}
_FROM_ONE = {"broadcast": ("src", "group_src")}
"""Entry points where one rank contributes (its global and its group rank's parameters): the
others receive."""
_FUNCOL = {name: "self" for name in ("all_reduce", "all_gather_single", "reduce_scatter_single",
                                     "all_gather_tensor", "reduce_scatter_tensor",
                                     "all_to_all_single")}


def _nbytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


class CommLedger:
    """Sums bytes per dimension while :meth:`tracking`; :meth:`take` returns and resets them.

    ``meshes`` are the run's device meshes (the dense one and the expert one); every named
    dimension of each, and their flattened children, name their process groups.
    """

    def __init__(self, meshes: list[DeviceMesh]) -> None:
        dims = [(mesh, dim) for mesh in meshes for dim in _dimension_names(mesh)]
        self.names = _group_names(dims, data_first=True)
        """group name -> dimension, for c10d calls (data parallelism wins a shared group)."""
        self.functional_names = _group_names(dims, data_first=False)
        """group name -> dimension, for functional collectives (the other dimensions win)."""
        self.bytes: dict[str, int] = defaultdict(int)
        self._helpers: dict[str, int] = defaultdict(int)
        """The helper threads' bytes not yet counted in a step (:meth:`count_helpers`)."""
        self._active = False
        self._installs = 0
        self._lock = threading.Lock()
        """Helper threads count beside the training thread (and its autograd threads)."""

    def add(self, group: Any, nbytes: int, functional: bool = False) -> None:
        """Count ``nbytes`` on ``group`` (a ProcessGroup, None for the world, or anything the
        functional collectives accept, then ``functional``), if this ledger counts the calling
        thread now (see the module) and the group is real."""
        if not self._counting() or not nbytes:
            return
        pg = _process_group(group)
        if dist.get_world_size(pg) > 1:
            names = self.functional_names if functional else self.names
            to = self._helpers if _on_helper() else self.bytes
            with self._lock:
                to[_LABEL.get() or names.get(pg.group_name, "other")] += nbytes

    def _counting(self) -> bool:
        """Inside a step's window every thread; while installed, orch's helpers always."""
        return self._active or (self._installs > 0 and _on_helper())

    def count_helpers(self) -> None:
        """Count the helper threads' bytes since the last call in the current step."""
        with self._lock:
            for name, nbytes in self._helpers.items():
                self.bytes[name] += nbytes
            self._helpers.clear()

    @contextlib.contextmanager
    def helpers_left_out(self) -> Iterator[None]:
        """Leave the helper threads' collectives inside the block out of every step (an
        evaluation's shared-parameter broadcasts, which no training step sent); what they had
        counted before it stays for :meth:`count_helpers`. Helpers still running work of
        before the block (an optimizer update) must have finished when it starts."""
        with self._lock:
            kept = dict(self._helpers)
        try:
            yield
        finally:
            with self._lock:
                self._helpers = defaultdict(int, kept)

    def take(self) -> dict[str, int]:
        """The bytes counted since the last call, by dimension, and a fresh start."""
        with self._lock:
            out = dict(sorted(self.bytes.items()))
            self.bytes.clear()
        return out

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Count the collectives issued inside the block (a step), whatever thread issues them
        (installing the ledger for the block, where it is not already)."""
        with self.installed():
            self._active = True
            try:
                yield
            finally:
                self._active = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap torch.distributed's Python entry points for the block (re-entrant), so that
        orch's helper threads are counted between the :meth:`tracking` windows in it too: the
        trainer installs it around its loop of steps."""
        patches = self._patches() if self._installs == 0 else []
        for module, name, _, wrapper in patches:
            setattr(module, name, wrapper)
        self._installs += 1
        try:
            yield
        finally:
            self._installs -= 1
            for module, name, original, _ in patches:
                setattr(module, name, original)

    def _patches(self) -> list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]]:
        """(module, name, original, counting wrapper) for each entry point counted."""
        patches = [(module, name, getattr(module, name),
                    self._counted(getattr(module, name), name, arg, module is funcol))
                   for module, table in ((dist, _C10D), (funcol, _FUNCOL))
                   for name, arg in table.items()]
        # only where a pipeline loaded torch's pipelining (importing it costs runs without one
        # half a second, orch.runtime.parallelize)
        if (schedules := sys.modules.get("torch.distributed.pipelining.schedules")) is not None:
            patches.append((schedules, "_batch_p2p", schedules._batch_p2p,
                            self._counted_pipeline_sends(schedules._batch_p2p)))
        return patches

    def attach_ddp(self, ddp: DistributedDataParallel, group: dist.ProcessGroup) -> None:
        """Make DDP's bucket all-reduces visible: its C++ reducer calls c10d directly, but with
        torch's Python default hook registered it all-reduces through ``dist.all_reduce``."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(group, allreduce_hook)

    def _counted(
        self, fn: Callable[..., Any], name: str, tensor_arg: str, functional: bool
    ) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._counting():
                bound = signature.bind_partial(*args, **kwargs).arguments
                if tensor_arg == "p2p_op_list":  # count what this rank sends
                    for op in bound[tensor_arg]:
                        if getattr(op.op, "__name__", "") == "isend":
                            self.add(op.group, _nbytes(op.tensor))
                elif name not in _FROM_ONE or _is_source(bound, *_FROM_ONE[name]):
                    self.add(bound.get("group"), _nbytes(bound[tensor_arg]), functional)
            return fn(*args, **kwargs)

        return counted

    def _counted_pipeline_sends(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """torch's pipelining runtime issues a batch of sends alone with ``dist.isend`` per op
        (``schedules._batch_p2p``), not through ``batch_isend_irecv``: count those batches
        here (mixed batches still go through ``batch_isend_irecv``, counted there). Patching
        ``dist.isend`` itself would not do: a ``P2POp`` made with the patched function fails
        ``batch_isend_irecv``'s ``op is isend`` test."""

        @functools.wraps(fn)
        def counted(p2p_ops: list[dist.P2POp], *args: Any, **kwargs: Any) -> Any:
            if self._active and p2p_ops and all(op.op is dist.isend for op in p2p_ops):
                for op in p2p_ops:
                    self.add(op.group, _nbytes(op.tensor))
            return fn(p2p_ops, *args, **kwargs)

        return counted


def _group_names(dims: list[tuple[DeviceMesh, str]], data_first: bool) -> dict[str, str]:
    """Process group name -> reported dimension; when dimensions share a group, data-parallel
    names win if ``data_first``, else the others do."""
    names: dict[str, str] = {}
    for mesh, dim in sorted(dims, key=lambda item: (item[1] in DIMENSION_OF) != data_first):
        group = mesh[dim].get_group()
        if dist.get_world_size(group) > 1:
            names.setdefault(group.group_name, DIMENSION_OF.get(dim, dim))
    return names


def _dimension_names(mesh: DeviceMesh) -> list[str]:
    """A mesh's own dimension names and those of the meshes flattened from it."""
    names = list(mesh.mesh_dim_names or ())
    flattened: Mapping[str, Any] = getattr(mesh._get_root_mesh(), "_flatten_mapping", {})
    return names + [name for name in flattened if name not in names]


def _on_helper() -> bool:
    """Whether the calling thread is one of orch's helpers (:mod:`orch.offload.threads`)."""
    return threading.current_thread().name.startswith(HELPER_PREFIX)


def _is_source(bound: Mapping[str, Any], src: str, group_src: str) -> bool:
    """Whether this rank is the one a collective's ``bound`` arguments name as its source
    (``src``, a global rank, or ``group_src``, a rank in ``group``)."""
    if bound.get(src) is not None:
        return bound[src] == dist.get_rank()
    return bound.get(group_src) == dist.get_rank(_process_group(bound.get("group")))


def _process_group(group: Any) -> dist.ProcessGroup:
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    # a (mesh, dim) pair, a group name, ...: what the functional collectives accept
    return _resolve_process_group(funcol._resolve_group_name(group))


__all__ = ["CommLedger", "dimension"]
