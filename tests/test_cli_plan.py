"""``orch plan`` end to end as a user runs it: exit codes, tables, JSON, errors, no tracebacks."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCH = Path(sys.executable).parent / "orch"


def orch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ORCH), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_plan_table_for_tiny_on_cpu():
    out = orch("plan", "configs/tiny.yaml", "--world-size", "2", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    for text in (
        "plan for tiny on 2 x cpu",
        "dp 2 (replicate 1 x shard 2)",
        "memory per rank",
        "tokens/s, MFU",
        "rank grid",
        "node 0",
    ):
        assert text in out.stdout


def test_plan_says_when_gradients_are_reduced_where_it_matters():
    """``parallel.grad_reduce`` decides what a rank holds and sends only with several
    micro-batches per rank, FSDP-sharded gradients and no pipeline: the plan says it there."""
    def reduce_line(*sets: str) -> list[str]:
        args = [arg for item in sets for arg in ("--set", item)]
        out = orch("plan", "configs/llama3-8b.yaml", "--world-size", "16", *args)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if line.startswith("  reduce ")]

    assert reduce_line() == [
        "  reduce   every micro-batch (parallel.grad_reduce: microbatch)"]
    assert reduce_line("parallel.dp_replicate=2") == [
        "  reduce   every micro-batch, across replicas once per step"
        " (parallel.grad_reduce: microbatch)"]
    assert reduce_line("parallel.grad_reduce=step") == [
        "  reduce   once per step, whole gradients held between micro-batches"
        " (parallel.grad_reduce: step)"]
    assert reduce_line("parallel.pp=2") == []  # the stage reduces once per step
    assert reduce_line("parallel.dp_replicate=16") == []  # DDP: whole gradients anyway
    assert reduce_line("train.global_batch=16") == []  # one micro-batch per rank


def test_plan_names_the_optimizer_whose_states_it_counts():
    """The memory's optimizer line was AdamW's, 8-bit AdamW's or Muon's with nothing saying
    which (a tester compared a muon plan with an adamw one line by line)."""
    for name, said in (("adamw", "AdamW (two fp32 moments a parameter)"),
                       ("adamw8bit", "8-bit AdamW (two 8-bit moments"),
                       ("muon", "Muon for the blocks' matrices (one fp32 momentum), AdamW for")):
        out = orch("plan", "configs/tiny.yaml", "--world-size", "2", "--set",
                   f"optimizer.name={name}")
        assert out.returncode == 0 and f"\n  optim    {said}" in out.stdout, out.stderr
        json_out = orch("plan", "configs/tiny.yaml", "--world-size", "2", "--json", "--set",
                        f"optimizer.name={name}")
        assert json.loads(json_out.stdout)["optimizer"] == name


def test_plan_json_has_the_documented_keys():
    out = orch(
        "plan",
        "configs/llama3-8b.yaml",
        "--world-size",
        "16",
        "--json",
        "--set",
        "parallel.tp=2",
        "--set",
        "parallel.pp=2",
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    for key in ("degrees", "groups", "memory_bytes_per_rank", "step_time_s", "tokens_per_s", "mfu"):
        assert key in plan
    assert plan["degrees"]["tp"] == 2 and plan["degrees"]["pp"] == 2
    assert plan["groups"]["tp"][0] == [0, 1] and plan["groups"]["pp"][0] == [0, 8]
    assert set(plan["groups"]) >= {"tp", "cp", "dp", "pp", "ep", "etp", "edp"}
    assert 0 < plan["mfu"] < 1 and plan["memory_bytes_per_rank"] > 0


def test_auto_lists_best_five_and_reasons():
    out = orch("plan", "configs/llama3-70b.yaml", "--world-size", "64", "--auto")
    assert out.returncode == 0, out.stderr
    assert "searched" in out.stdout and "over memory (" in out.stdout
    rows = [
        line
        for line in out.stdout.splitlines()
        if line.strip()[:2] in {f"{i} " for i in range(1, 6)}
    ]
    assert len(rows) == 5
    assert "best plan:" in out.stdout


def test_auto_table_columns_stay_aligned_with_long_labels():
    """Labels such as ``hsdp256(128x2) cp2 tp2+sp ep8 etp2`` overflowed the degrees column and
    shifted their row's figures."""
    out = orch("plan", "configs/mixtral-8x22b.yaml", "--world-size", "1024", "--auto",
               "--top", "8")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if "recompute" in line and "degrees" in line)
    rows = lines[lines.index(header) + 1:lines.index(header) + 9]
    assert max(len(row[5:].split("  ")[0]) for row in rows) > 28  # longer than the default
    column = header.index("recompute")
    assert all(row[column:].split()[0] in {"none", "selective", "full"} for row in rows), rows


def test_auto_json_plans_sorted_and_fitting():
    out = orch("plan", "configs/mixtral-8x22b.yaml", "--world-size", "128", "--auto", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # fastest first, where speeds within 0.1% (3 significant digits) tie and the plan that
    # communicates less goes first
    speeds = [float(f"{p['tokens_per_s']:.3g}") for p in result["plans"]]
    assert speeds == sorted(speeds, reverse=True) and len(speeds) == 5
    assert all(p["fits"] for p in result["plans"])
    assert result["searched"] == result["fit"] + result["over_memory"]


def test_bad_input_exits_2_with_every_problem_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: %s\nmodel:\n  hedas: 4\n  dim: big\n" % (REPO / "configs/tiny.yaml"))
    out = orch("plan", str(bad), "--world-size", "2", "--set", "parallel.tp=x")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert "(3 problems)" in out.stderr and "did you mean 'heads'" in out.stderr
    assert "bad.yaml:4 model.dim" in out.stderr


def test_the_readmes_bad_input_example_is_one_round(capsys, monkeypatch):
    """The misspelled key hid tp=3's four problems (a second run found them): the README's
    example prints them together, as the README shows (a line ending ', ...' cut short)."""
    from orch.cli import main

    readme = (REPO / "README.md").read_text()
    command, shown = re.search(r"\n\$ \.venv/bin/orch (plan .*model\.hedas=4)\n(.*?)\n```",
                               readme, re.S).groups()
    monkeypatch.chdir(REPO)
    assert main(shlex.split(command)) == 2
    printed = capsys.readouterr().err.rstrip("\n").splitlines()
    for said, got in zip(shown.splitlines(), printed, strict=True):
        assert got == said or (said.endswith(", ...") and got.startswith(said[:-3])), got
    assert "has no key 'hedas'" in shown and shown.count("by tp=3") == 3


def test_a_stand_in_value_says_nothing_of_its_own(capsys):
    """tp=0 is refused by a config rule, and tp=abc does not convert: the plan's checks run
    with tp at its default (1), which on 3 devices made dp 3, which global_batch 8 with
    micro_batch 2 does not divide; that is not the user's mistake and is not said. A problem
    with no part in the stand-in (the misspelled key) still is."""
    from orch.cli import main

    for tp in ("0", "abc"):
        assert main(["plan", "configs/tiny.yaml", "--world-size", "3", "--set",
                     f"parallel.tp={tp}", "--set", "model.hedas=4"]) == 2
        err = capsys.readouterr().err
        assert "(2 problems)" in err and "parallel.tp" in err and "has no key 'hedas'" in err
        assert "global_batch" not in err and "Traceback" not in err


def test_the_rules_of_model_and_config_run_without_a_machine(capsys, tmp_path):
    """Where the machine could not be resolved (a bad --world-size, --device, --gpus-per-node
    or cluster file) the degree rules were skipped: only the machine's problem was said, and
    tp=3's four came in a second round. The rules that read only the model and the config run;
    those of the node size (tp inside a node) cannot."""
    from orch.cli import main

    for machine in (["--world-size", "0"], ["--device", "h300"], ["--world-size", "12"],
                    ["--set", f"cluster={tmp_path / 'none.yaml'}"]):
        assert main(["plan", "configs/tiny.yaml", *machine, "--set", "parallel.tp=3"]) == 2
        err = capsys.readouterr().err
        assert "(5 problems)" in err, (machine, err)
        assert "model.heads=8 is not divisible by tp=3" in err
    assert main(["plan", "configs/tiny.yaml", "--device", "h300", "--set", "parallel.pp=9"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'h300'" in err and "9 pipeline stages for model.layers=4" in err
    assert main(["plan", "configs/tiny.yaml", "--world-size", "0", "--set",
                 "parallel.tp=16"]) == 2
    assert "spans nodes" not in capsys.readouterr().err


def test_plan_rule_errors_exit_2():
    out = orch("plan", "configs/tiny.yaml", "--world-size", "3", "--set", "parallel.tp=3")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no valid plan" in out.stderr and "tp=3" in out.stderr


def test_missing_config_file_exits_2():
    out = orch("plan", "configs/nope.yaml", "--world-size", "2")
    assert out.returncode == 2 and "config file not found" in out.stderr


def test_top_without_auto_is_refused(capsys):
    """--top lists the plans --auto finds; without --auto it was ignored."""
    from orch.cli import main

    assert main(["plan", "configs/tiny.yaml", "--world-size", "2", "--top", "3"]) == 2
    assert "--top: 3: lists the plans --auto finds" in capsys.readouterr().err
    assert main(["plan", "configs/tiny.yaml", "--world-size", "2", "--auto", "--top", "2"]) == 0


def test_a_cluster_takes_no_gpus_per_node_and_names_its_file_once(capsys, tmp_path):
    """--gpus-per-node was ignored with a cluster (--world-size was refused); a cluster's
    problems named its file twice ('cluster X: X nodes[0]...')."""
    from orch.cli import main

    assert main(["plan", "configs/llama3-8b.yaml", "--set",
                 "cluster=configs/clusters/dgx-h100-4node.yaml", "--gpus-per-node", "4"]) == 2
    assert ("--gpus-per-node: 4 is set, but cluster configs/clusters/dgx-h100-4node.yaml lists "
            "each node's devices") in capsys.readouterr().err
    # --device was mixed in: A100 compute priced over the H100 nodes' NVLink
    assert main(["plan", "configs/llama3-8b.yaml", "--set",
                 "cluster=configs/clusters/dgx-h100-4node.yaml", "--device", "a100"]) == 2
    assert ("--device: a100 is set, but cluster configs/clusters/dgx-h100-4node.yaml names each "
            "node's device") in capsys.readouterr().err
    broken = tmp_path / "c.yaml"
    broken.write_text("device: h100\nnodes:\n  - {name: a, devices: 0}\n")
    assert main(["plan", "configs/llama3-8b.yaml", "--set", f"cluster={broken}"]) == 2
    err = capsys.readouterr().err
    assert f"cluster {broken}:3 nodes[0].devices: 0" in err and err.count(str(broken)) == 1


def test_auto_with_no_valid_layout_names_the_rule(capsys):
    """It said '0 fit, 0 over memory ... no plan fits: add devices, offload, or shorten
    train.seq_len' where no data-parallel size divides the batch."""
    from orch.cli import main

    assert main(["plan", "configs/tiny.yaml", "--world-size", "7", "--auto"]) == 2
    # at micro-batch 1, the least the search tries: the config's 2 said 'use a multiple of 14'
    err = capsys.readouterr().err
    assert "train.global_batch: 8 is not divisible by micro_batch x dp = 1 x 7" in err
    assert "use a multiple of 7," in err
    # a batch the search can split: the file's micro-batch 2 is no bound of it under --auto
    assert main(["plan", "configs/tiny.yaml", "--world-size", "7", "--device", "cpu",
                 "--auto", "--set", "train.global_batch=7"]) == 0
    assert "1  fsdp7                         1  " in capsys.readouterr().out
    assert main(["plan", "configs/tiny.yaml", "--world-size", "7", "--device", "cpu",
                 "--auto", "--set", "train.global_batch=7", "--set", "train.micro_batch=2"]) == 2
    assert "7 is not a multiple of train.micro_batch=2" in capsys.readouterr().err


def test_auto_keeps_what_set_gives_and_searches_what_the_file_gives(capsys, tmp_path):
    """--auto --set parallel.tp=2 listed an fsdp2 plan as the best and never said tp=2 was
    dropped. Degrees, micro-batch and recompute given with --set are kept, even where the
    search would not go by itself (cp under 1,024 tokens a rank, a micro-batch of 3); those
    the config file gives are searched as before."""
    from orch.cli import main

    def auto(*args: str) -> dict:
        assert main(["plan", *args, "--auto", "--json", "--top", "20"]) == 0
        return json.loads(capsys.readouterr().out)

    kept = auto("configs/tiny.yaml", "--world-size", "2", "--set", "parallel.tp=2")
    assert kept["kept"] == {"parallel.tp": 2} and kept["plans"]
    assert {plan["degrees"]["tp"] for plan in kept["plans"]} == {2}
    assert main(["plan", "configs/tiny.yaml", "--world-size", "2", "--auto", "--set",
                 "parallel.tp=2"]) == 0
    assert "with parallel.tp=2 (given with --set)" in capsys.readouterr().out.splitlines()[0]
    outside = auto("configs/tiny.yaml", "--world-size", "4", "--set", "parallel.cp=2",
                   "--set", "train.recompute=full", "--set", "parallel={dp_shard: 2}")
    assert {(p["degrees"]["cp"], p["degrees"]["dp_shard"], p["recompute"])
            for p in outside["plans"]} == {(2, 2, "full")}
    three = auto("configs/tiny.yaml", "--world-size", "3", "--set", "train.global_batch=6",
                 "--set", "train.micro_batch=3")
    assert {plan["micro_batch"] for plan in three["plans"]} == {3}
    written = tmp_path / "tp2.yaml"
    written.write_text(f"base: {REPO / 'configs/tiny.yaml'}\nparallel:\n  tp: 2\n")
    searched = auto(str(written), "--world-size", "2")
    assert searched["kept"] == {} and {p["degrees"]["tp"] for p in searched["plans"]} == {1, 2}


def test_auto_says_which_value_given_with_set_leaves_no_plan(capsys):
    from orch.cli import main

    assert main(["plan", "configs/tiny.yaml", "--world-size", "2", "--auto", "--set",
                 "parallel.tp=3", "--set", "train.recompute=full"]) == 2
    err = capsys.readouterr().err
    assert ("--set parallel.tp: 3: --auto keeps it as given, and no valid plan on 2 x "
            "h100-sxm-80gb has parallel.tp=3") in err
    assert "model.heads=8 is not divisible by tp=3" in err and "recompute" not in err
    assert main(["plan", "configs/tiny.yaml", "--world-size", "4", "--auto", "--set",
                 "parallel.tp=2", "--set", "parallel.pp=4"]) == 2
    assert ("--set: parallel.pp=4, parallel.tp=2: --auto keeps them as given, and no valid "
            "plan on 4 x h100-sxm-80gb has them together") in capsys.readouterr().err


def test_inputs_that_are_not_what_they_look_like_are_named(capsys, tmp_path):
    """A directory was 'config file not found', a cluster file given as the config listed its
    keys as unknown, and --device '' fell back to the default silently."""
    from orch.cli import main

    assert main(["plan", "configs"]) == 2
    assert "configs: is a directory, not a config file" in capsys.readouterr().err
    assert main(["plan", "configs/clusters/mixed-nic.yaml"]) == 2
    assert ("is a cluster description (it lists nodes:), not a training config\n        fix: "
            "give a config such as configs/llama3-8b.yaml, with this file as --set "
            "cluster=configs/clusters/mixed-nic.yaml") in capsys.readouterr().err
    assert main(["plan", "configs/tiny.yaml", "--device", ""]) == 2
    assert "--device: is empty" in capsys.readouterr().err
    assert main(["plan", "configs/tiny.yaml", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.count("fix:") == 1  # it printed two


def test_plan_notes_what_orch_launch_refuses():
    """The plan prices offload with expert parallelism, which this runtime cannot run: it said
    "fits" with no word, and orch launch then refused the same config."""
    out = orch("plan", "configs/tiny-moe.yaml", "--device", "cpu", "--world-size", "2",
               "--set", "parallel.ep=2", "--set", "parallel.dp_replicate=2",
               "--set", "parallel.dp_shard=1", *(arg for group in ("params", "grads", "optimizer")
                                                 for arg in ("--set", f"offload.{group}=cpu")),
               "--json")
    assert out.returncode == 0, out.stderr
    (note,) = json.loads(out.stdout)["notes"]
    assert note.startswith("orch launch refuses it: offload: with parallel.ep=2")
    assert "fix: set parallel.ep=1" in note
    clean = orch("plan", "configs/tiny.yaml", "--device", "cpu", "--world-size", "2", "--json")
    assert json.loads(clean.stdout)["notes"] == []
    # --auto offloaded lists what orch launch runs offloaded, replicas (it listed only FSDP,
    # TP and pipeline plans, each refused); a refusal the config makes is noted on each row
    offload = [arg for group in ("params", "grads", "optimizer")
               for arg in ("--set", f"offload.{group}=cpu")]
    plans = json.loads(orch("plan", "configs/tiny.yaml", "--device", "cpu", "--world-size",
                            "2", "--auto", "--json", *offload).stdout)["plans"]
    assert [(p["degrees"]["dp_replicate"], p["degrees"]["dp_shard"], p["notes"])
            for p in plans] == [(2, 1, [])]
    searched = orch("plan", "configs/tiny.yaml", "--device", "cpu", "--world-size", "2",
                    "--auto", *offload, "--set", "model.tie_embeddings=true")
    assert searched.returncode == 0, searched.stderr
    assert "orch launch refuses #1, #2 (see each plan's notes" in searched.stdout


def test_plan_does_not_import_torch():
    """`orch plan` imported torch through the launcher's feature checks (its runtime imports),
    1.9 s of a 0.25 s command; it prices plans and starts nothing."""
    code = ("import sys; from orch.cli import main; "
            "main(['plan', 'configs/llama3-8b.yaml', '--world-size', '64', '--auto']); "
            "main(['plan', 'configs/tiny-moe.yaml', '--world-size', '2', '--set', "
            "'offload.params=cpu']); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stdout.splitlines()[-1] == "False"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """A Ctrl-C (during a long ``--auto`` search, or a c10d rendezvous wait in ``orch launch``)
    ended in a KeyboardInterrupt traceback."""
    import orch.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(orch.cli, "cmd_plan", interrupted)
    assert orch.cli.main(["plan", "configs/tiny.yaml"]) == 130
    assert capsys.readouterr().err == "\norch plan: stopped by SIGINT\n"
