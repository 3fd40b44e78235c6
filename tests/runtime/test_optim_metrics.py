"""Learning-rate schedule, optimizer groups, and the progress line format."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

from orch.config import load_config
from orch.models.llama import Transformer
from orch.runtime.metrics import StepMetrics
from orch.runtime.optim import build_optimizer, decay_change, lr_at

CFG = load_config("configs/tiny.yaml", ["train.steps=110", "train.warmup_steps=10"])


def test_warmup_then_cosine_to_the_floor():
    t = CFG.train
    assert lr_at(1, t) == pytest.approx(t.lr / 10) and lr_at(10, t) == pytest.approx(t.lr)
    assert lr_at(60, t) == pytest.approx(t.lr * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert lr_at(110, t) == pytest.approx(t.lr * t.min_lr_ratio)
    linear = dataclasses.replace(t, lr_schedule="linear")
    assert lr_at(60, linear) == pytest.approx(t.lr - 0.9 * t.lr * 0.5)
    constant = dataclasses.replace(t, lr_schedule="constant")
    assert lr_at(100, constant) == t.lr
    rates = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert not any(math.isnan(r) for r in rates)


def test_decay_steps_ends_the_decay_and_a_resume_that_moves_the_end_says_so():
    """Extending a finished run (train.steps 8 -> 12, as its closing lines suggest) stretched
    its cosine: step 9's lr jumped from the floor back to 2.9x it, silently; train.decay_steps
    keeps the old end (the floor after it), and the launcher says which happens."""
    t8 = dataclasses.replace(CFG.train, steps=8, warmup_steps=2)
    t12 = dataclasses.replace(t8, steps=12)
    kept = dataclasses.replace(t12, decay_steps=8)
    assert [lr_at(s, kept) for s in range(1, 9)] == [lr_at(s, t8) for s in range(1, 9)]
    assert lr_at(9, kept) == lr_at(12, kept) == pytest.approx(t8.lr * t8.min_lr_ratio)
    assert lr_at(9, t12) > 2 * lr_at(8, t8)
    saved = dataclasses.asdict(t8)
    said = decay_change(saved, t12, 8)
    assert said == (f"the lr decay ends at step 12 where the checkpoint's run ended it at 8 "
                    f"(train.decay_steps, else train.steps): step 9's lr is {lr_at(9, t12):.3g}, "
                    f"{lr_at(9, kept):.3g} on that schedule; --set train.decay_steps=8 keeps it")
    assert decay_change(saved, kept, 8) is None  # the same end
    constant = {**saved, "lr_schedule": "constant"}  # constant both: no decay to move
    assert decay_change(constant, dataclasses.replace(t12, lr_schedule="constant"), 8) is None
    assert decay_change(saved, dataclasses.replace(t8, decay_steps=6), 8) is None  # both past
    assert decay_change(saved, t12, 5) is not None  # a preempted run extended: changes too
    warming = dataclasses.replace(t12, steps=20, warmup_steps=8)  # the same lr until step 8
    assert "step 9's lr is " in decay_change({"steps": 10}, warming, 3)
    old = {k: v for k, v in saved.items() if k != "decay_steps"}  # saved before the field
    assert decay_change(old, t12, 8) == said


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_holds_the_peak_then_cools_down_to_the_floor(shape):
    """Warmup-stable-decay (torchtitan's decay_ratio, Megatron's WSD): the peak lr until the
    last cooldown_steps before the decay's end, then the curve named to the floor; by default
    the cooldown is a fifth of the steps after warmup."""
    t = dataclasses.replace(CFG.train, lr_schedule="wsd", cooldown_shape=shape)  # 10 + 100
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    assert [lr_at(s, t) for s in (1, 10)] == pytest.approx([peak / 10, peak])
    assert all(lr_at(s, t) == peak for s in range(10, 91))  # cooldown: 20 of the 100 steps
    left = {"linear": 0.5, "cosine": 0.5, "sqrt": 1 - math.sqrt(0.5)}[shape]
    assert lr_at(100, t) == pytest.approx(floor + (peak - floor) * left)
    quarter = {"linear": 0.75, "cosine": 0.5 * (1 + math.cos(math.pi / 4)), "sqrt": 0.5}[shape]
    assert lr_at(95, t) == pytest.approx(floor + (peak - floor) * quarter)
    assert lr_at(110, t) == lr_at(200, t) == pytest.approx(floor)
    rates = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    short = dataclasses.replace(t, cooldown_steps=4, decay_steps=50)
    assert lr_at(46, short) == peak and lr_at(50, short) == pytest.approx(floor)
    assert lr_at(47, short) < peak
    whole = dataclasses.replace(t, cooldown_steps=100)  # from the warmup's end: no stable phase
    assert lr_at(11, whole) < peak


def test_a_wsd_launch_says_where_its_cooldown_falls():
    """The cooldown's start is derived (train.cooldown_steps, else a fifth of the steps after
    the warmup): a launch said nothing of it until the run ended. The words agree with lr_at."""
    from orch.runtime.optim import wsd_phases

    t = dataclasses.replace(CFG.train, lr_schedule="wsd")  # 10 + 100 steps, cooldown 20
    said = wsd_phases(t)
    assert said == (f"lr wsd: warmup over steps 1-10, the peak {t.lr:.3g} until step 90, then a "
                    f"linear cooldown over steps 91-110 to {t.lr * t.min_lr_ratio:.3g}")
    assert lr_at(90, t) == t.lr > lr_at(91, t) and lr_at(110, t) == pytest.approx(
        t.lr * t.min_lr_ratio)
    cold = dataclasses.replace(t, warmup_steps=0, cooldown_shape="sqrt", cooldown_steps=1)
    assert wsd_phases(cold).startswith(f"lr wsd: the peak {t.lr:.3g} until step 109, then a "
                                       "sqrt cooldown over step 110 to")


def test_a_resume_that_moves_or_reshapes_a_wsd_cooldown_says_from_which_step():
    """The wsd way to go on: more steps from a checkpoint of the stable phase, whose cooldown
    then moves to the new end; or another cooldown from it. The rates change only from the
    first step where the two schedules part, which the launcher names."""
    t = dataclasses.replace(CFG.train, lr_schedule="wsd", cooldown_steps=20)  # peak to 90
    saved = dataclasses.asdict(t)
    longer = dataclasses.replace(t, steps=200)  # cooldown 181-200
    said = decay_change(saved, longer, 60)
    assert said == ("the lr cooldown (linear) runs over steps 181-200 where the checkpoint's run "
                    "ran it (linear) over steps 91-110 (train.cooldown_steps and "
                    "train.decay_steps, else train.steps): step 91's lr is "
                    f"{lr_at(91, longer):.3g}, {lr_at(91, t):.3g} on that schedule; "
                    "--set train.decay_steps=110 keeps it")
    assert lr_at(91, longer) == t.lr
    assert decay_change(saved, longer, 95).startswith(
        "the lr cooldown (linear) runs over steps 181-200")  # inside the old cooldown: next one
    assert "step 96's lr is " in decay_change(saved, longer, 95)
    resh = dataclasses.replace(t, cooldown_shape="sqrt", cooldown_steps=40)
    said = decay_change(saved, resh, 60)
    assert ("runs over steps 71-110 where the checkpoint's run ran it (linear) over steps "
            "91-110") in said
    assert said.endswith("step 71's lr is "
                         f"{lr_at(71, resh):.3g}, {t.lr:.3g} on that schedule; --set "
                         "train.cooldown_steps=20 --set train.cooldown_shape=linear keeps it")
    assert decay_change(saved, t, 60) is None  # the same schedule
    assert decay_change(saved, dataclasses.replace(t, decay_steps=110), 60) is None  # spelled so
    assert decay_change(saved, resh, 110) is None  # both over
    one_step = dataclasses.replace(t, cooldown_steps=1)  # every curve ends at the floor
    saved_one = dataclasses.asdict(one_step)
    assert decay_change(saved_one, dataclasses.replace(one_step, cooldown_shape="sqrt"),
                        50) is None


def test_a_cooldown_of_one_step_or_none_is_worded_so():
    """A cooldown of one step was said to run "over steps 30-30", and a run whose warmup
    reached its decay's end (no cooldown) to have run it "over 21-20"."""
    t = dataclasses.replace(CFG.train, lr_schedule="wsd", steps=30, warmup_steps=5,
                            cooldown_steps=25)
    said = decay_change(dataclasses.asdict(t), dataclasses.replace(t, cooldown_steps=1), 3)
    assert said.startswith("the lr cooldown (linear) runs over step 30 where the checkpoint's "
                           "run ran it (linear) over steps 6-30 (")
    t = dataclasses.replace(t, steps=20, warmup_steps=20, cooldown_steps=0)
    said = decay_change(dataclasses.asdict(t), dataclasses.replace(t, steps=40), 20)
    assert said.startswith("the lr cooldown (linear) runs over steps 37-40 where the "
                           "checkpoint's run ran it (linear) over no step (")


def test_a_resume_from_the_peak_under_another_schedule_or_floor_says_what_comes():
    """A stable-phase resume may set a wsd run's floor, or cool a constant run down as wsd
    (nothing trained reads either): the launch names the first step whose lr changes, and the
    --set that keeps the checkpoint's schedule, as it does for a moved cooldown. Before, a
    constant schedule on either side said nothing."""
    t = dataclasses.replace(CFG.train, lr_schedule="wsd", cooldown_steps=20)  # peak to 90
    lower = dataclasses.replace(t, min_lr_ratio=0.01)
    assert decay_change(dataclasses.asdict(t), lower, 60) == (
        f"the lr floor is {t.lr * 0.01:.3g} where the checkpoint's run's was "
        f"{t.lr * 0.1:.3g} (train.min_lr_ratio): step 91's lr is {lr_at(91, lower):.3g}, "
        f"{lr_at(91, t):.3g} on that schedule; --set train.min_lr_ratio=0.1 keeps it")
    constant = dataclasses.asdict(dataclasses.replace(t, lr_schedule="constant",
                                                      cooldown_steps=0))
    assert decay_change(constant, lower, 60) == (
        "the lr schedule is wsd where the checkpoint's run's was constant (train.lr_schedule): "
        f"step 91's lr is {lr_at(91, lower):.3g}, {t.lr:.3g} on that schedule; --set "
        "train.lr_schedule=constant --set train.min_lr_ratio=0.1 --set train.cooldown_steps=0 "
        "keeps it")
    held = dataclasses.replace(t, lr_schedule="constant", cooldown_steps=0, steps=200)
    assert decay_change(dataclasses.asdict(t), held, 60) == (
        "the lr schedule is constant where the checkpoint's run's was wsd (train.lr_schedule): "
        f"step 91's lr is {t.lr:.3g}, {lr_at(91, t):.3g} on that schedule; --set "
        "train.decay_steps=110 --set train.lr_schedule=wsd --set train.cooldown_steps=20 keeps "
        "it")
    assert decay_change(constant, dataclasses.replace(lower, min_lr_ratio=1.0), 60) is None


@pytest.mark.parametrize(("saved", "resumed", "step"), [
    (["train.lr_schedule=constant"], ["train.lr_schedule=wsd", "train.cooldown_steps=20",
                                      "train.min_lr_ratio=0.01"], 60),
    (["train.lr_schedule=cosine"], ["train.lr_schedule=wsd", "train.cooldown_steps=20",
                                    "train.cooldown_shape=sqrt"], 5),  # still warming up
    (["train.lr_schedule=wsd", "train.cooldown_steps=20"],
     ["train.lr_schedule=constant", "train.steps=200"], 60),
    (["train.lr_schedule=wsd", "train.cooldown_steps=20"],
     ["train.lr_schedule=wsd", "train.min_lr_ratio=0.01", "train.steps=200"], 60),
])
def test_the_sets_that_keep_the_checkpoints_schedule_make_a_config_that_keeps_it(
        saved, resumed, step):
    """The --sets a resume under another schedule names, added to its command, give a config
    that loads and trains the checkpoint's rates: "--set train.lr_schedule=constant" alone,
    after a wsd cooldown or floor was set, was refused (a cooldown or floor set beside a
    constant schedule), as was "--set train.lr_schedule=cosine" after a cooldown."""
    base = ["train.steps=110", "train.warmup_steps=10"]
    before = dataclasses.asdict(load_config("configs/tiny.yaml", [*base, *saved]).train)
    train = load_config("configs/tiny.yaml", [*base, *resumed]).train
    said = decay_change(before, train, step)
    keep = said.rpartition("; ")[2].removesuffix(" keeps it").split()
    assert keep[::2] == ["--set"] * (len(keep) // 2), said
    kept = load_config("configs/tiny.yaml", [*base, *resumed, *keep[1::2]]).train
    assert decay_change(before, kept, step) is None, said


def test_no_weight_decay_on_norms():
    optimizer = build_optimizer(Transformer(CFG.model), CFG)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == CFG.optimizer.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])


def test_progress_line_has_the_documented_fields():
    line = StepMetrics(step=120, steps=1000, loss=3.4123, lr=3e-4, grad_norm=1.0, tokens=4096,
                       step_time_s=0.41, tokens_per_s=48200, tflops=412, mfu=0.417,
                       mem_bytes=int(61.2 * 2**30), mem_total_bytes=80 * 2**30).line()
    assert line == ("step 120/1000 | loss 3.412 | 48.2k tok/s | 412 TFLOP/s | MFU 41.7% | "
                    "mem 61.2/80.0 GiB | 0.41 s/step")


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_the_trainer_clips_the_global_gradient_norm(clip):
    """The clip scales every gradient by clip / norm (torch's clip_grad_norm_ is the reference)
    and returns the norm before clipping; 0 turns it off. (It once passed gradients where
    clip_grads_with_norm_ wants parameters, which clipped nothing: AdamW hid it.)"""
    import types

    import torch

    from orch.runtime.trainer import Trainer

    torch.manual_seed(0)
    model = Transformer(CFG.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    expected = [p.grad.clone() for p in model.parameters()]
    norm = float(torch.nn.utils.get_total_norm(expected))
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for r, g in zip(ref, expected, strict=True):
        r.grad = g.clone()
    if clip:
        torch.nn.utils.clip_grad_norm_(ref, clip)
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, grad_clip=clip))
    trainer = types.SimpleNamespace(model=model, cfg=cfg, pipeline=None, offload=None)
    assert Trainer._clip(trainer) == pytest.approx(norm)
    for p, r in zip(model.parameters(), ref, strict=True):
        assert torch.equal(p.grad, r.grad)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(total) == pytest.approx(clip if clip else norm, rel=1e-5)


MISSING = object()
"""A field a test leaves out of a step record."""


def _record(step: int, **changes: object) -> dict:
    """A step record as the runtime writes it (the fields ``orch report`` reads)."""
    return {"step": step, "steps": 4, "loss": 5.0 - step, "lr": 1e-3 * step, "grad_norm": 2.0,
            "tokens_per_s": 100.0, "mfu": 0.01, "mem_bytes": 1 << 20,
            "devices": [{"rank": 0, "rss_bytes": 1 << 20}], "comm_bytes": {"dp": 10}, **changes}


@pytest.mark.parametrize("changes, said", [
    ({"devices": "x"}, "devices is 'x'"),
    ({"devices": [{"rss_bytes": 5}]}, "devices is [{'rss_bytes': 5}]"),
    ({"devices": [{"rank": "a"}]}, "devices is [{'rank': 'a'}]"),
    ({"comm_bytes": {"dp": "lots"}}, "comm_bytes is {'dp': 'lots'}"),
    ({"comm_bytes": [1]}, "comm_bytes is [1]"),
    ({"tokens_per_s": None}, "tokens_per_s is None, not a number of at least 0"),
    ({"mfu": "x"}, "mfu is 'x'"),
    ({"loss": "x"}, "loss is 'x', not a number (or null where not finite)"),
    ({"aux_loss": [1]}, "aux_loss is [1]"),
    ({"lr": -1e-3}, "lr is -0.001, not a number of at least 0"),
    ({"lr": None}, "lr is None, not a number of at least 0"),
    ({"grad_norm": "big"}, "grad_norm is 'big', not a number (or null where not finite)"),
    ({"tokens_per_s": -5}, "tokens_per_s is -5, not a number of at least 0"),
    ({"loss": MISSING}, "loss is missing, not a number (or null where not finite)"),
    ({"mfu": MISSING}, "mfu is missing, not a number of at least 0"),
    ({"offload": {"device_peak_bytes": "x", "device_budget_bytes": 7}},
     "offload is {'device_peak_bytes': 'x', 'device_budget_bytes': 7}, not a device peak and "
     "budget in bytes"),
    ({"devices": [{"rank": 0, "rss_bytes": 5, "offload": {"device_peak_bytes": 5}}]},
     "devices[0].offload is {'device_peak_bytes': 5}, not a device peak and budget in bytes"),
])
def test_the_report_skips_a_record_it_cannot_use_and_says_why(tmp_path, capsys, changes, said):
    """Each of these crashed ``orch report`` with a TypeError, KeyError or AttributeError (a
    record without ``loss`` was taken for one whose loss was not finite)."""
    import json

    from orch.report import write_report

    bad = {k: v for k, v in _record(2, **changes).items() if v is not MISSING}
    rows = [_record(1), bad, _record(3), _record(3, loss=0.5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    err = capsys.readouterr().err
    assert f"skipped the record of step 2 in {tmp_path / 'metrics.jsonl'}: {said}" in err
    summary = (tmp_path / "report" / "summary.md").read_text()
    # a resumed run's steps logged again: the later record stands, once
    assert "- steps logged: 2, last step 3 of 4" in summary and "-> 0.5000 at step 3" in summary


def test_the_report_draws_the_learning_rate_and_gradient_norm(tmp_path):
    """``optimization.png`` and a summary line: the lr each step trained at (its peak, where it
    ended) and the gradient norm (median, the largest finite one and its step; a diverged
    step's null left out). Records without an lr (an older orch's) draw no such plot."""
    import json

    from orch.report import write_report

    rows = [_record(1, lr=1e-3, grad_norm=3.0), _record(2, lr=3e-3, grad_norm=40.0),
            _record(3, lr=2e-3, grad_norm=None), _record(4, lr=5e-4, grad_norm=1.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = write_report(tmp_path)
    assert tmp_path / "report" / "optimization.png" in written
    assert (tmp_path / "report" / "optimization.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- learning rate: 0.0005 at step 4 (highest logged 0.003); gradient norm median 3, " \
        "largest 40 at step 2\n" in summary, summary
    assert "![optimization](optimization.png)" in summary
    older = tmp_path / "older"
    older.mkdir()
    (older / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k not in ("lr", "grad_norm")}) + "\n"
        for r in rows))
    assert "optimization.png" not in [p.name for p in write_report(older)]
    assert "learning rate" not in (older / "report" / "summary.md").read_text()


def test_nothing_in_optimization_png_covers_its_curves(tmp_path, monkeypatch):
    """A constant lr (or a wsd stable phase, or a resumed run back at the peak) runs along the
    top of its axis, where the legend in the upper right corner hid it: no box drawn over the
    axes may hold a point of either curve."""
    import json

    from orch import report

    rows = [_record(s, lr=1e-3, grad_norm=10.0 / s) for s in range(1, 21)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    covered: list[str] = []
    save = report._save

    def inspect(fig, path):
        if path.name == "optimization.png":
            fig.canvas.draw()
            boxes = [legend.get_window_extent() for axis in fig.axes
                     if (legend := axis.get_legend()) is not None]
            covered.extend(f"{line.get_label()} at {x:.0f}, {y:.0f}" for axis in fig.axes
                           for line in axis.get_lines()
                           for x, y in axis.transData.transform(line.get_xydata())
                           if any(box.contains(x, y) for box in boxes))
        return save(fig, path)

    monkeypatch.setattr(report, "_save", inspect)
    report.write_report(tmp_path)
    assert covered == []


def test_a_torn_last_metrics_line_neither_blocks_a_resume_nor_a_report(tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves its last line torn; the resume keeps the
    records up to its checkpoint's step and drops the rest (before: a JSONDecodeError in every
    worker, so the run could not resume until the file was edited), and ``orch report`` reads
    the records, saying what it skipped."""
    import io
    import json

    from orch.report import read_metrics
    from orch.runtime.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [_record(n) for n in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '[1, 2]\n{"step": 4, "loss": 4.')
    assert read_metrics(tmp_path) == rows
    assert "skipped 2 line(s)" in capsys.readouterr().err
    MetricsLog(tmp_path, True, io.StringIO(), resume_step=2).close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


def test_records_a_resume_redoes_are_moved_aside_not_deleted(tmp_path):
    """A resume from an older checkpoint (or ``resume=none``) deleted the records after it at
    start; when that run died before its first save, the next ``--resume auto`` took the newer
    checkpoint again, whose steps' records were gone."""
    import io
    import json

    from orch.runtime.metrics import SUPERSEDED_METRICS, MetricsLog

    path, aside = tmp_path / "metrics.jsonl", tmp_path / SUPERSEDED_METRICS
    rows = [_record(n) for n in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = io.StringIO()
    MetricsLog(tmp_path, True, out, resume_step=2).close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    assert [json.loads(line) for line in aside.read_text().splitlines()] == rows[2:]
    assert f"2 metrics records after step 2 moved to {aside}" in out.getvalue()
    MetricsLog(tmp_path, True, io.StringIO(), resume_step=0).close()  # starting over
    assert path.read_text() == ""
    assert [json.loads(line) for line in aside.read_text().splitlines()] == [
        *rows[2:], *rows[:2]]


def test_a_report_into_a_file_is_refused_with_the_fix(tmp_path, capsys):
    """``--out`` naming an existing file crashed with FileExistsError; a file at the default
    ``RUN_DIR/report`` was then blamed on an ``--out`` the user never gave."""
    import json

    from orch.cli import main
    from orch.report import ReportError, write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    (tmp_path / "taken").write_text("")
    with pytest.raises(ReportError, match=r"--out .*taken: cannot be made a directory"):
        write_report(tmp_path, tmp_path / "taken")
    (tmp_path / "report").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'report'}, the default output directory, cannot be made a directory "
            f"(File exists); fix: move the file {tmp_path / 'report'} out of the way, or give "
            "--out PATH") in err and "--out " + str(tmp_path) not in err


@pytest.mark.parametrize("make, said", [
    (lambda run: None, "{run} does not exist; fix: give the run directory of an orch launch"),
    (lambda run: run.write_text(""), "{run} is a file, not a run directory; fix: give the run "
     "directory of an orch launch (its run.dir)"),
    (lambda run: (run / "metrics.jsonl").mkdir(parents=True),
     "{run}/metrics.jsonl is not a file (the run's step records are written there); fix: move "
     "it out of the way"),
    (lambda run: run.mkdir(), "{run}: no metrics.jsonl; fix: give the run directory of an orch "
     "launch (its run.dir) that has logged at least one step"),
])
def test_a_run_directory_the_report_cannot_read_is_said_as_what_it_is(tmp_path, capsys, make,
                                                                      said):
    """A path that does not exist, a file, and a metrics.jsonl that is a directory were all
    said as "no metrics.jsonl"."""
    from orch.cli import main

    run = tmp_path / "run"
    make(run)
    assert main(["report", str(run)]) == 2
    assert f"orch report: {said.format(run=run)}" in capsys.readouterr().err


@pytest.mark.parametrize("pp, copied", [(2, True), (1, False)])
def test_the_report_shows_the_pipeline_timeline_of_a_pipelined_plan_only(tmp_path, pp, copied):
    """A run resumed from pp2 onto one process keeps pp2's timeline in its directory; the
    report embedded it under "plan: 1 x cpu, one process"."""
    import json

    from orch.report import write_report

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(_record(n)) + "\n"
                                                    for n in (1, 2)))
    (tmp_path / "plan.json").write_text(json.dumps({"world_size": pp, "device": "cpu",
                                                    "degrees": {"pp": pp}}))
    (tmp_path / "pipeline_timeline.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    written = write_report(tmp_path)
    assert (tmp_path / "report" / "pipeline_timeline.png" in written) is copied
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert ("pipeline_timeline.png" in summary) is copied


@pytest.mark.parametrize("plan, said", [
    ("[1, 2]", "is not a JSON object (it holds list [1, 2])"),
    ('{"degrees": [2]}', "has degrees [2], not an object of degrees"),
    ('{"degrees": {"pp": "2"}}', "has degree pp '2', not a whole number of at least 1"),
    ('{"degrees": {"virtual_stages": 0}}', "has degree virtual_stages 0, not a whole number"),
    ('{"degrees": {"sequence_parallel": "yes"}}', "has degree sequence_parallel 'yes', not true"),
    ('{"devices": ["h100"]}', "has devices ['h100'], not a description"),
    ('{"tiers": ["cpu"]}', "has tiers ['cpu'], not each tensor group's home tier"),
    ('{"tiers": {"params": 1}}', "has tiers {'params': 1}, not each tensor group's home tier"),
    ('{"step": {"comm_s": {"dp": "x"}}}', "has step {'comm_s': {'dp': 'x'}}, not the plan's"),
    ('{"step": {"comm_s": {"dp": 1}, "exposed_comm_s": "x"}}', "has step {'comm_s'"),
])
def test_a_plan_the_report_cannot_use_is_left_unknown_and_the_report_whole(tmp_path, capsys,
                                                                         plan, said):
    """Each of these crashed ``orch report`` (AttributeError, TypeError) after the plots were
    written, leaving part of a report; a plan.json that cannot be read already left the plan
    unknown, with a note."""
    import json

    from orch.report import write_report

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(_record(n)) + "\n"
                                                    for n in (1, 2)))
    (tmp_path / "plan.json").write_text(plan)
    (tmp_path / "pipeline_timeline.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    written = write_report(tmp_path)
    assert f"orch report: {tmp_path / 'plan.json'} {said}" in capsys.readouterr().err
    assert [p.name for p in written] == ["loss.png", "optimization.png", "throughput.png",
                                         "memory.png", "communication.png", "summary.md"]
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- plan: unknown (no usable plan.json; 1 rank(s) recorded)" in summary


def test_the_report_reads_everything_before_it_writes_anything(tmp_path, monkeypatch):
    """The summary, which reads the plan and the checkpoints last, is made before the output
    directory: a failure reading the run leaves no partial report behind."""
    import json

    import orch.report
    from orch.report import ReportError, write_report

    def unreadable(*args: object) -> str:
        raise ReportError("checkpoints unreadable")

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    monkeypatch.setattr(orch.report, "_summary", unreadable)
    with pytest.raises(ReportError, match="checkpoints unreadable"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_a_diverged_run_is_reported_not_skipped(tmp_path, capsys):
    """Steps whose loss was NaN were written as ``NaN`` (not JSON) and skipped by the report,
    whose summary then read as a healthy run of the steps before the divergence."""
    import io
    import json
    import math

    from orch.report import write_report
    from orch.runtime.metrics import MetricsLog, StepMetrics

    log = MetricsLog(tmp_path, True, io.StringIO())
    for step, loss in ((1, 5.5), (2, 5.4), (3, math.nan), (4, math.inf)):
        log.log(StepMetrics(step=step, steps=4, loss=loss, lr=1e-3, grad_norm=math.nan,
                            tokens=8, step_time_s=1.0, tokens_per_s=8.0, tflops=0.1, mfu=0.01,
                            mem_bytes=1 << 20, mem_total_bytes=1 << 30,
                            devices=[{"rank": 0, "rss_bytes": 1 << 20}]))
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(name))
            for line in text.splitlines()]
    assert [r["loss"] for r in rows] == [5.5, 5.4, None, None] and rows[0]["grad_norm"] is None
    write_report(tmp_path)
    assert "skipped" not in capsys.readouterr().err
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- steps logged: 4, last step 4 of 4" in summary
    assert "- loss: 5.5000 at step 1 -> nan at step 4" in summary
    assert "- loss not finite (NaN or infinite) at 2 logged step(s), from step 3" in summary


def test_the_loss_plot_of_a_run_without_a_finite_loss_spans_the_steps_logged(tmp_path,
                                                                            monkeypatch):
    """Every loss null: the x-axis was scaled to the line at step 1 alone (0.96-1.04), though
    6 steps were logged."""
    import json

    import orch.report
    from orch.report import write_report

    limits = {}
    save = orch.report._save

    def keep_limits(fig, path):
        limits[path.name] = fig.axes[0].get_xlim()
        return save(fig, path)

    monkeypatch.setattr(orch.report, "_save", keep_limits)
    rows = [_record(n, loss=None) for n in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    assert limits["loss.png"] == pytest.approx((0.75, 6.25))


def test_the_report_draws_each_ranks_memory_and_the_mfu_at_their_own_steps(tmp_path,
                                                                         monkeypatch):
    """A run resumed onto more ranks: rank 1's readings of steps 3-4 were drawn at steps 1-2,
    and the MFU axis was derived from the first record's tokens/s (off by the world size)."""
    import json

    import matplotlib

    import orch.report
    from orch.report import memory_by_rank, write_report

    matplotlib.use("Agg")
    drawn: dict[str, dict[str, tuple[list, list]]] = {}
    save = orch.report._save

    def keep_lines(fig, path):
        drawn[path.name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                            for ax in fig.axes for line in ax.get_lines()}
        return save(fig, path)

    monkeypatch.setattr(orch.report, "_save", keep_lines)
    one = [{"rank": 0, "rss_bytes": 1 << 30}]
    two = [*one, {"rank": 1, "rss_bytes": 2 << 30}]
    rows = [_record(1, devices=one), _record(2, devices=one, mfu=0.02),
            _record(3, devices=two), _record(4, devices=two, mfu=0.03)]
    assert memory_by_rank(rows) == {0: [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)],
                                    1: [(3, 2.0), (4, 2.0)]}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary_said = write_report(tmp_path)[-1].read_text()
    assert "- plan: unknown (no usable plan.json; 2 rank(s) recorded)" in summary_said
    assert "MFU 2.00% (median over logged steps after the first)" in summary_said
    assert drawn["throughput.png"]["MFU"] == ([1, 2, 3, 4], [1.0, 2.0, 1.0, 3.0])
    assert drawn["memory.png"]["rank 1"] == ([3, 4], [2.0, 2.0])


def test_the_report_names_a_mixed_clusters_devices(tmp_path):
    import json

    from orch.report import write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    (tmp_path / "plan.json").write_text(json.dumps({
        "world_size": 16, "device": "h100-sxm-80gb", "devices": "8 x h200 + 8 x h100-sxm-80gb",
        "degrees": {"dp_shard": 16}}))
    summary = write_report(tmp_path)[-1].read_text()
    assert "- plan: 8 x h200 + 8 x h100-sxm-80gb, fsdp16" in summary


@pytest.mark.parametrize("degrees, schedule, said", [
    ({"pp": 2, "virtual_stages": 2}, "zbv", "2 x cpu, pp2v2 (zbv schedule)"),
    ({"pp": 2, "dp_replicate": 2, "dp_shard": 2}, "1f1b",
     "8 x cpu, pp2 hsdp4(2x2) (1f1b schedule)"),
    ({"tp": 2, "sequence_parallel": True}, "none", "2 x cpu, tp2+sp"),
    ({}, "none", "1 x cpu, single"),
])
def test_the_report_says_the_plan_as_launch_does(tmp_path, degrees, schedule, said):
    """A ZB-V run's summary said "plan: 2 x cpu, pp=2" where launch had said pp2v2: without
    the virtual stages and the schedule."""
    import json

    from orch.plan.degrees import Degrees
    from orch.report import write_report

    plan = Degrees(**degrees)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    (tmp_path / "plan.json").write_text(json.dumps({
        "world_size": plan.world, "device": "cpu", "devices": "", "degrees": plan.as_dict(),
        "schedule": schedule}))
    assert f"- plan: {said}\n" in write_report(tmp_path)[-1].read_text()


OFFLOADED = {"params": "cpu", "grads": "cpu", "optimizer": "cpu", "activations": "device"}
"""The tiers of the plan of an offloaded tiny run (``offload.params/grads/optimizer=cpu``)."""


def _offload(peak: int, budget: int = 7_000_000) -> dict:
    """A step record's ``offload`` as the engine writes it (``OffloadEngine.step_record``)."""
    return {"device_peak_bytes": peak, "device_budget_bytes": budget,
            "to_device_bytes": 96014336, "to_home_bytes": 48533504, "optimizer_s": None,
            "optimizer_wait_s": None, "optimizer_overlap": None}


@pytest.mark.parametrize("world, comm_s, rows, said", [
    (1, {"offload": 0.0307}, [_record(n, comm_bytes={}, offload=_offload(6508544))
                              for n in (1, 2)],
     ["- plan: 1 x cpu, single, offload params=cpu grads=cpu optimizer=cpu\n",
      "- offload: device peak 6.2 MiB of the 6.7 MiB device budget (93%; "
      "offload.device_budget)\n",
      "- communication (the plan's estimate): host<->device offload transfers 15.5% of a step's "
      "compute + communication time, 0.0291 s exposed\n"]),
    (2, {"dp_replicate": 0.02, "offload": 0.0307},
     [_record(n, offload=_offload(3 << 20, 4 << 20), devices=[
         {"rank": 0, "rss_bytes": 1 << 20, "offload": _offload(3 << 20, 4 << 20)},
         {"rank": 1, "rss_bytes": 1 << 20, "offload": _offload(7 << 19, 4 << 20)}])
      for n in (1, 2)],
     ["- plan: 2 x cpu, ddp2, offload params=cpu grads=cpu optimizer=cpu\n",
      "- offload: device peak 3.5 MiB of the 4.0 MiB device budget (88%; "
      "offload.device_budget)\n",
      "- communication (the plan's estimate): collectives 9.1%, host<->device offload transfers "
      "14.0% of a step's compute + communication time, 0.0291 s exposed\n"]),
])
def test_an_offloaded_runs_summary_names_its_tiers_transfers_and_device_peak(tmp_path, world,
                                                                            comm_s, rows, said):
    """An offloaded run's summary read as a plain one: ``plan: 1 x cpu, single``, its
    host<->device transfers (the plan's ``comm_s["offload"]``) as its "communication", and the
    process's resident set as its only memory figure, without the device peak against
    ``offload.device_budget`` that the records hold (the highest over the replicas' here)."""
    import json

    from orch.plan.degrees import Degrees
    from orch.report import write_report

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "plan.json").write_text(json.dumps({
        "world_size": world, "device": "cpu", "devices": f"{world} x cpu",
        "degrees": Degrees(dp_replicate=world).as_dict(), "tiers": OFFLOADED,
        "step": {"compute_s": 0.1679, "comm_s": comm_s, "exposed_comm_s": 0.0291}}))
    summary = write_report(tmp_path)[-1].read_text()
    assert all(line in summary for line in said), summary


def test_the_offload_device_peak_is_the_reading_nearest_its_budget_as_the_readme_says(tmp_path):
    """The README said the device peak is "the highest of its records'
    ``offload.device_peak_bytes``"; the report takes the reading that is the highest share of its
    own budget (a run resumed under a larger budget: 3 of 4 MiB, 75%, then 5 of 8 MiB, 62%),
    which is what the line is about. The README says so now."""
    import json

    from orch.report import write_report

    rows = [_record(1, offload=_offload(3 << 20, 4 << 20)),
            _record(2, offload=_offload(5 << 20, 8 << 20))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ("- offload: device peak 3.0 MiB of the 4.0 MiB device budget (75%; "
            "offload.device_budget)\n") in write_report(tmp_path)[-1].read_text()
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert ("`offload.device_budget` (of its records' `offload.device_peak_bytes`, the reading "
            "that is the highest share of its own `offload.device_budget_bytes`") in readme


@pytest.mark.parametrize("rate, said", [
    (0.0, "0.0"), (4.24, "4.2"), (9.94, "9.9"), (9.96, "10"), (42.4, "42"), (999.4, "999"),
    (999.6, "1.0k"), (48_200, "48.2k"), (999_940, "999.9k"), (999_960, "1.00M"),
    (1_250_000, "1.25M"),
])
def test_the_progress_line_says_tokens_per_s_in_the_unit_that_shows_them(rate, said):
    """Below 50 tok/s (offloaded fine-tuning of a large model) the line read ``0.0k tok/s``, and
    just under a million ``1000.0k``."""
    line = StepMetrics(step=1, steps=2, loss=3.0, lr=1e-3, grad_norm=1.0, tokens=4096,
                       step_time_s=1.0, tokens_per_s=rate, tflops=1.0, mfu=0.1, mem_bytes=0,
                       mem_total_bytes=1).line()
    assert f" | {said} tok/s | " in line


def test_the_reports_medians_leave_out_the_first_step_of_every_start(tmp_path):
    """The median dropped only the run's very first record, though each start's first step
    (a resume's too) includes its warm-up: a resumed start's slow step counted."""
    import json

    from orch.report import write_report

    rows = [_record(1, tokens_per_s=1.0, resumed_from=None), _record(2, tokens_per_s=100.0),
            _record(3, tokens_per_s=1.0, mfu=0.0, resumed_from="ckpt/step-00000002"),
            _record(4, tokens_per_s=100.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_report(tmp_path)[-1].read_text()
    assert ("- throughput: 100 tokens/s, MFU 1.00% (median over logged steps but the first of "
            "each of the run's 2 starts)") in summary


def test_a_report_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """It raised ModuleNotFoundError with a traceback."""
    import json
    import sys

    from orch.cli import main

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "orch report draws its plots with matplotlib, which this Python cannot import" in err
    assert "fix: pip install matplotlib" in err and "Traceback" not in err


@pytest.mark.parametrize("existing", [False, True])
def test_a_report_that_cannot_be_written_leaves_none_of_it_and_says_why(tmp_path, monkeypatch,
                                                                        existing):
    """A full disk (or a read-only ``--out``) failed in PIL with a traceback, after some plots
    were written: half a report, which looked like a whole one. The report is now drawn in a
    directory of its own and put in place at the end; a failure removes it and says why."""
    import errno
    import json

    import orch.report
    from orch.report import MARKER, ReportError, write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    out = tmp_path / "out"
    if existing:  # a directory holding other files, and an earlier report's
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "loss.png").write_bytes(b"old")
        (out / MARKER).write_text(json.dumps({"files": {"loss.png": [_sha256(b"old")]}}))
    save, saved = orch.report._save, []

    def full_disk(fig, path):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(save(fig, path))
        return saved[-1]

    monkeypatch.setattr(orch.report, "_save", full_disk)
    with pytest.raises(ReportError) as refused:
        write_report(tmp_path, out)
    assert str(refused.value) == (
        f"--out {out}: the report could not be written (No space left on device); none of it "
        "was left there; fix: give --out a directory you can write, on a file system with free "
        "space")
    assert saved  # one plot was drawn before the disk filled
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.name != "metrics.jsonl")  # (the staging directory too: .out.partial-*)
    assert left == (["out", "out/.orch-report", "out/loss.png", "out/notes.txt"] if existing
                    else [])
    if existing:
        assert (out / "loss.png").read_bytes() == b"old"


def test_a_report_into_an_existing_directory_keeps_its_other_files(tmp_path):
    import json

    from orch.report import MARKER, write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    written = write_report(tmp_path, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.txt", MARKER, *(p.name for p in written)])


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


_YOURS = "(written by you, or by an orch older than the .orch-report marker)"
_CHANGED = "(changed since an orch report wrote them)"


@pytest.mark.parametrize("marker, clash", [
    (None, f"loss.png, summary.md {_YOURS}"),
    ({"summary.md": [_sha256(b"MY NOTES\n")]}, f"loss.png {_YOURS}"),
    ({"../loss.png": [_sha256(b"keep\n")], "summary.md": [_sha256(b"MY NOTES\n")]},
     f"loss.png, summary.md {_YOURS}"),
    ({"summary.md": [_sha256(b"MY NOTES\n")], "loss.png": [_sha256(b"earlier\n")]},
     f"loss.png {_CHANGED}"),
    ({"summary.md": [_sha256(b"earlier\n")]}, f"summary.md {_CHANGED} and loss.png {_YOURS}"),
    (["loss.png", "summary.md"], f"loss.png, summary.md {_YOURS}"),
    ("not json", f"loss.png, summary.md {_YOURS}")])
def test_a_report_never_replaces_files_no_earlier_report_wrote(tmp_path, capsys, marker, clash):
    """``--out DIR`` holding the user's ``summary.md`` and ``loss.png`` said "wrote 4 files" and
    had replaced both. Only files an earlier report's marker records, still holding what it
    wrote (the marker's sha256), may be replaced: none without a marker (or with one that is not
    a record of plain names and digests), not loss.png where it records summary.md alone (a file
    the user put beside a report), not loss.png the user changed since the report wrote it."""
    import json

    from orch.cli import main
    from orch.report import MARKER

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    out = tmp_path / "d"
    out.mkdir()
    (out / "summary.md").write_text("MY NOTES\n")
    (out / "loss.png").write_text("keep\n")
    if marker is not None:
        (out / MARKER).write_text(marker if isinstance(marker, str)
                                  else json.dumps({"files": marker}))
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    assert (f"orch report: --out {out} holds {clash}, which the report would replace; nothing "
            "was written; fix: give --out a new or empty directory, or remove those files (or the "
            "directory)") in capsys.readouterr().err
    assert (out / "summary.md").read_text() == "MY NOTES\n"
    assert (out / "loss.png").read_text() == "keep\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["loss.png", "summary.md", *([MARKER] if marker else [])])


def test_a_default_report_directory_of_other_files_is_refused_with_the_fix(tmp_path, capsys):
    """A file of a report's name that the default directory's marker does not list."""
    import json

    from orch.cli import main
    from orch.report import MARKER

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "memory.png").write_text("mine")
    (tmp_path / "report" / MARKER).write_text('{"files": {}}')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (f"orch report: {tmp_path / 'report'}, the default output directory, holds "
            "memory.png (written by you, or by an orch older than the .orch-report marker), "
            "which the report would replace") in err
    assert err.endswith("fix: move those files out of the way, or give --out PATH\n")
    assert (tmp_path / "report" / "memory.png").read_text() == "mine"


def test_a_default_report_directory_of_an_orch_older_than_the_marker_is_replaced(tmp_path):
    """``orch report RUN_DIR`` of a run an orch older than the marker reported (its
    ``RUN_DIR/report`` holds the report's files and no marker) exited 2, saying they were
    written by "no earlier orch report". That directory is orch's: the report's names in it are
    replaced (an earlier report's communication.png it does not write is removed), other files
    stay; a user's ``--out`` without a marker is still refused (above)."""
    import json

    from orch.report import MARKER, write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1, comm_bytes={})) + "\n")
    old = tmp_path / "report"
    old.mkdir()
    for name in ("loss.png", "throughput.png", "memory.png", "communication.png", "summary.md",
                 "notes.txt"):
        (old / name).write_text("older orch's")
    written = write_report(tmp_path)
    assert "communication.png" not in {p.name for p in written}
    assert sorted(p.name for p in old.iterdir()) == sorted(
        [MARKER, "notes.txt", *(p.name for p in written)])
    assert "# Run report" in (old / "summary.md").read_text()
    assert (old / "notes.txt").read_text() == "older orch's"


def test_an_earlier_report_is_replaced_and_its_marker_records_the_reports_files(tmp_path):
    import json

    from orch.report import MARKER, write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    out = tmp_path / "out"
    first = write_report(tmp_path, out)
    (out / "notes.txt").write_text("mine")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(2)) + "\n")
    second = write_report(tmp_path, out)
    assert first == second and "last step 2 of 4" in (out / "summary.md").read_text()
    assert json.loads((out / MARKER).read_text()) == {
        "written_by": "orch report",
        "files": {p.name: [_sha256(p.read_bytes())] for p in sorted(second)}}
    assert (out / "notes.txt").read_text() == "mine"


def test_a_reports_file_changed_since_is_neither_replaced_nor_removed(tmp_path, capsys):
    """The marker listed the report's names alone: a report's ``summary.md`` the user had edited
    was replaced by the next report without a word. The marker records each file's sha256 now:
    a changed file the new report would write is refused, one it does not write (an earlier
    pp run's ``communication.png``) is kept, said on stderr, and no longer the report's."""
    import json

    from orch.cli import main
    from orch.report import MARKER, write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    out = tmp_path / "out"
    write_report(tmp_path, out)
    (out / "summary.md").write_text("my edits")
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    assert (f"holds summary.md {_CHANGED}, which the report would replace; nothing was written"
            ) in capsys.readouterr().err
    assert (out / "summary.md").read_text() == "my edits"
    (out / "summary.md").unlink()
    (out / "communication.png").write_text("my edits")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1, comm_bytes={})) + "\n")
    written = write_report(tmp_path, out)
    assert (out / "communication.png").read_text() == "my edits"
    assert (f"orch report: kept communication.png in {out}: an earlier report wrote them and this "
            "one does not, but they changed since, so they are yours now"
            ) in capsys.readouterr().err
    assert sorted(json.loads((out / MARKER).read_text())["files"]) == sorted(
        p.name for p in written)


def test_a_report_directory_holds_the_latest_reports_files_alone(tmp_path):
    """A pp run's report, then another run's into the same directory (or the pp run resumed
    onto a plan without a pipeline, into its default RUN_DIR/report): the pp report's
    communication.png and pipeline_timeline.png stayed beside the new summary. They go now;
    files no report wrote stay."""
    import json

    from orch.report import MARKER, REPORT_FILES, write_report

    pp, basic, out = tmp_path / "pp", tmp_path / "basic", tmp_path / "out"
    for run, changes in ((pp, {}), (basic, {"comm_bytes": {}})):
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps(_record(1, **changes)) + "\n")
    (pp / "plan.json").write_text(json.dumps({"world_size": 2, "device": "cpu",
                                              "degrees": {"pp": 2}}))
    (pp / "pipeline_timeline.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    names = {p.name for p in write_report(pp, out)}
    assert names >= {"communication.png", "pipeline_timeline.png"}
    assert names <= set(REPORT_FILES)  # the names a default directory without a marker owns
    (out / "notes.txt").write_text("mine")
    written = write_report(basic, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "notes.txt", *(p.name for p in written)])
    assert "communication.png" not in {p.name for p in written}
    assert sorted(json.loads((out / MARKER).read_text())["files"]) == sorted(
        p.name for p in written)


def test_the_memory_plot_of_many_ranks_is_a_band_not_a_legend_of_each(tmp_path, monkeypatch):
    """Above 16 ranks memory.png drew a line and a legend entry per rank (hundreds of them over
    the plot); it now draws their min/median/max per step."""
    import json

    import orch.report
    from orch.report import memory_band, write_report

    labels = {}
    save = orch.report._save

    def keep_labels(fig, path):
        labels[path.name] = [t.get_text() for ax in fig.axes if ax.get_legend()
                             for t in ax.get_legend().get_texts()]
        return save(fig, path)

    monkeypatch.setattr(orch.report, "_save", keep_labels)
    ranks = [{"rank": r, "rss_bytes": (r + 1) << 30} for r in range(17)]
    rows = [_record(1, devices=ranks), _record(2, devices=ranks[:3])]
    assert memory_band(orch.report.memory_by_rank(rows)) == [(1, 1.0, 9.0, 17.0),
                                                             (2, 1.0, 2.0, 3.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    assert sorted(labels["memory.png"]) == ["median rank", "min to max over ranks"]


def test_a_relative_out_is_reported_into_twice_with_absolute_temporary_paths(tmp_path,
                                                                              monkeypatch):
    """Since Python 3.12 ``tempfile.mkdtemp``, which made the staging directory, returns an
    absolute path. The second report into a relative output directory (there from the first)
    told its staging directory inside it from one beside it by comparing the staging directory's
    parent with ``out``: never equal, so the staging directory was renamed onto the non-empty
    report directory (ENOTEMPTY) and the report failed as "could not be written". Here the
    staging directory is made absolute, as mkdtemp did on 3.12."""
    import json

    import orch.report
    from orch.report import MARKER, write_report

    made = orch.report._new_directory
    monkeypatch.setattr(orch.report, "_new_directory",
                        lambda *args: Path(os.path.abspath(made(*args))))
    monkeypatch.chdir(tmp_path)
    Path("run").mkdir()
    Path("run/metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    first = write_report("run")
    second = write_report("run")
    assert first == second and all(p.is_file() for p in second)
    assert sorted(p.name for p in Path("run/report").iterdir()) == sorted(
        [MARKER, *(p.name for p in second)])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_a_new_report_directory_has_the_mode_a_plain_mkdir_gives(tmp_path, umask, mode):
    """The report directory, drawn in a staging directory and renamed into place, kept
    ``mkdtemp``'s 0700: a report others could read before (0755 under umask 022) no longer
    was."""
    import json

    from orch.report import write_report

    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
    before = os.umask(umask)
    try:
        write_report(tmp_path)
    finally:
        os.umask(before)
    assert (tmp_path / "report").stat().st_mode & 0o777 == mode
