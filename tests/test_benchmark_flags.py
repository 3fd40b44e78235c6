"""The benchmarks refuse bad flags up front, as argparse errors (usage, the flag, what it must be,
exit 2), not as tracebacks minutes into a run, and their ``--help`` says what each measures in
whole sentences; nothing here runs a benchmark."""

from __future__ import annotations

import argparse
import sys

import pytest
from benchmark_modules import benchmark

attention, offload_io, bench_flags = (benchmark(n) for n in ("attention", "offload_io",
                                                              "bench_flags"))
at_least, byte_size, positive_int = bench_flags.at_least, bench_flags.byte_size, \
    bench_flags.positive_int


def test_whole_numbers_below_the_bound_are_refused_saying_why():
    assert positive_int("3") == 3
    assert at_least(6, "5 warm-up steps")("6") == 6
    for text in ("0", "-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            positive_int(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"at least 6 \(5 warm-up steps\)"):
        at_least(6, "5 warm-up steps")("5")
    heads = at_least(128, "heads of 128", multiple_of=128)
    assert heads("256") == 256
    for text in ("64", "192", "0"):
        with pytest.raises(argparse.ArgumentTypeError,
                           match=r"a multiple of 128 of at least 128 \(heads of 128\)"):
            heads(text)


def test_byte_sizes():
    assert byte_size("64MiB") == 64 << 20
    for text in ("abc", "0", "-1MiB", "3 parsecs"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive byte size"):
            byte_size(text)


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "abc"], "argument --size: must be a positive byte size"),
    (["--size", "1MiB", "--chunk", "3MiB"], "--chunk (3,145,728 bytes) is larger than --size"),
    (["--chunk", "1000"], "not a whole number of MiB"),
    (["--size", "100MiB", "--chunk", "64MiB"], "not a whole number of --chunk"),
    (["--rounds", "0"], "argument --rounds: must be a whole number of at least 1"),
    (["--dir", "{tmp}/missing"], "is not a directory"),
])
def test_offload_io_refuses_bad_flags_before_making_its_directory(args, message, tmp_path,
                                                                  capsys):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    with pytest.raises(SystemExit) as info:
        offload_io.main(["--dir", str(tmp_path), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no orch-offload-io-* left behind


def test_attention_on_cpu_says_which_flags_it_ignores(monkeypatch, capsys):
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(attention, "cpu_paths", lambda: print("cpu table"))
    assert attention.main(["--seqs", "512", "--dtype", "fp16", "--documents", "512"]) == 0
    out = capsys.readouterr().out
    assert "--dtype, --seqs, --documents set the GPU comparison only, ignored here" in out
    assert "cpu table" in out
    assert attention.main([]) == 0
    assert "ignored here" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        attention.main(["--seqs", "0"])
    assert "argument --seqs: must be a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "args", "message"), [
    ("offload_checkpoint", ["--rounds", "0"], "argument --rounds: must be a whole number of at "
     "least 1, not '0'"),
    ("offload_checkpoint", ["--dim", "64"], "argument --dim: must be a multiple of 128 of at "
     "least 128 (heads of 128), not '64'"),
    ("offload_checkpoint", ["--layers", "0"], "argument --layers: must be a whole number"),
    ("offload_startup", ["--dim", "64"], "argument --dim: must be a multiple of 128"),
    ("offload_startup", ["--rounds", "0"], "argument --rounds: must be a whole number"),
    ("recompute", ["--steps", "3"], "argument --steps: must be more than --warmup (3), whose "
     "steps are left out of the median, not 3"),
    ("recompute", ["--rounds", "0"], "argument --rounds: must be a whole number"),
    ("recompute", ["--procs", "0"], "argument --procs: must be a whole number"),
    ("compile", ["--steps", "2", "--warmup", "2"], "argument --steps: must be more than --warmup"),
    ("compile", ["--procs", "0"], "argument --procs: must be a whole number"),
    ("hetero_nic", ["--fast-mbit", "-5"], "argument --fast-mbit: must be a whole number of at "
     "least 1, not '-5'"),
    ("hetero_nic", ["--steps", "2"], "argument --steps: must be a whole number of at least 3 "
     "(the first 2 are warm-up"),
    ("offload_cpu", ["--steps", "2"], "argument --steps: must be more than --warmup (2)"),
    ("offload_cpu", ["--rounds", "0"], "argument --rounds: must be a whole number"),
    ("offload_finetune", ["--steps", "1"], "argument --steps: must be more than --warmup (1)"),
    ("offload_finetune", ["--batch", "0"], "argument --batch: must be a whole number"),
    ("attention", ["--documents", "0"], "argument --documents: must be a whole number of at "
     "least 1, not '0'"),
    ("attention", ["--documents", "1024", "--sweep"], "argument --sweep: not allowed with "
     "argument --documents"),
])
def test_benchmarks_refuse_bad_flags_naming_them(name, args, message, capsys):
    with pytest.raises(SystemExit) as info:
        benchmark(name).main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_failing_worker_is_named_with_its_own_error():
    orch_runs = benchmark("orch_runs")
    with pytest.raises(SystemExit) as info:
        orch_runs.json_worker([sys.executable, "-c", "import sys; sys.exit('heads must be >= 1')"],
                              "the whole build")
    assert str(info.value).startswith("the whole build failed (exit 1):\nheads must be >= 1")


@pytest.mark.parametrize("name", ["attention", "compile", "hetero_nic", "offload_checkpoint",
                                  "offload_cpu", "offload_finetune", "offload_io",
                                  "offload_startup", "overhead", "parallel_cpu", "pipeline",
                                  "plan_search", "recompute"])
def test_help_describes_a_benchmark_in_whole_sentences(name, capsys):
    module = benchmark(name)
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    first_paragraph = "".join(module.__doc__.split("\n\n")[0].split())
    assert first_paragraph.endswith(".")
    assert first_paragraph in "".join(capsys.readouterr().out.split())  # as argparse wraps it
