"""``orch report RUN_DIR``: plots of a run and a short markdown summary beside them.

Read from what the run wrote (``metrics.jsonl``, ``plan.json``, ``config.yaml``, the pipeline
timeline and checkpoints), written to ``RUN_DIR/report/`` (or ``--out``):

- ``loss.png``: the language-model loss per logged step (and the MoE balancing term, and the
  held-out evaluations' loss as points), with a line where it first was not finite;
- ``throughput.png``: tokens/s per logged step, with MFU on the right-hand axis;
- ``optimization.png``: the learning rate each logged step trained at (warmup, decay or a wsd
  cooldown as they ran, across resumes), with the gradient norm before clipping on a log-scaled
  right-hand axis, the two curves to read beside a loss spike;
- ``memory.png``: each rank's device memory (GPU memory used, or the process's resident set on
  CPU) from the telemetry readings, or rank 0's peak where a run has none; above 16 ranks, their
  min, median and max per step;
- ``communication.png``: bytes handed to collectives per step, stacked by parallel dimension;
- ``pipeline_timeline.png``: the measured timeline of the last logged step, when there is one;
- ``summary.md``: the plan (with an offloaded run's tiers), the steps done, the losses (the
  held-out one too), throughput, MFU and memory figures (an offloaded run's device peak against
  its budget), the plan's estimated share of a step for collectives and for offload transfers,
  and the checkpoints.

matplotlib (Agg, no display) is imported here only, never on the training path.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import secrets
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from orch.errors import OrchError
from orch.parallel.pipeline.timeline import TIMELINE_PNG
from orch.plan.degrees import Degrees
from orch.plan.render import gib, offloaded_tiers
from orch.runtime.checkpoint.files import MANIFEST, step_dirs
from orch.runtime.records import is_eval, read_records
from orch.runtime.telemetry import memory_field, memory_in_use

GIB = 2**30


class ReportError(OrchError):
    """A directory ``orch report`` cannot read as a run."""


def _unreadable_run(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a run directory the report can read, with the fix, or None: a
    path that does not exist, a file, and a ``metrics.jsonl`` that is a directory were all said
    as "no metrics.jsonl", which sent the user looking for a file that was not the problem."""
    path = run_dir / "metrics.jsonl"
    fix = "fix: give the run directory of an orch launch (its run.dir)"
    if not run_dir.exists():
        return f"{run_dir} does not exist; {fix}"
    if not run_dir.is_dir():
        return f"{run_dir} is a file, not a run directory; {fix}"
    if not path.exists():
        return f"{run_dir}: no metrics.jsonl; {fix} that has logged at least one step"
    if not path.is_file():
        return (f"{path} is not a file (the run's step records are written there); fix: move it "
                "out of the way and report a run that has logged a step")
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The usable step records of ``run_dir/metrics.jsonl``, by step, after notes on stderr
    about what was skipped; a :class:`ReportError` where there are none."""
    return read_run_records(run_dir)[0]


def read_run_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The usable step records of ``run_dir/metrics.jsonl`` and its held-out evaluations'
    (:func:`~orch.runtime.records.is_eval`), each by step, after notes on stderr about what was
    skipped; a :class:`ReportError` where there are no step records."""
    if (why := _unreadable_run(run_dir)) is not None:
        raise ReportError(why)
    path = run_dir / "metrics.jsonl"
    records, skipped = read_records(path)
    if skipped:
        print(f"orch report: skipped {skipped} line(s) of {path} that are not step records "
              "(a run killed while writing leaves its last line torn)", file=sys.stderr)
    usable: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for record in records:
        bad = _bad_eval_field(record) if is_eval(record) else _bad_field(record)
        if bad is None:
            (evals if is_eval(record) else usable).append(record)
        else:
            what = "evaluation" if is_eval(record) else "record"
            print(f"orch report: skipped the {what} of step {record['step']} in {path}: {bad}",
                  file=sys.stderr)
    if not usable:
        raise ReportError(f"{path} has no usable step records; fix: report once the run has "
                          "logged a step")
    # a run resumed from an earlier checkpoint logs its steps again: the later ones stand
    return _by_step(usable), _by_step(evals)


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def _bad_eval_field(record: dict[str, Any]) -> str | None:
    """What in an evaluation's record the report cannot use, or None (as :func:`_bad_field`)."""
    if not _number(record.get("step"), 1):
        return f"step is {_shown(record, 'step')}, not a number of at least 1"
    if not _loss_value(record["eval_loss"]):
        return (f"eval_loss is {_shown(record, 'eval_loss')}, not a number (or null where not "
                "finite)")
    return None


def _number(value: Any, least: float = -math.inf) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= least)


def _loss_value(value: Any) -> bool:
    """A loss as the runtime writes it: a number, or null where it was not finite (a diverged
    step is what a report must show, not skip)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _shown(record: dict[str, Any], key: str) -> str:
    """``record[key]`` as a message quotes it, or ``missing``: a missing ``loss`` said "None"
    as though the run had written null (a diverged step)."""
    return repr(record[key]) if key in record else "missing"


def _bad_field(record: dict[str, Any]) -> str | None:
    """What in a step record the report cannot use (``field: value``, with why), or None: each
    field it reads, of the type and range the runtime writes (a hand-edited or foreign line
    crashed the report). ``loss`` must be there: null is a diverged step's loss, but a record
    without the key has none at all (it crashed the report with a KeyError)."""
    for key, least in (("step", 1), ("steps", 1), ("tokens_per_s", 0), ("mfu", 0),
                       ("mem_bytes", 0)):
        if not _number(record.get(key), least):
            return f"{key} is {_shown(record, key)}, not a number of at least {least}"
    if "lr" in record and not _number(record["lr"], 0):
        return f"lr is {_shown(record, 'lr')}, not a number of at least 0"
    for key in ("loss", *(key for key in ("aux_loss", "grad_norm") if key in record)):
        if key not in record or not _loss_value(record[key]):
            return f"{key} is {_shown(record, key)}, not a number (or null where not finite)"
    comm = record.get("comm_bytes")
    if comm is not None and not (isinstance(comm, dict)
                                 and all(_number(v, 0) for v in comm.values())):
        return f"comm_bytes is {comm!r}, not bytes per parallel dimension"
    devices = record.get("devices")
    if devices is not None and not (isinstance(devices, list) and all(
            isinstance(d, dict) and isinstance(d.get("rank"), int) and not isinstance(
                d["rank"], bool) and _number(memory_field(d), 0) for d in devices)):
        return f"devices is {devices!r}, not readings with a rank and memory figures"
    offloads = [("offload", record.get("offload")),
                *((f"devices[{i}].offload", d.get("offload")) for i, d in enumerate(devices or []))]
    for where, figures in offloads:
        if figures is not None and not (isinstance(figures, dict) and _number(
                figures.get("device_peak_bytes"), 0) and _number(
                figures.get("device_budget_bytes"), 1)):
            return f"{where} is {figures!r:.80}, not a device peak and budget in bytes"
    return None


_DEGREES = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "etp", "virtual_stages")
"""The whole-number degrees of ``plan.json`` the summary names (with ``sequence_parallel``)."""


def read_plan(run_dir: Path) -> dict[str, Any]:
    """``run_dir/plan.json`` when the report can use it, else ``{}`` after a note saying why, and
    the summary says the plan is unknown (the plots do not need it). Each field the report reads
    is checked here, before anything is written: a valid JSON file that was not an object, or
    held a degree or an estimate of another type, crashed the report after the plots were
    written, leaving part of a report."""
    path = run_dir / "plan.json"
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):
        why = "is missing or unreadable"
    else:
        if (why := _bad_plan(plan)) is None:
            return plan
    print(f"orch report: {path} {why}; the plan is left unknown in the summary", file=sys.stderr)
    return {}


def _bad_plan(plan: Any) -> str | None:
    """Why the report cannot use ``plan`` (a parsed ``plan.json``), or None."""
    if not isinstance(plan, dict):
        return f"is not a JSON object (it holds {type(plan).__name__} {plan!r:.60})"
    degrees = plan.get("degrees", {})
    if not isinstance(degrees, dict):
        return f"has degrees {degrees!r:.60}, not an object of degrees"
    for key in _DEGREES:
        value = degrees.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"has degree {key} {value!r}, not a whole number of at least 1"
    if not isinstance(degrees.get("sequence_parallel", False), bool):
        return (f"has degree sequence_parallel {degrees['sequence_parallel']!r}, not true or "
                "false")
    if not isinstance(plan.get("devices", ""), str):
        return f"has devices {plan['devices']!r:.60}, not a description such as '8 x h100'"
    tiers = plan.get("tiers", {})
    if not (isinstance(tiers, dict) and all(isinstance(t, str) for t in tiers.values())):
        return f"has tiers {tiers!r:.60}, not each tensor group's home tier"
    step = plan.get("step") or {}
    comm = (step.get("comm_s") or {}) if isinstance(step, dict) else None
    if not (isinstance(comm, dict) and all(_number(v, 0) for v in comm.values())
            and all(_number(step.get(k, 0), 0) for k in ("compute_s", "exposed_comm_s"))):
        return f"has step {step!r:.60}, not the plan's estimated seconds of a step"
    return None


def write_report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the plots and ``summary.md`` of ``run_dir``; returns the files written.

    Everything the report reads (records, plan, pipeline timeline, checkpoints) is read and
    checked before the output directory is made: a run directory it cannot read leaves no
    partial report behind. It is drawn in a directory of its own and put in place at the end,
    so a failure writing it (a full disk, a read-only mount) leaves none of it either: a
    ``ReportError`` says why. It replaces only what an earlier report wrote (:data:`MARKER`,
    or :data:`REPORT_FILES` in a default directory without one): a directory holding other
    files of the names it writes is refused, before anything is drawn."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportError(f"orch report draws its plots with matplotlib, which this Python "
                          f"cannot import ({exc}); fix: pip install matplotlib") from None
    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    records, evals = read_run_records(run_dir)
    plan = read_plan(run_dir)
    given, out = bool(out), Path(out) if out else run_dir / "report"
    drawn = {"communication": any(r.get("comm_bytes") for r in records),
             "optimization": any("lr" in r for r in records)}  # bytes moved; lr recorded
    plots = {name: functools.partial(draw, evals=evals) if name == "loss" else draw
             for name, draw in _PLOTS.items() if drawn.get(name, True)}
    timeline = run_dir / TIMELINE_PNG
    # a run resumed onto a plan without a pipeline keeps the earlier plan's timeline: not this
    copied = [timeline] if timeline.is_file() and plan.get("degrees", {}).get("pp", 1) > 1 else []
    written = [*(out / f"{name}.png" for name in plots), *(out / t.name for t in copied)]
    summary = _summary(run_dir, records, plan, written, evals)
    names = [*(p.name for p in written), "summary.md"]
    earlier = _earlier(out, given)
    owned = _owned(out, earlier)
    _refuse_overwrite(out, given, names, earlier, owned)
    stage, inside = _staging(out, given)
    try:
        steps = [r["step"] for r in records]
        for name, plot in plots.items():
            plot(stage / f"{name}.png", steps, records)
        for source in copied:
            shutil.copy(source, stage / source.name)
        (stage / "summary.md").write_text(summary)
        _publish(stage, out, inside, owned)
    except OSError as exc:  # a full disk, a read-only mount: PIL's traceback, half a report
        raise ReportError(_unwritten(out, given, exc)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if kept := [n for n in earlier if n not in owned and n not in names and (out / n).is_file()]:
        print(f"orch report: kept {', '.join(kept)} in {out}: an earlier report wrote them and "
              "this one does not, but they changed since, so they are yours now", file=sys.stderr)
    return [*written, out / "summary.md"]


def _staging(out: Path, given: bool) -> tuple[Path, bool]:
    """A new, empty directory to draw the report in, so that a failure leaves none of it in
    ``out``, and whether it is inside ``out``: inside when ``out`` is a directory already (the
    same file system, even when ``out`` is a mount point), else beside it, to be renamed into
    place. The flag, not a comparison of paths, tells :func:`_publish` which (a path made
    absolute on the way never equals a relative ``out``)."""
    try:
        if out.is_dir():
            return _new_directory(out, ".report-partial-"), True
        if out.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
        out.parent.mkdir(parents=True, exist_ok=True)
        return _new_directory(out.parent, f".{out.name}.partial-"), False
    except OSError as exc:
        raise ReportError(_unmade(out, given, exc)) from None


def _new_directory(parent: Path, prefix: str) -> Path:
    """A new directory ``parent/<prefix><random>``, made by a plain mkdir so that it has the
    mode a plain mkdir gives (``0o777 & ~umask``, or what the parent's default ACL says): beside
    ``out`` it is renamed into place as the report directory, which ``mkdtemp`` would leave 0700,
    readable by its owner alone (it was 0755 under the usual umask before the report was
    staged)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused name for the report's staging directory",
                          str(parent / prefix))


MARKER = ".orch-report"
"""The file by which a report directory says what an ``orch report`` wrote in it (JSON:
``{"written_by": "orch report", "files": {NAME: [SHA256, ...]}}``, the sha256 of each file's
contents as the report left them; two while a report replaces an earlier one's): those files,
while they still hold those contents, and only those, a later report may replace."""

def _earlier(out: Path, given: bool) -> dict[str, list[str] | None]:
    """What an earlier report wrote in ``out``: each file's name and the sha256 digests its
    contents may have, as the :data:`MARKER` records them. Where there is no marker, the
    :data:`REPORT_FILES` of the default output directory, with any contents (an orch older than
    the marker wrote them there: a report of such a run was refused), and nothing of a user's
    ``--out``; nothing where the marker is not such a record of plain file names (a name with
    a slash could reach outside ``out``)."""
    try:
        files = json.loads((out / MARKER).read_text())["files"]
    except FileNotFoundError:
        return {} if given else dict.fromkeys(REPORT_FILES)
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    if not isinstance(files, dict) or not all(
            name not in ("", ".", "..") and "/" not in name and isinstance(digests, list)
            and all(isinstance(d, str) for d in digests) for name, digests in files.items()):
        return {}
    return files


def _sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path`` (a report's files are a few hundred KiB)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _owned(out: Path, earlier: dict[str, list[str] | None]) -> dict[str, str]:
    """The files of ``out`` that still hold what an ``earlier`` report wrote, with their sha256:
    a report's ``summary.md`` the user edited since was silently replaced (the marker listed
    names alone)."""
    owned = {}
    for name, digests in earlier.items():
        if (out / name).is_file():
            digest = _sha256(out / name)
            if digests is None or digest in digests:
                owned[name] = digest
    return owned


def _refuse_overwrite(out: Path, given: bool, names: list[str],
                      earlier: dict[str, list[str] | None], owned: dict[str, str]) -> None:
    """Refuse, before anything is drawn, a report whose files ``names`` would replace files of
    ``out`` that are not an ``earlier`` report's as it wrote them (``owned``): a user's
    ``summary.md`` or ``loss.png`` in ``--out`` was silently replaced, and so was a report's
    ``summary.md`` the user had edited."""
    clash = [n for n in names if n not in owned and os.path.lexists(out / n)]
    if not clash:
        return
    why = {"changed since an orch report wrote them": [n for n in clash if earlier.get(n)],
           f"written by you, or by an orch older than the {MARKER} marker":
           [n for n in clash if not earlier.get(n)]}
    held = " and ".join(f"{', '.join(files)} ({reason})" for reason, files in why.items() if files)
    where = f"--out {out}" if given else f"{out}, the default output directory,"
    fix = ("give --out a new or empty directory, or remove those files (or the directory)" if given
           else "move those files out of the way, or give --out PATH")
    raise ReportError(f"{where} holds {held}, which the report would replace; nothing was "
                      f"written; fix: {fix}")


def _mark(stage: Path, files: dict[str, list[str]]) -> Path:
    """``stage/MARKER`` recording ``files`` (name: sha256 digests) as the report's own."""
    path = stage / MARKER
    path.write_text(json.dumps({"written_by": "orch report", "files": dict(sorted(files.items()))})
                    + "\n")
    return path


def _publish(stage: Path, out: Path, inside: bool, owned: dict[str, str]) -> None:
    """Put the finished report of ``stage`` in place: when ``stage`` is ``inside`` ``out``, a
    directory already (it may hold other files), each file renamed into it, after a marker
    that records them with the files an earlier report wrote (``owned``), each name with both
    its earlier and its new contents' digests (a report cut short still owns what it put
    there); then the earlier report's files this one does not write are removed (a pp run's
    ``communication.png`` and ``pipeline_timeline.png`` stayed beside the next run's summary),
    and the marker records this report's alone. Else ``stage``, with its marker, renamed to
    ``out``."""
    files = {p.name: _sha256(p) for p in stage.iterdir()}
    if not inside:
        _mark(stage, {name: [digest] for name, digest in files.items()})
        os.rename(stage, out)
        return
    both = {name: sorted({owned.get(name), files.get(name)} - {None}) for name in owned | files}
    os.replace(_mark(stage, both), out / MARKER)
    for name in sorted(files):
        os.replace(stage / name, out / name)
    for name in sorted(owned.keys() - files.keys()):
        (out / name).unlink(missing_ok=True)
    os.replace(_mark(stage, {name: [digest] for name, digest in files.items()}), out / MARKER)


def _unwritten(out: Path, given: bool, exc: OSError) -> str:
    """Why the report could not be written into ``out`` (nothing of it was left there), and
    the fix."""
    where = f"--out {out}" if given else f"{out}, the default output directory,"
    fix = ("give --out a directory you can write, on a file system with free space" if given
           else "free space there, or give --out PATH on a file system you can write")
    return (f"{where}: the report could not be written ({exc.strerror or exc}); none of it "
            f"was left there; fix: {fix}")


def _unmade(out: Path, given: bool, exc: OSError) -> str:
    """Why the report's directory ``out`` cannot be made, and the fix: said as ``--out`` only
    when the user gave it (a file at ``RUN_DIR/report`` was blamed on an --out never given)."""
    if given:
        return (f"--out {out}: cannot be made a directory ({exc.strerror}); fix: give a new or "
                "existing directory you can write")
    fix = (f"move the file {out} out of the way, or give --out PATH"
           if isinstance(exc, FileExistsError) else "give --out PATH in a directory you can write")
    return (f"{out}, the default output directory, cannot be made a directory ({exc.strerror}); "
            f"fix: {fix}")


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(value: float | None) -> float:
    """A loss to plot: NaN (a gap in the line) where it was not finite."""
    return math.nan if value is None or not math.isfinite(value) else value


def not_finite(records: list[dict]) -> list[int]:
    """The logged steps whose loss was not finite (NaN or infinite: null in metrics.jsonl)."""
    return [r["step"] for r in records if math.isnan(_finite(r["loss"]))]


def _loss(path: Path, steps: list[int], records: list[dict], evals: list[dict] = ()) -> Path:
    fig, ax = _figure("loss", "cross-entropy")
    ax.plot(steps, [_finite(r["loss"]) for r in records], label="language-model loss")
    if evals:  # points (with a line): evaluations are sparser than logged steps
        ax.plot([e["step"] for e in evals], [_finite(e["eval_loss"]) for e in evals],
                marker="o", label="held-out loss (eval.path)")
    if any(r.get("aux_loss") is not None for r in records):
        ax.plot(steps, [_finite(r.get("aux_loss")) for r in records], label="MoE balancing term")
    if bad := not_finite(records):
        ax.axvline(bad[0], color="red", linestyle="--",
                   label=f"loss not finite from step {bad[0]}")
    ax.set_xlim(*_step_limits(steps + [e["step"] for e in evals]))
    ax.legend()
    return _save(fig, path)


def _step_limits(steps: list[int]) -> tuple[float, float]:
    """The x-axis of ``loss.png``: the steps logged with matplotlib's usual 5% margin. Left to
    autoscaling, a run whose every loss is null (nothing finite to draw) was scaled to the red
    line alone, step 1 (0.96-1.04), though 6 steps were logged."""
    low, high = min(steps), max(steps)
    margin = 0.05 * (high - low) or 0.5
    return low - margin, high + margin


def _throughput(path: Path, steps: list[int], records: list[dict]) -> Path:
    fig, ax = _figure("throughput", "tokens/s")
    ax.plot(steps, [r["tokens_per_s"] for r in records], label="tokens/s")
    # MFU as recorded, on its own axis: its ratio to tokens/s changes with the world size and
    # device when a run resumes onto another plan
    right = ax.twinx()
    right.plot(steps, [100 * r["mfu"] for r in records], color="tab:orange", linestyle=":",
               label="MFU")
    right.set_ylabel("MFU (%)")
    right.set_ylim(bottom=0)
    ax.legend(handles=[*ax.get_lines(), *right.get_lines()], loc="lower right")
    return _save(fig, path)


def _optimization(path: Path, steps: list[int], records: list[dict]) -> Path:
    """Each curve named by its axis' label in its colour, not by a legend: the lr sits at the
    top of its axis wherever it is at the peak (a constant run, a wsd stable phase, a resumed
    run back at the peak), where a legend in the corner hid it."""
    fig, ax = _figure("learning rate and gradient norm", "learning rate")
    right = ax.twinx()  # norms span decades (a spike, the early steps): a log scale shows both
    for axis, key, label, style in ((ax, "lr", "learning rate", "-"),
                                    (right, "grad_norm", "gradient norm (before clipping)", ":")):
        colour = "tab:blue" if axis is ax else "tab:orange"
        axis.plot(steps, [_finite(r.get(key)) for r in records], color=colour, linestyle=style)
        axis.set_ylabel(label, color=colour)
        axis.tick_params(axis="y", which="both", colors=colour)
    if any(_finite(r.get("grad_norm")) > 0 for r in records):
        right.set_yscale("log")
    ax.set_ylim(bottom=0)
    return _save(fig, path)


def _optimization_line(records: list[dict]) -> str | None:
    """The summary's line for the learning rate and the gradient norm (the last logged step's lr
    and the highest logged, which the peak is only where a logged step trained at it, and the
    norms' median and largest finite value with its step), or None for records without an lr
    (an orch older than the field)."""
    rates = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if not rates:
        return None
    peak = max(lr for _, lr in rates)
    line = (f"- learning rate: {rates[-1][1]:.3g} at step {rates[-1][0]} (highest logged "
            f"{peak:.3g})")
    norms = [(r["step"], r["grad_norm"]) for r in records
             if _number(r.get("grad_norm")) and math.isfinite(r["grad_norm"])]
    if norms:
        step, top = max(norms, key=lambda n: n[1])
        line += (f"; gradient norm median {statistics.median(n for _, n in norms):.3g}, largest "
                 f"{top:.3g} at step {step}")
    return line


def memory_by_rank(records: list[dict]) -> dict[int, list[tuple[int, float]]]:
    """``(step, GiB)`` per rank per logged step where the rank has a reading: telemetry
    readings (a run resumed onto more ranks has the new ranks from its resume on), else rank
    0's peak (``mem_bytes``)."""
    if not all(r.get("devices") for r in records):
        return {0: [(r["step"], r["mem_bytes"] / GIB) for r in records]}
    out: dict[int, list[tuple[int, float]]] = {}
    for record in records:
        for reading in record["devices"]:
            out.setdefault(reading["rank"], []).append(
                (record["step"], memory_in_use(reading) / GIB))
    return out


BAND_ABOVE = 16
"""Ranks above which ``memory.png`` draws their min/median/max per step, not a line each (a
legend of hundreds of ranks covered the plot)."""


def _memory(path: Path, steps: list[int], records: list[dict]) -> Path:
    by_rank = memory_by_rank(records)
    if len(by_rank) > BAND_ABOVE:
        return _memory_band(path, by_rank)
    fig, ax = _figure("memory per rank", "GiB")
    for rank, points in sorted(by_rank.items()):
        ax.plot(*zip(*points, strict=True), label=f"rank {rank}")
    ax.legend(ncol=4, fontsize="small")
    return _save(fig, path)


def memory_band(by_rank: dict[int, list[tuple[int, float]]]) -> list[tuple[int, float, float,
                                                                            float]]:
    """``(step, min, median, max)`` GiB over the ranks with a reading at each step."""
    at: dict[int, list[float]] = {}
    for points in by_rank.values():
        for step, used in points:
            at.setdefault(step, []).append(used)
    return [(step, min(v), statistics.median(v), max(v)) for step, v in sorted(at.items())]


def _memory_band(path: Path, by_rank: dict[int, list[tuple[int, float]]]) -> Path:
    fig, ax = _figure(f"memory over {len(by_rank)} ranks", "GiB")
    steps, low, mid, high = zip(*memory_band(by_rank), strict=True)
    ax.fill_between(steps, low, high, alpha=0.3, label="min to max over ranks")
    ax.plot(steps, mid, label="median rank")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _communication(path: Path, steps: list[int], records: list[dict]) -> Path:
    dims = sorted({dim for r in records for dim in (r.get("comm_bytes") or {})})
    fig, ax = _figure("bytes to collectives per step, by parallel dimension (rank 0)", "MB")
    bottom = [0.0] * len(records)
    for dim in dims:
        mb = [(r.get("comm_bytes") or {}).get(dim, 0) / 1e6 for r in records]
        ax.bar(steps, mb, bottom=bottom, label=dim, width=0.8 * _spacing(steps))
        bottom = [b + m for b, m in zip(bottom, mb, strict=True)]
    ax.legend()
    return _save(fig, path)


def _spacing(steps: list[int]) -> float:
    return min((b - a for a, b in zip(steps, steps[1:], strict=False)), default=1) or 1


def _summary(run_dir: Path, records: list[dict], plan: dict[str, Any],
             written: list[Path], evals: list[dict] = ()) -> str:
    """``summary.md``: ``plan`` as :func:`read_plan` gives it, ``written`` the plots beside it,
    ``evals`` the held-out evaluations."""
    last = records[-1]
    steady, over = _steady(records)
    memory = memory_by_rank(records)
    peak = max(gib for points in memory.values() for _, gib in points)
    lines = [
        f"# Run report: {run_dir}",
        "",
        f"- plan: {_layout(plan, len(memory))}",
        f"- steps logged: {len(records)}, last step {last['step']} of {last['steps']}",
        f"- loss: {_finite(records[0]['loss']):.4f} at step {records[0]['step']} -> "
        f"{_finite(last['loss']):.4f} at step {last['step']}",
    ]
    if bad := not_finite(records):
        lines.append(f"- loss not finite (NaN or infinite) at {len(bad)} logged step(s), from "
                     f"step {bad[0]}")
    if evals:
        lines.append(f"- held-out loss: {_finite(evals[0]['eval_loss']):.4f} at step "
                     f"{evals[0]['step']} -> {_finite(evals[-1]['eval_loss']):.4f} at step "
                     f"{evals[-1]['step']} ({len(evals)} evaluation(s))")
    if optimization := _optimization_line(records):
        lines.append(optimization)
    lines += [
        f"- throughput: {statistics.median(r['tokens_per_s'] for r in steady):,.0f} tokens/s, "
        f"MFU {100 * statistics.median(r['mfu'] for r in steady):.2f}% (median over "
        f"{over})",
        f"- memory: peak {peak:.2f} GiB on one rank ({len(memory)} rank(s) recorded)",
    ]
    if offload := _offload_peak(records):
        lines.append(offload)
    if communication := _communication_estimate(plan.get("step") or {}):
        lines.append(communication)
    complete = sorted(p.name for _, p in step_dirs(run_dir / "checkpoints")  # not moved-aside
                      if (p / MANIFEST).exists())
    lines.append(f"- checkpoints: {', '.join(complete) if complete else 'none'}")
    lines += ["", *[f"![{p.stem}]({p.name})" for p in written]]
    return "\n".join(lines) + "\n"


def _offload_peak(records: list[dict]) -> str | None:
    """The summary's line for an offloaded run: the most the offload engine placed on the
    device at once against that step's ``offload.device_budget``, from the reading, over the
    logged steps and the replicas, that is the highest share of its budget (a run resumed under
    another budget has two; how near the budget it came is the figure an offloaded run is about;
    the memory line's is the process's resident set on CPU), or None for a run that did not
    offload."""
    figures = [o for r in records
               for o in (r.get("offload"), *(d.get("offload") for d in r.get("devices") or []))
               if o is not None]
    if not figures:
        return None
    top = max(figures, key=lambda o: o["device_peak_bytes"] / o["device_budget_bytes"])
    peak, budget = top["device_peak_bytes"], top["device_budget_bytes"]
    return (f"- offload: device peak {gib(peak)} of the {gib(budget)} device budget "
            f"({100 * peak / budget:.0f}%; offload.device_budget)")


def _communication_estimate(step: dict[str, Any]) -> str | None:
    """The summary's line for the plan's estimated communication: the collectives' share of a
    step, and an offloaded run's host<->device transfers (the plan's ``comm_s["offload"]``)
    named as such (they were said as the communication share of a run on one process), or
    None where the plan estimates neither."""
    comm = step.get("comm_s") or {}
    kinds = {"collectives": sum(v for k, v in comm.items() if k != "offload"),
             "host<->device offload transfers": comm.get("offload", 0)}
    total = sum(kinds.values()) + step.get("compute_s", 0) or 1
    shares = [f"{kind} {100 * seconds / total:.1f}%" for kind, seconds in kinds.items()
              if seconds]
    if not shares:
        return None
    return (f"- communication (the plan's estimate): {', '.join(shares)} of a step's compute + "
            f"communication time, {step.get('exposed_comm_s', 0):.3g} s exposed")


def _steady(records: list[dict]) -> tuple[list[dict], str]:
    """The records the medians are taken over, and how the summary says which: all but the
    first step of each start, whose time includes warm-up (compiles, first loads), a resumed
    start's as much as the first. A start's first record has ``resumed_from`` (a file of an
    older orch has none: only its first record is known to start one)."""
    firsts = {id(records[0])} | {id(r) for r in records if "resumed_from" in r}
    steady = [r for r in records if id(r) not in firsts]
    if not steady:
        return records, ("the one logged step" if len(records) == 1 else
                         f"all {len(records)} logged steps, each a start's first")
    if len(firsts) == 1:
        return steady, "logged steps after the first"
    return steady, f"logged steps but the first of each of the run's {len(firsts)} starts"


def _layout(plan: dict[str, Any], ranks_recorded: int) -> str:
    """``4 x cpu, fsdp2 tp2``, ``2 x cpu, pp2v2 (zbv schedule)``: the degrees as ``orch
    launch`` says them (:meth:`Degrees.short`), then the tiers away from the device (``1 x
    cpu, single, offload params=cpu grads=cpu``: an offloaded run read as a plain one), or
    what is known without ``plan.json``."""
    if not plan:
        return f"unknown (no usable plan.json; {ranks_recorded} rank(s) recorded)"
    saved = plan.get("degrees", {})
    degrees = Degrees(**{k: saved[k] for k in (*_DEGREES, "sequence_parallel") if k in saved})
    schedule = plan.get("schedule")
    layout = degrees.short(schedule if isinstance(schedule, str) else None)
    devices = plan.get("devices") or f"{plan.get('world_size', '?')} x {plan.get('device', '?')}"
    offloaded = offloaded_tiers(plan.get("tiers"))
    return f"{devices}, {layout}" + (f", offload {offloaded}" if offloaded else "")


_PLOTS = {"loss": _loss, "optimization": _optimization, "throughput": _throughput,
          "memory": _memory, "communication": _communication}
"""Every plot a report may draw, as ``NAME.png`` (communication where collectives moved
bytes, optimization where the records hold the learning rate)."""

REPORT_FILES = (*(f"{name}.png" for name in _PLOTS), TIMELINE_PNG, "summary.md")
"""Every name a report may write: in a default ``RUN_DIR/report`` without a :data:`MARKER`,
reported into by an orch older than the marker, these are the report's own (the directory is
orch's)."""


__all__ = ["ReportError", "memory_by_rank", "read_metrics", "read_plan", "read_run_records",
           "write_report"]
