"""Held-out evaluation (``eval:``) without a launch: its config rules, the checks of its file
before any process starts (data.path's, said of eval.path), the sequences each rank evaluates,
when evaluations are due, and their records (the run log's line, ``metrics.jsonl``, the
report). Its numbers on every layout are checked in tests/launch/test_parallel_parity.py, the
forward-only passes in tests/parallel/test_pipeline.py and tests/offload/test_engine.py."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orch.config import load_config
from orch.config.rules import check_config
from orch.errors import ConfigError
from orch.launch.launcher import prepare
from orch.runtime.data import DataError, PackedSequences, load_tokens, read_like_data
from orch.runtime.evaluation import Evaluation, eval_file_problems, load_eval_batches
from orch.runtime.metrics import EvalMetrics, MetricsLog
from orch.runtime.records import is_eval

SEQ, BATCH = 16, 4  # train.seq_len, train.global_batch: 65 tokens make one eval batch


def _cfg(*sets: str):
    return load_config("configs/tiny.yaml", [f"train.seq_len={SEQ}",
                                             f"train.global_batch={BATCH}",
                                             "train.micro_batch=1", *sets])


def _text(tmp_path: Path, tokens: int, name: str = "held.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(range(65, 91)) * (tokens // 26) + b"a" * (tokens % 26))
    return path


def _said(cfg) -> list[str]:
    return [str(p) for p in [*check_config(cfg), *eval_file_problems(cfg)]]


def test_evaluation_is_off_by_default_and_asks_for_nothing():
    cfg = _cfg()
    assert (cfg.eval.interval, cfg.eval.path) == (0, "") and _said(cfg) == []
    assert Evaluation.of(cfg, 0, 1) is None


@pytest.mark.parametrize("sets, said", [
    (["eval.interval=5"], "eval.path: is empty, but eval.interval=5 asks for evaluations\n"
     "    fix: set eval.path to a held-out text or token file, data.holdout to the fraction of "
     "the training data to hold out for them (e.g. 0.01), or eval.interval to 0"),
    (["data.holdout=1"], "data.holdout: 1 is not a fraction in [0, 1)\n"
     "    fix: hold out a small fraction of the training data, e.g. 0.01, or 0 for none"),
    (["data.holdout=0.1", "eval.path=x.txt"], "data.holdout: 0.1 holds data out for "
     "evaluations, but they read eval.path 'x.txt'\n    fix: clear eval.path to evaluate on "
     "the held-out data, or set data.holdout to 0"),
    (["eval.interval=-1"], "eval.interval: must be 0 or more, got -1\n"
     "    fix: use 0 to switch evaluation off, or e.g. 100"),
    (["eval.batches=0"], "eval.batches: must be at least 1, got 0\n"
     "    fix: use a positive number of global batches, e.g. 4"),
])
def test_config_rules(sets, said):
    """Checked with the config: ``orch plan`` says them too."""
    with pytest.raises(ConfigError) as refused:
        _cfg(*sets)
    assert [str(p) for p in refused.value.problems] == [said]


def _file_problem(tmp_path: Path, path: Path | str, *sets: str) -> str:
    (said,) = _said(_cfg("eval.interval=2", f"eval.path={path}", *sets))
    return said


def test_a_missing_file_is_said_of_eval_path_without_the_shipped_corpus(tmp_path):
    said = _file_problem(tmp_path, tmp_path / "nope.txt")
    assert said.startswith(f"eval.path: '{tmp_path / 'nope.txt'}' does not exist")
    assert "fix: correct the path (relative paths start where orch runs)" in said
    assert "shipped corpus" not in said and "data.path" not in said


@pytest.mark.parametrize("name, content, said", [
    ("dir", None, "is not a file\n    fix: point eval.path at one file"),
    ("held.txt", b"ab\0cd" * 100, "holds NUL bytes in its first 64 KiB: a binary file, not "
     "text\n    fix: give a text file, or token ids as .npy"),
    ("held.pt", b"x" * 100, "is a .pt file: neither text nor token ids as orch reads them"),
    ("held.txt", b"", "is empty\n    fix: point eval.path at a file with data"),
    ("held.bin", b"x" * 101, "has 101 bytes, not a multiple of 2 (data.token_dtype='uint16')"),
])
def test_the_file_is_checked_with_data_paths_rules(tmp_path, name, content, said):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    got = _file_problem(tmp_path, path)
    assert got.startswith(f"eval.path: '{path}'") and said in got, got


def test_the_held_out_files_suffix_says_how_it_reads_not_data_format(tmp_path):
    """``data.format`` says how data.path reads: with ``tokens`` for a .bin of training data,
    a text held-out file was refused with the fix 'set data.format to text', which would have
    broken the training data."""
    cfg = _cfg("data.format=tokens", "eval.interval=2", f"eval.path={_text(tmp_path, 200)}")
    assert eval_file_problems(cfg) == []
    assert len(load_eval_batches(cfg, 0, 1)) == 1


def test_an_unreadable_file(tmp_path, monkeypatch):
    path = _text(tmp_path, 200)
    monkeypatch.setattr("orch.runtime.data.os.access", lambda p, mode: False)
    assert _file_problem(tmp_path, path) == (
        f"eval.path: '{path}' cannot be read by this user (permission denied)\n"
        "    fix: make it readable (chmod a+r), or point eval.path at a copy")


def test_too_short_for_one_global_batch(tmp_path):
    path = _text(tmp_path, BATCH * SEQ)  # one token short
    assert _file_problem(tmp_path, path) == (
        f"eval.path: '{path}' holds 64 tokens, fewer than one global batch of "
        "train.global_batch=4 sequences of train.seq_len=16 needs (65)\n"
        "    fix: use a longer eval.path, or lower train.global_batch or train.seq_len")


def test_more_batches_than_the_file_holds_says_the_most_it_allows(tmp_path):
    path = _text(tmp_path, 3 * BATCH * SEQ + 1)
    assert _said(_cfg("eval.interval=2", f"eval.path={path}", "eval.batches=3")) == []
    said = _file_problem(tmp_path, path, "eval.batches=4")
    assert said == (f"eval.batches: 4, but eval.path '{path}' holds 3 global batches of 4 x 16 "
                    "tokens (193 tokens)\n"
                    "    fix: set eval.batches to at most 3, or use a longer eval.path")


def test_a_gzip_file_past_its_sniffed_head_is_read_as_far_as_evaluations_read(tmp_path):
    """A compressed held-out text whose size its first 64 KiB do not tell: too few batches
    for eval.batches were found only by every rank's worker after start; the launcher now
    decompresses what evaluations would read (all of it here, the file ending sooner)."""
    tokens = 70_000  # 1,093 global batches of 4 x 16 tokens
    path = tmp_path / "held.txt.gz"
    path.write_bytes(gzip.compress(_text(tmp_path, tokens).read_bytes()))
    assert _said(_cfg("eval.interval=2", f"eval.path={path}", "eval.batches=1093")) == []
    assert _file_problem(tmp_path, path, "eval.batches=2000") == (
        f"eval.batches: 2000, but eval.path '{path}' holds 1093 global batches of 4 x 16 tokens "
        f"({tokens} tokens)\n    fix: set eval.batches to at most 1093, or use a longer "
        "eval.path")


def test_orch_launch_says_them_with_every_other_problem_before_starting(tmp_path):
    argv = ["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path / 'r'}",
            "--set", "train.lr=abc", "--set", "eval.interval=10", "--set",
            f"eval.path={tmp_path / 'nope.txt'}"]
    with pytest.raises(ConfigError) as refused:
        prepare(argv)
    said = [p.where for p in refused.value.problems]
    assert said == ["--set train.lr", "eval.path"] and not (tmp_path / "r").exists()


def test_a_token_id_beyond_the_vocabulary_is_said_when_the_worker_reads_the_file(tmp_path):
    path = tmp_path / "held.npy"
    np.save(path, np.full(200, 300, dtype=np.uint16))
    with pytest.raises(DataError) as info:
        load_eval_batches(_cfg("eval.interval=2", f"eval.path={path}"), 0, 1)
    assert str(info.value).startswith(f"model.vocab_size: 256, but '{path}' contains token id "
                                      "300")


@pytest.mark.parametrize("name", ["held.bin", "held.txt", "held.txt.gz"])
def test_only_the_part_an_evaluation_uses_is_read(tmp_path, name):
    """Every rank read (and range-scanned) the whole held-out file for the first
    ``batches x global_batch x seq_len + 1`` ids it uses: an id past them is not looked at,
    and text is read that far."""
    used = 2 * BATCH * SEQ + 1
    path = tmp_path / name
    if name.endswith(".bin"):
        ids = np.full(used + 100, 7, dtype=np.uint16)
        ids[used] = 300  # beyond the vocabulary, past what two batches use
        ids.tofile(path)
    else:
        body = bytes(range(65, 91)) * 100
        path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
        source = read_like_data(_cfg().data, str(path))
        assert load_tokens(source, 256, limit=used).tobytes() == body[:used]
    cfg = _cfg("eval.interval=2", "eval.batches=2", f"eval.path={path}")
    assert sum(len(micro) for micro in load_eval_batches(cfg, 0, 1)) == 2 * BATCH


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_every_evaluation_reads_the_files_first_batches_in_order_split_as_training(
        tmp_path, dp_size):
    """Ranks take contiguous shares of each global batch, as ``BatchStream`` splits a step's:
    together, in rank order, the first ``batches x global_batch`` packed samples of the file."""
    tokens = 5 * BATCH * SEQ + 7  # 5 batches and a tail no evaluation reads
    path = _text(tmp_path, tokens)
    cfg = _cfg("eval.interval=2", f"eval.path={path}", "eval.batches=3")
    samples = PackedSequences(np.frombuffer(path.read_bytes(), dtype=np.uint8), SEQ)
    ranks = [load_eval_batches(cfg, rank, dp_size) for rank in range(dp_size)]
    for batch in range(3):
        inputs = torch.cat([i for rank in ranks for i, _ in rank[batch]])
        targets = torch.cat([t for rank in ranks for _, t in rank[batch]])
        want = samples.gather(np.arange(batch * BATCH, (batch + 1) * BATCH))
        assert torch.equal(inputs, want[0]) and torch.equal(targets, want[1])
        assert all(len(rank[batch]) == BATCH // dp_size for rank in ranks)  # micro_batch 1
    evaluation = Evaluation.of(cfg, 0, dp_size)
    assert evaluation is not None and evaluation.tokens == 3 * BATCH * SEQ


def test_evaluations_are_due_every_interval_and_at_the_last_step_not_at_a_stop(tmp_path):
    path = _text(tmp_path, 200)
    evaluation = Evaluation.of(_cfg("eval.interval=4", f"eval.path={path}", "train.steps=10",
                                    "train.warmup_steps=1", "run.stop_at_step=6"), 0, 1)
    assert evaluation is not None
    assert [s for s in range(1, 11) if evaluation.due(s)] == [4, 8, 10]


def test_an_evaluation_is_a_record_of_its_own_and_a_line_in_the_log(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path, True, out)
    log.log_eval(EvalMetrics(step=40, eval_loss=2.314, eval_tokens=4096, eval_s=0.8))
    log.close()
    assert out.getvalue() == "eval step 40: loss 2.314 (ppl 10.11) over 4,096 tokens in 0.80 s\n"
    line = (tmp_path / "metrics.jsonl").read_text()
    assert line.startswith('{"step": 40, ') and "resumed_from" not in line  # a step record's
    assert is_eval(json.loads(line))


def test_the_report_plots_and_sums_up_the_evaluations_and_reads_the_steps_as_before(
        tmp_path, capsys):
    from orch.report import read_metrics, read_run_records, write_report

    steps = [{"step": n, "steps": 4, "loss": 5.0 - n, "tokens_per_s": 100.0, "mfu": 0.01,
              "mem_bytes": 1 << 20} for n in range(1, 5)]
    evals = [{"step": n, "eval_loss": 4.5 - n, "eval_tokens": 64, "eval_s": 0.1} for n in (2, 4)]
    rows = [steps[0], steps[1], evals[0], steps[2], steps[3], evals[1]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path) == steps
    assert read_run_records(tmp_path) == (steps, evals)
    write_report(tmp_path)
    assert "skipped" not in capsys.readouterr().err
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- held-out loss: 2.5000 at step 2 -> 0.5000 at step 4 (2 evaluation(s))" in summary
    assert "- steps logged: 4, last step 4 of 4" in summary
