"""Bytes a forward pass leaves alive for its backward, measured.

Every tensor an op makes during the forward is watched through a weak reference to its storage;
what is still alive once the forward has returned and its output is dropped (parameters, buffers
and the loss aside) is what the backward will read. It counts whatever keeps the tensors:
autograd's saved tensors, a checkpoint's inputs, selective recompute's cache of op outputs, and
the local shards of tensor-parallel DTensors, so one measure serves every ``train.recompute``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


def _plain(values: Iterable[object]) -> Iterator[torch.Tensor]:
    """The plain tensors holding ``values``' data (a DTensor's local shard, and so on)."""
    for value in values:
        if not isinstance(value, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(value):
            names, _ = value.__tensor_flatten__()
            yield from _plain(getattr(value, name) for name in names)
        else:
            yield value


class _Watch(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in _plain(tree_leaves(out)):
            storage = tensor.untyped_storage()
            seen = self.storages.get(storage.data_ptr())
            if seen is None or seen[0].expired():  # a freed storage's address is reused
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out


def live_forward_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors ``forward()`` (which returns the loss) made and left alive."""
    kept = {t.untyped_storage().data_ptr()
            for t in _plain([*model.parameters(), *model.buffers()])}
    watch = _Watch()
    with watch:
        loss = forward()
    kept.add(loss.untyped_storage().data_ptr())
    return sum(size for address, (ref, size) in watch.storages.items()
               if not ref.expired() and address not in kept)


class _Peak(_Watch):
    """:class:`_Watch` that also keeps the most bytes its tensors held alive at once, but those
    of storages that existed before (an in-place op's output is its input)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.peak = existing, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = super().__torch_dispatch__(func, types, args, kwargs)
        alive = sum(size for address, (ref, size) in self.storages.items()
                    if not ref.expired() and address not in self.existing)
        self.peak = max(self.peak, alive)
        return out


def peak_new_bytes(run: Callable[[], object], existing: Iterable[torch.Tensor]) -> int:
    """The most bytes of tensors ``run()`` made that were alive at once, beside ``existing``
    (what it needs on top of the tensors it updates in place)."""
    watch = _Peak({t.untyped_storage().data_ptr() for t in _plain(existing)})
    with watch:
        run()
    return watch.peak
