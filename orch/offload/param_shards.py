"""Parameters partitioned over offloaded replicas (``offload.shard_params``, as ZeRO-3 does).

ZeRO-Offload's partition (:mod:`orch.offload.partition`) splits the optimizer states and the CPU
step between the replicas by unit, but every replica still keeps every parameter at home. With
``shard_params`` a replica keeps only the parameters of the units it owns (the ones it steps);
the others rest as placeholders, and whenever a replica needs a unit it does not own (its
forward and its backward, every micro-batch) the owner broadcasts it, as ZeRO-3 all-gathers a
layer before use. Per replica, CPU memory then holds about ``1 / replicas`` of the parameters and
a window of units on their way; the traffic is one unit's bytes per use, between the replicas'
host memories (a gloo group, whatever the device's backend, as the gradients' sums). With NVMe
homes only the owner reads a unit from the disk (:attr:`Homes.elsewhere
<orch.offload.homes.Homes.elsewhere>`), which divides the replicas' reads between them. The
gradients of a unit a replica does not own leave its memory too once their sum has left for the
owner (:attr:`GradientHomes.free_summed <orch.offload.grad_homes.GradientHomes.free_summed>`).

Collectives must start in the same order on every replica, but which units a replica fetches
ahead of use depends on its device budget, and that differs between replicas: a replica whose
micro-batches missed an expert releases that unit later, kept activations follow timings. So the
broadcasts do not follow the fetches; they follow the model: a unit's forward asks for itself and
the next ``depth - 1`` units, a unit's backward for the ``depth`` units before it, each unit once
per pass (a forward, or a backward), and a fetch only takes what was asked for. A pass's leftovers
(asked for, never fetched: the backward of a frozen embedding) are waited for and dropped when the
next pass starts. The broadcasts run one after another on a thread of their own, in the order
they were asked for, so the training thread does not wait for them (nor for the owner's read of
a unit from NVMe, nor for its update of the unit, which the owner waits for before packing).

Checkpoints stay ordinary: each replica saves and loads the units it owns, and leaves the
others to their owners (:mod:`orch.offload.checkpoint_homes`); no unit moves between replicas
for it. :meth:`SharedParams.all_in_memory` gathers every unit on every replica, to read a whole
model's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from orch.offload.grad_homes import packed_views
from orch.offload.nvme import placeholder
from orch.offload.partition import Partition
from orch.offload.threads import helper_pool
from orch.parallel.comm_stats import dimension


class SharedParams:
    """Each unit's parameters at home on its owner only, sent to the other replicas per use."""

    def __init__(self, units: list[list[nn.Parameter]], partition: Partition,
                 host_empty: Callable[[int], torch.Tensor], stepped: Callable[[int], None],
                 read_home: Callable[[int], AbstractContextManager[list[torch.Tensor]]]
                 ) -> None:
        """``host_empty(nbytes)``: CPU memory for a unit on its way (pinned on CUDA);
        ``stepped(index)``: blocks until unit ``index``'s pending update has stepped it;
        ``read_home(index)``: the owner's unit ``index`` as it rests (CPU memory or NVMe)."""
        self.units, self.partition = units, partition
        self._host_empty, self._stepped, self._read_home = host_empty, stepped, read_home
        self._sender = helper_pool("orch-shared-params")
        """Runs the broadcasts in the order they were asked for."""
        self._group = dist.new_group(dist.get_process_group_ranks(partition.group),
                                     backend="gloo")
        """The broadcasts' own group: they never interleave with the gradients' sums."""
        self._asked: dict[int, Future[torch.Tensor]] = {}
        """Units asked for in this pass and not yet fetched: the broadcast's packed unit."""
        self._passed: set[int] = set()
        """Units asked for in this pass (fetched or not)."""
        self.bytes_received = 0
        for index in range(len(units)):
            if not partition.owns(index):
                self._drop(index)

    def start_pass(self) -> None:
        """A forward or a backward begins: forget the last pass's requests (leftovers are
        waited for, since every replica started them, and dropped)."""
        for sent in self._asked.values():
            sent.result()
        self._asked.clear()
        self._passed.clear()

    def ask(self, indices: range) -> None:
        """Start the broadcasts of the units ``indices`` (in that order) not yet asked for in
        this pass; every replica calls it at the same points of the model's run."""
        for index in indices:
            if not 0 <= index < len(self.units) or index in self._passed:
                continue
            self._passed.add(index)
            if self.units[index]:
                self._asked[index] = self._sender.submit(self._send, index)

    def asked(self, index: int) -> bool:
        """Unit ``index`` was asked for in this pass and not fetched yet."""
        return index in self._asked

    def take(self, index: int) -> list[torch.Tensor]:
        """Unit ``index``'s parameters as its owner has them (asked for first if this pass has
        not; views of a buffer the caller drops once copied)."""
        self.ask(range(index, index + 1))
        if index not in self._asked:
            raise RuntimeError(f"unit {index} fetched twice in one pass: its parameters were "
                               "sent once")
        packed = self._asked.pop(index).result()
        if not self.partition.owns(index):
            self.bytes_received += packed.numel() * packed.element_size()
        return packed_views(packed, self.units[index])

    def _send(self, index: int) -> torch.Tensor:
        """(The sender thread.) Unit ``index`` packed: from the owner's home once its update
        has stepped it, broadcast into the same buffer on the others."""
        params = self.units[index]
        nbytes = sum(p.numel() for p in params) * params[0].element_size()
        packed = self._host_empty(nbytes).view(params[0].dtype)
        if self.partition.owns(index):
            self._stepped(index)
            with self._read_home(index) as homes:
                for part, home in zip(packed_views(packed, params), homes, strict=True):
                    part.copy_(home)
        with dimension("dp"):  # a group of its own, no mesh's
            dist.broadcast(packed, src=self.partition.owners[index], group=self._group)
        return packed

    def close(self) -> None:
        """Wait for the broadcasts asked for and never fetched, and stop the sender."""
        self.start_pass()
        self._sender.shutdown()

    @contextmanager
    def all_in_memory(self) -> Iterator[None]:
        """Every unit's parameters in place on every replica for the block (to read a whole
        model's weights), the units this replica does not own dropped again after."""
        for index, params in enumerate(self.units):
            if not self.partition.owns(index):
                for p in params:
                    p.data = torch.empty(p.shape, dtype=p.dtype)
            self.partition.share(index)
        try:
            yield
        finally:
            for index in range(len(self.units)):
                if not self.partition.owns(index):
                    self._drop(index)

    def _drop(self, index: int) -> None:
        for p in self.units[index]:
            p.data = placeholder(p.data)


__all__ = ["SharedParams"]
