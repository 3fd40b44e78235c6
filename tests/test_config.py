"""Config loading: base chains, overrides typed by the schema, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from orch.config import Config, TrainConfig, config_to_dict, load_config, parse_bytes
from orch.config.source import parse_yaml_text
from orch.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems_of(path: Path | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_all_example_configs_load():
    names = {p.stem for p in CONFIGS}
    assert {
        "tiny",
        "tiny-moe",
        "llama3-8b",
        "llama3-70b",
        "mixtral-8x22b",
        "qwen2-57b-a14b",
        "mistral-nemo-12b",
        "qwen3-8b",
        "qwen3-30b-a3b",
        "qwen2.5-7b",
    } <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, Config) and cfg.model.name == path.stem


def test_presets_share_bases():
    llama = load_config(REPO / "configs/llama3-70b.yaml")
    assert (llama.model.vocab_size, llama.model.rope_theta, llama.model.n_kv_heads) == (
        128256,
        500000.0,
        8,
    )
    assert llama.train.seq_len == 8192 and llama.checkpoint.async_save  # from large-run.yaml
    moe = load_config(REPO / "configs/tiny-moe.yaml")
    assert moe.model.dim == 256 and moe.model.experts == 4  # tiny.yaml, then its own keys


def test_base_chain_merges_nested_sections(tmp_path):
    write(tmp_path, "a.yaml", "model: {dim: 64, heads: 4}\ntrain: {steps: 5, warmup_steps: 0}\n")
    write(tmp_path, "sub/b.yaml", "base: ../a.yaml\nmodel: {heads: 8}\n")
    c = write(tmp_path, "c.yaml", "base: sub/b.yaml\ntrain: {seq_len: 32}\n")
    cfg = load_config(c)
    assert (cfg.model.dim, cfg.model.heads, cfg.train.steps, cfg.train.seq_len) == (64, 8, 5, 32)


def test_base_list_later_wins(tmp_path):
    write(tmp_path, "a.yaml", "train: {steps: 5, lr: 0.1, warmup_steps: 0}\n")
    write(tmp_path, "b.yaml", "train: {steps: 7}\n")
    cfg = load_config(write(tmp_path, "c.yaml", "base: [a.yaml, b.yaml]\n"))
    assert (cfg.train.steps, cfg.train.lr) == (7, 0.1)


def test_base_cycle_is_reported_with_chain(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    text = problems_of(tmp_path / "a.yaml")
    assert "cycle" in text and "a.yaml -> " in text and "b.yaml" in text


def test_missing_base_names_referrer(tmp_path):
    text = problems_of(write(tmp_path, "a.yaml", "base: nothere.yaml\n"))
    assert "nothere.yaml" in text and "not found" in text and "named as base by" in text


def test_malformed_yaml_reports_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  dim: 4\n  heads: [1, 2\ntrain: {}\n")
    text = problems_of(path)
    assert "malformed YAML" in text and "bad.yaml:" in text


@pytest.mark.parametrize("text, where, message", [
    ("parallel: &p {x: *p}\n", "y.yaml:1", "parallel.x: an alias refers to a mapping or list "
                                          "that contains it"),
    ("parallel: &p [1, *p]\n", "y.yaml:1", "parallel[1]: an alias refers to a mapping or list "
                                          "that contains it"),
    ("model:\n  dim: 64\nparallel:\n  tp: !custom 2\n", "y.yaml:4",
     "parallel.tp: could not determine a constructor for the tag '!custom'"),
    ("parallel:\n  tp: !!int abc\n", "y.yaml:2", "parallel.tp: invalid literal for int()"),
    ("x: !!python/name:os.system\n", "y.yaml:1", "cannot read x: could not determine"),
])
def test_yaml_that_is_not_plain_data_is_a_problem_at_its_line(tmp_path, text, where, message):
    """Tags, bad explicit types and self-containing aliases were tracebacks; in ``--set`` the
    text is kept, and the field's type names it."""
    got = problems_of(write(tmp_path, "y.yaml", text))
    assert f"{where}: cannot read {message.removeprefix('cannot read ')}" in got
    got = problems_of(None, ["train.steps=!!int abc"])
    assert "--set train.steps: '!!int abc' is not a whole number" in got


def test_merge_keys_merge_and_non_utf8_is_named(tmp_path):
    text = "shared: &s {steps: 3}\ntrain: {<<: *s, seq_len: 64}\n"
    got = problems_of(write(tmp_path, "m.yaml", text))
    assert "(2 problems)" in got and "m.yaml:1 shared: unknown key 'shared'" in got
    assert "train.warmup_steps: 10 is not between 0 and train.steps=3" in got  # merged in
    (tmp_path / "b.yaml").write_bytes(b"model:\n  name: \xff\xfe\n")
    assert "b.yaml: is not UTF-8 text (byte 15: b'\\xff')" in problems_of(tmp_path / "b.yaml")


def test_a_key_written_beside_a_merge_overrides_it(tmp_path):
    """YAML's explicit keys override merged ones; ``{<<: *t, steps: 20}`` was refused as
    'train.steps appears twice'. A key written twice in the mapping itself still is."""
    text = ("defaults: &t {steps: 10, seq_len: 64}\n"
            "train:\n  <<: *t\n  steps: 20\n  warmup_steps: 30\n")
    got = problems_of(write(tmp_path, "o.yaml", text))
    assert "appears twice" not in got
    assert "train.warmup_steps: 30 is not between 0 and train.steps=20" in got
    assert "o.yaml:1 defaults: unknown key 'defaults'" in got
    got = problems_of(write(tmp_path, "t.yaml", text + "  steps: 30\n"))
    assert "(1 problem)" in got and "t.yaml:6: key 'train.steps' appears twice" in got


def test_merges_of_several_mappings_follow_yaml():
    """The first mapping of ``<<: [*a, *b]`` wins a key both have, the mapping's own keys win
    over both, and an anchor whose own keys override a merge reads the same where it is
    aliased (neither is a repeated key)."""
    text = ("a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc: {<<: [*a, *b]}\n"
            "d: &d {<<: *a, x: 3}\ne: {<<: [*d, *b], z: 4}\nf: *d\n")
    data, locs, problems = parse_yaml_text(text, "m.yaml")
    assert problems == []
    assert (data["c"], data["d"], data["e"], data["f"]) == (
        {"x": 1, "y": 1, "z": 2}, {"x": 3, "y": 1}, {"x": 3, "y": 1, "z": 4}, {"x": 3, "y": 1})
    assert (locs["e.x"], locs["e.y"], locs["e.z"]) == ("m.yaml:4", "m.yaml:1", "m.yaml:5")


def test_duplicate_key_reported(tmp_path):
    text = problems_of(write(tmp_path, "d.yaml", "model:\n  dim: 64\n  dim: 128\n"))
    assert "d.yaml:3" in text and "appears twice" in text


def test_every_problem_at_once_with_lines_and_fixes(tmp_path):
    path = write(
        tmp_path,
        "many.yaml",
        "model:\n  dim: abc\n  hedas: 4\nparallel:\n  cp_kind: rign\nfoo: 1\n",
    )
    text = problems_of(path, ["train.seq_len=x", "model.nope=1"])
    assert "(6 problems)" in text
    assert "many.yaml:2 model.dim: 'abc' is not a whole number" in text
    assert "many.yaml:3 model.hedas: unknown key 'hedas'" in text and "did you mean 'heads'" in text
    assert "many.yaml:5 parallel.cp_kind: 'rign' is not one of ring, ulysses" in text
    assert "did you mean 'ring'" in text
    assert "unknown key 'foo'" in text
    assert "--set train.seq_len: 'x' is not a whole number" in text
    assert "model has no key 'nope'" in text
    assert text.count("fix:") == 6


def test_a_rules_problem_names_the_file_and_line_of_its_value(tmp_path):
    """A conversion problem said 'a.yaml:3 model.dim' while a rule's in the same file said
    only 'train.lr': the README promises file:line. A value from --set, or a field at its
    default, has no line to name."""
    path = write(tmp_path, "a.yaml", f"base: {REPO / 'configs/tiny.yaml'}\nmodel:\n  dim: abc\n"
                 "train:\n  lr: -0.1\n  steps: 5\n  warmup_steps: 20\n")
    text = problems_of(path)
    assert "a.yaml:3 model.dim: 'abc' is not a whole number" in text
    assert "a.yaml:5 train.lr: must be positive, got -0.1" in text
    assert "a.yaml:7 train.warmup_steps: 20 is not between 0 and train.steps=5" in text
    text = problems_of(path, ["train.lr=-1", "train.warmup_steps=30"])
    assert "\n  - train.lr: must be positive" in text
    assert "\n  - train.warmup_steps: 30 is not" in text


def test_overrides_are_typed_by_schema():
    cfg = load_config(
        None,
        [
            "parallel.tp=2",
            "parallel.sequence_parallel=false",
            "train.lr=1e-3",
            "model.name=123",
            "offload.device_budget=1.5GiB",
            "offload.params=cpu",
            "model.kv_heads=null",
            "model={dim: 512, heads: 8}",
        ],
    )
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is False
    assert cfg.train.lr == 1e-3 and cfg.model.name == "123"
    assert cfg.offload.device_budget == int(1.5 * 2**30) and cfg.model.kv_heads is None
    assert cfg.model.dim == 512


@pytest.mark.parametrize(
    "override,message",
    [
        ("parallel.tp=two", "parallel.tp: 'two' is not a whole number"),
        ("parallel.sequence_parallel=maybe", "'maybe' is not true or false"),
        ("train.lr=fast", "'fast' is not a number"),
        ("parallel.tp=2.5", "2.5 is not a whole number"),
        ("train.steps=true", "True is not a whole number"),
        ("offload.device_budget=lots", "'lots' is not a byte size or one of 'auto'"),
        ("offload.params=gpu", "'gpu' is not one of device, cpu, nvme"),
        ("offload.activations=none",  # said "or one of 'auto'"; fix "...; or pick one of auto"
         "'none' is not one of device, cpu, nvme, auto\n        fix: pick one of device, cpu, "
         "nvme, auto"),
        ("optimizer.name=adam", "'adam' is not one of adamw, adamw8bit"),
        ("model=4", "expected a section of key: value pairs"),
        ("tp=2", "the top level has no key 'tp'"),
        ("parallel.tp.x=2", "'parallel.tp' is a value, it has no key 'x'"),
        ("parallel.tp", "is not of the form key.path=value"),
        # letter case aside: TP got no suggestion
        ("parallel.TP=2", "parallel has no key 'TP'\n        fix: did you mean 'tp'?"),
        ("parallel.cp_kind=RING", "fix: did you mean 'ring'?"),
        ("parallel.grad_reduce=steps",
         "parallel.grad_reduce: 'steps' is not one of microbatch, step\n        fix: did you "
         "mean 'step'?"),
    ],
)
def test_bad_override_messages(override, message):
    assert message in problems_of(None, [override])


MOE = ["model.experts=4"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.dim=0"], "model.dim: must be at least 1, got 0"),
        (["train.micro_batch=0"], "train.micro_batch: must be at least 1, got 0"),
        (["model.dim=250"], "model.dim: 250 is not divisible by model.heads=8"),
        (["model.dim=24", "model.heads=8"], "model.heads: head_dim dim/heads = 3 is odd"),
        (["model.head_dim=7"], "model.head_dim: 7 is not an even width of at least 2"),
        (["model.head_dim=0"], "model.head_dim: 0 is not an even width of at least 2"),
        (["model.kv_heads=3"], "heads=8 is not a multiple of kv_heads=3"),
        (["model.rope_theta=0"], "model.rope_theta: must be positive"),
        (["model.experts=-1"], "model.experts: must be 0 (dense) or more"),
        ([*MOE, "model.top_k=9"], "model.top_k: 9 is not between 1 and experts=4"),
        ([*MOE, "model.moe_layer_interval=0"], "model.moe_layer_interval: 0 is not between 1"),
        ([*MOE, "model.capacity_factor=0"], "model.capacity_factor: must be positive"),
        ([*MOE, "model.shared_experts=-1"], "model.shared_experts: must be 0 or more"),
        ([*MOE, "model.expert_ffn_dim=0"], "model.expert_ffn_dim: must be positive"),
        ([*MOE, "model.aux_loss_coeff=-1"], "model.aux_loss_coeff: must be 0 (off) or more"),
        ([*MOE, "model.bias_update_rate=-0.1"], "model.bias_update_rate: must be 0 (off)"),
        ([*MOE, "model.score_func=relu"], "model.score_func"),
        (["train.seq_len=4096"], "train.seq_len: 4096 is longer than model.max_seq_len=512"),
        (
            ["train.global_batch=7"],
            "train.global_batch: 7 is not a multiple of train.micro_batch=2",
        ),
        (["train.lr=0"], "train.lr: must be positive"),
        (["train.seed=-1"], "train.seed: -1 is not in [0, 2**64 - 1]: numpy's generators "
                            "refuse a negative seed"),  # crashed every worker
        (["train.seed=18446744073709551616"], "train.seed: 18446744073709551616 is not in [0, "
                                              "2**64 - 1]"),  # so did torch.manual_seed
        (["train.lr_schedule=wsd", "train.cooldown_shape=null"],  # was "did you mean 'cosine'?"
         "--set train.cooldown_shape: None (YAML reads null, ~ and an empty value as nothing) is "
         "not one of linear, cosine, sqrt\n        fix: pick one of"),
        (["train.recompute=~"], "fix: did you mean 'none'? pick one of none, selective, full"),
        (["train.recompute=yes"], "True (YAML reads yes, no, on and off as booleans) is not one "
                                  "of none, selective, full"),  # it said True, not why
        (["train.lr=inf"], "--set train.lr: 'inf' is not a finite number"),
        (["optimizer.weight_decay=.nan"], "--set optimizer.weight_decay: nan is not a finite"),
        (["model.norm_eps=-1"], "model.norm_eps: must be positive, got -1.0"),
        (["parallel.pp=2", "parallel.pp_schedule=2bp-1f1b", "parallel.pp_max_deferred=-3"],
         "parallel.pp_max_deferred: must be 0 or more, got -3"),  # was under pp_schedule
        (["parallel.stage_layers=[2,2]"], "parallel.stage_layers: [2, 2] splits the layers "
                                          "between pipeline stages, but parallel.pp is 1"),
        (["train.compile=inductor", "parallel.tp=2"], "train.compile: inductor with "
                                                      "parallel.tp=2"),
        (["train.compile=aot_eager", "parallel.pp=2", "parallel.pp_schedule=zbv",
          "parallel.virtual_stages=2"], "train.compile: aot_eager with pp_schedule=zbv: a "
                                        "compiled block computes its weight gradients"),
        (["offload.io_block_size=1"], "offload.io_block_size: 1 bytes is not a positive "
                                      "multiple of 4,096"),
        (["offload.device_budget=1GB"], "offload.device_budget: 1000000000 is set, but nothing "
                                        "is offloaded"),  # was ignored
        (["offload.io_threads=4"], "offload.io_threads: 4 is set, but nothing rests on NVMe"),
        (["offload.params=cpu", "offload.grads=cpu", "offload.nvme_path=/tmp"],
         "offload.nvme_path: /tmp is set, but nothing rests on NVMe"),  # was ignored
        (["offload.prefetch_depth=5"], "offload.prefetch_depth: 5 is set, but nothing is "
                                       "offloaded"),  # was ignored
        (["offload.optimizer=cpu", "offload.cpu_adam=torch", "optimizer.name=adamw8bit"],
         "offload.cpu_adam: torch is set, but it picks the CPU step of AdamW"),  # was ignored
        (["train.compile=aot_eager", "parallel.pp=2", "train.recompute=full"],  # crashed later
         "train.compile: aot_eager with parallel.pp=2 and train.recompute=full"),
        (["train.min_lr_ratio=2"], "train.min_lr_ratio: 2.0 is not in [0, 1]"),
        (
            ["train.warmup_steps=600"],
            "train.warmup_steps: 600 is not between 0 and train.steps=500",
        ),
        (["train.warmup_steps=-1"], "fix: use 0 (no warmup) or the warmup's length in steps"),
        (["train.decay_steps=-1"], "train.decay_steps: -1 is neither 0 nor a step at or "
                                   "after train.warmup_steps=20"),
        (["train.decay_steps=5"], "train.decay_steps: 5 is neither 0 nor a step at or after "
                                  "train.warmup_steps=20"),
        (["train.cooldown_steps=5"], "train.cooldown_steps: 5 is set, but train.lr_schedule "
                                     "is cosine: it shapes a wsd schedule's cooldown"),
        (["train.cooldown_shape=sqrt", "train.lr_schedule=linear"], "train.cooldown_shape: "
         "sqrt is set, but train.lr_schedule is linear: it shapes a wsd schedule's cooldown"),
        (["train.lr_schedule=wsd", "train.cooldown_steps=-1"],
         "train.cooldown_steps: must be 0 or more, got -1"),
        # a constant schedule never decays: a floor or decay end set for it was ignored
        (["train.lr_schedule=constant", "train.min_lr_ratio=0.05"], "train.min_lr_ratio: 0.05 "
         "is set, but train.lr_schedule is constant: it shapes the decay after the warmup\n"
         "        fix: set a schedule that decays (train.lr_schedule=cosine, linear or wsd), or "
         "leave train.min_lr_ratio out"),
        (["train.lr_schedule=constant", "train.decay_steps=100"], "train.decay_steps: 100 is "
         "set, but train.lr_schedule is constant"),
        (["train.lr_schedule=wsd", "train.cooldown_steps=481"], "train.cooldown_steps: 481 is "
         "longer than the 480 steps from the warmup's end (train.warmup_steps=20) to the "
         "decay's (train.steps=500)"),
        (["train.lr_schedule=wsd", "train.decay_steps=100", "train.cooldown_steps=90"],
         "train.cooldown_steps: 90 is longer than the 80 steps from the warmup's end "
         "(train.warmup_steps=20) to the decay's (train.decay_steps=100)"),
        (["optimizer.muon_momentum=0.9"], "optimizer.muon_momentum: 0.9 is set, but "
                                           "optimizer.name is adamw: it tunes Muon"),
        (["optimizer.name=muon", "optimizer.muon_momentum=1"],
         "optimizer.muon_momentum: 1.0 is not in [0, 1)"),
        (["optimizer.name=muon", "optimizer.muon_ns_steps=0"],
         "optimizer.muon_ns_steps: 0 is not between 1 and 20"),
        (["optimizer.name=muon", "offload.params=cpu", "offload.optimizer=cpu"],
         "optimizer.name: muon with offload.params=cpu, offload.optimizer=cpu: the offload "
         "engine steps AdamW's CPU kernels unit by unit"),
        (["train.grad_clip=-1"], "train.grad_clip: must be 0 (off) or positive"),
        (["optimizer.beta1=1"], "optimizer.beta1: 1.0 is not in [0, 1)"),
        (["optimizer.eps=0"], "optimizer.eps: must be positive"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay: must be 0 or more"),
        (["parallel.tp=0"], "parallel.tp: must be at least 1, got 0"),
        (["parallel.dp_shard=0"], "parallel.dp_shard: must be at least 1, or -1"),
        (
            ["parallel.virtual_stages=2"],
            "parallel.virtual_stages: 2 needs pp_schedule: interleaved",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=interleaved"],
            "interleaved needs virtual_stages of 2 or more",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.virtual_stages=3"],
            "parallel.pp_schedule: zbv runs 2 stages per rank (a V), not virtual_stages=3",
        ),
        (["parallel.pp=2", "parallel.pp_max_deferred=1"],
         "parallel.pp_max_deferred: 1 applies to the 2bp schedules, not 1f1b"),
        (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_rebalance_threshold=1.2"],
         "re-partitioning needs a pipeline of one stage per rank (pp 2, 2 stages per rank "
         "under zbv)"),  # zbv's V without virtual_stages spelled out: the rebalancer's split
        # of 4 chunks over 2 measured ranks raised in the middle of the run
        (["parallel.ep=2"], "parallel.ep: 2 > 1 but the model has no experts"),
        (["offload.params=nvme"], "offload.params: is nvme but offload.nvme_path is empty"),
        (["offload.prefetch_depth=-1"], "offload.prefetch_depth: must be 0 or more"),
        (["offload.io_threads=0"], "offload.io_threads: must be at least 1"),
        (["offload.io_threads=0"], "fix: use e.g. 2 (the default)"),  # was "use e.g. 8 / 1"
        (["offload.io_queue_depth=0"], "fix: use e.g. 32 (the default)"),
        (["run.log_interval=0"], "run.log_interval: must be at least 1"),
        (["run.stop_at_step=501"], "run.stop_at_step: 501 is not between 0 and train.steps=500"),
        (["run.comm_timeout_s=0.5"], "run.comm_timeout_s: 0.5 is neither 0 (torch's timeouts) nor"),
        (["run.comm_timeout_s=1e6"], "run.comm_timeout_s: 1e+06 is neither 0"),
        (["checkpoint.keep_last=-1"], "checkpoint.keep_last: must be 0 or more"),
        (["train.document_mask=true"],
         "train.document_mask: needs the end-of-document id, but data.eos_id is -1 (none)"),
        (["data.eos_id=300"], "data.eos_id: 300 is neither -1 (none) nor an id of the "
         "vocabulary (0 to model.vocab_size - 1 = 255)"),
        (["data.eos_id=-7"], "data.eos_id: -7 is neither -1 (none) nor an id"),
        (["data.path=ids.bin", "model.vocab_size=128256"],  # read as twice as many ids
         "data.token_dtype: uint16 for a .bin file (data.path) of a model with "
         "model.vocab_size=128256"),
        (["eval.interval=10", "eval.path=held.bin", "model.vocab_size=128256"],  # held out too
         "data.token_dtype: uint16 for a .bin file (eval.path) of a model with"),
    ],
)
def test_each_config_rule(overrides, message):
    text = problems_of(REPO / "configs/tiny.yaml", overrides)
    assert message in text and "fix:" in text


def test_a_head_dim_frees_dim_from_a_multiple_of_the_heads():
    """dim 250 over 8 heads is refused (250 / 8 is no width) unless model.head_dim gives the
    heads' width, as Mistral NeMo's 128 at dim 5120 with 32 heads."""
    cfg = load_config(REPO / "configs/tiny.yaml", ["model.dim=250", "model.head_dim=40"])
    assert cfg.model.head_size == 40 and load_config(REPO / "configs/tiny.yaml").model.head_size \
        == 32


def test_a_wsd_cooldown_is_judged_against_a_valid_warmup_and_decay_end_only():
    """With train.decay_steps=-1 (or a warmup past train.steps) refused, the cooldown's bound
    was taken from it: '50 is longer than the 0 steps ...; fix: use at most 0', a second,
    wrong problem. With no step between a valid warmup and the decay's end, the fix said
    'use at most 0, or 0 for a fifth of them'."""
    for bad in ("train.decay_steps=-1", "train.warmup_steps=600"):
        text = problems_of(REPO / "configs/tiny.yaml", ["train.lr_schedule=wsd", bad,
                                                         "train.cooldown_steps=50"])
        assert "(1 problem)" in text and "cooldown" not in text, text
    text = problems_of(REPO / "configs/tiny.yaml", ["train.lr_schedule=wsd", "train.steps=20",
                                                     "train.cooldown_steps=1"])
    assert ("train.cooldown_steps: 1 is longer than the 0 steps from the warmup's end "
            "(train.warmup_steps=20) to the decay's (train.steps=20)\n        fix: use 0 (no "
            "step lies between them to cool down over), or end the decay later") in text


def test_the_largest_seed_is_the_largest_torch_takes():
    """train.seed's bound is torch's: 2**64 - 1 seeds its generators (numpy's take any size)."""
    import numpy as np
    import torch

    from orch.config.rules import SEED_MAX

    cfg = load_config(REPO / "configs/tiny.yaml", [f"train.seed={SEED_MAX}"])
    torch.Generator().manual_seed(cfg.train.seed)
    np.random.default_rng((cfg.train.seed, 0))  # the data order's
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed(SEED_MAX + 1)


def test_a_renormalized_top1_is_said_not_refused():
    """One expert per token with its weight renormalized (always 1) trains the router on the
    balancing loss alone: ``orch plan`` notes it and ``orch launch`` warns (it was accepted
    silently). Said, not refused: a run saved before ``norm_topk_prob`` existed resumes only
    with it true. Switch Transformer's raw probability says nothing."""
    from orch.config.rules import renormalized_top1
    from orch.plan import build_plan

    said = ("model.top_k: 1 with model.norm_topk_prob=true: the router learns only from the "
            "balancing loss, its weight being always 1")
    top1 = load_config(REPO / "configs/tiny-moe.yaml", ["model.top_k=1"])
    from orch.launch.launcher import start_notes

    assert renormalized_top1(top1.model).startswith(said)
    plan = build_plan(top1, world_size=1)
    assert any(note.startswith(said) for note in plan.notes)
    assert f"orch launch: warning: {said}" in "\n".join(start_notes(top1, plan, None))
    switch = load_config(REPO / "configs/tiny-moe.yaml",
                         ["model.top_k=1", "model.norm_topk_prob=false"])
    assert renormalized_top1(switch.model) is None
    assert renormalized_top1(load_config(REPO / "configs/tiny-moe.yaml").model) is None


def test_a_bound_on_deferred_steps_is_refused_beside_the_schedules_other_problem():
    """A zbv with virtual_stages=3 and pp_max_deferred=2 was refused for its V alone; the
    bound, refused by the plan where the schedule had a problem no more, came a round later."""
    text = problems_of(REPO / "configs/tiny.yaml", [
        "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.virtual_stages=3",
        "parallel.pp_max_deferred=2"])
    assert "zbv runs 2 stages per rank (a V), not virtual_stages=3" in text
    assert "parallel.pp_max_deferred: 2 applies to the 2bp schedules, not zbv" in text


def test_a_misspelled_schedule_is_not_named_as_the_default_by_another_rule():
    """pp_max_deferred with the schedule misspelled was also refused as 'not 1f1b': the
    default standing in for the refused value."""
    text = problems_of(REPO / "configs/tiny.yaml", [
        "parallel.pp=2", "parallel.pp_schedule=2bp-1ff1b", "parallel.pp_max_deferred=2"])
    assert "did you mean '2bp-1f1b'" in text and "not 1f1b" not in text


def test_a_value_that_must_be_positive_hides_no_other_problem():
    """The rules stopped after the positivity checks: model.dim=-1 hid parallel.tp=0, and
    train.steps=0 hid train.lr=-5; kv_heads=0 said 'heads=8 is not a multiple of kv_heads=0'."""
    text = problems_of(REPO / "configs/tiny.yaml", ["model.dim=-1", "parallel.tp=0",
                                                     "train.steps=0", "train.lr=-5",
                                                     "model.kv_heads=0"])
    for said in ("model.dim: must be at least 1, got -1", "parallel.tp: must be at least 1",
                 "train.steps: must be at least 1", "train.lr: must be positive",
                 "model.kv_heads: must be at least 1, got 0"):
        assert said in text, said
    assert "not a multiple of kv_heads" not in text


def test_a_value_refused_on_its_own_is_no_bound_of_another():
    """train.steps=-5 was said three times: on its own, and as the bound of warmup_steps and
    run.stop_at_step, values the user did not give ('20 is not between 0 and train.steps=-5').
    A rule comparing values the user gave, neither refused on its own, is still said."""
    text = problems_of(REPO / "configs/tiny.yaml", ["train.steps=-5"])
    assert "(1 problem)" in text and "train.steps: must be at least 1, got -5" in text
    text = problems_of(REPO / "configs/tiny.yaml", ["train.steps=-5", "train.decay_steps=5",
                                                     "parallel.pp=0",
                                                     "parallel.pp_rebalance_threshold=1.5"])
    assert "(3 problems)" in text and "train.decay_steps: 5 is neither 0 nor" in text
    assert "stop_at_step" not in text and "re-partitioning" not in text


def test_a_value_that_does_not_convert_hides_no_rule_and_says_nothing_of_its_default():
    """The cross-field rules were skipped once a value failed to convert (lr=-1 was said in a
    second round); run on the failed field's default, the warmup rule said warmup 200 exceeds
    train.steps=100, a value the user never gave (the file has 500)."""
    text = problems_of(REPO / "configs/tiny.yaml", ["train.steps=abc", "train.warmup_steps=200",
                                                     "train.lr=-1"])
    assert "(2 problems)" in text and "--set train.steps: 'abc' is not a whole number" in text
    assert "train.lr: must be positive, got -1" in text and "warmup" not in text


def test_a_rule_reading_a_failed_value_is_left_out_and_said_where_that_value_is_fine():
    """The warmup rule reads train.steps (``Problem.reads``): with steps failed, it would judge
    warmup 200 against the default 100; with steps at 150, warmup 200 is still said."""
    from orch.config import load_config_lenient

    failed = load_config_lenient(REPO / "configs/tiny.yaml",
                                 ["train.steps=abc", "train.warmup_steps=200"])
    assert [p.where for p in failed.problems] == ["--set train.steps"]
    assert {"train.steps", "train.warmup_steps"} <= failed.stand_ins
    fine = problems_of(REPO / "configs/tiny.yaml", ["train.steps=150", "train.warmup_steps=200"])
    assert "(1 problem)" in fine and "train.warmup_steps: 200 is not between 0 and " \
        "train.steps=150" in fine


def test_later_problems_are_left_out_by_the_fields_they_read_not_their_section():
    """A stand-in drops a later problem at it, or one that read it or its section; a problem
    said at the section holding it but reading other fields is kept."""
    from orch.config import load_config_lenient
    from orch.errors import Problem

    loaded = load_config_lenient(REPO / "configs/tiny.yaml", ["parallel.cp_kind=rinng"])
    assert loaded.stand_ins == {"parallel.cp_kind"}
    kept = Problem("parallel", "the world size", reads=("parallel.tp",))
    later = [kept, Problem("parallel.cp_kind", "at it"),
             Problem("run.dir", "a section read", reads=("parallel",))]
    with pytest.raises(ConfigError) as info:
        loaded.check(later)
    assert info.value.problems == [*loaded.problems, kept]


def test_later_problems_say_where_their_field_was_written(tmp_path):
    """A plan rule's or the launch's problem with a field a file set names its ``file:line``,
    as the config's own rules do; one given with --set or left at its default, or about a
    whole section, is named as before."""
    from orch.config import load_config_lenient
    from orch.errors import PlanError, Problem

    config = tmp_path / "tp3.yaml"
    config.write_text(f"base: {REPO}/configs/tiny.yaml\nparallel:\n  tp: 3\n")
    loaded = load_config_lenient(config, ["train.lr=0.001"])
    later = [Problem("parallel.tp", "heads"), Problem("train.lr", "lr"),
             Problem("parallel.cp", "cp"), Problem("--top", "top"), Problem("parallel", "all")]
    with pytest.raises(PlanError) as info:
        loaded.check(later)
    assert [p.where for p in info.value.problems] == [
        f"{config}:3 parallel.tp", "train.lr", "parallel.cp", "--top", "parallel"]


def test_the_lenient_load_gives_the_config_later_checks_run_on():
    """``orch plan`` and ``orch launch`` go on with the config: failed and refused fields at
    their defaults (named as stand-ins; dp_shard too when a degree it fills the world after is
    one), and the fields a rule compared one with where it still refuses the default, not the
    section (which hid every later problem reading the section's other fields)."""
    from orch.config import load_config_lenient

    loaded = load_config_lenient(REPO / "configs/tiny.yaml", ["parallel.tp=0", "train.lr=x"])
    assert loaded.config is not None and loaded.config.parallel.tp == 1
    assert loaded.config.train.lr == TrainConfig().lr and loaded.config.train.steps == 500
    assert loaded.stand_ins == {"parallel.tp", "parallel.dp_shard", "train.lr"}
    assert len(loaded.problems) == 2
    with pytest.raises(ConfigError):
        loaded.check()
    wider = load_config_lenient(REPO / "configs/tiny.yaml",
                                ["train.steps=2", "train.warmup_steps=5", "parallel.tp=2"])
    # default warmup 10 > 2 steps: steps stands in too, at its default 100
    assert wider.stand_ins == {"train.warmup_steps", "train.steps"}
    assert (wider.config.train.warmup_steps, wider.config.train.steps) == (10, 100)
    assert wider.config.train.lr == 1e-3 and wider.config.parallel.tp == 2  # the file's lr
    clean = load_config_lenient(REPO / "configs/tiny.yaml", ["model.hedas=4"])
    assert clean.config is not None and clean.stand_ins == frozenset()


def test_virtual_stages_of_zero_is_one_problem():
    text = problems_of(REPO / "configs/tiny.yaml", ["parallel.virtual_stages=0"])
    assert "(1 problem)" in text and "parallel.virtual_stages: must be at least 1, got 0" in text


def test_valid_variants_pass():
    load_config(REPO / "configs/tiny.yaml", ["model.heads=16", "train.lr=1e-3"])
    load_config(
        REPO / "configs/tiny.yaml",
        [
            *MOE,
            "parallel.ep=2",
            "parallel.pp=2",
            "parallel.pp_schedule=interleaved",
            "parallel.virtual_stages=2",
        ],
    )


def test_parse_bytes_units():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("512") == 512
    assert parse_bytes("12 parsecs") is None
    assert parse_bytes("1e9") == 10**9 and parse_bytes("1.5e3MB") == 15 * 10**8  # were refused
    assert parse_bytes("1PiB") == 2**50 and parse_bytes("e9") is None
    assert load_config(REPO / "configs/tiny.yaml", ["offload.pinned_budget=1.0e9",
                                                    "offload.params=cpu", "offload.grads=cpu"]
                       ).offload.pinned_budget == 10**9  # a YAML float


def test_parse_bytes_refuses_a_fraction_of_a_byte():
    """``"1.5"`` was cut to 1 byte silently, where a YAML number 1.5 was refused; a unit may
    still take a fraction that comes to whole bytes, read exactly."""
    assert parse_bytes("1.5") is None and parse_bytes("1.5B") is None
    assert parse_bytes("1e-10GB") is None and parse_bytes("1.0001kB") is None
    assert parse_bytes("1e-3GB") == 10**6
    assert parse_bytes("1.1GB") == 11 * 10**8 and parse_bytes("0.5KiB") == 512
    assert parse_bytes("2.0") == 2


def test_config_roundtrips_through_dict():
    cfg = load_config(REPO / "configs/mixtral-8x22b.yaml")
    from orch.config import config_from_dict

    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_a_list_replaced_by_set_is_placed_at_set(tmp_path):
    """List items carry their file's lines; a --set replacing the list kept them, so its bad
    item was placed at the file's line."""
    path = tmp_path / "run.yaml"
    path.write_text(f"base: {REPO / 'configs/tiny.yaml'}\nparallel:\n  pp: 2\n"
                    "  stage_layers:\n    - 2\n    - 2\n")
    text = problems_of(path, ["parallel.stage_layers=[x, 2]"])
    assert "--set parallel.stage_layers[0]: 'x' is not a whole number" in text


def test_the_schemas_defaults_break_no_rule():
    """What the lenient load falls back to when nothing else passes the rules (a section, up to
    the whole config, at its defaults): the fallback must itself pass."""
    from orch.config.rules import check_config

    assert check_config(Config()) == []


@pytest.mark.parametrize("value, schedule_field", [
    ("optimizer.muon_ns_steps=0", "optimizer.name is adamw"),
    ("train.cooldown_steps=-1", "train.lr_schedule is cosine"),
])
def test_a_field_its_feature_does_not_read_is_one_problem(value, schedule_field):
    """A Muon or wsd field set without Muon or wsd is said to be unread, once: its range was
    judged as well (two problems for one value, one of them moot)."""
    text = problems_of(REPO / "configs/tiny.yaml", [value])
    assert "(1 problem)" in text and schedule_field in text
