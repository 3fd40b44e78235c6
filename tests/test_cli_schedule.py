"""``orch schedule``: the simulated figures, the JSON, the PNG on disk, and bad input."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from orch.cli import main


def test_1f1b_figures_match_the_analytic_bubble(capsys, tmp_path):
    png = tmp_path / "1f1b.png"
    assert main(["schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--json",
                 "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["makespan"] == 3 * (8 + 4 - 1)  # F 1 + B 2 per micro-batch, P - 1 bubbles
    assert out["bubble_fraction"] == pytest.approx(3 / 11)
    assert out["peak_activations"] == [4, 3, 2, 1]
    assert out["ranks"][0][0] == {"action": "0F0", "start": 0.0, "end": 1.0}
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 22 + 4 * (28 + 6) + 6)  # a legend, one band per rank


def _pixels(png: bytes) -> list[bytes]:
    """The scanlines of one of ``write_png``'s images (RGB, filter 0, one IDAT)."""
    width, height = struct.unpack(">II", png[16:24])
    start = png.index(b"IDAT") + 4
    raw = zlib.decompress(png[start:start + struct.unpack(">I", png[start - 8:start - 4])[0]])
    return [raw[y * (3 * width + 1) + 1:(y + 1) * (3 * width + 1)] for y in range(height)]


def test_the_png_says_what_its_colours_ranks_and_step_are(tmp_path):
    """The run directory's timeline PNG is read alone (orch schedule prints the legend beside
    its own): a legend strip on top with a swatch per action and the measured step, and each
    band's rank number on its left."""
    from orch.parallel.schedules.generators import build_schedule
    from orch.parallel.schedules.render import COLOURS, HEADER, TEXT, write_png
    from orch.parallel.schedules.simulate import Costs, simulate

    timeline = simulate(build_schedule("1f1b", 2, 4, 1), Costs())
    write_png(timeline, tmp_path / "plain.png")
    write_png(timeline, tmp_path / "step.png", step=12)
    plain, stepped = (_pixels((tmp_path / name).read_bytes()) for name in ("plain.png",
                                                                           "step.png"))
    legend = b"".join(plain[:HEADER])
    assert all(bytes(colour) in legend for colour in COLOURS.values())
    assert bytes(TEXT) in legend
    assert plain[HEADER:] == stepped[HEADER:] and plain[:HEADER] != stepped[:HEADER]
    for rank in (0, 1):  # the number's pixels sit in the band's margin, left of the blocks
        band = plain[HEADER + 6 + rank * (28 + 6):HEADER + 6 + rank * (28 + 6) + 28]
        assert any(bytes(TEXT) in line[:3 * 20] for line in band)
    one = [line[:3 * 20] for line in plain[HEADER + 6:HEADER + 6 + 28]]
    two = [line[:3 * 20] for line in plain[HEADER + 6 + 34:HEADER + 6 + 34 + 28]]
    assert one != two  # "0" and "1"


def test_json_costs_hold_the_fused_backwards_cost(capsys):
    """``costs.b`` was null in --json where the text said B 2 (I + W)."""
    assert main(["schedule", "1f1b", "--stages", "2", "--microbatches", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["costs"]["b"] == 2.0


def test_text_output_has_figures_per_rank_and_a_chart(capsys):
    assert main(["schedule", "zb-h1", "--stages", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert "makespan 27, bubble 11.1%" in out  # 3M + P - 1: ZB-H1 beats 1F1B's 33
    assert out.count("rank 3  |") == 1 and "W" in out.split("rank 0  |")[1]


def test_zbv_defaults_to_its_two_chunks_in_a_v(capsys):
    assert main(["schedule", "zbv", "--stages", "4", "--microbatches", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["virtual"], out["placement"]) == (2, "v")
    assert out["makespan"] == 25.5  # the fill's 1.5 + 24 of work: ZB-H1 takes 27
    assert out["peak_activations"] == [8] * 4  # 2P half-share chunks: 1F1B's peak of P
    assert {a["action"] for a in out["ranks"][0]} >= {"0F0", "7F0", "7I0", "7W0", "0B0"}
    assert main(["schedule", "zbv", "--stages", "4", "--microbatches", "8",
                 "--virtual", "3"]) == 2
    assert "zbv runs 2 stages per rank (a V), not virtual=3" in capsys.readouterr().err


def test_bad_sizes_exit_2_naming_the_fix(capsys):
    assert main(["schedule", "interleaved", "--stages", "4", "--microbatches", "6",
                 "--virtual", "2"]) == 2
    err = capsys.readouterr().err
    assert "--microbatches: interleaved 1F1B needs microbatches to be a multiple of stages" in err
    assert "fix: try 8 (the next multiple of 4)" in err
    with pytest.raises(SystemExit) as exc:
        main(["schedule", "pipedream", "--stages", "2", "--microbatches", "2"])
    assert exc.value.code == 2 and "invalid choice: 'pipedream'" in capsys.readouterr().err


def test_every_bad_size_is_named_under_its_flag(capsys):
    """Only the first bad value was named, under the schedule's name ('interleaved: stages must
    be at least 1, got 0 / fix: see orch schedule --help'), and a schedule too large to build
    hid every other problem."""
    assert main(["schedule", "interleaved", "--stages", "0", "--microbatches", "0",
                 "--virtual", "0"]) == 2
    err = capsys.readouterr().err
    assert "(3 problems)" in err and "--stages: must be at least 1, got 0" in err
    assert "--microbatches: must be at least 1, got 0\n        fix: give 1 or more micro" in err
    assert "--virtual: interleaved runs 2 or more stages per rank, not virtual=0" in err
    assert main(["schedule", "interleaved", "--stages", "3", "--microbatches", "4",
                 "--virtual", "1"]) == 2
    err = capsys.readouterr().err
    assert "(2 problems)" in err and "--virtual: interleaved runs 2" in err
    assert "--microbatches: interleaved 1F1B needs microbatches to be a multiple" in err
    assert main(["schedule", "1f1b", "--stages", "4", "--microbatches", "100000",
                 "--max-deferred", "1"]) == 2
    err = capsys.readouterr().err
    assert "(2 problems)" in err and "--max-deferred: 1 applies to 2bp-gpipe and 2bp-1f1b" in err
    assert "--stages x --microbatches: 4 x 1 chunks x 100000 micro-batches" in err


def test_costs_that_are_not_finite_and_unwritable_pngs_are_refused_before_simulating(
        capsys, tmp_path):
    """NaN costs gave 'makespan nan' and invalid JSON; a PNG path in a missing directory or
    naming a directory failed with a traceback after the schedule had printed."""
    args = ["schedule", "1f1b", "--stages", "2", "--microbatches", "4"]
    assert main([*args, "--f", "nan", "--comm", "-5", "--png",
                 str(tmp_path / "missing" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "(3 problems)" in err and "--f: nan: a cost must be finite and above 0" in err
    assert "--comm: -5: a cost must be finite and 0 or more" in err
    assert f"--png: '{tmp_path / 'missing'}' is not a writable directory" in err
    assert main([*args, "--png", str(tmp_path)]) == 2
    assert "is not a file name" in capsys.readouterr().err
    assert main([*args, "--png", "/dev/full"]) == 2  # the write fails: a PermissionError or
    assert "--png: '/dev/full' could not be written (No space left on device)" in (  # OSError
        capsys.readouterr().err)


def test_a_schedule_too_large_to_build_in_seconds_is_refused_at_once(capsys):
    """100,000 micro-batches ran for minutes and GBs before; now refused, with the other
    problems."""
    assert main(["schedule", "zbv", "--stages", "64", "--microbatches", "100000", "--f",
                 "nan"]) == 2
    err = capsys.readouterr().err
    assert "(2 problems)" in err and "--stages x --virtual x --microbatches: 64 x 2 chunks x " \
        "100000 micro-batches = 12,800,000 stage micro-batches, over the 32,768 orch schedule " \
        "builds for zbv" in err


def test_zbv_and_png_have_limits_of_their_own(capsys):
    """ZB-V's order search grows with the square of the stages: 256 stages of one micro-batch
    ran for 90 s, within the limit on stage micro-batches. --png drew a band per rank into one
    image in memory: 1.6 GB and 139,270 pixels tall at 4,096 ranks."""
    assert main(["schedule", "zbv", "--stages", "128", "--microbatches", "1"]) == 2
    assert "--stages: 128: zbv builds up to 64 stages" in capsys.readouterr().err
    assert main(["schedule", "1f1b", "--stages", "4096", "--microbatches", "16", "--png",
                 "big.png"]) == 2
    err = capsys.readouterr().err
    assert "(1 problem)" in err and "--png: draws up to 256 ranks, one band each; --stages is " \
        "4096" in err and "leave out --png" in err


def test_subnormal_costs_are_drawn(capsys, tmp_path):
    """Costs of 1e-320 gave a subnormal makespan, whose inverse is infinite: the PNG's pixel
    positions were 0 x infinity = NaN (ValueError: cannot convert float NaN to integer)."""
    png = tmp_path / "tiny.png"
    assert main(["schedule", "gpipe", "--stages", "2", "--microbatches", "2", "--f", "1e-320",
                 "--i", "1e-320", "--w", "1e-320", "--png", str(png)]) == 0
    assert "rank 0  |FFF" in capsys.readouterr().out
    data = png.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    band = _pixels(data)[22 + 6]  # rank 0's first scanline, under the legend
    assert (width, height) == (1200, 22 + 2 * (28 + 6) + 6)
    margin = 4 * 2 + 2 * 6  # one digit, and a gap either side
    assert band[3 * margin:3 * margin + 6] == bytes((40, 40, 40, 66, 133, 244))  # a forward's
    # edge, then its blue
    assert band[-3:] == bytes((235, 235, 235))  # rank 0 ends idle: its last B ends at 5/6


def test_costs_whose_sum_overflows_are_refused(capsys):
    """Each cost finite, their sum past the largest float: the JSON said "makespan": Infinity
    and "bubble_fraction": NaN (not JSON), the table "bubble nan%" and an empty timeline."""
    assert main(["schedule", "1f1b", "--stages", "2", "--microbatches", "2", "--f", "1e308",
                 "--b", "1e308", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "the costs add up to more than the largest float" in err


def test_a_reader_that_leaves_early_ends_the_output_quietly():
    """``orch schedule ... --json | head`` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.Popen([sys.executable, "-m", "orch.cli", "schedule", "gpipe", "--stages", "8",
                            "--microbatches", "64", "--json"],
                           cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert run.stdout is not None and run.stdout.read(10)
    run.stdout.close()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 141 and err == b"", err


def test_header_counts_in_the_singular_for_one(capsys):
    """'1 stages x 1 chunks' read wrong."""
    assert main(["schedule", "1f1b", "--stages", "1", "--microbatches", "1"]) == 0
    assert "schedule 1f1b: 1 stage x 1 chunk, 1 micro-batch (" in capsys.readouterr().out
