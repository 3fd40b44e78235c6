"""``model.init_from``: a HuggingFace Llama checkpoint directory (sharded safetensors, as
``save_pretrained`` writes it) loads into orch's Transformer with the same logits, the config is
checked field by field before anything loads, and ``orch launch`` starts training from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from launch_harness import FAST, REPO, launch, metrics, overrides

from orch.config import ModelConfig, load_config
from orch.errors import ProblemsError
from orch.models.hf import hf_config
from orch.models.hf_load import ARCHITECTURES, init_from_problems, load_hf_weights
from orch.models.llama import Transformer

transformers = pytest.importorskip("transformers")


def tiny(**changes: object) -> ModelConfig:
    return dataclasses.replace(load_config("configs/tiny.yaml").model, **changes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialized LlamaForCausalLM of the tiny shape, saved in 1 MB shards."""
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(3)
    hf_cfg = transformers.LlamaConfig(**hf_config(tiny()), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="1MB")
    return path, model


def test_sharded_checkpoint_loads_with_the_same_logits(checkpoint):
    path, hf = checkpoint
    assert len(list(path.glob("*.safetensors"))) > 2  # really sharded, with an index
    assert (path / "model.safetensors.index.json").is_file()
    cfg = tiny(init_from=str(path))
    ours = Transformer(cfg).eval()
    read = load_hf_weights(ours, cfg)
    assert read == len(list(ours.parameters()))
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max()
    assert diff < 1e-5, diff


def test_mismatched_config_is_refused_field_by_field(checkpoint):
    path, _ = checkpoint
    problems = init_from_problems(tiny(init_from=str(path), dim=128, layers=2, rope_theta=1e6))
    text = "\n".join(str(p) for p in problems)
    assert "model.dim: 128 but" in text and "hidden_size: 256" in text and "set model.dim=256" \
        in text
    assert "model.layers: 2 but" in text and "set model.layers=4" in text
    assert "model.rope_theta" in text
    with pytest.raises(ProblemsError, match="model.dim"):
        load_hf_weights(Transformer(tiny(dim=128, layers=2)), tiny(init_from=str(path),
                                                                    dim=128, layers=2))


def test_missing_or_foreign_directories_are_refused(tmp_path, checkpoint):
    assert "is not a directory" in str(init_from_problems(tiny(init_from=str(tmp_path / "no")))[0])
    assert "has no config.json" in str(init_from_problems(tiny(init_from=str(tmp_path)))[0])
    assert "save_pretrained" in init_from_problems(tiny(init_from=str(tmp_path)))[0].fix
    # orch's own checkpoints were told only "a directory written by save_pretrained"
    step = tmp_path / "run" / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    # a run's checkpoints/ folder got the save_pretrained advice alone
    for given in (step, tmp_path / "run", tmp_path / "run" / "checkpoints"):
        (problem,) = init_from_problems(tiny(init_from=str(given)))
        assert problem.message == f"{str(given)!r} has no config.json", problem
        assert problem.fix == "it is an orch checkpoint or run directory, which init_from " \
            f"does not read: continue it with --resume {step} (weights, optimizer and step), " \
            f"or start from its weights alone with orch ckpt export {given} --to hf OUT and " \
            "model.init_from=OUT", problem
    # none complete: the fix offered --resume and orch ckpt export, which refuse them too
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    unfinished = tmp_path / "new" / "checkpoints" / "step-00000002"
    unfinished.mkdir(parents=True)
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    for given in (tmp_path / "dcp", tmp_path / "new", unfinished.parent,
                  tmp_path / "fresh" / "checkpoints"):
        (problem,) = init_from_problems(tiny(init_from=str(given)))
        assert problem.fix == "it is an orch checkpoint or run directory, which init_from " \
            "does not read, and holds no complete checkpoint (none has its manifest.json: no " \
            "save finished), so --resume and orch ckpt export refuse it too: point init_from " \
            "at a directory written by save_pretrained, or export a complete checkpoint of a " \
            "run", (given, problem)
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    other = tmp_path / "biased"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    assert "has no *.safetensors" in str(init_from_problems(tiny(init_from=str(other)))[0])
    for shard in path.glob("*.safetensors"):
        (other / shard.name).write_bytes(shard.read_bytes())
    assert "attention_bias: true" in str(init_from_problems(tiny(init_from=str(other)))[0])


def test_missing_and_misshapen_tensors_are_refused_before_launch(checkpoint, tmp_path):
    """The launcher's check reads the shards' headers: a tensor gone and a tensor of the wrong
    shape are both named, with nothing loaded."""
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in path.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    gone, cut = "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    for shard in broken.glob("*.safetensors"):
        tensors = load_file(shard)
        if gone in tensors or cut in tensors:
            tensors.pop(gone, None)
            if cut in tensors:
                tensors[cut] = tensors[cut][:-1].contiguous()
            save_file(tensors, shard, metadata={"format": "pt"})
    problems = init_from_problems(tiny(init_from=str(broken)))
    text = "\n".join(str(p) for p in problems)
    assert len(problems) == 2, text
    assert f"{gone}: has no tensor in" in text
    assert f"{cut}: has shape (255, 256), orch's layers.2.attention.wq.weight (256, 256)" in text
    # config.json equals model.* here (checked first), so "check model.*" was no fix
    assert "as the checkpoint's own config.json (equal to model.*) gives it: the tensors do not " \
        "match their config.json\n    fix: re-save the checkpoint, or copy it again" in text, text


def test_missing_tensors_are_named_by_their_hf_keys(checkpoint, tmp_path):
    """A missing lm_head.weight was "output.weight: has no tensor", model.norm.weight
    "norm.weight: ...": orch's names, not in the shards, beside problems that used HF keys. An
    untied model's missing head is said to be what a tied checkpoint looks like."""
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint
    headless = _copy(path, tmp_path / "headless")
    for shard in headless.glob("*.safetensors"):
        tensors = load_file(shard)
        kept = {k: v for k, v in tensors.items() if k not in ("lm_head.weight",
                                                               "model.norm.weight")}
        if len(kept) < len(tensors):
            save_file(kept, shard, metadata={"format": "pt"})
    problems = init_from_problems(tiny(init_from=str(headless)))
    assert [p.where for p in problems] == ["model.norm.weight", "lm_head.weight"], problems
    assert f"has no tensor in {headless}, as in a checkpoint with tied embeddings, but its " \
        "config.json's tie_word_embeddings is false" in problems[1].message
    assert "set tie_word_embeddings: true in its config.json and model.tie_embeddings=true" \
        in problems[1].fix
    assert problems[0].fix == "use a complete checkpoint"


def _launch_problems(tmp_path: Path, *sets: str) -> list[str]:
    """Where each problem ``orch launch`` finds before starting anything lies."""
    from orch.launch.launcher import prepare

    argv = ["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path / 'run'}",
            *[arg for item in sets for arg in ("--set", item)]]
    with pytest.raises(ProblemsError) as refused:
        prepare(argv)
    return [problem.where for problem in refused.value.problems]


def test_checkpoint_problems_are_said_beside_a_failed_field_the_shapes_do_not_read(
        checkpoint, tmp_path):
    """The tensors' problems read "the whole model section": a failed max_seq_len (no
    parameter's shape) dropped the 39 problems of a checkpoint missing most tensors; and the
    kv_heads comparison, which reads heads through kv_heads null, judged a failed heads'
    default (8) against the checkpoint's 16."""
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint
    sparse = _copy(path, tmp_path / "sparse")
    for shard in sparse.glob("*.safetensors"):
        kept = {k: v for k, v in load_file(shard).items() if k == "model.embed_tokens.weight"}
        save_file(kept, shard, metadata={"format": "pt"})
    wheres = _launch_problems(tmp_path, f"model.init_from={sparse}", "model.max_seq_len=0")
    assert wheres[0] == "model.max_seq_len" and len(wheres) > 10, wheres

    def sixteen_heads(config: dict) -> None:
        config.update(num_attention_heads=16, head_dim=16)
        config.pop("num_key_value_heads")

    heads = _with_config(path, tmp_path / "heads", sixteen_heads)
    wheres = _launch_problems(tmp_path, f"model.init_from={heads}", "model.kv_heads=null",
                              "model.heads=abc")
    assert wheres == ["--set model.heads"], wheres


def _copy(source: Path, to: Path) -> Path:
    to.mkdir()
    for file in source.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def test_damaged_or_foreign_files_are_refused_not_raised(checkpoint, tmp_path):
    """Each crashed the launcher with a traceback (FileNotFoundError, SafetensorError,
    JSONDecodeError, KeyError, TypeError, AttributeError), or loaded the wrong function or
    integer weights silently."""
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint
    shards = sorted(path.glob("*.safetensors"))
    config = json.loads((path / "config.json").read_text())

    def problem(name: str, change) -> str:
        broken = _copy(path, tmp_path / name)
        change(broken)
        return "\n".join(str(p) for p in init_from_problems(tiny(init_from=str(broken))))

    index = "model.safetensors.index.json"
    cases = {
        "shard gone": (lambda d: (d / shards[1].name).unlink(), f"names {shards[1].name}, which "
                       "is not in"),
        "shard cut": (lambda d: (d / shards[0].name).write_bytes(shards[0].read_bytes()[:50]),
                      f"{shards[0].name} cannot be read as safetensors"),
        "index not json": (lambda d: (d / index).write_text("{"), "weight_map is missing or "
                           "damaged"),
        "index without map": (lambda d: (d / index).write_text("{}"), "weight_map is missing"),
        "architectures null": (lambda d: (d / "config.json").write_text(json.dumps(
            config | {"architectures": None, "model_type": "gemma"})), "has model_type: "
            "'gemma', not 'llama' or 'mistral'"),
        "config a list": (lambda d: (d / "config.json").write_text("[]"), "holds a JSON list, "
                          "not a model config"),
        "gelu": (lambda d: (d / "config.json").write_text(json.dumps(
            {k: v for k, v in config.items() if k != "architectures"} | {"hidden_act": "gelu"})),
            "has hidden_act: 'gelu', not 'silu'"),
    }
    for name, (change, said) in cases.items():
        assert said in problem(name.replace(" ", "-"), change), name

    def to_int8(d: Path) -> None:
        for shard in d.glob("*.safetensors"):
            tensors = {k: t.to(torch.int8) for k, t in load_file(shard).items()}
            save_file(tensors, shard, metadata={"format": "pt"})

    assert "is I8, not a floating-point tensor" in problem("int8", to_int8)


def _with_config(source: Path, to: Path, change) -> Path:
    """A copy of the checkpoint at ``source`` whose config.json ``change`` edited in place."""
    _copy(source, to)
    config = json.loads((to / "config.json").read_text())
    change(config)
    (to / "config.json").write_text(json.dumps(config))
    return to


def _text(model: ModelConfig) -> str:
    return "\n".join(str(p) for p in init_from_problems(model))


def test_absent_config_keys_are_transformers_defaults(checkpoint, tmp_path):
    """config.json without tie_word_embeddings, rms_norm_eps or any RoPE theta: transformers
    reads False, 1e-6 and 10000, so orch compares with those (it skipped absent keys and
    loaded with its own values, logits 1.3 off); with the named fixes the logits are
    transformers' own."""
    path, _ = checkpoint

    def strip(config: dict) -> None:
        for key in ("tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters"):
            config.pop(key, None)

    bare = _with_config(path, tmp_path / "bare", strip)
    text = _text(tiny(init_from=str(bare), tie_embeddings=True, rope_theta=500000.0))
    for fix in ("set model.tie_embeddings=false", "set model.norm_eps=1e-06",
                "set model.rope_theta=10000.0"):
        assert fix in text, text
    assert "has no rms_norm_eps, which transformers reads as 1e-06" in text
    # booleans as config.json and the YAML write them, as model.qk_norm's are
    assert "model.tie_embeddings: true but " in text and "reads as false" in text
    nulled = _with_config(path, tmp_path / "null", lambda c: c.update(num_key_value_heads=None))
    assert "model.kv_heads" not in _text(tiny(init_from=str(nulled), kv_heads=None))  # heads
    cfg = tiny(init_from=str(bare), norm_eps=1e-6)
    assert init_from_problems(cfg) == []
    ours = Transformer(cfg).eval()
    load_hf_weights(ours, cfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(bare, attn_implementation="eager").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() < 1e-5


def test_config_values_of_the_wrong_json_type_are_named(checkpoint, tmp_path):
    """config.json with "hidden_size": "256" (a string) was answered "model.dim: 256 but ...
    has hidden_size: '256'; fix: set model.dim=256", the value it already had."""
    path, _ = checkpoint
    quoted = _with_config(path, tmp_path / "quoted", lambda c: c.update(
        hidden_size="256", head_dim="32", tie_word_embeddings="false", rms_norm_eps="1e-05"))
    problems = init_from_problems(tiny(init_from=str(quoted)))
    text = "\n".join(str(p) for p in problems)
    assert len(problems) == 4 and "model.dim" not in text and "set model." not in text, text
    config = quoted / "config.json"
    assert f"model.init_from: {config} has hidden_size: '256', not a whole number" in text
    assert "fix: write hidden_size in config.json as a JSON integer (256, not \"256\")" in text
    assert "has head_dim: '32', not a whole number" in text
    assert "has tie_word_embeddings: 'false', not true or false" in text
    assert "has rms_norm_eps: '1e-05', not a number" in text


def test_rope_theta_and_type_are_read_as_transformers_reads_them(checkpoint, tmp_path):
    """transformers 5 takes theta from rope_parameters (or rope_scaling) before the top-level
    key: two that disagree are refused; a legacy ``type`` scales RoPE like ``rope_type``, and
    an explicit default type is no scaling."""
    path, _ = checkpoint
    cfg = tiny(rope_theta=500000.0)

    def change(name: str, **keys: object) -> str:
        edited = _with_config(path, tmp_path / name, lambda config: config.update(keys))
        return _text(dataclasses.replace(cfg, init_from=str(edited)))

    both = change("both", rope_theta=500000.0, rope_parameters={"rope_theta": 10000.0})
    assert "rope_theta: 500000.0 and rope_parameters.rope_theta: 10000.0" in both
    assert "set model.rope_theta" not in both  # no fix that would follow one reading
    inner = change("inner", rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    assert "has rope_parameters.rope_theta: 10000.0" in inner and "set model.rope_theta=10000.0" \
        in inner
    assert "scales RoPE" in change("legacy", rope_parameters={"type": "linear", "factor": 2.0,
                                                              "rope_theta": 500000.0})
    assert change("default", rope_scaling={"rope_type": "default", "rope_theta": 500000.0}) == ""


def test_a_tied_head_that_differs_from_the_embedding_is_refused(checkpoint, tmp_path,
                                                                monkeypatch):
    """transformers does not tie a checkpoint's lm_head.weight that differs from its embedding:
    loading the embedding as a tied orch model's head was another function, silently."""
    path, _ = checkpoint
    tied = _with_config(path, tmp_path / "tied", lambda c: c.update(tie_word_embeddings=True))
    cfg = tiny(init_from=str(tied), tie_embeddings=True)
    text = _text(cfg)
    assert "model.tie_embeddings: true, but" in text and "lm_head.weight that differs" in text
    assert "set model.tie_embeddings=false" in text
    index = json.loads((tied / "model.safetensors.index.json").read_text())
    head_shard = tied / index["weight_map"].pop("lm_head.weight")
    (tied / "model.safetensors.index.json").write_text(json.dumps(index))
    from safetensors.torch import load_file, save_file
    tensors = load_file(head_shard)
    embedding = next(load_file(s)["model.embed_tokens.weight"] for s in tied.glob("*.safetensors")
                     if "model.embed_tokens.weight" in load_file(s))
    tensors["lm_head.weight"] = embedding.clone()  # saved, but the same: loads as before
    save_file(tensors, head_shard, metadata={"format": "pt"})
    assert _text(cfg) == ""
    # compared a few rows at a time (a vocabulary matrix is never read whole, twice): a
    # difference in the last rows is still found
    monkeypatch.setattr("orch.models.hf_load.EQUAL_ROWS", 3)
    tensors["lm_head.weight"][-1, 0] += 1
    save_file(tensors, head_shard, metadata={"format": "pt"})
    assert "lm_head.weight that differs" in _text(cfg)


def test_what_no_model_setting_fixes_is_said_once_for_what_it_is(checkpoint, tmp_path):
    """An MoE config was told "config.json: not a Llama model ... use a LlamaForCausalLM
    checkpoint" of a Llama checkpoint; a head_dim other than the model's gave one shape problem
    per projection, each "check model.*": one problem now, with the setting that fixes it."""
    path, _ = checkpoint
    moe = init_from_problems(tiny(init_from=str(path), experts=4, moe_layer_interval=2))
    assert [p.where for p in moe] == ["model.experts"] and moe[0].fix == "set model.experts=0"
    assert f"4 but {path / 'config.json'} describes a llama model, whose feed-forward layers " \
        "are all dense" == moe[0].message
    wide = _with_config(path, tmp_path / "wide", lambda c: c.update(head_dim=64))
    problems = init_from_problems(tiny(init_from=str(wide)))
    assert len(problems) == 1, problems
    assert f"model.head_dim: None (heads 32 wide) but {wide / 'config.json'} has head_dim: 64" \
        in str(problems[0]) and problems[0].fix == "set model.head_dim=64"
    # a model.head_dim the checkpoint's hidden_size / heads does not give, and one that dim and
    # heads give anyway (said once, as model.dim's problem)
    assert "has head_dim: 32" in _text(tiny(init_from=str(path), head_dim=48))
    bare = _with_config(path, tmp_path / "bare", lambda c: c.pop("head_dim"))
    text = _text(tiny(init_from=str(bare), head_dim=48))
    assert "has no head_dim, which transformers reads as hidden_size / num_attention_heads = 32" \
        in text and "set model.head_dim=32" in text
    assert "model.head_dim" not in _text(tiny(init_from=str(path), dim=512))


def _saved(tmp_path: Path, family: str, cfg: ModelConfig, spread: str = "", **extra: object):
    """A random ``family`` (llama, mistral, qwen2, qwen3, mixtral or qwen3_moe) checkpoint of
    ``cfg``'s shape, saved, and the transformers model that saved it; ``spread``: a name suffix
    of parameters drawn N(0, 0.5) (biases away from transformers' zero init, routers far from
    uniform), so that a lost or misplaced one shows."""
    classes = {family: name for name, family in ARCHITECTURES.items()}
    causal_lm = getattr(transformers, classes[family])
    torch.manual_seed(5)
    hf_cfg = causal_lm.config_class(**{**hf_config(cfg), "architectures": [classes[family]],
                                       **extra}, attn_implementation="eager")
    model = causal_lm(hf_cfg).float().eval()
    with torch.no_grad():  # norms away from 1 (QK-norm's too), so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape))
            elif spread and name.endswith(spread):
                p.normal_(0.0, 0.5)
    path = tmp_path / family
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _loads_as(loading: ModelConfig, hf: torch.nn.Module) -> int:
    """Load ``loading.init_from`` into orch's Transformer (nothing refused first) and check its
    logits against the transformers model ``hf``; the tensors read."""
    assert init_from_problems(loading) == []
    ours = Transformer(loading).eval()
    read = load_hf_weights(ours, loading)
    tokens = torch.randint(0, loading.vocab_size, (2, 48),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf.float().eval()(tokens).logits).abs().max()
    assert diff < 1e-5, diff
    return read


def test_a_qwen2_checkpoint_loads_with_its_qkv_biases(tmp_path):
    """Qwen2ForCausalLM (Qwen2.5's class): Llama's decoder with biases on q, k and v, loaded
    into model.qkv_bias; either side without them is named with its fix."""
    cfg = tiny(qkv_bias=True, kv_heads=2)
    path, hf = _saved(tmp_path, "qwen2", cfg, spread=".bias")
    loading = dataclasses.replace(cfg, init_from=str(path))
    _loads_as(loading, hf)
    unbiased = _text(dataclasses.replace(loading, qkv_bias=False))
    assert f"model.qkv_bias: false but {path / 'config.json'} describes a qwen2 model, whose " \
        "attention has query, key and value biases" in unbiased
    assert "set model.qkv_bias=true" in unbiased
    llama, _ = _saved(tmp_path, "llama", tiny(kv_heads=2))
    biased = _text(tiny(init_from=str(llama), qkv_bias=True, kv_heads=2))
    assert "describes a llama model, whose attention has no query, key and value biases" \
        in biased and "set model.qkv_bias=false" in biased


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_heads_wider_than_dim_over_heads_load_with_the_same_logits(tmp_path, family):
    """``model.head_dim``: heads 48 wide at dim 256 with 8 heads (384-wide query projections),
    as Mistral NeMo's 128 at 5120 with 32 and Qwen3's 128 at 2560 with 32; saved by
    LlamaForCausalLM, MistralForCausalLM (Llama's decoder, loaded where its sliding window is
    off) and Qwen3ForCausalLM (Llama's with QK-norm: ``model.qk_norm``)."""
    cfg = tiny(head_dim=48, qk_norm=family == "qwen3")
    path, hf = _saved(tmp_path, family, cfg, sliding_window=None)
    loading = dataclasses.replace(cfg, init_from=str(path))
    _loads_as(loading, hf)
    other = _text(dataclasses.replace(loading, qk_norm=family != "qwen3"))
    want = str(family == "qwen3").lower()
    assert f"model.qk_norm: {str(family != 'qwen3').lower()} but {path / 'config.json'} " \
        f"describes a {family} model" in other and f"set model.qk_norm={want}" in other


MOE = {"mixtral": {"experts": 4},
       "qwen3_moe": {"experts": 4, "top_k": 3, "qk_norm": True, "moe_layer_interval": 2,
                     "expert_ffn_dim": 96, "norm_topk_prob": False}}
"""MoE models of the tiny shape: Mixtral's (every layer, top-2 renormalized) and Qwen3-MoE's
(every other layer, narrower experts, top-3 weights as they are)."""


@pytest.mark.parametrize("family", MOE)
def test_moe_checkpoints_saved_by_transformers_load_with_the_same_logits(tmp_path, family):
    """transformers holds each MoE layer's experts fused and saves them one tensor per expert
    and projection (Mixtral's w1/w2/w3, Qwen3-MoE's gate/up/down_proj): orch stacks them,
    transposed, into its grouped experts."""
    from safetensors import safe_open

    cfg = tiny(**MOE[family])  # routers far from uniform: a misplaced expert changes the routing
    path, hf = _saved(tmp_path, family, cfg, spread="mlp.gate.weight")
    with safe_open(str(path / "model.safetensors"), framework="pt") as saved:
        keys = len(list(saved.keys()))
    assert _loads_as(dataclasses.replace(cfg, init_from=str(path)), hf) == keys  # one per expert


def test_moe_fields_that_differ_from_the_checkpoint_are_named_at_once(tmp_path):
    """Each routing field set otherwise than the checkpoint computes is named with its fix, and
    what the family has no weights or function for (shared experts, sigmoid scores) too;
    Mixtral's implied layout (MoE in every layer, renormalized top-k) included."""
    mixtral, _ = _saved(tmp_path, "mixtral", tiny(**MOE["mixtral"]))
    problems = init_from_problems(tiny(
        init_from=str(mixtral), experts=8, top_k=1, expert_ffn_dim=100, moe_layer_interval=2,
        norm_topk_prob=False, shared_experts=1, score_func="sigmoid"))
    text = "\n".join(map(str, problems))
    config = mixtral / "config.json"
    for said, fix in [
            ("model.experts: 8 but {} has num_local_experts: 4", "set model.experts=4"),
            ("model.top_k: 1 but {} has num_experts_per_tok: 2", "set model.top_k=2"),
            ("model.expert_ffn_dim: 100 but {} has intermediate_size: 688",
             "set model.expert_ffn_dim=688"),
            ("model.moe_layer_interval: 2 but {} describes a mixtral model, MoE in every layer",
             "set model.moe_layer_interval=1"),
            ("model.norm_topk_prob: false but {} describes a mixtral model, whose router "
             "renormalizes", "set model.norm_topk_prob=true"),
            ("model.shared_experts: 1 but {} describes a mixtral model, which has no shared "
             "experts", "set model.shared_experts=0"),
            ("model.score_func: 'sigmoid' but {} describes a mixtral model, whose router takes "
             "softmax scores", "set model.score_func=softmax")]:
        assert said.format(config) in text and fix in text, (said, text)
    assert len(problems) == 7, text
    dense = _text(tiny(init_from=str(mixtral)))  # a dense config, an MoE checkpoint
    assert f"model.experts: 0 but {config} has num_local_experts: 4" in dense


def test_qwen3_moe_config_keys_as_transformers_reads_them(tmp_path):
    """Qwen3-MoE's hub configs say num_experts, transformers 5 saves num_local_experts: both
    read; absent keys are Qwen3MoeConfig's defaults; dense layers listed in mlp_only_layers
    (not every decoder_sparse_step-th) have no orch layout."""
    cfg = tiny(**MOE["qwen3_moe"])
    path, _ = _saved(tmp_path, "qwen3_moe", cfg)
    assert "num_local_experts" in json.loads((path / "config.json").read_text())
    hub = _with_config(path, tmp_path / "hub", lambda c: c.update(
        num_experts=c.pop("num_local_experts")))
    assert init_from_problems(dataclasses.replace(cfg, init_from=str(hub))) == []
    text = _text(dataclasses.replace(cfg, init_from=str(path), experts=8))
    assert "model.experts: 8 but" in text and "has num_local_experts: 4" in text, text

    def bare(config: dict) -> None:
        for key in ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "norm_topk_prob", "decoder_sparse_step"):
            config.pop(key)

    text = _text(dataclasses.replace(cfg, init_from=str(_with_config(path, tmp_path / "bare",
                                                                        bare))))
    for fix in ("set model.experts=128", "set model.top_k=8", "set model.expert_ffn_dim=768",
                "set model.moe_layer_interval=1"):
        assert fix in text, (fix, text)
    assert "has no decoder_sparse_step, which transformers reads as 1" in text
    assert "norm_topk_prob" not in text  # absent is false, as the model's
    listed = _with_config(path, tmp_path / "listed", lambda c: c.update(mlp_only_layers=[1]))
    text = _text(dataclasses.replace(cfg, init_from=str(listed)))
    assert "has mlp_only_layers: [1]" in text and "model.moe_layer_interval" in text, text


def test_mlp_only_layers_that_are_dense_anyway_load(tmp_path):
    """mlp_only_layers listing only layers that decoder_sparse_step makes dense anyway (or
    beyond the model) is the layout orch computes: it was refused for being non-empty."""
    cfg = tiny(**MOE["qwen3_moe"])  # MoE in layers 1 and 3
    path, _ = _saved(tmp_path, "qwen3_moe", cfg, mlp_only_layers=[0, 2, 7])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert type(hf.model.layers[1].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    _loads_as(dataclasses.replace(cfg, init_from=str(path)), hf)


def test_a_missing_expert_is_named_by_its_hf_key(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny(**MOE["qwen3_moe"])
    path, _ = _saved(tmp_path, "qwen3_moe", cfg)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    problems = init_from_problems(dataclasses.replace(cfg, init_from=str(path)))
    assert [str(p) for p in problems] == [
        f"model.layers.1.mlp.experts.2.up_proj.weight: has no tensor in {path}\n"
        "    fix: use a complete checkpoint"], problems


def test_qwen3_moe_experts_width_beside_dense_layers_is_expert_ffn_dims(tmp_path):
    """A Qwen3-MoE checkpoint with dense layers has two widths: intermediate_size (the dense
    layers', model.ffn_dim) and moe_intermediate_size (the experts'). With model.expert_ffn_dim
    null the experts' width was said to be ffn_dim's to fix ("set model.ffn_dim=96"), and once
    set, the dense width asked it back ("set model.ffn_dim=688"): no config passed."""
    cfg = tiny(**MOE["qwen3_moe"])
    path, _ = _saved(tmp_path, "qwen3_moe", cfg)
    problems = init_from_problems(dataclasses.replace(cfg, init_from=str(path),
                                                      expert_ffn_dim=None))
    assert [(p.where, p.fix) for p in problems] == [
        ("model.expert_ffn_dim", "set model.expert_ffn_dim=96")], problems
    assert problems[0].message.startswith("null (so 688) but "), problems[0].message


def test_both_names_of_the_expert_count_are_read_as_transformers_reads_them(tmp_path):
    """transformers 5 maps num_experts to num_local_experts in Mixtral's and Qwen3-MoE's
    configs: a Mixtral config.json saying num_experts alone was read as the default 8 experts,
    one giving the two names different counts loaded whichever orch read, and a mistyped
    alias was named by the other key, not in the file."""
    cfg = tiny(**MOE["mixtral"])
    path, hf = _saved(tmp_path, "mixtral", cfg)
    alias = _with_config(path, tmp_path / "alias", lambda c: c.update(
        num_experts=c.pop("num_local_experts")))
    assert transformers.AutoConfig.from_pretrained(alias).num_local_experts == 4
    _loads_as(dataclasses.replace(cfg, init_from=str(alias)), hf)
    both = _with_config(path, tmp_path / "both", lambda c: c.update(num_experts=6))
    problems = init_from_problems(dataclasses.replace(cfg, init_from=str(both)))
    assert [str(p) for p in problems] == [
        f"model.init_from: {both / 'config.json'} has num_local_experts: 4 and num_experts: 6: "
        "transformers 5 reads num_experts, transformers 4 num_local_experts\n    fix: make "
        "config.json say the checkpoint's number of experts (its routers' rows) under one of "
        "the two keys"], problems
    qwen = tiny(**MOE["qwen3_moe"])
    path, _ = _saved(tmp_path, "qwen3_moe", qwen)  # transformers 5 saves num_local_experts
    both = _with_config(path, tmp_path / "qwen-both", lambda c: c.update(num_experts=6))
    text = _text(dataclasses.replace(qwen, init_from=str(both)))
    assert "has num_experts: 6 and num_local_experts: 4: transformers 5 reads " \
        "num_local_experts" in text and "model.experts" not in text, text
    typed = _with_config(path, tmp_path / "typed", lambda c: c.update(num_local_experts="4"))
    text = _text(dataclasses.replace(qwen, init_from=str(typed)))
    assert "has num_local_experts: '4', not a whole number" in text, text
    assert "write num_local_experts in config.json as a JSON integer" in text, text


def test_tensors_their_config_json_has_no_place_for_are_said_so(tmp_path):
    """An expert beyond config.json's count, experts in a layer it makes dense, a dense MLP in
    one it makes MoE and a layer beyond its count were each "no counterpart in orch's
    Transformer, use a bias-free ... Qwen3MoeForCausalLM checkpoint": the checkpoint's own
    family's tensors, told to use that family."""
    from safetensors.torch import load_file, save_file

    cfg = tiny(**MOE["qwen3_moe"])  # MoE in layers 1 and 3
    path, _ = _saved(tmp_path, "qwen3_moe", cfg)
    tensors = load_file(path / "model.safetensors")
    extra = {"model.layers.1.mlp.experts.4.up_proj.weight": "is of expert 4, but config.json "
             "has 4 experts a layer (as model.experts), 0 to 3",
             "model.layers.0.mlp.gate.weight": "is an MoE layer's, but config.json makes layer "
             "0 dense (as model.moe_layer_interval: MoE every 2 layers)",
             "model.layers.3.mlp.down_proj.weight": "is a dense feed-forward's, but config.json "
             "makes layer 3 MoE (as model.moe_layer_interval: MoE every 2 layers)",
             "model.layers.4.input_layernorm.weight": "is of layer 4, but config.json has 4 "
             "layers (as model.layers)"}
    save_file({**tensors, **{key: torch.zeros(1) for key in extra}},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    problems = init_from_problems(dataclasses.replace(cfg, init_from=str(path)))
    assert sorted(str(p) for p in problems) == sorted(
        f"{key}: in model.safetensors {why}: the tensors do not match the checkpoint's own "
        "config.json\n    fix: re-save the checkpoint, or copy it again"
        for key, why in extra.items()), problems


def test_a_checkpoint_attending_through_a_window_is_refused(tmp_path):
    """Mistral 7B v0.1's attention sees 4,096 tokens back (transformers' default where
    config.json says nothing), as Qwen3's does with use_sliding_window; orch's the whole
    sequence: another function past that length. A window of at least model.max_seq_len (which
    bounds train.seq_len) cuts no sequence orch trains on: loaded, with transformers' logits."""
    cfg = tiny()  # model.max_seq_len 512
    path, _ = _saved(tmp_path, "mistral", cfg, sliding_window=256)
    text = _text(dataclasses.replace(cfg, init_from=str(path)))
    assert f"{path / 'config.json'} has sliding_window: 256: its attention sees only that " \
        "many tokens back, orch's the whole sequence (model.max_seq_len=512)" in text
    assert "Mistral 7B v0.3's and NeMo's sliding_window is null" in text
    assert "or set model.max_seq_len (and so train.seq_len) to at most its window, 256" in text
    long = dataclasses.replace(cfg, max_seq_len=8192)
    config = json.loads((path / "config.json").read_text())
    del config["sliding_window"]
    (path / "config.json").write_text(json.dumps(config))
    assert "has no sliding_window, which transformers reads as 4096" in _text(
        dataclasses.replace(long, init_from=str(path)))
    v01, hf = _saved(tmp_path / "v01", "mistral", cfg, sliding_window=4096)
    _loads_as(dataclasses.replace(cfg, init_from=str(v01)), hf)
    qwen3 = tiny(qk_norm=True)
    path, _ = _saved(tmp_path, "qwen3", qwen3, use_sliding_window=True, sliding_window=16,
                     max_window_layers=2)
    assert "turns a sliding window on (use_sliding_window, layer_types)" in _text(
        dataclasses.replace(qwen3, init_from=str(path)))


def test_a_qwen3_window_that_no_layer_takes_is_no_window(tmp_path):
    """use_sliding_window slides only the layers from max_window_layers on (transformers'
    layer_types, where it wrote them): Qwen3-8B's max_window_layers is its 36 layers, so none,
    and transformers computes orch's function; such a checkpoint was refused all the same."""
    qwen3 = tiny(qk_norm=True)
    path, hf = _saved(tmp_path, "qwen3", qwen3, use_sliding_window=True, sliding_window=16,
                      max_window_layers=qwen3.layers)
    cfg = dataclasses.replace(qwen3, init_from=str(path))
    assert _text(cfg) == ""
    ours = Transformer(cfg).eval()
    load_hf_weights(ours, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 48 tokens: past the window of 16, had any layer slid
        assert (ours(tokens) - hf(tokens).logits).abs().max() < 1e-5
    config = json.loads((path / "config.json").read_text())
    del config["layer_types"]  # as transformers before 4.53 wrote it: derived from the rest
    (path / "config.json").write_text(json.dumps(config))
    assert _text(cfg) == ""
    (path / "config.json").write_text(json.dumps(config | {"max_window_layers": 2}))
    assert "turns a sliding window on" in _text(cfg)


def test_absent_qwen3_keys_are_its_own_defaults(tmp_path):
    """Qwen3Config's defaults are not LlamaConfig's: heads 128 wide whatever the hidden size,
    32 key/value heads, 151,936 tokens."""
    cfg = tiny(qk_norm=True, head_dim=128)
    path, _ = _saved(tmp_path, "qwen3", cfg)
    config = json.loads((path / "config.json").read_text())
    for key in ("head_dim", "num_key_value_heads", "vocab_size"):
        del config[key]
    (path / "config.json").write_text(json.dumps(config))
    text = _text(dataclasses.replace(cfg, init_from=str(path), head_dim=None))
    assert "has no head_dim, which transformers reads as 128 (qwen3's default)" in text
    assert "set model.head_dim=128" in text and "set model.kv_heads=32" in text
    assert "set model.vocab_size=151936" in text


def test_text_data_with_a_tokenizer_vocabulary_is_refused_before_launch(tmp_path, monkeypatch):
    """orch tokenizes text as bytes: a 512-token checkpoint started training on ids 0-255 that
    meant its own tokenizer's tokens, without a word. Token files (made with its tokenizer)
    launch; a 256-token checkpoint reads text as bytes (test_launch_starts_from_the_checkpoint)."""
    import numpy as np

    from orch.errors import OrchError
    from orch.launch.launcher import prepare

    monkeypatch.chdir(REPO)
    cfg = tiny(vocab_size=512)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg)))
    hf.save_pretrained(tmp_path / "hf")
    text = tmp_path / "notes.txt"
    text.write_text("text, not token ids " * 100)
    np.save(tmp_path / "ids.npy", np.arange(2048, dtype=np.uint16) % 512)

    def launch_args(data: Path | str) -> list[str]:
        return ["--nproc-per-node", "1", "configs/tiny.yaml", *overrides(
            tmp_path / "run", "model.vocab_size=512", f"model.init_from={tmp_path / 'hf'}",
            f"data.path={data}")]

    for data, said in [(text, f"data.path: {str(text)!r} is text tokenized as bytes"),
                       ("", "data.path: empty: the shipped corpus, text, tokenized as bytes")]:
        with pytest.raises(OrchError) as refused:
            prepare(launch_args(data))
        assert said in str(refused.value)
        assert "checkpoint of 512 tokens" in str(refused.value)
        assert "fix: tokenize the text with the checkpoint's tokenizer: orch data prepare " \
            f"{data or 'FILE'} --tokenizer {tmp_path / 'hf'} --out DATA.bin" in str(refused.value)
    prepare(launch_args(tmp_path / "ids.npy"))
    with pytest.raises(OrchError) as refused:  # held-out text too (eval.path)
        prepare([*launch_args(tmp_path / "ids.npy"), "--set", "eval.interval=5", "--set",
                 f"eval.path={text}"])
    assert f"eval.path: {str(text)!r} is text tokenized as bytes" in str(refused.value)
    assert "then set eval.path to DATA.bin (a model" in str(refused.value)


def test_a_wrong_vocab_size_with_init_from_is_one_problem_not_two(checkpoint, tmp_path,
                                                                  monkeypatch):
    """model.vocab_size=512 with a 256-token checkpoint gave its own problem and a second,
    false one: "data.path: ... model.init_from starts from a checkpoint of 512 tokens". The
    text-data check reads the checkpoint's vocabulary now; the other way round (a 512-token
    checkpoint, model.vocab_size=256) both problems are real and both are said."""
    from orch.errors import OrchError
    from orch.launch.launcher import prepare

    monkeypatch.chdir(REPO)
    path, _ = checkpoint
    wide = _with_config(path, tmp_path / "wide", lambda c: c.update(vocab_size=512))
    for init_from, vocab, said in [(path, 512, []), (wide, 256, ["checkpoint of 512 tokens"])]:
        with pytest.raises(OrchError) as refused:
            prepare(["--nproc-per-node", "1", "configs/tiny.yaml", *overrides(
                tmp_path / "run", f"model.vocab_size={vocab}", f"model.init_from={init_from}")])
        text = str(refused.value)
        assert f"model.vocab_size: {vocab} but" in text, text
        assert ("data.path:" in text) == bool(said) and all(s in text for s in said), text


@pytest.mark.slow  # one single-process launch each, ~10 s
@pytest.mark.parametrize("homes", ["device", "nvme"])
def test_launch_starts_from_the_checkpoint(checkpoint, tmp_path, homes):
    """The first logged loss is the HuggingFace model's own loss on the first batch, also when
    the checkpoint is read unit by unit into NVMe homes (offloaded parameters and states)."""
    path, hf = checkpoint
    run = tmp_path / "run"
    offload = [] if homes == "device" else [
        "offload.params=nvme", "offload.grads=cpu", "offload.optimizer=nvme",
        f"offload.nvme_path={tmp_path}"]
    out = launch("--nproc-per-node", "1", "configs/tiny.yaml",
                 *overrides(run, "train.steps=1", "train.warmup_steps=1",
                            f"model.init_from={path}", *offload))
    assert out.returncode == 0, out.stderr
    assert f"orch: initialized from {path}" in out.stdout
    assert abs(metrics(run)[0]["loss"] - _first_step_loss(hf, "configs/tiny.yaml")) < 1e-5
    if homes == "device":  # the checkpoint directory gone, the run still resumes; a new one not
        _resume_needs_no_init_from(run, tmp_path / "gone")


def _first_step_loss(hf: torch.nn.Module, config: str, *sets: str) -> float:
    """The loss of the transformers model ``hf`` on the first step's batch of a launch of
    ``config`` (with ``sets``), computed in this process."""
    from orch.runtime.data import BatchStream, PackedSequences, load_tokens

    cfg = load_config(config, [*FAST, *sets])
    t = cfg.train
    stream = BatchStream(PackedSequences(load_tokens(cfg.data, cfg.model.vocab_size),
                                         t.seq_len), t.global_batch, t.micro_batch,
                         seed=t.seed)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())
                  for x, y in stream.next_step()]
    return float(torch.stack(losses).mean())


@pytest.mark.slow  # one launch of two processes, ~15 s
def test_an_moe_launch_with_expert_parallelism_starts_from_a_mixtral_checkpoint(tmp_path):
    """Each rank's half of every expert stack (ep=2 over dp_shard=2) read from the
    checkpoint's per-expert tensors: the first logged loss is MixtralForCausalLM's own."""
    sets = ["model.shared_experts=0"]
    path, hf = _saved(tmp_path, "mixtral", load_config("configs/tiny-moe.yaml", sets).model)
    run = tmp_path / "run"
    out = launch("--nproc-per-node", "2", "configs/tiny-moe.yaml", *overrides(
        run, *sets, "parallel.ep=2", "train.steps=1", "train.warmup_steps=1",
        f"model.init_from={path}"))
    assert out.returncode == 0, out.stderr
    assert f"orch: initialized from {path}" in out.stdout
    logged = metrics(run)[0]["loss"]
    assert abs(logged - _first_step_loss(hf, "configs/tiny-moe.yaml", *sets)) < 1e-5, logged


def _resume_needs_no_init_from(run: Path, gone: Path) -> None:
    """The launcher refused to resume a run whose init_from directory had gone ("is not a
    directory"), although a resume takes its weights from the run's checkpoint."""
    from orch.errors import OrchError
    from orch.launch.launcher import prepare

    def launch_args(run_dir: Path) -> list[str]:
        return ["--nproc-per-node", "1", str(REPO / "configs/tiny.yaml"), *overrides(
            run_dir, "train.steps=2", "train.warmup_steps=1", f"model.init_from={gone}")]

    prepare(launch_args(run))
    with pytest.raises(OrchError, match=f"model.init_from: '{gone}' is not a directory"):
        prepare(launch_args(run.parent / "fresh"))


def test_a_resumed_run_neither_reads_init_from_nor_draws_an_init(tmp_path):
    """A run resuming from a checkpoint takes its first weights from nothing: the load
    overwrites every parameter, so ``model.init_from`` is not opened (here it does not even
    exist) and fill_all leaves the parameters as allocated."""
    from orch.models.weights import Unfilled, fill_all
    from orch.runtime.training_worker import _first_weights

    cfg = load_config("configs/tiny.yaml", [f"model.init_from={tmp_path / 'absent'}"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert isinstance(_first_weights(cfg, model, resuming=True), Unfilled)
    with pytest.raises(ProblemsError, match="absent"):
        _first_weights(cfg, model, resuming=False)
    plain = Transformer(cfg.model)
    before = {name: p.detach().clone() for name, p in plain.named_parameters()}
    fill_all(plain, Unfilled())
    assert all(torch.equal(p, before[name]) for name, p in plain.named_parameters())
