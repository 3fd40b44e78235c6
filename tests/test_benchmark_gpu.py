"""benchmarks/gpu.sh and the GPU benchmarks it runs, checked without a GPU: gpu.sh's commands
against their scripts' own parsers, its refusals, and its exit status when a part fails (with a
stand-in Python that says it has a GPU)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
GPU_SH = BENCHMARKS / "gpu.sh"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # as when a benchmark runs: its directory is on the path


def _benchmark(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{path.stem}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def _gpu_sh(*args: str, env: dict[str, str] | None = None,
            script: Path = GPU_SH) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _printed_commands() -> list[tuple[str, list[str]]]:
    """(part, Python arguments) of every command ``gpu.sh --print`` lists."""
    out = _gpu_sh("--print", env={"PYTHON": "python3"})
    assert out.returncode == 0, out.stderr
    commands = []
    for line in out.stdout.splitlines():
        part, command = line.split(": ", 1)
        python, *args = shlex.split(command)
        assert python == "python3"
        commands.append((part, args))
    return commands


class _Parsed(Exception):
    """Raised in place of running a benchmark once its parser has taken the arguments."""


def _parse_with_script(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Give ``args`` (a script and its flags) to the script's ``main``, stopping right after its
    argparse parser took them: a flag it does not know, or a bad value, is a SystemExit."""
    script = REPO / args[0]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202 (argparse's)
        raise _Parsed(original(self, *a, **k))

    module = _benchmark(script)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *args[1:]])
    with pytest.raises(_Parsed):
        module.main()


def test_every_part_runs_commands_its_scripts_accept(monkeypatch):
    commands = _printed_commands()
    assert sorted({part for part, _ in commands}) == sorted(
        "tests attention moe optim pipeline offload compile".split())
    for part, args in commands:
        if args[:2] == ["-m", "pytest"]:
            markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"][
                "ini_options"]["markers"]
            assert args[args.index("-m", 2) + 1] in {m.split(":")[0] for m in markers}
            assert all((REPO / a).is_dir() for a in args if a.startswith("tests/")), part
        else:
            _parse_with_script(args, monkeypatch)
    assert [a for p, a in commands if p == "pipeline"] == [
        ["benchmarks/pipeline.py", "--stages", s, "--blocks", "16", "--rounds", "2", "--steps",
         "2"] for s in ("4", "8")]
    assert [a for p, a in commands if p == "attention"][1] == [
        "benchmarks/attention.py", "--documents", "1024", "--seqs", "8192", "16384"]


def test_a_bad_flag_fails_the_parse_check(monkeypatch):
    with pytest.raises(SystemExit):
        _parse_with_script(["benchmarks/moe_dispatch.py", "--tokenz", "8"], monkeypatch)


def test_unknown_parts_are_refused_before_anything_runs(tmp_path):
    out = _gpu_sh("moe", "bogus", "", env={"RESULTS": str(tmp_path / "r"),
                                           "PYTHON": str(tmp_path / "missing")})
    assert out.returncode == 2
    assert "unknown part 'bogus' ''; parts: tests attention moe" in out.stderr
    assert not (tmp_path / "r").exists()


def test_without_a_cuda_device_it_stops_before_running_anything(tmp_path):
    out = _gpu_sh("moe", env={"RESULTS": str(tmp_path / "r"), "PYTHON": sys.executable})
    assert out.returncode == 1
    assert "sees no CUDA device" in out.stderr
    assert "run it on a GPU machine, with PYTHON set to a Python whose torch has CUDA" \
        in out.stderr
    assert not (tmp_path / "r").exists()


FAKE_PYTHON = """#!/bin/sh
case "$1" in
    -c) echo "NVIDIA H100 80GB HBM3"; exit 0 ;;
    benchmarks/pipeline.py) [ "$3" = 4 ] && { echo "4 stages broke"; exit 3; } ;;
    benchmarks/moe_dispatch.py) sleep 30 ;;
esac
echo "ran $*"
"""


@pytest.fixture
def gpu_checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of gpu.sh in a checkout of its own (its results go under it) and a stand-in
    Python that reports an H100, fails the 4-stage pipeline and outlasts moe's time limit."""
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu.sh"
    shutil.copy(GPU_SH, script)
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return script, {"PYTHON": str(python), "PART_LIMIT_S": "2"}


def test_a_failed_command_fails_its_part_and_the_script(gpu_checkout):
    script, env = gpu_checkout
    out = _gpu_sh("pipeline", "optim", "moe", script=script, env=env)
    assert out.returncode == 1
    assert "gpu.sh: failed: pipeline moe" in out.stderr
    (folder,) = (script.parent / "results").iterdir()
    assert folder.name.startswith("gpu-") and folder.name.endswith("-h100-80gb-hbm3")
    assert sorted(f.name for f in folder.iterdir()) == [
        "machine.txt", "moe.txt", "optim.txt", "pipeline.txt"]
    pipeline = (folder / "pipeline.txt").read_text()
    assert "== exit 3: " in pipeline and "--stages 4" in pipeline
    assert "ran benchmarks/pipeline.py --stages 8" in pipeline  # the 8-stage run still ran
    assert pipeline.endswith("== pipeline: exit 3\n")
    assert (folder / "moe.txt").read_text().endswith(
        "== moe: exit 124 (cut off at the 2 s limit)\n")
    assert (folder / "optim.txt").read_text().endswith("== optim: exit 0\n")

    again = _gpu_sh("optim", script=script, env=env)  # the same day, the same device
    assert again.returncode == 2
    assert f"{folder.relative_to(script.parents[1])} holds results already" in again.stderr
    assert (folder / "optim.txt").stat().st_size and not (folder / "tests.txt").exists()


def test_an_empty_results_folder_is_used(gpu_checkout, tmp_path):
    script, env = gpu_checkout
    (tmp_path / "out").mkdir()
    out = _gpu_sh("optim", script=script, env={**env, "RESULTS": str(tmp_path / "out")})
    assert out.returncode == 0, out.stderr
    assert f"results in {tmp_path / 'out'}" in out.stdout


moe_dispatch = _benchmark(BENCHMARKS / "moe_dispatch.py")


def test_moe_dispatch_times_grouped_mm_unchecked_against_both_alternatives(monkeypatch):
    """The value check reads the counts back to the host (a synchronization each call); the
    model skips it, and so must orch's side of every row, torch._grouped_mm's included."""
    import orch.kernels.moe as moe

    checks, grouped_mm = [], moe.grouped_mm

    def recording(*args, check: bool = True, **kwargs):  # noqa: ANN002, ANN003, ANN202
        checks.append(check)
        return grouped_mm(*args, check=check, **kwargs)

    monkeypatch.setattr(moe, "grouped_mm", recording)
    rows = moe_dispatch.run_case("E4 K2", 16, 32, 4, 2, 16, moe_dispatch.torch.float32,
                                 moe_dispatch.torch.device("cpu"), lambda fn: (fn(), 1.0)[1])
    assert {alt for _, op, alt, *_ in rows if op.startswith("grouped_mm")} == {
        "torch loop", "torch._grouped_mm"}
    assert checks == [False] * 4


@pytest.mark.parametrize("flag", ["--tokens", "--hidden", "--reps"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_moe_dispatch_refuses_sizes_below_one(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        moe_dispatch.main([flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: must be a whole number of at least 1, not '{value}'" \
        in capsys.readouterr().err


optim8bit = _benchmark(BENCHMARKS / "optim8bit.py")


class _ClockedOptimizer:
    """An optimizer whose steps take the given seconds on a fake clock: the first step, then
    the warm-up steps, then the timed ones."""

    clock = 0.0

    def __init__(self, seconds: list[float]) -> None:
        self.seconds, self.state = iter(seconds), {}

    def step(self) -> None:
        _ClockedOptimizer.clock += next(self.seconds)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("warmup", [0, 2])
def test_optim8bit_times_only_the_steps_after_the_first_and_the_warm_up(warmup, interleave,
                                                                        monkeypatch):
    monkeypatch.setattr(optim8bit.time, "perf_counter", lambda: _ClockedOptimizer.clock)
    seconds = [100.0] + [10.0] * warmup + [1.0, 3.0]  # compiling, warming up, timed
    (result,) = optim8bit.measure({"clocked": lambda _: _ClockedOptimizer(seconds)}, [(2, 2)],
                                  "cpu", steps=2, warmup=warmup, interleave=interleave)
    assert (result.first_s, result.ms, result.best_ms) == (100.0, 2000.0, 1000.0)


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "argument --steps: must be a whole number of at least 1, not '0'"),
    (["--warmup", "-1"], "argument --warmup: must be a whole number of at least 0, not '-1'"),
    (["--device", "cuda"], "--device cuda: torch "),
])
def test_optim8bit_refuses_flags_it_cannot_time(args, message, monkeypatch, capsys):
    monkeypatch.setattr(optim8bit.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        optim8bit.main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("cuda", "sets", "precision"), [
    (True, [], "bf16"), (False, [], "fp32"), (True, ["train.precision=fp32"], "fp32")])
def test_compile_benchmark_runs_bf16_on_a_gpu(cuda, sets, precision, monkeypatch, capsys):
    """configs/tiny.yaml's base asks fp32 (for CPU runs); a GPU run measures bf16, as users
    train there, unless --set says otherwise."""
    compile_bench = _benchmark(BENCHMARKS / "compile.py")
    launched = []

    def launch(config: str, procs: int, items: list[str]) -> tuple[list[dict], dict]:
        launched.append(items)
        return [{"tokens": 64, "step_time_s": 0.5}] * 12, {}

    monkeypatch.setattr(compile_bench, "launch", launch)
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)  # main imports torch
    monkeypatch.setattr("torch.cuda.get_device_name", lambda: "NVIDIA H100")
    monkeypatch.setattr(sys, "argv", ["compile.py", "--rounds", "1", "--set", *sets])
    compile_bench.main()
    assert len(launched) == 2
    for items in launched:
        chosen = [item for item in items if item.startswith("train.precision=")]
        assert chosen[-1] == f"train.precision={precision}"  # the last one given wins
    assert f"train.precision={'bf16' if cuda else 'fp32'}" in capsys.readouterr().out


attention = _benchmark(BENCHMARKS / "attention.py")


def test_packed_documents_are_seeded_runs_of_lengths_around_the_mean():
    from orch.kernels.attention import document_mask

    ids = attention.packed_documents(3, 1000, 64)
    assert torch.equal(ids, attention.packed_documents(3, 1000, 64))
    assert not torch.equal(ids, attention.packed_documents(3, 1000, 64, seed=1))
    assert (ids[:, 0] == 0).all() and set(ids.diff(dim=1).unique().tolist()) == {0, 1}
    lengths = attention.document_lengths(ids)
    assert int(lengths.sum()) == ids.numel()
    last = (ids[:, -1] + 1).cumsum(0) - 1  # each row's last document, cut at its end
    whole = lengths[[i for i in range(len(lengths)) if i not in last.tolist()]]
    assert 32 <= int(whole.min()) and int(whole.max()) <= 96
    assert 56 <= float(whole.float().mean()) <= 72
    # the pairs its TFLOP/s count: each document's causal pairs, the diagonal's halved
    assert float((lengths.double() ** 2).sum()) / 2 == document_mask(ids).sum() - ids.numel() / 2
    assert attention.document_lengths(torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
                                      ).tolist() == [2, 3, 1, 1, 5]


def _cpu_inputs(batch, seq, heads, head_dim, dtype):  # noqa: ANN001, ANN202 (the benchmark's)
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, seq, heads, head_dim, generator=gen).to(dtype).requires_grad_()
            for _ in range(3)]


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,  # noqa: ANN001, ANN202
            causal=False):
    """flash-attn's ``flash_attn_varlen_func`` by its contract: (total, heads, head_dim) tokens,
    each sequence of ``cu_seqlens`` (int32) attending on its own."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert max_seqlen_q == max_seqlen_k == int(cu_seqlens_q.diff().max()) and causal
    bounds = cu_seqlens_q.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


@pytest.fixture
def attention_on_cpu(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """attention.py's GPU path on CPU tensors, with a clock that runs a call once and says it
    took 1 ns (3 ns with the backward), and flash-attn's varlen function as :func:`_varlen`;
    the list fills with each timing's ``backward``."""
    timed = []

    def clock(fn, q, k, v, backward):  # noqa: ANN001, ANN202
        timed.append(backward)
        out = fn(q, k, v)
        if backward:
            out.sum().backward()
        return 3e-6 if backward else 1e-6

    flash_attn = ModuleType("flash_attn")
    flash_attn.flash_attn_varlen_func = _varlen
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn)
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_header", lambda dtype: None)
    monkeypatch.setattr(attention, "_inputs", _cpu_inputs)
    monkeypatch.setattr(attention, "_time", clock)
    return timed


DOCUMENTS = ["--documents", "16", "--seqs", "64", "--head-dims", "16", "--model-dim", "32",
             "--tokens", "128"]


def _table(out: str) -> list[dict[str, str]]:
    """The rows of the markdown table ``out`` holds, by column (every row as wide as its
    header; ``\\|`` is a pipe inside a cell)."""
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in out.splitlines() if line.startswith("|")]
    return [dict(zip(rows[0], row, strict=True)) for row in rows[2:]]


def test_documents_times_each_contender_counting_only_visible_pairs(attention_on_cpu, capsys):
    assert attention.main(DOCUMENTS) == 0
    fwd, both = _table(capsys.readouterr().out)
    assert attention_on_cpu == [False] * 4 + [True] * 4  # orch, sdpa+mask, causal, flash-attn
    ids = attention.packed_documents(2, 64, 16)
    pairs = float((attention.document_lengths(ids).double() ** 2).sum()) / 2
    assert (fwd["batch x heads"], fwd["pass"], both["pass"]) == ("2 x 2", "fwd", "fwd+bwd")
    assert fwd["visible"] == f"{pairs / (2 * 64 * 64 / 2):.1%}"
    for row, ns, backward in ((fwd, 1, 1.0), (both, 3, 3.5)):
        tflops = 4 * 2 * 16 * backward / ns / 1e3  # per pair: 4 x heads x head_dim; 1 FLOP/ns
        for name in ("orch", "sdpa+mask", "flash-attn varlen"):  # is 1e-3 TFLOP/s
            assert row[f"{name} TFLOP/s"] == f"{pairs * tflops:.1f}", name
        assert row["orch causal TFLOP/s"] == f"{2 * 64 * 64 / 2 * tflops:.1f}"
        assert row["orch/sdpa+mask"] == row["orch/flash-attn"] == "1.00"
    diffs = fwd["max\\|diff\\|"]
    assert diffs.startswith("orch ") and "; flash-attn varlen " in diffs


def test_documents_are_not_timed_where_orch_differs_from_sdpa(attention_on_cpu, monkeypatch,
                                                               capsys):
    """orch's output is checked against SDPA's with the mask before anything is timed: here a
    flash_attention that drops the document ids (plain causal attention)."""
    import orch.kernels.attention as orch_attention

    causal_only = orch_attention.flash_attention
    monkeypatch.setattr(orch_attention, "flash_attention",
                        lambda q, k, v, causal=False, documents=None: causal_only(q, k, v, causal))
    assert attention.main(DOCUMENTS) == 1
    out, err = capsys.readouterr()
    (row,) = _table(out)
    assert row["orch ms"] == ("not timed: orch differs from sdpa+mask beyond torch.bfloat16's "
                              "rounding")
    assert attention_on_cpu == []
    assert "differs from torch SDPA's with the mask, so these cases were not timed: head_dim 16, " \
        "seq 64: orch\n" in err
