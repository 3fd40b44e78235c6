"""The offload engine trains the plain run's numbers while holding a fraction of the state.

The tiny Llama (3.0M parameters: 12.1 MB of fp32 parameters, as much again of gradients and
twice that of AdamW moments, 48.5 MB in all) trains with parameters, gradients and optimizer
states at home in CPU memory and a device budget of 7 MB, under a sixth of its state: a decoder
block is 2.9 MB, so the engine can hold two units and a gradient. Losses,
gradient norms and final parameters must equal the plain run's exactly (the engine only moves
copies; accumulation over micro-batches adds in the same order), and the accounted device peak
must stay under the budget while having held at least the largest unit.
"""

from __future__ import annotations

import threading

import pytest
import torch
from offload_harness import BUDGET, tiny_cfg, train

from orch.offload import transfers
from orch.offload.blockio import DirectIO
from orch.offload.budget import BudgetExceeded
from orch.offload.nvme import NvmeTier, ScratchFile


def _tier(tmp_path) -> NvmeTier:
    file = ScratchFile(tmp_path)
    return NvmeTier(file, DirectIO(file.path, 1 << 20, 2), 64 << 20)


@pytest.fixture(scope="module")
def plain():
    return train(offload=False)


@pytest.mark.parametrize("recompute,depth", [("none", 1), ("none", 2), ("full", 2),
                                             ("selective", 3)])
def test_offloaded_training_equals_plain_run_exactly(plain, recompute, depth):
    losses, norms, params, peaks, engine, *_ = train(True, recompute, depth)
    ref_losses, ref_norms, ref_params, *_ = plain
    assert losses == ref_losses
    assert norms == ref_norms  # clipping active: norms above 0.5 in every step
    assert min(norms) > 0.5
    for name, tensor in ref_params.items():
        assert torch.equal(params[name], tensor), name
    largest = max(unit.nbytes for unit in engine.units)
    assert all(largest <= peak <= BUDGET for peak in peaks), peaks
    assert (min(peaks) >= 2 * largest) == (depth > 1)  # a prefetched block beside the current
    assert engine.budget.used == 0  # everything released after each backward
    state = sum(p.numel() for p in params.values()) * 4 * 4  # params, grads, two moments
    assert BUDGET < state / 6


@pytest.mark.parametrize("staging", [1 << 24, 1000], ids=["whole", "chunked"])
def test_bf16_device_copies_train_the_mixed_precision_numbers(monkeypatch, staging):
    """Under bf16 the engine computes on bf16 device copies of the float32 homes (converted on
    the device side through a staging buffer: whole parameters, or 1,000 elements at a time) and
    sums their bf16 gradients at home in float32: the numbers of a plain run computing on a bf16
    cast of the model (FSDP's mixed precision), exactly, with half the device bytes for the
    parameters. Before, the engine computed in float32 under autocast, whose bf16 weight casts
    it neither freed nor accounted."""
    monkeypatch.setattr(transfers, "CONVERSION_STAGING_ELEMENTS", staging)
    run = train(True, param_dtype=torch.bfloat16)
    ref = train(False, param_dtype=torch.bfloat16)
    assert run.losses == ref.losses and run.norms == ref.norms
    for name, tensor in ref.params.items():
        assert torch.equal(run.params[name], tensor), name
        assert run.params[name].dtype == torch.float32  # the homes, and the optimizer's
    engine = run.engine
    copies = [c for unit in engine.units for c in unit.device_copies]
    assert copies and all(c.dtype == torch.bfloat16 for c in copies)
    largest = max(p.numel() for unit in engine.units for p in unit.params)
    staged = min(largest, staging) * 4
    assert engine.budget.used == staged  # the staging buffer: everything else given back
    block = engine.units[1]
    assert block.device_nbytes * 2 == block.nbytes
    assert all(block.device_nbytes + staged <= peak <= BUDGET for peak in run.peaks)


def test_parameters_are_home_on_the_cpu_between_steps(plain):
    engine = train(True)[4]
    for unit in engine.units:
        assert not unit.fetched  # and the device copies hold no memory
        assert all(copy.untyped_storage().nbytes() == 0 for copy in unit.device_copies)
        assert all(p.device.type == "cpu" and p.grad is None for p in unit.params)


class _Later:
    """Copies that happen only when waited for, as a side stream's are to the host until its
    event: a read before the wait sees what was there before (uninitialized device memory, the
    previous micro-batch's gradient, an empty activation home)."""

    def __init__(self, stream: DeferredTransfers, pairs: list[tuple[torch.Tensor, torch.Tensor]]
                 ) -> None:
        self.stream, self.pairs = stream, pairs

    def synchronize(self) -> None:
        self.stream.run_through(self)


class DeferredTransfers:
    """The engine's HostTransfers with every copy put off until something waits for it, so
    the CUDA path's ordering (use a unit or an activation only after its copy, read a gradient
    or an activation home only after it landed) is checked on the CPU: a wait too late changes
    the numbers. Waiting for a copy runs the copies queued before it first, as one stream
    would."""

    stream = None

    def __init__(self) -> None:
        self.pending: list[_Later] = []
        self.deferred = 0
        self._lock = threading.Lock()  # the NVMe writer thread waits for activation copies

    def host_empty(self, nbytes):  # type: ignore[no-untyped-def]
        return torch.empty(nbytes, dtype=torch.uint8)

    def to_device(self, copies, homes, host_waits):  # type: ignore[no-untyped-def]
        return self._later(list(zip(copies, homes, strict=True)), host_waits)

    def to_home(self, home, source):  # type: ignore[no-untyped-def]
        return self._later([(home, source)], False)

    def to_host(self, source):  # type: ignore[no-untyped-def]
        host = torch.full_like(source, float("nan"))  # read before its copy: NaN numbers
        return self._later([(host, source)], False), host

    def _later(self, pairs, now):  # type: ignore[no-untyped-def]
        later = _Later(self, pairs)
        with self._lock:
            self.pending.append(later)
            self.deferred += not now
        if now:  # the host waits for these (an NVMe staging buffer goes back after)
            later.synchronize()
            return None
        return later

    def run_through(self, later: _Later) -> None:
        with self._lock:
            while later in self.pending:
                for target, source in self.pending.pop(0).pairs:
                    target.copy_(source)

    def wait(self, done) -> None:  # type: ignore[no-untyped-def]
        if done is not None:
            done.synchronize()

    host_wait = wait

    def drain(self) -> None:
        """Nothing: the deferred copies are the test, not the device's queue."""

    def synchronize(self) -> None:
        with self._lock:
            last = self.pending[-1] if self.pending else None
        if last is not None:
            last.synchronize()


@pytest.mark.parametrize("recompute,on_nvme,activations", [
    ("none", (), "device"), ("full", (), "device"),
    ("none", ("params", "optimizer", "grads"), "device"), ("none", (), "cpu"),
    ("none", ("params",), "nvme")],
    ids=["cpu", "cpu-recompute", "nvme", "activations-cpu", "activations-nvme"])
def test_copies_that_land_late_still_train_the_plain_numbers(plain, tmp_path, recompute,
                                                             on_nvme, activations):
    tier = _tier(tmp_path) if on_nvme else None
    transfers = DeferredTransfers()
    run = train(True, recompute, nvme=tier, on_nvme=on_nvme, transfers=transfers,
                activations=activations)
    ref = train(False, recompute) if recompute != "none" else plain
    assert transfers.deferred > 0
    assert run.losses == ref.losses and run.norms == ref.norms
    for name, tensor in ref.params.items():
        assert torch.equal(run.params[name], tensor), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)")
@pytest.mark.parametrize("on_nvme,activations,dtype", [
    ((), "device", None), (("params", "optimizer"), "device", None), ((), "cpu", None),
    ((), "cpu", torch.bfloat16), (("params", "optimizer"), "device", torch.bfloat16)])
def test_on_cuda_fetches_copy_on_a_side_stream_and_train_the_plain_numbers(tmp_path, on_nvme,
                                                                           activations, dtype):
    """Pinned CPU homes (or NVMe staging buffers, which the host waits on), copies on the
    engine's stream (parameters, gradients, swapped activations; bf16 device copies converted
    there), the compute stream waiting for each where it is used: the plain CUDA run's numbers
    within rounding (its AdamW steps on the GPU, the engine's on the CPU)."""
    tier = _tier(tmp_path) if on_nvme else None
    ref = train(False, device="cuda", param_dtype=dtype)
    run = train(True, device="cuda", nvme=tier, on_nvme=on_nvme, activations=activations,
                param_dtype=dtype)
    assert run.engine.transfers.stream is not None
    if tier is not None:  # registered with CUDA: copies from it are DMA, not bounced
        assert tier.pool.arena is not None and tier.pool.arena.is_pinned()
    # bf16: a float32 difference of AdamW's (GPU against CPU) can round to another bf16 value
    rtol, atol = (1e-5, 1e-6) if dtype is None else (1e-2, 3e-3)
    assert torch.allclose(torch.tensor(run.losses), torch.tensor(ref.losses), rtol=rtol)
    for name, tensor in ref.params.items():
        assert torch.allclose(run.params[name], tensor, rtol=10 * rtol, atol=atol), name
    homes = [p.data for unit in run.engine.units for p in unit.params]
    assert all(home.is_pinned() for home in homes) != bool(on_nvme)  # NVMe: placeholders


def test_a_budget_below_one_unit_is_refused_with_the_numbers():
    with pytest.raises(BudgetExceeded, match=r"layers\.0.*over the budget of 1,000,000"):
        train(True, budget=10**6)


@pytest.mark.parametrize("activations", ["device", "cpu"])
def test_the_plans_least_budget_is_enough(plain, activations):
    """With swapped activations the plan's least budget (what ``orch launch`` accepts) was
    short of what the engine then placed: it counted each norm as CUDA's fused kernel keeps it
    (a CPU build also keeps the normalized tensor), and the rotary tables once, where every
    swapped unit copies them. The run stopped on BudgetExceeded in its first backward."""
    from orch.plan import build_plan

    cfg = tiny_cfg("train.micro_batch=2", "offload.params=cpu", "offload.grads=cpu",
                   "offload.optimizer=cpu", f"offload.activations={activations}")
    least = build_plan(cfg, 1, 1, "cpu").memory.window_min
    losses, _, _, peaks, *_ = train(True, activations=activations, budget=least)
    assert losses == plain[0] and max(peaks) <= least


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_swapped_activations_train_the_plain_numbers(plain, recompute):
    """Saved activations go home during each block's forward and come back, a block's at once
    and accounted, before its backward; the head keeps its own (its backward follows at once)."""
    losses, norms, params, peaks, engine, records, *_ = train(True, recompute, 2, activations="cpu")
    ref_losses, ref_norms, ref_params, *_ = plain
    assert losses == ref_losses and norms == ref_norms
    for name, tensor in ref_params.items():
        assert torch.equal(params[name], tensor), name
    assert all(peak <= BUDGET for peak in peaks)
    for record in records:  # every byte sent home came back once
        assert record["activations_to_home_bytes"] == record["activations_to_device_bytes"]
        # measured: 13.7 MB a step (1.7 MB per block and micro-batch); under full recompute
        # the recompute keeps what it saves (each block's input) and 1 KB goes home
        sent = record["activations_to_home_bytes"]
        assert sent > 10**7 if recompute == "none" else 0 < sent < 10**4
    # the optimizer figures are the previous update's: none before the first step (a 0.0
    # overlap read as an update nothing hid)
    first, *later = records
    assert first["optimizer_s"] is first["optimizer_overlap"] is first["optimizer_wait_s"] is None
    assert later and all(r["optimizer_s"] > 0 and 0 <= r["optimizer_overlap"] <= 1 for r in later)


def test_eight_bit_adamw_steps_at_home_exactly():
    """orch's AdamW8bit (its CPU reference path) as the home optimizer, unit by unit."""
    ref_losses, _, ref_params, *_ = train(False, optimizer="adamw8bit")
    losses, _, params, *_ = train(True, optimizer="adamw8bit")
    assert losses == ref_losses
    for name, tensor in ref_params.items():
        assert torch.equal(params[name], tensor), name


AUTO_BUDGET = 12 * 10**6  # two blocks' parameters, a gradient, and room for 4.2 MB more


def _assert_plain_numbers(run, plain):
    assert run.losses == plain.losses and run.norms == plain.norms
    for name, tensor in plain.params.items():
        assert torch.equal(run.params[name], tensor), name
    assert all(peak <= AUTO_BUDGET for peak in run.peaks)


def test_automatic_activations_keep_the_last_blocks_that_fit_and_swap_or_recompute_the_rest(
        plain, capsys):
    """Step 1 swaps every block and measures it (1.3 MB saved per block here); then the last
    three blocks fit in the budget's room and stay on the device, accounted, and the first goes
    home or is recomputed, by which costs less (measured: copies 4.9 ms, forward 22 ms)."""
    run = train(True, activations="auto", budget=AUTO_BUDGET)
    _assert_plain_numbers(run, plain)
    policy = run.records[-1]["activations"]
    assert policy["layers.0"] in ("swap", "recompute")
    assert [policy[f"layers.{i}"] for i in (1, 2, 3)] == ["keep"] * 3
    assert max(run.peaks[1:]) > run.peaks[0]  # kept activations count against the budget
    log = capsys.readouterr().out
    assert "orch: activations per block" in log and "layers.3 keep (1.3 MB fit" in log


def test_a_slow_host_link_makes_the_policy_recompute(plain, monkeypatch, capsys):
    from orch.offload.policy import AutoActivations

    monkeypatch.setattr(AutoActivations, "bandwidth", lambda self, measured: 1e6)  # 1 MB/s
    run = train(True, activations="auto", budget=AUTO_BUDGET)
    _assert_plain_numbers(run, plain)
    assert run.records[-1]["activations"]["layers.0"] == "recompute"
    assert "layers.0 recompute (1.3 MB: copies 2" in capsys.readouterr().out


@pytest.mark.parametrize("on_nvme,activations,budget", [
    ((), "device", BUDGET), (("params", "optimizer", "grads"), "nvme", BUDGET),
    ((), "auto", AUTO_BUDGET)], ids=["cpu", "nvme", "auto"])
def test_forward_passes_between_steps_leave_training_and_the_engine_as_they_were(
        plain, tmp_path, on_nvme, activations, budget):
    """An evaluation after each step (forwards alone, no gradients: ``forward_passes``) gives
    the plain model's held-out loss exactly, and the steps the plain numbers: the head, which a
    training forward keeps for its backward, is released too; no activation is swapped or
    measured (``auto`` measures and decides as without them); the step record (bytes moved,
    device peak, NVMe traffic, the update's waits) and what the engine holds are as before the
    passes."""
    tier = _tier(tmp_path) if on_nvme else None
    run = train(True, nvme=tier, on_nvme=on_nvme, activations=activations, budget=budget,
                evaluate=True)
    ref = train(False, evaluate=True)
    assert run.losses == plain.losses and run.norms == plain.norms
    for name, tensor in plain.params.items():
        assert torch.equal(run.params[name], tensor), name
    assert run.evals == ref.evals and len(run.evals) == 3
    for before, after in run.around_evals:  # (auto: what the policy measured, and decided)
        assert before == after
        assert after["fetched"] == [] and not after["in_backward"]


@pytest.mark.parametrize("cpu_adam", ["torch", pytest.param("deepspeed", marks=pytest.mark.nvme)])
def test_the_cpu_adamw_kernels_step_at_home_exactly_and_agree_with_torch_adamw(plain, cpu_adam):
    """offload.cpu_adam's kernels (torch's fused AdamW, DeepSpeed's CPU Adam on torch's state
    layout): the offloaded run equals the plain run with the same kernel bit for bit, and the
    kernel agrees with the foreach AdamW within fp32 rounding (measured after 3 steps: at most
    3.1e-6 / 7.9e-6 apart, 2e-9 on average: AdamW turns rounding on near-zero gradients into
    steps of up to lr = 1e-3, DESIGN.md)."""
    if cpu_adam == "deepspeed":
        pytest.importorskip("deepspeed")
    ref = train(False, cpu_adam=cpu_adam)
    run = train(True, cpu_adam=cpu_adam)
    assert run.losses == ref.losses
    for name, tensor in ref.params.items():
        assert torch.equal(run.params[name], tensor), name
        diff = (tensor - plain.params[name]).abs()
        assert diff.max() < 5e-5 and diff.mean() < 1e-8, name
    assert type(run.optimizer).__name__ == {"torch": "AdamW", "deepspeed": "DeepSpeedAdamW"}[
        cpu_adam]
    assert set(run.optimizer.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.nvme
def test_deepspeed_adamw_state_moves_into_torch_adamw_keeping_its_own_kernel():
    """A checkpoint of an offloaded run stepped by DeepSpeed's kernel resumes onto torch's AdamW
    (another offload.cpu_adam pick, or a device-resident plan): the groups have the same keys
    (a missing ``amsgrad`` once failed such a resume), the moments arrive, and the resumed
    optimizer keeps its own ``foreach``/``fused`` choice."""
    pytest.importorskip("deepspeed")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    from orch.offload.cpu_adam import DeepSpeedAdamW
    from orch.runtime.optim import implementation_kept

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model = torch.nn.Linear(4, 4)
    saving = DeepSpeedAdamW(model.parameters(), 1e-3, (0.9, 0.95), 1e-8)
    model(torch.ones(2, 4)).sum().backward()
    saving.step()
    model.zero_grad(set_to_none=True)
    _, saved = get_state_dict(model, saving, options=options)
    resumed = torch.optim.AdamW(model.parameters(), foreach=True)
    assert set(resumed.param_groups[0]) == set(saving.param_groups[0])
    _, into = get_state_dict(model, resumed, options=options)  # as the worker's resume does
    assert set(into) == set(saved)
    with implementation_kept(resumed):
        set_state_dict(model, resumed, options=options, model_state_dict={},
                       optim_state_dict=saved)
    assert resumed.param_groups[0]["foreach"] is True
    assert resumed.param_groups[0]["betas"] == (0.9, 0.95)
    for p in model.parameters():
        assert torch.equal(resumed.state[p]["exp_avg"], saving.state[p]["exp_avg"])
