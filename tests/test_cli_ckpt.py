"""``orch ckpt inspect|verify|export`` on checkpoints written by orch's CheckpointManager, as the
worker writes them (``{"model": ..., "optim": ...}`` through DCP), in one process."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from orch.cli import main
from orch.config import load_config
from orch.models.hf import hf_config, hf_family
from orch.models.hf_load import load_hf_weights
from orch.models.llama import Transformer
from orch.runtime.checkpoint import CheckpointError, CheckpointManager
from orch.runtime.checkpoint.safe_load import read_metadata

PLAN = {"world_size": 2, "degrees": {"dp_shard": 2, "tp": 1, "dp": 2, "world": 2}}


def tiny_model(tie: bool = False, *extra: str) -> tuple[object, Transformer]:
    cfg = load_config("configs/tiny.yaml", [f"model.tie_embeddings={str(tie).lower()}", *extra])
    model = Transformer(cfg.model)
    model.init_weights(5)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return cfg, model


def save_run(run: Path, cfg: object, model: Transformer, steps: tuple[int, ...] = (3, 6)) -> Path:
    manager = CheckpointManager(run, cfg, PLAN)
    optim = {"lr": 1e-3, "exp_avg": {k: torch.zeros_like(v) for k, v in
                                     model.state_dict().items()}}
    for step in steps:
        path = manager.save(step, {"model": model.state_dict(), "optim": optim},
                            {"epoch": 0, "step_in_epoch": step})
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cfg, model = tiny_model()
    run = tmp_path_factory.mktemp("ckpt") / "run"
    save_run(run, cfg, model)
    return run


def test_inspect_shows_step_plan_config_files_and_tensors(run, capsys):
    assert main(["ckpt", "inspect", str(run), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "step-00000003" in text and "step-00000006" in text
    assert "step      6 (saved" in text and "plan      2 ranks: dp_shard=2" in text
    assert "model     dim=256 layers=4 heads=8 kv_heads=4 vocab_size=256 experts=0\n" in text
    assert "__0_0.distcp" in text and ".metadata" in text
    assert "model.layers.0.attention.wq.weight  [256, 256]  float32" in text
    assert main(["ckpt", "inspect", str(run / "checkpoints" / "step-00000003"), "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["step"] == 3 and record["data"] == {"epoch": 0, "step_in_epoch": 3}
    assert record["groups"]["model"]["tensors"] == len(Transformer(load_config(
        "configs/tiny.yaml").model).state_dict())
    assert record["bytes"] == sum(record["files"].values())


def test_inspect_goes_on_past_an_argument_that_is_no_checkpoint(run, tmp_path, capsys):
    """``inspect nowhere RUN`` stopped at the first argument (exit 2, RUN not shown); verify
    went on. Each one that is no checkpoint is named at the end, the others shown."""
    nowhere, empty = tmp_path / "nowhere", tmp_path / "empty"
    empty.mkdir()
    assert main(["ckpt", "inspect", str(nowhere), str(run), str(empty)]) == 2
    captured = capsys.readouterr()
    assert "step-00000003" in captured.out and "step      6 (saved" in captured.out
    assert "not a run directory or checkpoint (2 problems)" in captured.err
    assert f"{nowhere}: " in captured.err and f"{empty}: holds no checkpoints" in captured.err
    assert main(["ckpt", "inspect", "--json", str(nowhere), str(run)]) == 2
    captured = capsys.readouterr()
    assert [r["step"] for r in json.loads(captured.out)] == [3, 6]
    assert f"{nowhere}: " in captured.err


def test_verify_passes_intact_checkpoints_and_names_a_bad_file(run, tmp_path, capsys):
    import shutil

    assert main(["ckpt", "verify", str(run)]) == 0
    assert "2 checkpoints: 2 ok, 0 bad\n" in capsys.readouterr().out
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step-00000006"
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    unfinished = copy / "checkpoints" / "step-00000009"
    unfinished.mkdir()
    assert main(["ckpt", "verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"BAD         {newest}" in out and f"{shard}: sha256 differs" in out
    assert "ok          " + str(copy / "checkpoints" / "step-00000003") in out
    assert f"unfinished  {unfinished}" in out
    assert main(["ckpt", "verify", "--quick", str(newest)]) == 0  # same size: only hashes see it
    (copy / "checkpoints" / "step-00000003" / ".metadata").write_bytes(b"not a pickle")
    assert main(["ckpt", "inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "damaged: " in out and ".metadata: is not a checkpoint index" in out
    assert "\n  fix: " in out
    assert main(["ckpt", "inspect", "--json", str(copy / "checkpoints" / "step-00000003")]) == 0
    (damaged,) = json.loads(capsys.readouterr().out)  # the fix was inside "error", after "\n"
    assert ".metadata: is not a checkpoint index" in damaged["error"]
    assert "\n" not in damaged["error"] and damaged["fix"]
    assert main(["ckpt", "verify", str(unfinished)]) == 1  # one checkpoint: incomplete is bad
    assert "is missing: the save of this checkpoint did not finish" in capsys.readouterr().out
    # a path that is no checkpoint is reported, and the others are still checked (it stopped
    # the command at once, exit 2, the good run unchecked)
    assert main(["ckpt", "verify", str(tmp_path / "nowhere"), str(run)]) == 1
    out = capsys.readouterr().out
    nowhere = tmp_path / "nowhere"
    assert f"BAD         {nowhere}\n  {nowhere}: does not exist" in out
    assert "2 checkpoints: 2 ok, 0 bad; 1 argument not a checkpoint" in out  # was "2 checkpoint(s)"
    assert f"ok          {run}" in out
    (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="is truncated: the file ends before the index"):
        read_metadata(newest)  # cut short: damaged, not forged (the fix said it was)


def test_inspect_plan_line_names_the_schedule_virtual_stages_and_offload_tiers(run):
    """The plan line showed ``pp=2`` alone: which schedule, how many virtual stages and where
    the states lived (offload tiers) were in the manifest but not said."""
    from orch.cli_ckpt import render
    from orch.runtime.checkpoint.browse import describe

    record = describe(run / "checkpoints" / "step-00000006")
    assert "  plan      2 ranks: dp_shard=2\n" in render(record)
    record["plan"] = {"world_size": 4, "schedule": "interleaved", "tiers": {
        "params": "cpu", "grads": "device", "optimizer": "nvme", "activations": "device"},
        "degrees": {"pp": 2, "dp_shard": 2, "virtual_stages": 2}}
    assert "  plan      4 ranks: pp=2 (interleaved schedule, 2 virtual stages per rank), " \
        "dp_shard=2; offload params=cpu optimizer=nvme\n" in render(record)


def test_a_run_directory_named_step_something_is_a_run_directory(run, tmp_path, capsys):
    """A run directory whose name began with ``step-`` (``step-lr-sweep``) was taken for one
    checkpoint: inspect said "unfinished save", verify BAD, export "has no complete
    checkpoint". Only ``step-NNNNNNNN`` without a ``checkpoints/`` of its own is one now."""
    import shutil

    from orch.runtime.checkpoint.browse import checkpoints_in, newest_complete

    for name in ("step-lr-sweep", "step-00000001"):
        sweep = tmp_path / name
        shutil.copytree(run / "checkpoints", sweep / "checkpoints")
        steps = [sweep / "checkpoints" / f"step-0000000{n}" for n in (3, 6)]
        assert checkpoints_in(sweep) == steps and newest_complete(sweep) == steps[-1]
        assert main(["ckpt", "verify", str(sweep)]) == 0
        assert "2 checkpoints: 2 ok, 0 bad" in capsys.readouterr().out
        assert main(["ckpt", "inspect", str(sweep)]) == 0
        assert "unfinished" not in capsys.readouterr().out
    unfinished = tmp_path / "step-00000009"  # named as a step, no manifest: one, unfinished
    unfinished.mkdir()
    assert checkpoints_in(unfinished) == [unfinished]


def test_verify_names_an_unreadable_file_not_a_traceback(run, monkeypatch, capsys):
    """A file the user may not read was a PermissionError traceback (the hashing was not
    guarded), in ``orch ckpt verify`` and in a resume's check alike. Root reads any file, so
    the read is made to fail as it does for a user without permission."""
    from orch.runtime.checkpoint import files, manifest

    newest = run / "checkpoints" / "step-00000006"
    locked = newest / "__0_0.distcp"

    def sha256(file: Path) -> str:
        if file == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return files.sha256(file)

    monkeypatch.setattr(manifest, "sha256", sha256)
    assert main(["ckpt", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"BAD         {newest}\n  {locked}: cannot be read (Permission denied)\n" in out
    assert "2 checkpoints: 1 ok, 1 bad" in out
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: cannot be read \(Permission"):
        CheckpointManager(run, tiny_model()[0], PLAN).resolve_resume(str(newest))


def test_a_checkpoint_removed_while_checked_is_said_to_be_not_bad(run, tmp_path, monkeypatch,
                                                                 capsys):
    """``checkpoint.keep_last`` of a run still saving deletes a checkpoint (manifest first)
    between the listing and the check: verify said BAD (exit 1) and inspect "damaged", about
    one call in ten on a live run. The deletion is made to happen at that moment here."""
    import shutil

    from orch.runtime.checkpoint import browse, files, manifest
    from orch.runtime.checkpoint.files import remove_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    older, newest = sorted((copy / "checkpoints").iterdir())

    def retention_meanwhile(file: Path) -> str:
        if file.parent == older:
            remove_checkpoint(older)
        return files.sha256(file)

    monkeypatch.setattr(manifest, "sha256", retention_meanwhile)
    assert main(["ckpt", "verify", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"removed     {older}: removed while checking (checkpoint.keep_last of a running " \
        "run), not counted as bad" in out and f"ok          {newest}" in out
    assert "BAD" not in out and "2 checkpoints: 1 ok, 0 bad, 1 removed while checking" in out
    shutil.copytree(run, copy, dirs_exist_ok=True)
    assert main(["ckpt", "verify", str(older)]) == 0  # named alone: the same
    assert f"removed     {older}: removed while checking" in capsys.readouterr().out
    shutil.copytree(run, copy, dirs_exist_ok=True)
    real = browse.contents

    def retention_before_the_index(path: Path) -> browse.Contents:
        if path == older:
            remove_checkpoint(older)
        return real(path)

    monkeypatch.setattr(browse, "contents", retention_before_the_index)
    assert main(["ckpt", "inspect", str(copy), "--json"]) == 0
    removed, kept = json.loads(capsys.readouterr().out)
    assert removed == {"path": str(older), "complete": False, "removed": True}
    assert kept["step"] == 6 and "error" not in kept
    shutil.copytree(run, copy, dirs_exist_ok=True)
    assert main(["ckpt", "inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"{older}\n  removed while checking (checkpoint.keep_last" in out
    assert "damaged" not in out and "unfinished" not in out


def test_export_of_a_checkpoint_removed_meanwhile_says_so(run, tmp_path, monkeypatch, capsys):
    """A live run's retention deleting the checkpoint mid-export was a traceback (DCP's
    AssertionError, or "has a per-rank index (rank 0)", which was false)."""
    import shutil

    from orch.models import hf_export
    from orch.runtime.checkpoint.files import remove_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step-00000006"
    real = hf_export.read_tensors

    def retention_meanwhile(path: Path, infos: list) -> dict:
        remove_checkpoint(newest)
        return real(path, infos)

    monkeypatch.setattr(hf_export, "read_tensors", retention_meanwhile)
    assert main(["ckpt", "export", str(copy), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{newest}: was removed while it was being exported" in err and "Traceback" not in err
    assert "checkpoint.keep_last" in err and "fix: export again" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no OUT, no temporary


QWEN3 = ("model.qk_norm=true", "model.head_dim=48")
EXPORTED = {"llama": (False, ()), "llama-tied": (True, ()), "qwen3": (True, QWEN3),
            "qwen2": (True, ("model.qkv_bias=true",)),
            "mixtral": (False, ("model.experts=4",)),
            "qwen3-moe": (True, (*QWEN3, "model.experts=4", "model.moe_layer_interval=2",
                                 "model.norm_topk_prob=false", "model.expert_ffn_dim=96"))}
"""Models exported: Llama's, untied and tied, and Qwen3's attention (QK-norm, wider heads) and
Qwen2's (q/k/v biases) with their small models' tied embeddings; Mixtral's MoE (every layer,
top-2 renormalized) and Qwen3-MoE's (every other layer, narrower experts, top-k weights as they
are)."""


@pytest.mark.parametrize("name", list(EXPORTED))
def test_export_to_hf_gives_transformers_the_same_logits_and_reads_back(tmp_path, name, capsys):
    transformers = pytest.importorskip("transformers")
    tie, extra = EXPORTED[name]
    cfg, model = tiny_model(tie, *extra)
    save_run(tmp_path / "run", cfg, model, steps=(1,))
    out = tmp_path / "hf"
    assert main(["ckpt", "export", str(tmp_path / "run"), "--to", "hf", str(out),
                 "--max-shard-size", "2MB"]) == 0
    assert len(list(out.glob("*.safetensors"))) > 2  # sharded, with an index
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == tie
    capsys.readouterr()
    assert main(["ckpt", "inspect", "--json", str(tmp_path / "run")]) == 0
    (record,) = json.loads(capsys.readouterr().out)  # a tied head was counted twice
    assert record["groups"]["model"]["tensors"] == len(list(model.parameters())) + \
        cfg.model.moe_layers  # and a balancing bias per MoE layer
    # through the Auto class, as pipeline() and vLLM load it (it needs config.json's model_type)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no key missing, unexpected or of another shape
    assert type(hf).__name__ == hf_family(cfg.model)[0]
    hf.eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model.eval()(tokens) - hf(tokens).logits).abs().max()
    assert diff < 1e-5, diff
    back_cfg = dataclasses.replace(cfg.model, init_from=str(out))
    back = Transformer(back_cfg)
    load_hf_weights(back, back_cfg)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if tie:  # a tied checkpoint that also saves its head (as some do) loads as transformers does
        from safetensors.torch import load_file, save_file

        shard = next(p for p in sorted(out.glob("*.safetensors"))
                     if "model.embed_tokens.weight" in load_file(p))
        tensors = load_file(shard)
        save_file(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
                  shard, metadata={"format": "pt"})
        index = json.loads((out / "model.safetensors.index.json").read_text())
        index["weight_map"]["lm_head.weight"] = shard.name
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
        # every tensor read but that head (an MoE stack's experts one by one)
        assert load_hf_weights(Transformer(back_cfg), back_cfg) == len(index["weight_map"]) - 1


def test_export_carries_the_init_from_checkpoints_tokenizer(tmp_path, capsys):
    """A model fine-tuned from a HuggingFace checkpoint speaks that checkpoint's tokenizer: the
    export was written without its files and with null special token ids, so transformers
    could load the weights but not encode a word; a directory gone since is said."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (source / name).write_text(json.dumps({"made by": name}))
    cfg, model = tiny_model(False, f"model.init_from={source}")
    save_run(tmp_path / "run", cfg, model, steps=(1,))
    out = tmp_path / "hf"
    assert main(["ckpt", "export", str(tmp_path / "run"), "--to", "hf", str(out)]) == 0
    assert "tokenizer.json, tokenizer_config.json, generation_config.json, config.json)" in \
        capsys.readouterr().out  # the files it wrote
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == {"made by": name}
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)
    import shutil

    shutil.rmtree(source)
    assert main(["ckpt", "export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "b")]) == 0
    assert f"  note: model.init_from {source} cannot be read any more: its tokenizer files" \
        in capsys.readouterr().out
    assert not (tmp_path / "b" / "tokenizer.json").exists()


def test_export_notes_an_expert_capacity_the_hf_model_does_not_have(tmp_path, capsys):
    cfg, model = tiny_model(False, "model.experts=4", "model.capacity_factor=1.25")
    save_run(tmp_path / "run", cfg, model, steps=(1,))
    assert main(["ckpt", "export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "  note: model.capacity_factor is 1.25: orch drops the routed copies over an " \
        "expert's capacity, MixtralForCausalLM routes every token" in out, out


def test_export_refuses_balancing_biases_that_change_the_routing(tmp_path, capsys):
    """HF's routers have no aux-loss-free balancing bias: one that is not zero picks other
    experts there, so the export would compute another function without a word."""
    cfg, model = tiny_model(False, "model.experts=4", "model.bias_update_rate=0.001")
    model.layers["2"].feed_forward.expert_bias[1] = 0.01
    save_run(tmp_path / "run", cfg, model, steps=(1,))
    assert main(["ckpt", "export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "cannot export (1 problem)" in err, err
    assert "model.layers.2.feed_forward.expert_bias: is not all zero" in err
    assert "model.bias_update_rate: 0" in err and not (tmp_path / "hf").exists()


def test_export_names_every_problem_of_the_request_at_once_before_hashing(tmp_path, capsys):
    """Before: the whole checkpoint was hashed first (a damaged one was all that was said), then
    an MoE model's refusal came alone, and a bad --max-shard-size alone."""
    moe = load_config("configs/tiny-moe.yaml")
    save_run(tmp_path / "moe", moe, Transformer(moe.model), steps=(1,))
    shard = tmp_path / "moe" / "checkpoints" / "step-00000001" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1  # found only by hashing, which waits for the quick checks
    shard.write_bytes(bytes(data))
    (tmp_path / "taken").mkdir()
    assert main(["ckpt", "export", str(tmp_path / "moe"), "--to", "hf", str(tmp_path / "taken"),
                 "--dtype", "int8", "--max-shard-size", "abc"]) == 2
    err = capsys.readouterr().err
    assert "cannot export (4 problems)" in err and "Traceback" not in err
    assert "--dtype: 'int8' is not a dtype an export writes" in err and "bfloat16" in err
    assert "--max-shard-size: 'abc' is not a byte size" in err and "500MB" in err
    assert f"{tmp_path / 'taken'}: exists; an export never overwrites" in err
    assert "model.shared_experts: 1, which MixtralForCausalLM cannot compute" in err
    assert "sha256" not in err and list((tmp_path / "taken").iterdir()) == []
    cfg, model = tiny_model()
    save_run(tmp_path / "run", cfg, model, steps=(1,))
    args = ["ckpt", "export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "o")]
    assert main([*args, "--max-shard-size", "0"]) == 2
    assert "--max-shard-size: '0' is not a positive size" in capsys.readouterr().err
    assert main([*args, "--max-shard-size", "1.5"]) == 2  # was taken as 1 byte
    err = capsys.readouterr().err
    assert "--max-shard-size: '1.5' is not a whole number of bytes" in err
    assert "fix: give a whole number of bytes, or a size such as 5GB" in err
    assert not (tmp_path / "o").exists()
    assert hf_config(cfg.model)["num_hidden_layers"] == 4
    (tmp_path / "empty").mkdir()  # no complete checkpoint: said beside the request's problems
    assert main(["ckpt", "export", str(tmp_path / "empty"), "--to", "hf", str(tmp_path / "taken"),
                 "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "cannot export (3 problems)" in err and f"  - {tmp_path / 'empty'}: " in err, err


def test_export_refuses_a_damaged_checkpoint_and_a_path_under_a_file(run, tmp_path, capsys):
    """A checkpoint whose bytes differ from its manifest exported damaged weights with exit 0
    (resume refused it; export checked nothing); an output path under a file was a traceback."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shard = copy / "checkpoints" / "step-00000006" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    args = ["ckpt", "export", str(copy), "--to", "hf"]
    assert main([*args, str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "does not match its manifest" in err and "sha256 differs" in err
    assert "orch ckpt verify" in err and not (tmp_path / "hf").exists()
    older = copy / "checkpoints" / "step-00000003"
    (older / "rng-rank-00000.pt").write_bytes(b"changed, but not read by an export")
    assert main(["ckpt", "export", str(older), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    (tmp_path / "afile").write_text("")
    assert main(["ckpt", "export", str(run), "--to", "hf", str(tmp_path / "afile" / "hf")]) == 2
    assert f"{tmp_path / 'afile'}: is not a directory" in capsys.readouterr().err


def edit_manifest(checkpoint: Path, **model: object) -> None:
    """Set ``model`` fields in ``checkpoint``'s manifest config, as a hand edit would."""
    file = checkpoint / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["config"]["model"].update(model)
    file.write_text(json.dumps(manifest))


def test_export_and_verify_refuse_a_manifest_config_that_is_not_the_saved_one(run, tmp_path,
                                                                               capsys):
    """export wrote config.json from the manifest's config unchecked: with model.dim edited to
    512 and vocab_size to 32000, verify said ok and transformers loaded the export with "Reinit
    due to size mismatch" (random weights); a rope_theta, norm_eps or tying edit gave no shape
    error at all. The config is now checked against the fingerprint saved beside it."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step-00000006"
    for edit in ({"dim": 512, "vocab_size": 32000}, {"rope_theta": 500000.0},
                 {"tie_embeddings": True}):
        shutil.copy(run / "checkpoints" / "step-00000006" / "manifest.json", newest)
        edit_manifest(newest, **edit)
        assert main(["ckpt", "export", str(copy), "--to", "hf", str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert f"{newest / 'manifest.json'}: config does not hash to the fingerprint saved " \
            "with it" in err and "edited after the save" in err, (edit, err)
        assert "fix: restore manifest.json's config as it was saved" in err
        assert not (tmp_path / "hf").exists()
        assert main(["ckpt", "verify", "--quick", str(copy)]) == 1
        out = capsys.readouterr().out
        assert f"BAD         {newest}\n  {newest / 'manifest.json'}: config does not hash" in out
        assert "ok          " + str(copy / "checkpoints" / "step-00000003") in out


def test_export_refuses_tensors_the_manifest_config_does_not_describe(run, tmp_path, capsys):
    """A manifest whose config hashes right but is another model's (copied from another run's
    checkpoint, or edited with its fingerprint recomputed) passes the fingerprint check; the
    tensors' shapes against a model built from it on the meta device still catch it."""
    import shutil

    from orch.config import config_to_dict
    from orch.runtime.checkpoint import config_fingerprint

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step-00000006"
    other = load_config("configs/tiny.yaml", ["model.dim=512", "model.layers=5"])
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest |= {"config": config_to_dict(other), "fingerprint": config_fingerprint(other)}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert main(["ckpt", "export", str(copy), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{newest / 'manifest.json'}: config.model does not describe the checkpoint's " \
        "tensors (model.tok_embeddings.weight is [256, 256], the config's model [256, 512]; " \
        "model.layers.0.attention_norm.weight is [256], the config's model [512]" in err, err
    assert "more" in err and "fix: restore the manifest.json saved with this checkpoint" in err
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_path_in_a_runs_checkpoints(run, tmp_path, capsys):
    """An export into a run's checkpoints/ was accepted; there it looks like an unfinished save
    (or lies inside a checkpoint), which that run's next save deletes with checkpoint.keep_last.
    A directory merely named checkpoints, of no run, still takes an export."""
    checkpoints = run / "checkpoints"
    other = tmp_path / "other"  # a run that has started but not saved yet
    other.mkdir()
    (other / "plan.json").write_text("{}")
    for out, inside in [
        (checkpoints / "step-00000010", checkpoints),
        (run.parent / "x" / ".." / "run" / "checkpoints" / "hf", checkpoints),
        (checkpoints / "step-00000006" / "hf", checkpoints),  # pruned with that checkpoint
        (other / "checkpoints" / "step-00000001", other / "checkpoints"),
    ]:
        assert main(["ckpt", "export", str(run), "--to", "hf", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out}: is inside {inside}, a run's checkpoints directory" in err, err
        assert f"fix: export outside it, such as to {inside.parent / 'hf'}" in err
        assert not out.exists()
    assert main(["ckpt", "export", str(run), "--to", "hf", str(checkpoints)]) == 2
    assert f"{checkpoints}: is a run's checkpoints directory" in capsys.readouterr().err
    mine = tmp_path / "mine" / "checkpoints" / "tiny-hf"
    assert main(["ckpt", "export", str(run), "--to", "hf", str(mine)]) == 0
    assert (mine / "config.json").is_file()


def test_export_refuses_a_dangling_link_and_an_out_that_appears_meanwhile(run, tmp_path,
                                                                         monkeypatch, capsys):
    """A dangling link as OUT passed the existence check (exists() follows links) and the
    final rename raised NotADirectoryError with a traceback (exit 1); so did an OUT made while
    exporting (a second export into the same path: "Directory not empty"). The link is refused
    before anything is read; an OUT that appeared is named, left as it was, the temporary gone."""
    from orch.models import hf_export

    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    read = []
    real = hf_export.read_tensors
    monkeypatch.setattr(hf_export, "read_tensors", lambda *a: read.append(1) or real(*a))
    assert main(["ckpt", "export", str(run), "--to", "hf", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"{link}: is a link to {tmp_path / 'nowhere'}, which does not exist" in err, err
    assert "fix: choose a new directory, or remove the link" in err and not read
    link.unlink()

    def appears(out: Path, make) -> str:
        def other_export_meanwhile(*args: object) -> dict:
            make(out)
            return real(*args)

        monkeypatch.setattr(hf_export, "read_tensors", other_export_meanwhile)
        assert main(["ckpt", "export", str(run), "--to", "hf", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and not list(tmp_path.glob(".*tmp-*"))
        return err

    def full_directory(out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("theirs")

    err = appears(tmp_path / "raced", full_directory)
    assert f"{tmp_path / 'raced'}: appeared while exporting (Directory not empty); nothing of " \
        "it was touched, and nothing was written" in err, err
    assert "fix: export again into a new directory" in err
    assert (tmp_path / "raced" / "config.json").read_text() == "theirs"
    err = appears(tmp_path / "linked", lambda out: out.symlink_to(tmp_path / "nowhere"))
    assert f"{tmp_path / 'linked'}: appeared while exporting" in err, err
    assert (tmp_path / "linked").is_symlink()


def test_export_says_which_checkpoint_and_the_newer_ones_it_passed_over(run, tmp_path, capsys):
    """With the newest step's manifest.json gone, export took step 3 instead of 6 and printed
    the same "wrote OUT: 2 files, ..." line as an export of step 6."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    older, newest = (copy / "checkpoints" / f"step-0000000{n}" for n in (3, 6))
    assert main(["ckpt", "export", str(copy), "--to", "hf", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'all'} from {newest} (step 6): 2 files, "), out
    assert "passed over" not in out
    (newest / "manifest.json").unlink()
    assert main(["ckpt", "export", str(copy), "--to", "hf", str(tmp_path / "hf")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'hf'} from {older} (step 3): 2 files, ")
    assert lines[1:] == [f"  passed over newer {newest}: it has no manifest.json (a save that did "
                         "not finish, or a checkpoint whose manifest was lost), and resume "
                         "passes over it too"], lines


def test_export_to_an_empty_out_says_it_is_empty(run, capsys):
    """``--to hf ""`` was refused as "- .: exists; an export never overwrites" (Path("") is
    ".")."""
    assert main(["ckpt", "export", str(run), "--to", "hf", ""]) == 2
    err = capsys.readouterr().err
    assert "cannot export (1 problem):\n  - OUT: is empty\n" in err and "- .:" not in err, err
    assert "fix: give the directory to create" in err


def test_a_tensor_without_a_hf_key_is_refused_not_left_out(run, tmp_path, monkeypatch, capsys):
    """Every tensor the mapping gave no key for was filtered out with the tied head: an export
    without it, and no word. Here the final norm stands for a parameter the mapping lacks."""
    from orch.models import hf_export

    real = hf_export.hf_keys
    monkeypatch.setattr(hf_export, "hf_keys", lambda fqn, *args: [] if fqn == "norm.weight"
                        else real(fqn, *args))
    assert main(["ckpt", "export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "cannot export" in err and "Traceback" not in err
    assert ("model.norm.weight: has no LlamaForCausalLM key (orch.models.hf.hf_keys maps "
            "none), so the export would leave it out") in err
    assert not (tmp_path / "hf").exists()


def test_inspect_names_qwen3_attention_where_the_model_has_it(tmp_path, capsys):
    """A Qwen3-shaped checkpoint (QK-norm, heads 48 wide at dim 256 with 8 heads) read as the
    Llama one beside it: a resume refused for ``model.qk_norm: True -> False`` sent the user to a
    model line that did not say it. A Llama checkpoint's line stays as it was."""
    qwen3 = load_config("configs/tiny.yaml", ["model.qk_norm=true", "model.head_dim=48"])
    save_run(tmp_path / "qwen3", qwen3, Transformer(qwen3.model), steps=(3,))
    assert main(["ckpt", "inspect", str(tmp_path / "qwen3")]) == 0
    assert "  model     dim=256 layers=4 heads=8 kv_heads=4 head_dim=48 qk_norm=True " \
        "vocab_size=256 experts=0\n" in capsys.readouterr().out


def test_inspect_names_the_optimizer_and_the_lr_schedule(tmp_path, capsys):
    """A Muon checkpoint read as an AdamW one (``optim 61 (...)`` and no optimizer named), and a
    wsd run's schedule was not said: both must match to resume (the optimizer) or place the
    next run's cooldown (``--resume PATH`` from a stable-phase checkpoint)."""
    cfg = load_config("configs/tiny.yaml", [
        "optimizer.name=muon", "optimizer.muon_ns_steps=3", "train.lr_schedule=wsd",
        "train.cooldown_steps=100", "train.cooldown_shape=sqrt", "train.decay_steps=400"])
    save_run(tmp_path / "muon", cfg, Transformer(cfg.model), steps=(3,))
    adamw = load_config("configs/tiny.yaml", ["train.lr_schedule=constant"])
    save_run(tmp_path / "adamw", adamw, Transformer(adamw.model), steps=(3,))
    assert main(["ckpt", "inspect", str(tmp_path / "muon"), str(tmp_path / "adamw")]) == 0
    text = capsys.readouterr().out
    assert "  train     steps=500 global_batch=8 seq_len=256 lr=0.001 lr_schedule=wsd " \
        "warmup_steps=20 decay_steps=400 cooldown_steps=100 cooldown_shape=sqrt " \
        "min_lr_ratio=0.1 precision=fp32 seed=0\n" in text
    assert "  optimizer name=muon beta1=0.9 beta2=0.95 eps=1e-08 weight_decay=0.1 " \
        "muon_momentum=0.95 muon_ns_steps=3\n" in text
    assert "lr=0.001 lr_schedule=constant warmup_steps=20 precision=fp32" in text
    assert "  optimizer name=adamw beta1=0.9 beta2=0.95 eps=1e-08 weight_decay=0.1\n" in text


def test_export_from_elsewhere_finds_a_relative_init_from(tmp_path, monkeypatch, capsys):
    """A run launched with model.init_from relative to its directory recorded it so, and an
    export run from anywhere else read it from there: the tokenizer was noted as gone while it
    was still in place (or another directory's taken)."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (source / "tokenizer.json").write_text("{}")
    cfg, model = tiny_model(False, "model.init_from=source")
    monkeypatch.chdir(tmp_path)  # where the run is launched
    save_run(tmp_path / "run", cfg, model, steps=(1,))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["ckpt", "export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "note" not in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 2
