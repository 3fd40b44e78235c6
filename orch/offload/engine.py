"""Parameters and gradients that live off the device, fetched a layer at a time.

The model is cut into units in execution order: the embedding, each decoder block, and the head
(final norm and output projection). Between uses every parameter's data is its *home* tensor in
CPU memory, so checkpoints, the gradient clip and the optimizer see ordinary CPU parameters (the
optimizer step runs on the CPU, on the home copies). Around a unit's use the engine swaps in a
device copy:

- forward: a pre-hook on the unit's first module fetches it and the next ``prefetch_depth - 1``
  units; a post-hook on its last module releases it (the head stays: backward starts with it);
- backward: the unit's output passes through an identity autograd function whose backward
  fetches the unit (and prefetches the units backward reaches next) before its gradients are
  computed; each parameter's gradient leaves the device as soon as autograd has accumulated it
  (``register_post_accumulate_grad_hook``), summed into a CPU gradient; the unit is released once
  its last gradient has left and the gradient has reached its input (an identity there too).

On CUDA both copies run on a side stream beside the compute, from and into pinned homes
(:mod:`orch.offload.transfers`); on a CPU device they are plain copies.

Swapping ``param.data`` (not the parameter object) is what makes the backward exact: autograd
saved the parameter itself, or views of it such as ``weight.t()``, for the backward. Each
parameter has one device tensor for the whole run whose storage is freed (resized to nothing) on
release and refilled on fetch, as FSDP does, so those saved views hold no memory between forward
and backward and see the data again once the unit is fetched for its backward; the copy goes
through ``.data``, so no version counter moves. Every fetched byte and every gradient byte on
the device is accounted in a :class:`~orch.offload.budget.DeviceBudget`, which never lets the
engine pass ``device_budget``.

Gradient accumulation over micro-batches matches the plain run bit for bit: the first micro-batch's
gradient is copied home, later ones added, as autograd would have done in ``param.grad`` (on CUDA a
later one travels to a pinned buffer beside the backward and is added on the host once it has
landed, in order; a blocking copy there would stall the backward). After the last micro-batch
:meth:`OffloadEngine.finish_step` hands the CPU gradients to the parameters (``param.grad``), so the
trainer's clip runs unchanged on the CPU; :meth:`OffloadEngine.step` then runs the trainer's
optimizer on them unit by unit beside the next forward (:mod:`orch.offload.cpu_step`), and a unit is
fetched only once it is updated. Data-parallel replicas sum each unit's home gradients onto the
replica that steps it, as the unit's last backward of the step ends, and that replica sends the
others the stepped parameters (:mod:`orch.offload.grad_homes`, :mod:`orch.offload.partition`), or,
with ``offload.shard_params``, keeps them while the others receive each unit from its owner per use
(:mod:`orch.offload.param_shards`). Gradients on NVMe leave CPU memory between backwards
(:mod:`orch.offload.grad_homes`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from orch.config.schema import OffloadConfig
from orch.models.weights import WeightSource, buffers_to, meta_to_placeholders
from orch.offload.activations import ActivationSwap
from orch.offload.blockio import open_block_io
from orch.offload.budget import DeviceBudget
from orch.offload.cpu_step import UnitUpdates
from orch.offload.grad_homes import GradientHomes
from orch.offload.homes import Homes
from orch.offload.nvme import Due, NvmeTier, scratch_file
from orch.offload.param_shards import SharedParams
from orch.offload.partition import Partition, owners_by_size
from orch.offload.policy import AutoActivations
from orch.offload.transfers import CopyDone, HostTransfers
from orch.parallel.recompute import recompute_block


@dataclass(eq=False)
class Unit:
    """Parameters fetched and released together: a block, the embedding, or the head."""

    name: str
    modules: list[nn.Module]
    """Run in this order within a forward; the first gets the fetch, the last the release."""
    params: list[nn.Parameter]
    index: int
    param_names: list[str]
    """The parameters' names in the model (what a weight source fills a meta-built one by)."""
    fetched: bool = False
    grads_left: int = 0
    """Gradients still to leave the device in the current backward."""
    input_grad_due: bool = False
    """The current backward has yet to reach the unit's input."""
    wraps_input: bool = False
    """The last forward's input required grad, so the backward will reach it."""
    device_copies: list[torch.Tensor] = field(default_factory=list)
    copied: CopyDone = None
    """On CUDA: the end of the fetch's copy, which the compute stream waits for before use."""
    device_dtype: torch.dtype | None = None
    """The dtype of the device copies (the compute dtype); None: the homes' own."""

    @property
    def nbytes(self) -> int:
        """The parameters' bytes at home."""
        return sum(p.numel() * p.element_size() for p in self.params)

    @property
    def device_nbytes(self) -> int:
        """The parameters' bytes on the device, fetched."""
        if self.device_dtype is None:
            return self.nbytes
        return sum(p.numel() for p in self.params) * self.device_dtype.itemsize


def transformer_units(model: nn.Module) -> list[Unit]:
    """The units of orch's Transformer in execution order (tied embeddings are refused by the
    plan: one parameter in two units)."""
    parts: list[tuple[str, list[nn.Module]]] = [("tok_embeddings", [model.tok_embeddings])]
    parts += [(f"layers.{name}", [block]) for name, block in model.layers.items()]
    parts.append(("head", [model.norm, model.output]))
    names = {p: name for name, p in model.named_parameters()}
    units = []
    for index, (name, modules) in enumerate(parts):
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        units.append(Unit(name, modules, params, index, [names[p] for p in params]))
    return units


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first calls ``callback``: on a unit's output, to fetch the unit
    before its own backward; on its input, to learn that the unit's backward is through."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        ctx.callback()
        return None, grad


class OffloadEngine:
    """Keeps ``units``' parameters and gradients at home in CPU memory and brings each unit to
    ``device`` only around its forward and backward, within ``budget``."""

    def __init__(self, units: list[Unit], device: torch.device, budget: DeviceBudget,
                 prefetch_depth: int, activations: str = "device",
                 nvme: NvmeTier | None = None, params_on_nvme: bool = False,
                 optimizer_on_nvme: bool = False, grads_on_nvme: bool = False,
                 elsewhere: frozenset[int] = frozenset(),
                 weights: WeightSource | None = None,
                 param_dtype: torch.dtype | None = None) -> None:
        """``param_dtype``: the dtype the device copies of the parameters compute in, and so their
        gradients (bf16 under bf16 precision, as FSDP's ``param_dtype``), while homes, gradients at
        home and the optimizer stay float32; None: the homes' dtype. Under autocast with float32
        device copies, each layer's bf16 cast of its weight is a new tensor that autograd keeps for
        the backward and autocast caches for the whole forward, outside the units' storage the
        engine frees and outside the budget: the whole model in bf16 on the device by the end of the
        forward. ``elsewhere``: with ``offload.shard_params``, the units other replicas own, known
        before the replicas' group exists (:func:`offload_transformer`), so their parameters are
        never allocated, pinned or written here. ``weights``: where every parameter's values come
        from, if given (the model's own are ignored: placeholders of a model built on the meta
        device); each unit is allocated, filled and placed in its home before the next, so the whole
        model is never in CPU memory at once unless that is its home."""
        self.units, self.device, self.budget = units, device, budget
        self.transfers = HostTransfers(device)
        """Parameters', gradients' and swapped activations' copies, on a side stream on CUDA
        (:mod:`orch.offload.transfers`)."""
        if nvme is not None:
            nvme.pool.register_with(self.transfers.register)
        self.swap = (ActivationSwap(device, budget, self.transfers,
                                    nvme if activations == "nvme" else None)
                     if activations in ("cpu", "nvme", "auto") else None)
        """Sends the units' saved activations home during the forward (not the head's, whose
        backward follows at once): to CPU memory, or on to the NVMe tier."""
        self.auto = AutoActivations({u.index: u.name for u in units if u.name.startswith(
            "layers.")}, device) if activations == "auto" else None
        """``activations: auto``: keep, swap or recompute per block, decided after the
        measuring steps (step 1, or 2 with one micro-batch a step)."""
        if self.auto is not None and self.swap is not None:
            self.swap.timing = True
        self._kept: dict[int, int] = {}
        """Bytes of kept activations each unit holds on the device now (accounted)."""
        self.depth = max(1, prefetch_depth)
        self.in_backward = False
        self.forward_only = False
        """Inside :meth:`forward_passes`: forwards no backward follows (an evaluation)."""
        self._pass = 0
        """The number of the pass over the units running now (:meth:`Homes.next_pass`)."""
        self._io_marks: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        """The NVMe tier's counters when the last two optimizer steps started (before the
        first one, when the step started): a step's record counts the bytes between them, its
        forward and backward and the update before it. Marked in the trainer's thread with no
        update running, so no byte of the update's threads falls between two records or into
        the wrong one."""
        self._update_marked = False
        self._io_passes: tuple[int, ...] = (0, 0, 0)
        """The NVMe counters' growth in :meth:`forward_passes` since the last mark: left out of
        the next step's record (its count starts that much later)."""
        self.bytes_to_device = 0
        self.bytes_to_home = 0
        self._fresh: set[nn.Parameter] = set()
        """Parameters whose home gradient holds nothing from this step yet."""
        self._last_micro_batch = True
        """The running micro-batch is the step's last (its backward completes the gradients)."""
        self._unit_of: dict[nn.Parameter, Unit] = {}
        self._home_data: dict[int, list[torch.Tensor]] = {}
        """Per fetched unit, its parameters' home tensors while they point at device copies."""
        for unit in units:
            unit.device_dtype = param_dtype
        largest = max(p.numel() for u in units for p in u.params)
        self._grad_reserve = largest * (
            param_dtype.itemsize if param_dtype is not None else
            max(p.element_size() for u in units for p in u.params))
        """Room prefetching leaves for the largest gradient, which autograd places unasked."""
        home_dtype = units[0].params[0].dtype
        if param_dtype is not None and param_dtype != home_dtype:
            self.budget.take(self.transfers.stage_conversions(largest, home_dtype),
                             f"the staging buffer of {home_dtype} <-> {param_dtype} copies")
        self.homes = Homes([unit.params for unit in units], nvme, params_on_nvme,
                           optimizer_on_nvme, lambda index: self.updates.stepped_event(index),
                           elsewhere)
        """Where parameters and optimizer states rest: CPU memory, or the NVMe tier's file."""
        for unit in units:
            for name, p in zip(unit.param_names, unit.params, strict=True):
                self._unit_of[p] = unit
                if unit.index not in elsewhere:  # (those become placeholders in place())
                    p.data = self._home_tensor(p, name, weights, pin=not params_on_nvme)
            self.homes.place(unit.index)
        self.grads = GradientHomes([unit.params for unit in units],
                                   nvme if grads_on_nvme else None, self.transfers.pin,
                                   self.transfers.register)
        """The home gradients: in CPU memory (averaged over data-parallel replicas once given a
        group) or on the NVMe tier between backwards."""
        self._landing: deque[tuple[torch.cuda.Event, int, Callable[[], object] | None]] = deque()
        """Gradient copies on their way home (CUDA): each one's end, its device bytes, accounted
        until it has landed, and what the host does with it then (a later micro-batch's
        gradient is added to the home; a step's first was copied straight into it)."""
        self.updates = UnitUpdates([unit.params for unit in units], self.homes)
        self.partition: Partition | None = None
        """With data-parallel replicas: which replica steps which unit."""
        self.shared: SharedParams | None = None
        """With ``offload.shard_params``: the units this replica does not own, sent per use."""
        for unit in units:
            for p in unit.params:
                p.register_post_accumulate_grad_hook(self._grad_ready)
            unit.modules[0].register_forward_pre_hook(
                lambda module, args, unit=unit: self._before_forward(unit, args))
            unit.modules[-1].register_forward_hook(
                lambda module, args, out, unit=unit: self._after_forward(unit, out))
        self.start_step()

    @torch.no_grad()
    def _home_tensor(self, p: nn.Parameter, name: str, weights: WeightSource | None,
                     pin: bool) -> torch.Tensor:
        """``p``'s values in CPU memory (pinned on CUDA where ``pin``; an NVMe home leaves at
        once): from ``weights`` if given (filled where they will rest), else its own data."""
        if weights is not None:
            home = (self.transfers.host_empty(p.numel() * p.element_size()).view(p.dtype)
                    .view(p.shape) if pin else torch.empty(p.shape, dtype=p.dtype))
            weights.fill(name, home)
            return home
        if p.is_meta:
            raise ValueError(f"{name} is on the meta device and has no values: pass a weight "
                             "source (orch.models.weights) to fill it")
        home = p.data.to("cpu")
        return self.transfers.pin(home) if pin else home

    # --- fetch and release ----------------------------------------------------------------

    def fetch(self, unit: Unit) -> None:
        """Give ``unit``'s parameters device copies of their home data (accounted)."""
        if unit.fetched:
            return
        self.updates.wait(unit.index)  # the previous step's update of this unit (stepped)
        self.budget.take(unit.device_nbytes, f"the parameters of {unit.name}")
        resting = [p.data for p in unit.params]
        if not unit.device_copies:  # one device tensor per parameter for the whole run
            unit.device_copies = [torch.empty_like(r, device=self.device,
                                                   dtype=unit.device_dtype or r.dtype)
                                  for r in resting]
        sent = self.shared is not None  # by its owner, into a buffer dropped after the copy
        source = (nullcontext(self.shared.take(unit.index)) if self.shared
                  else self.homes.params_to_copy(unit.index, self._next_use(unit)))
        with source as homes:
            for copy, home in zip(unit.device_copies, homes, strict=True):
                copy.untyped_storage().resize_(home.numel() * copy.element_size())
            # through .data: no version bump for the saved views; an NVMe staging buffer (or a
            # unit sent by its owner) is dropped after this block, so its copy must have ended
            unit.copied = self.transfers.to_device([c.data for c in unit.device_copies], homes,
                                                   host_waits=sent or self.homes.params_on_nvme)
        for p, copy in zip(unit.params, unit.device_copies, strict=True):
            p.data = copy
        self._home_data[unit.index] = resting
        unit.fetched = True
        self.bytes_to_device += unit.nbytes  # the homes' bytes cross (converted on the device)

    def _next_use(self, unit: Unit) -> Due:
        """When ``unit``'s parameters, fetched now, are next read from their home: in the
        next pass (a forward's fetches by the backward, last unit first; a backward's by the
        update, or the next micro-batch's forward, first unit first), but the last unit's
        from its forward, which it stays fetched through to its backward: in the pass after."""
        last = len(self.units) - 1
        if self.in_backward or self.forward_only:  # the next pass: the training forward's
            return (self._pass + 1, unit.index)
        if unit.index == last:
            return (self._pass + 2, unit.index)
        return (self._pass + 1, last - unit.index)

    def release(self, unit: Unit) -> None:
        """Point ``unit``'s parameters at what they rest as again (their home data, or NVMe
        placeholders) and free the device copies' memory (their storage shrinks to nothing;
        saved views of them see data again once the unit is fetched for its backward)."""
        if not unit.fetched:
            return
        self._use(unit)  # a copy still in flight must end before its memory can be reused
        for p, home in zip(unit.params, self._home_data.pop(unit.index), strict=True):
            p.data = home
        for copy in unit.device_copies:
            copy.untyped_storage().resize_(0)
        unit.fetched = False
        self.budget.give(unit.device_nbytes)

    def _prefetch(self, units: Iterator[Unit]) -> None:
        """Fetch up to ``prefetch_depth - 1`` further units while the budget allows it, and
        start reading the next one still at home from NVMe (:meth:`Homes.read_ahead`)."""
        for count, unit in enumerate(units):
            if unit.fetched:
                continue
            if self.shared is not None and not self.shared.asked(unit.index):
                return  # its owner has not been asked to send it yet
            room = unit.device_nbytes + self._grad_reserve
            if count >= self.depth - 1 or not self.budget.fits(room):
                if self.shared is None:  # shared units are read by their owner's sender
                    self.homes.read_ahead(unit.index)
                return
            self.fetch(unit)

    def _use(self, unit: Unit) -> None:
        """The compute stream waits for ``unit``'s fetch copy (CUDA) before what it runs next."""
        self.transfers.wait(unit.copied)
        unit.copied = None

    # --- hooks ------------------------------------------------------------------------------

    def _before_forward(self, unit: Unit, args: tuple) -> tuple | None:
        if unit.index == 0 and not self.in_backward:
            self._pass = self.homes.next_pass()
        if self.shared is not None and not self.in_backward:  # the model's order, not the budget's
            if unit.index == 0:
                self.shared.start_pass()
            self.shared.ask(range(unit.index, unit.index + self.depth))
        self.fetch(unit)
        self._use(unit)
        if self.in_backward:
            return None
        self._prefetch(iter(self.units[unit.index + 1:]))
        if self.forward_only:  # nothing is saved for a backward, nothing measured
            return None
        if (self.swap is not None and unit.index != len(self.units) - 1
                and (self.auto is None or self.auto.swaps(unit.index))):
            self.swap.enter(unit.index, unit.device_copies)
        if self.auto is not None:
            self.auto.forward_started(unit.index)
        x = args[0]
        unit.wraps_input = torch.is_grad_enabled() and x.requires_grad
        if unit.wraps_input:  # to learn when the unit's backward is through
            return (_OnBackward.apply(partial(self._input_reached, unit), x), *args[1:])
        return None

    def _after_forward(self, unit: Unit, output: torch.Tensor) -> torch.Tensor:
        if self.forward_only:  # no backward: the head is released too
            self.release(unit)
            return output
        if self.auto is not None:
            self.auto.forward_ended(unit.index)
        if self.swap is not None:
            self.swap.exit(unit.index)
        if self.in_backward:  # recomputed inside backward: the unit's backward comes next
            return output
        if self.auto is not None and self.auto.keeps(unit.index):
            assert self.swap is not None
            kept = self._kept[unit.index] = self.swap.measured[unit.index][0]
            self.budget.take(kept, f"the kept activations of {unit.name}")
        if unit.index != len(self.units) - 1:
            self.release(unit)
        if not torch.is_grad_enabled() or not output.requires_grad:
            return output
        return _OnBackward.apply(partial(self.before_unit_backward, unit), output)

    def before_unit_backward(self, unit: Unit) -> None:
        """Called by autograd when the gradient reaches ``unit``'s output."""
        if not self.in_backward:
            self._pass = self.homes.next_pass()
        self.in_backward = True
        if self.shared is not None:  # the model's order, not the budget's
            if unit.index == len(self.units) - 1:
                self.shared.start_pass()
            self.shared.ask(range(unit.index - 1, unit.index - 1 - self.depth, -1))
        self.fetch(unit)
        self._use(unit)
        if self.swap is not None:
            self.swap.fetch(unit.index)
            self.swap.read_ahead(unit.index - 1)
        self.grads.take_in(unit.index)  # NVMe, or freed after its sum: back in memory
        unit.grads_left = len(unit.params)
        unit.input_grad_due = unit.wraps_input  # not the embedding's: its input is token ids
        self._prefetch(reversed(self.units[:unit.index]))
        if self.swap is not None:  # the next unit's activations, behind its parameters
            self.swap.prefetch(unit.index - 1, spare=self._grad_reserve)

    def _grad_ready(self, p: torch.Tensor) -> None:
        """Move ``p``'s freshly accumulated gradient home (copy on its step's first
        micro-batch, add after); its unit may then be done (:meth:`_maybe_done`)."""
        assert isinstance(p, nn.Parameter) and p.grad is not None
        self.grads.take_in(self._unit_of[p].index)
        grad, home = p.grad, self.grads.of[p]
        nbytes = grad.numel() * grad.element_size()
        self._land_gradients(until_fits=nbytes)
        self.budget.take(nbytes, f"a gradient of {self._unit_of[p].name}")
        landed, then = None, None
        if p in self._fresh:  # on CUDA the copy runs beside the backward (its memory kept)
            landed = self.transfers.to_home(home, grad)  # converted on the device: home bytes
            self._fresh.discard(p)
            self.bytes_to_home += home.numel() * home.element_size()
        else:  # a later micro-batch's: summed into the home once its copy is on the host (an
            # earlier micro-batch's copy into ``home`` has landed: finish_backward)
            landed, host = self.transfers.to_host(grad)
            then = partial(home.add_, host)
            self.bytes_to_home += nbytes
        p.grad = None
        if landed is None:
            if then is not None:
                then()
            self.budget.give(nbytes)
        else:
            self._landing.append((landed, nbytes, then))
        unit = self._unit_of[p]
        unit.grads_left -= 1
        self._maybe_done(unit)

    def _land_gradients(self, until_fits: int | None = None) -> None:
        """Wait for gradient copies on their way home, oldest first, giving back their device
        bytes: all of them, or only until ``until_fits`` more bytes fit the budget."""
        while self._landing and (until_fits is None or not self.budget.fits(until_fits)):
            landed, nbytes, then = self._landing.popleft()
            landed.synchronize()
            if then is not None:  # a later micro-batch's gradient: added on the host, in order
                then()
            self.budget.give(nbytes)

    def _input_reached(self, unit: Unit) -> None:
        unit.input_grad_due = False
        self._maybe_done(unit)

    def _maybe_done(self, unit: Unit) -> None:
        """Release ``unit`` once its backward is through: every gradient has left and the
        gradient has reached its input (nodes between a weight's use and the input, such as a
        norm's statistics, may still unpack saved tensors after the weight's gradient)."""
        if unit.grads_left == 0 and not unit.input_grad_due:
            self._backward_done(unit)

    def _backward_done(self, unit: Unit) -> None:
        """Free what ``unit`` held for its backward: parameters and swapped activations."""
        self.release(unit)
        if self.swap is not None:
            self.swap.release(unit.index)
        self.budget.give(self._kept.pop(unit.index, 0))
        if self.grads.tier is not None or self.grads.group is not None:
            self._land_gradients()  # read on the host below: the unit's copies must be home
        if self.grads.tier is not None:  # NVMe: out of memory until the next backward adds
            self.grads.put_away(unit.index, self._fresh, final=self._last_micro_batch)
        elif self._last_micro_batch or self.grads.free_summed:  # sum over the replicas
            self.grads.reduce(unit.index, self._fresh)
            if self.grads.free_summed and not self.grads.owns(unit.index):
                self._fresh.update(unit.params)  # its buffer goes: the next copies, not adds

    @contextmanager
    def forward_passes(self) -> Iterator[None]:
        """Forward passes that no backward follows (an evaluation, under ``torch.no_grad``,
        between optimizer steps), leaving the engine as a training step left it: every unit is
        released after its forward (the head too, which training keeps for its backward), the
        activations are neither swapped nor measured (``offload.activations: auto``), the
        fetches name the next training forward as when their NVMe copies are due, and the
        step's figures (bytes moved, the device peak, the NVMe traffic between two optimizer
        steps, the seconds waited for an update) are those of training alone, should the record
        be read after them. The update running beside is waited for first (the trainer already
        has: that wait is the update's, and its broadcasts the next step's), so no byte of it is
        counted as the passes'."""
        assert not self.in_backward and not any(unit.fetched for unit in self.units), \
            "forward passes start between steps"
        figures = (self.bytes_to_device, self.bytes_to_home, self.budget.peak,
                   self.updates.waited)
        self.wait_updates()
        received = self.shared.bytes_received if self.shared is not None else 0
        io_before = self._io_now()
        self.forward_only = True
        try:
            yield
        finally:
            self.forward_only = False
            for unit in self.units:  # after an error part way
                self.release(unit)
            if self.shared is not None:  # broadcasts asked for and not fetched
                self.shared.start_pass()
                self.shared.bytes_received = received
            self.homes.drop_reads_ahead()
            (self.bytes_to_device, self.bytes_to_home, self.budget.peak,
             self.updates.waited) = figures
            self._io_passes = tuple(  # the passes' NVMe bytes: in no step's record
                skipped + now - then for skipped, now, then in zip(
                    self._io_passes, self._io_now(), io_before, strict=True))

    # --- steps ------------------------------------------------------------------------------

    def start_step(self) -> None:
        """Forget the previous step's gradients (the next micro-batch's are copied, not added)
        and start a new device peak."""
        self._fresh = set(self.grads.of)
        self.grads.start_step()
        self.budget.reset_peak()
        self.bytes_to_device = self.bytes_to_home = 0
        if not self._update_marked:  # not the load of a resumed run, nor the placing
            self._io_marks, self._io_passes = (self._io_now(), self._io_now()), (0, 0, 0)
        if self.swap is not None:
            self.swap.bytes_out = self.swap.bytes_in = 0
        if self.shared is not None:
            self.shared.bytes_received = 0

    def average_gradients_over(self, group: dist.ProcessGroup, shard_params: bool = False
                               ) -> None:
        """Train as one of ``group``'s data-parallel replicas (a gloo group over the world):
        each unit's gradients are averaged at home onto the replica that steps it, which then
        sends the others its parameters (:mod:`orch.offload.grad_homes`,
        :mod:`orch.offload.partition`); with ``shard_params`` it keeps them and sends a unit
        each time another replica uses it, and the others free their gradients of a unit once
        summed onto it (:mod:`orch.offload.param_shards`). Every replica calls it (it makes
        groups)."""
        self.partition = self.updates.partition = Partition([u.params for u in self.units], group)
        self.grads.group, self.grads.owners = group, self.partition.owners
        if shard_params:
            self.partition.params_sharded = self.grads.free_summed = True
            elsewhere = {u.index for u in self.units if not self.partition.owns(u.index)}
            if self.homes.elsewhere and self.homes.elsewhere != elsewhere:
                raise RuntimeError(f"the units built as other replicas' "
                                   f"({sorted(self.homes.elsewhere)}) are not the partition's "
                                   f"({sorted(elsewhere)})")
            self.homes.rest_elsewhere(elsewhere)
            self.shared = SharedParams([u.params for u in self.units], self.partition,
                                       self.transfers.host_empty, self.updates.wait,
                                       self.homes.params_to_copy)

    def start_micro_batch(self, last: bool) -> None:
        """Say whether the coming micro-batch is the step's last: after its backward each unit's
        gradients are final (their average over the replicas starts, NVMe gradients get their
        norms). Callers running several micro-batches per step must say it before each; the
        default takes every micro-batch for the last."""
        self._last_micro_batch = last

    def finish_backward(self) -> None:
        """After a micro-batch's backward: release every unit still on the device (units whose
        parameters got no gradient, e.g. experts no token chose, and the embedding)."""
        self._land_gradients()
        for unit in self.units:
            self._backward_done(unit)
        self.grads.end_micro_batch()
        self.homes.drop_reads_ahead()
        self.in_backward = False

    def finish_step(self) -> None:
        """After the last micro-batch: every parameter's ``grad`` is its CPU gradient (None for
        those no micro-batch reached), ready for the clip and the CPU optimizer step."""
        self.transfers.synchronize()  # no copy from a home may be running when it is stepped
        if self.shared is not None:  # nor a broadcast from one (asked, never fetched)
            self.shared.start_pass()
        for p, grad in self.grads.finish(self._fresh).items():
            p.grad = grad
        if self.auto is not None and self.auto.measuring and self.auto.step_done():
            self._choose_activations()

    def _choose_activations(self) -> None:
        """After the measuring steps: keep, swap or recompute each block from here on (room for
        kept activations: the budget less the parameter window, a gradient and the largest
        block's activations coming back), and say what was chosen and why."""
        assert self.auto is not None and self.swap is not None
        measured = self.swap.measured
        window = self.depth * max(u.device_nbytes for u in self.units) + self._grad_reserve
        room = self.budget.limit - window - max(measured[i][0] for i in self.auto.blocks)
        choices = self.auto.decide(measured, max(0, room))
        self.swap.timing = False
        for unit in self.units:
            if self.auto.actions.get(unit.index) == "recompute":
                recompute_block(unit.modules[0], "full")
        steps = "first step" if self.auto.steps == 1 else f"first {self.auto.steps} steps"
        print(f"orch: activations per block (the launch's {steps} measured, each block's first "
              f"forward left out: host copies at "
              f"{self.auto.bandwidth(measured) / 1e9:.2f} GB/s, room {max(0, room) / 1e6:.1f} "
              f"MB):\n" + "\n".join(f"  {choice}" for choice in choices), flush=True)

    @property
    def grads_on_nvme(self) -> bool:
        return self.grads.tier is not None

    @property
    def clips_gradients(self) -> bool:
        """The trainer's clip cannot see every gradient (on NVMe, or on other replicas): it
        calls :meth:`clip` instead."""
        return self.grads_on_nvme or self.partition is not None

    def clip(self, params: list[nn.Parameter], max_norm: float) -> float:
        """The global gradient norm over ``params`` (the model's, in order) and the clip to
        ``max_norm`` (0: none), as ``clip_grad_norm_`` computes them: with gradients on NVMe
        from the norms taken before each write, the factor applied as the optimizer step reads
        each unit's gradients back; with replicas from every owner's norms, each owner scaling
        its own gradients."""
        if self.partition is not None:
            total = self.partition.global_norm(params)
            if max_norm > 0:
                scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            return float(total)
        total = self.grads.grad_norm(params)
        if max_norm > 0:
            self.grads.scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return float(total)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Start ``optimizer``'s step on the CPU gradients (after the clip), unit by unit beside
        the next forward (:mod:`orch.offload.cpu_step`); it drops the gradients it used (NVMe
        gradients: read back per unit as it steps)."""
        self.updates.wait_all()  # the previous update's bytes are all counted: mark them
        assert self._io_marks is not None, "start_step() comes first"
        since = tuple(a + b for a, b in zip(self._io_marks[1], self._io_passes, strict=True))
        self._io_marks, self._io_passes = (since, self._io_now()), (0, 0, 0)
        self._update_marked = True
        self.updates.start(optimizer, self.grads.handover())

    def _io_now(self) -> tuple[int, ...]:
        tier = self.homes.tier
        return (0, 0, 0) if tier is None else (tier.bytes_read, tier.bytes_written,
                                               tier.bytes_from_memory)

    def wait_updates(self) -> None:
        """Block until the last optimizer step is done (before a checkpoint, at the end)."""
        self.updates.wait_all()

    @contextmanager
    def resident(self, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Every parameter and ``optimizer`` state in memory, in place (to read a whole model's
        weights; checkpoints go a tensor or a unit at a time instead,
        :mod:`orch.offload.checkpoint_homes`); NVMe homes are written back after, and with
        shared parameters the units this replica does not own are dropped again."""
        self.wait_updates()
        with ExitStack() as stack:
            stack.enter_context(self.homes.all_in_memory(optimizer))
            if self.shared is not None:
                stack.enter_context(self.shared.all_in_memory())
            yield

    def close(self) -> None:
        """Finish the last update and close the NVMe tier's scratch file (its space is free
        then; the kernel frees it too however the process ends)."""
        self.wait_updates()
        if self.shared is not None:  # units asked for and never fetched
            self.shared.close()
        if self.swap is not None:
            self.swap.close()
        self.grads.close()
        self.homes.close()

    def step_record(self) -> dict[str, float]:
        """The step's figures for metrics.jsonl, after its optimizer step has started
        (:meth:`step`); the optimizer figures are the previous update's, which ran beside this
        step's forward (None at a launch's first step: no update ran before it, and a 0.0 would
        read as an update nothing overlapped), and the NVMe bytes this step's forward and
        backward and that update's."""
        seconds, waited = self.updates.last or (None, None)  # null: no update ran before
        record = {"device_peak_bytes": self.budget.peak, "device_budget_bytes": self.budget.limit,
                  "to_device_bytes": self.bytes_to_device, "to_home_bytes": self.bytes_to_home,
                  "optimizer_s": seconds, "optimizer_wait_s": waited,
                  "optimizer_overlap": None if not seconds else max(0.0, 1.0 - waited / seconds)}
        if self.homes.tier is not None and self._io_marks is not None:
            before, after = self._io_marks
            for key, start, end in zip(("nvme_read_bytes", "nvme_written_bytes",
                                        "nvme_from_memory_bytes"), before, after, strict=True):
                record[key] = end - start
        if self.auto is not None and not self.auto.measuring:
            record["activations"] = {c.name: c.action for c in self.auto.choices}
        if self.shared is not None:
            record["params_received_bytes"] = self.shared.bytes_received
        if self.swap is not None:
            record["activations_to_home_bytes"] = self.swap.bytes_out
            record["activations_to_device_bytes"] = self.swap.bytes_in
        return record


def offload_transformer(model: nn.Module, device: torch.device, budget_bytes: int,
                        pinned_bytes: int, off: OffloadConfig, rank: int = 0,
                        replicas: int = 1, weights: WeightSource | None = None,
                        param_dtype: torch.dtype | None = None) -> OffloadEngine:
    """Offload orch's Transformer to the homes ``off`` names: parameters, optimizer states and
    saved activations in CPU memory or in a file under ``off.nvme_path`` (activations may also
    stay on the device), gradients in CPU memory; buffers (RoPE tables) on ``device``; at most
    ``budget_bytes`` of what the engine places on ``device`` at once, staging NVMe transfers
    through at most ``pinned_bytes`` of CPU buffers. ``replicas`` (``rank`` among them): with
    ``off.shard_params``, the units the others will own are let go at once (the owners are the
    partition's, :func:`~orch.offload.partition.owners_by_size`). A model built on the meta
    device (its buffers computed: :meth:`~orch.models.llama.Transformer.init_buffers`) gets its
    parameters from ``weights`` unit by unit, straight into their homes. ``param_dtype``: the
    device copies' dtype (:class:`OffloadEngine`)."""
    if weights is not None:
        meta_to_placeholders(model)
    buffers_to(model, device)  # buffers are not offloaded
    units = transformer_units(model)
    elsewhere: frozenset[int] = frozenset()
    if off.shard_params and replicas > 1:
        owners = owners_by_size([unit.nbytes for unit in units], replicas)
        elsewhere = frozenset(index for index, owner in enumerate(owners) if owner != rank)
    on_nvme = {group: getattr(off, group) == "nvme" for group in ("params", "grads", "optimizer")}
    tier = None
    if any(on_nvme.values()) or off.activations == "nvme":
        file = scratch_file(Path(off.nvme_path), rank)
        try:
            io = open_block_io(file.path, off.io_block_size, off.io_queue_depth, off.io_threads)
        except BaseException:
            file.close()
            raise
        tier = NvmeTier(file, io, pinned_bytes)
    return OffloadEngine(units, device, DeviceBudget(budget_bytes), off.prefetch_depth,
                         off.activations, tier, on_nvme["params"], on_nvme["optimizer"],
                         on_nvme["grads"], elsewhere, weights, param_dtype)


__all__ = ["OffloadEngine", "Unit", "buffers_to", "offload_transformer", "transformer_units"]
