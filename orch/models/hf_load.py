"""Start training from a HuggingFace checkpoint directory (``model.init_from``): Llama's, or
Mistral's, Qwen3's, Mixtral's or Qwen3-MoE's (:data:`ARCHITECTURES`).

The directory holds ``config.json`` and one or more ``*.safetensors`` shards (with
``model.safetensors.index.json`` when sharded), as ``save_pretrained`` writes them. The config
is checked against orch's model config first, every mismatch reported at once with the value to
set. Weights are then read one tensor at a time from memory-mapped shards (``safe_open``) into each
parameter as it is allocated (:class:`HFCheckpoint`, a weight source): for an offloaded model,
unit by unit straight into its home tier, so neither the checkpoint nor the whole model is held
in CPU memory at once.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orch.config.blend import blend_field, parse_blend
from orch.config.schema import KV_HEADS, MODEL_SHAPE, DataConfig, ModelConfig
from orch.errors import Problem, ProblemsError, reading
from orch.models.hf import (
    TIED_HEAD_ABSENT,
    TRAITS,
    hf_expert,
    hf_family,
    hf_ignored,
    hf_keys,
    hf_to_ours,
    is_expert_stack,
)
from orch.models.llama import Transformer
from orch.models.weights import fill_all

# What transformers' LlamaConfig (4.x and 5.x) takes for a key that config.json lacks or holds as
# null: orch compares those values, not its own, since they are what the checkpoint computes.
# num_key_value_heads defaults to num_attention_heads; RoPE's theta is read in _config_problems.
_HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
_DEFAULT_THETA = 10000.0
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2",
                 "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
"""The HuggingFace classes whose checkpoints orch's Transformer loads -> their ``model_type``.
Mistral's decoder is Llama's (the same names, no biases), Qwen3's Llama's with each query and
key head normalized (``model.qk_norm``), Qwen2's (Qwen2.5's) Llama's with biases on the query,
key and value projections (``model.qkv_bias``); Mixtral's is Mistral's with softmax-routed
experts in every layer, Qwen3-MoE's Qwen3's with them every ``decoder_sparse_step`` layers (orch's
``model.moe_layer_interval``: the same layers). Those but Llama attend through a sliding window
where their config turns one on (refused: orch's attention sees the whole sequence), and each
has its own defaults (below)."""
_LAYER_WINDOW_FAMILIES = ("qwen2", "qwen3")
"""Families whose sliding window covers the layers from ``max_window_layers`` on (or those
``layer_types`` names) where ``use_sliding_window`` turns it on."""
_FAMILY_DEFAULTS: dict[str, dict[str, int | float | bool]] = {
    "llama": {},
    "mistral": {"intermediate_size": 14336, "num_key_value_heads": 8},
    "qwen3": {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "head_dim": 128},
    "qwen2": {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32},
    "mixtral": {"intermediate_size": 14336, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                  "num_hidden_layers": 24, "num_key_value_heads": 4, "num_experts": 128,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "decoder_sparse_step": 1, "norm_topk_prob": False},
}
"""Where transformers' configs of the other families default differently from LlamaConfig, for
a key config.json lacks (a null ``num_key_value_heads`` still reads as the heads, a null or
absent ``head_dim`` as hidden_size / heads but for Qwen3's 128); the MoE keys are read only
for the MoE families."""


_KNOWN = " or ".join(ARCHITECTURES)
"""The classes a fix names: ``LlamaForCausalLM or MistralForCausalLM or ...``."""


def _family(theirs: dict) -> str:
    """The ``model_type`` a config.json describes: from ``architectures`` where it names one
    orch loads, else its ``model_type`` (Llama's where it says neither)."""
    architectures = theirs.get("architectures")
    named = [ARCHITECTURES[a] for a in architectures or () if a in ARCHITECTURES] \
        if isinstance(architectures, list) else []
    return named[0] if named else str(theirs.get("model_type", "llama"))


def _checked(family: str, model: ModelConfig, hf: dict) -> dict[str, tuple[str, object]]:
    """config.json key -> the ModelConfig field it must equal and that field's value as the key
    means it (``kv_heads`` null is the heads), for a checkpoint of ``family`` read as ``hf``.
    Mixtral's ``intermediate_size`` and Qwen3-MoE's ``moe_intermediate_size`` are the experts'
    width (``model.expert_ffn_dim``, or ``ffn_dim`` where that is null and the checkpoint
    has no dense layers); Qwen3-MoE's own ``intermediate_size`` is its dense layers'
    (``ffn_dim``), compared only where it has some (a ``decoder_sparse_step`` other than 1:
    transformers never reads it otherwise), and the experts' width is then
    ``expert_ffn_dim``'s, whatever it holds: "set model.ffn_dim" to the experts' width was
    otherwise answered by "set model.ffn_dim" to the dense layers'."""
    dense = family == "qwen3_moe" and hf.get("decoder_sparse_step") != 1
    experts = "expert_ffn_dim" if model.expert_ffn_dim is not None or dense else "ffn_dim"
    checked: dict[str, tuple[str, object]] = {
        "vocab_size": ("vocab_size", model.vocab_size),
        "hidden_size": ("dim", model.dim),
        "intermediate_size": ("ffn_dim", model.ffn_dim),
        "num_hidden_layers": ("layers", model.layers),
        "num_attention_heads": ("heads", model.heads),
        "num_key_value_heads": ("kv_heads", model.n_kv_heads),
        "rms_norm_eps": ("norm_eps", model.norm_eps),
        "rope_theta": ("rope_theta", model.rope_theta),
        "tie_word_embeddings": ("tie_embeddings", model.tie_embeddings),
    }
    if _traits(family)[0]:
        checked |= {"num_local_experts" if family == "mixtral" else "num_experts":
                    ("experts", model.experts), "num_experts_per_tok": ("top_k", model.top_k),
                    "decoder_sparse_step": ("moe_layer_interval", model.moe_layer_interval),
                    "norm_topk_prob": ("norm_topk_prob", model.norm_topk_prob)}
    if family == "mixtral":
        checked["intermediate_size"] = (experts, model.moe_ffn_dim)
    elif family == "qwen3_moe":
        checked["moe_intermediate_size"] = (experts, model.moe_ffn_dim)
        if not dense:
            del checked["intermediate_size"]
    return checked


_EXPERT_COUNT = {"mixtral": ("num_local_experts", "num_experts"),
                 "qwen3_moe": ("num_experts", "num_local_experts")}
"""Each MoE family's config.json key for its number of routed experts (its hub configs'), and
the other name of it: transformers 5 maps num_experts to num_local_experts in both families'
configs, saves num_local_experts and, given both, reads the other name; transformers 4 reads
the family's own key alone. Mixtral's num_experts was read as the default 8 experts."""


_MIXTRAL_ROUTING = {"decoder_sparse_step": (1, "MoE in every layer"),
                    "norm_topk_prob": (True, "whose router renormalizes its top-k weights")}
"""What a Mixtral checkpoint computes without a config key for it, in Qwen3-MoE's keys (which
orch's fields are compared with)."""


def _as_transformers_reads(theirs: dict) -> dict:
    """The checked fields of config.json ``theirs`` as transformers builds its LlamaConfig (or
    MistralConfig, Qwen3Config) from them: every absent (or null) key at that config's default
    (all but rope_theta and head_dim)."""
    family = _FAMILY_DEFAULTS.get(_family(theirs), {})
    defaults = {**_HF_DEFAULTS, **family}
    hf = {key: default if theirs.get(key) is None else theirs[key] for key, default in
          defaults.items() if key not in ("num_key_value_heads", "head_dim", "rope_theta")}
    kv_heads = theirs.get("num_key_value_heads", family.get("num_key_value_heads"))
    hf["num_key_value_heads"] = hf["num_attention_heads"] if kv_heads is None else kv_heads
    return hf


def _window_problem(theirs: dict, family: str, config_file: Path, span: int
                    ) -> Problem | None:
    """A Mistral or Qwen3 config.json whose attention looks back through a sliding window:
    Mistral's unless ``sliding_window`` is null (4096 where absent), Mixtral's where it is
    not (null where absent); Qwen3-MoE's where ``use_sliding_window`` is true; Qwen3's and
    Qwen2's where
    ``layer_types`` names a sliding layer or, without it, where ``use_sliding_window`` is true
    and a layer lies from ``max_window_layers`` (28) on, as transformers derives layer_types.
    Qwen3-8B's max_window_layers is its 36 layers: use_sliding_window true slides none of them,
    the same function as orch's (it was refused). A window of at least ``span``
    (``model.max_seq_len``, which bounds train.seq_len) never cuts a sequence orch trains on:
    Mistral 7B v0.1's 4096 with model.max_seq_len 4096 is the same function too."""
    layer_types, layers = theirs.get("layer_types"), theirs.get("num_hidden_layers", 32)
    first = theirs.get("max_window_layers", 28)
    window = theirs.get("sliding_window", None if family == "mixtral" else 4096)
    if isinstance(window, int) and not isinstance(window, bool) and window >= span:
        return None
    if family in ("mistral", "mixtral"):
        slides = window is not None
        said = ("has no sliding_window, which transformers reads as 4096"
                if "sliding_window" not in theirs else f"has sliding_window: {window!r}")
    else:
        turned_on = bool(theirs.get("use_sliding_window")) and window is not None
        slides = family == "qwen3_moe" and turned_on or family in _LAYER_WINDOW_FAMILIES and (
            "sliding_attention" in layer_types if isinstance(layer_types, list) else turned_on
            and not (isinstance(layers, int) and isinstance(first, int) and layers <= first))
        said = "turns a sliding window on (use_sliding_window, layer_types)"
    if not slides:
        return None
    shorter = (f", or set model.max_seq_len (and so train.seq_len) to at most its window, "
               f"{window}: orch then never attends further back than it"
               if isinstance(window, int) and not isinstance(window, bool) else "")
    return Problem("model.init_from", f"{config_file} {said}: its attention sees only that "
                   f"many tokens back, orch's the whole sequence (model.max_seq_len={span})",
                   "use a checkpoint without a sliding window (Mistral 7B v0.3's and NeMo's "
                   f"sliding_window is null, Qwen3's use_sliding_window false){shorter}",
                   ("model.max_seq_len",))


def init_from_problems(model: ModelConfig) -> list[Problem]:
    """What stops ``model.init_from`` from loading into ``model``: a missing directory or file,
    a config that is not a bias-free Llama, or dimensions that differ (each with its fix); once
    the config matches, every tensor without a place in orch's Transformer, every shape that
    differs and every parameter without a tensor, from the shards' headers (nothing is read but
    the two tensors a tied model's checkpoint may hold for its head, compared, and the model is
    built on the meta device): what the launcher checks before any process starts. An absent
    config.json key counts as transformers' default, as transformers reads it."""
    if problems := _config_problems(model):
        return problems
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(model).named_parameters()}
    return reading(_locate(model, shapes)[1], MODEL_SHAPE)


def _config_problems(model: ModelConfig) -> list[Problem]:
    """The directory and its config.json against ``model`` (see :func:`init_from_problems`)."""
    where, path = "model.init_from", Path(model.init_from)
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "has no config.json" if path.is_dir() else "is not a directory"
        return [Problem(where, f"{model.init_from!r} {what}", _orch_checkpoint_fix(path) or
                        "point it at a directory written by save_pretrained (config.json and "
                        "*.safetensors)")]
    try:
        shards = _shards(path)
    except CheckpointFileError as exc:
        return [exc.problem]
    if not shards:
        return [Problem(where, f"{model.init_from!r} has no *.safetensors file",
                        "save the checkpoint with safe_serialization=True")]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        return [Problem(where, f"{path / _INDEX} names {', '.join(missing)}, which "
                        f"{'is' if len(missing) == 1 else 'are'} not in {path}",
                        "copy the whole checkpoint directory")]
    try:
        theirs = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [Problem(where, f"{config_file}: {exc}", f"use a {_KNOWN} checkpoint")]
    if not isinstance(theirs, dict):
        return [Problem(where, f"{config_file} holds a JSON {type(theirs).__name__}, not a "
                        "model config", f"use a {_KNOWN} checkpoint")]
    problems, hf, family = [], _as_transformers_reads(theirs), _family(theirs)
    said = {}  # how config.json gives a checked value somewhere other than under its key
    rope_key = "rope_scaling" if theirs.get("rope_scaling") else "rope_parameters"
    rope = theirs.get(rope_key) or {}
    if not isinstance(rope, dict):
        problems.append(Problem(where, f"{config_file} has {rope_key}: {rope!r}, not a mapping",
                                f"use a {_KNOWN} checkpoint"))
        rope = {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(Problem(where, f"{config_file} scales RoPE ({rope_key}: {rope})",
                                "orch's RoPE has no scaling: use an unscaled checkpoint"))
    top, inner = theirs.get("rope_theta"), rope.get("rope_theta")
    if top is not None and inner is not None and top != inner:
        problems.append(Problem(where, f"{config_file} has rope_theta: {top!r} and {rope_key}."
                                f"rope_theta: {inner!r}: transformers 5 reads the second, "
                                "transformers 4 the first", "make config.json say the theta "
                                "the checkpoint was trained with, in both places"))
    elif inner is not None:
        hf["rope_theta"] = inner
        said["rope_theta"] = f"has {rope_key}.rope_theta: {inner!r}"
    else:
        theta = _FAMILY_DEFAULTS.get(family, {}).get("rope_theta", _DEFAULT_THETA)
        hf["rope_theta"] = theta if top is None else top
    architectures = theirs.get("architectures") or []
    if not isinstance(architectures, list) or (architectures and
                                               not set(architectures) & set(ARCHITECTURES)):
        problems.append(Problem(where, f"{config_file} describes {architectures}",
                                f"use a {_KNOWN} checkpoint"))
    types = " or ".join(map(repr, ARCHITECTURES.values()))
    for key, want in (("model_type", family), ("hidden_act", "silu")):  # where architectures
        foreign = key == "model_type" and family not in ARCHITECTURES.values()
        if foreign or theirs.get(key, want) != want:  # is missing, these still tell another
            problems.append(Problem(where, f"{config_file} has {key}: {theirs[key]!r}, not "
                                    f"{types if foreign else repr(want)}: another model than "
                                    "orch's Transformer", f"use a {_KNOWN} checkpoint"))
    if (window := _window_problem(theirs, family, config_file, model.max_seq_len)) is not None:
        problems.append(window)
    problems += _family_problems(model, family, theirs, config_file)
    named, ambiguous = {}, set()  # checked key -> the config.json key giving it; unreadable
    if family in _EXPERT_COUNT:
        key, alias = _EXPERT_COUNT[family]
        own, other = theirs.get(key), theirs.get(alias)
        if own is not None and other is not None and own != other:
            ambiguous.add(key)
            problems.append(Problem(where, f"{config_file} has {key}: {own!r} and {alias}: "
                                    f"{other!r}: transformers 5 reads {alias}, transformers 4 "
                                    f"{key}", "make config.json say the checkpoint's number of "
                                    "experts (its routers' rows) under one of the two keys"))
        elif other is not None:
            hf[key], said[key], named[key] = other, f"has {alias}: {other!r}", alias
    if family == "mixtral":
        hf |= {key: value for key, (value, _) in _MIXTRAL_ROUTING.items()}
        said |= {key: f"describes a mixtral model, {what}"
                 for key, (_, what) in _MIXTRAL_ROUTING.items()}
    for flag in ("attention_bias", "mlp_bias"):
        if theirs.get(flag):
            problems.append(Problem(where, f"{config_file} has {flag}: true",
                                    "orch's Llama has no output or MLP biases: use a checkpoint "
                                    "without them (Qwen2's q/k/v biases alone load, "
                                    "model.qkv_bias)"))
    mistyped = _mistyped(hf, theirs.get("head_dim"))
    problems += [Problem(where, f"{config_file} has {named.get(key, key)}: "
                         f"{hf.get(key, theirs.get(key))!r}, not {want}", f"write "
                         f"{named.get(key, key)} in config.json as {_AS_JSON[want]}, as "
                         "save_pretrained does") for key, want in mistyped.items()]
    head_dim, heads = theirs.get("head_dim"), hf["num_attention_heads"]
    default_width = _FAMILY_DEFAULTS.get(family, {}).get("head_dim")
    if not mistyped and heads > 0:  # transformers' head width: head_dim, else hidden / heads
        coupled = hf["hidden_size"] // heads
        width = head_dim if head_dim is not None else (
            default_width if "head_dim" not in theirs and default_width else coupled)
        # a width that follows from dim and heads is the fix of those fields, said below
        if width != model.head_size and (model.head_dim is not None or width != coupled):
            given = (f"has head_dim: {head_dim!r}" if head_dim is not None
                     else f"has no head_dim, which transformers reads as {width} ({family}'s "
                     "default)" if width != coupled else "has no head_dim, which transformers "
                     f"reads as hidden_size / num_attention_heads = {coupled}")
            problems.append(Problem("model.head_dim", f"{model.head_dim!r} (heads "
                                    f"{model.head_size} wide) but {config_file} {given}",
                                    f"set model.head_dim={width}", ("model.init_from",)))
    for key, (field, value) in _checked(family, model, hf).items():
        if key not in hf or key in mistyped or key in ambiguous or hf[key] == value:
            continue
        given = said.get(key) or (
            f"has {key}: {_written(theirs[key])}" if theirs.get(key) is not None
            else f"has no {key}, which transformers reads as {_written(hf[key])}")
        held = getattr(model, field)  # a null field as what it stands for (kv_heads: heads)
        held = _written(held) if held is not None else f"null (so {value})"
        problems.append(Problem(f"model.{field}", f"{held} but {config_file} {given}",
                                f"set model.{field}={_written(hf[key], quoted=False)}",
                                ("model.init_from", *(KV_HEADS if field == "kv_heads" else ()))))
    return problems


def _written(value: object, quoted: bool = True) -> str:
    """``value`` as config.json and YAML write it: a boolean as ``true``/``false`` (Python's
    ``False`` misquoted config.json and read beside model.qk_norm's ``false``), anything else
    as ``repr`` (or ``str`` where not ``quoted``: a ``--set`` value)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if quoted else str(value)


def _traits(family: str) -> tuple[bool, bool, bool]:
    """(MoE, QK-norm, q/k/v biases) of a checkpoint family (``orch.models.hf.TRAITS``; Mistral's
    are Llama's)."""
    return TRAITS.get(family, (False, False, False))


def _family_problems(model: ModelConfig, family: str, theirs: dict,
                     config_file: Path) -> list[Problem]:
    """What of ``model`` a ``family`` checkpoint has no weights or function for, beside the
    fields compared one by one: QK-norm and q/k/v biases either way, MoE layers in a dense
    family, and in an MoE
    one shared experts, sigmoid routing and Qwen3-MoE's dense ``mlp_only_layers`` (orch puts
    its dense layers by ``model.moe_layer_interval`` alone)."""
    if family not in ARCHITECTURES.values():
        return []
    moe, norms, biased = _traits(family)
    problems: list[Problem] = []
    if model.qk_norm != norms:
        does = ("normalizes each query and key head (q_norm, k_norm)" if norms
                else "normalizes no query or key head")
        problems.append(Problem("model.qk_norm", f"{str(model.qk_norm).lower()} but "
                                f"{config_file} describes a {family} model, whose attention "
                                f"{does}", f"set model.qk_norm={str(norms).lower()}",
                                ("model.init_from",)))
    if model.qkv_bias != biased:
        has = "has" if biased else "has no"
        problems.append(Problem("model.qkv_bias", f"{str(model.qkv_bias).lower()} but "
                                f"{config_file} describes a {family} model, whose attention "
                                f"{has} query, key and value biases",
                                f"set model.qkv_bias={str(biased).lower()}", ("model.init_from",)))
    wrong = [("experts", model.is_moe and not moe, "whose feed-forward layers are all dense", 0),
             ("shared_experts", moe and model.shared_experts > 0, "which has no shared experts",
              0),
             ("score_func", moe and model.score_func != "softmax", "whose router takes softmax "
              "scores", "softmax")]
    problems += [Problem(f"model.{field}", f"{getattr(model, field)!r} but {config_file} "
                         f"describes a {family} model, {what}", f"set model.{field}={want}",
                         ("model.init_from",)) for field, bad, what, want in wrong if bad]
    dense = theirs.get("mlp_only_layers") if family == "qwen3_moe" else None
    if dense and _sparse_made_dense(dense, theirs):
        problems.append(Problem("model.init_from", f"{config_file} has mlp_only_layers: "
                                f"{dense!r}: dense layers where the MoE ones fall every "
                                "decoder_sparse_step layers, which orch's layout "
                                "(model.moe_layer_interval) cannot say",
                                "use a checkpoint whose mlp_only_layers is empty"))
    return problems


def _sparse_made_dense(dense: object, theirs: dict) -> bool:
    """Whether Qwen3-MoE's ``mlp_only_layers`` (``dense``) makes a layer dense that its
    ``decoder_sparse_step`` (transformers' default 1) makes MoE, as transformers builds it
    (index in the list, else MoE every step layers): a list of layers that are dense anyway,
    or beyond ``num_hidden_layers``, is orch's layout, and was refused. Anything but a list of
    whole numbers with a whole step counts as one that does."""
    step, layers = theirs.get("decoder_sparse_step", 1), theirs.get("num_hidden_layers", 24)
    if not (isinstance(dense, list) and all(isinstance(i, int) for i in dense)
            and isinstance(step, int) and step > 0 and isinstance(layers, int)):
        return True
    return any(0 <= i < layers and (i + 1) % step == 0 for i in dense)


def _orch_checkpoint_fix(path: Path) -> str | None:
    """The fix for ``model.init_from`` naming an orch checkpoint (``manifest.json``, DCP's
    ``.metadata``), run directory (``checkpoints/``) or a run's ``checkpoints/`` folder (by its
    name, or the step directories it holds), None for any other directory: those were told only
    to use a directory written by save_pretrained, not how to use the one they have. One with
    no complete checkpoint gets no command: ``--resume`` and ``orch ckpt export`` refuse it
    too. Imported here: the checkpoint package pulls in DCP, which the launcher's checks
    otherwise never need."""
    from orch.runtime.checkpoint.browse import newest_complete
    from orch.runtime.checkpoint.files import CHECKPOINTS, MANIFEST, step_dirs
    from orch.runtime.checkpoint.manifest import INDEX, CheckpointError

    if not path.is_dir() or not ((path / MANIFEST).is_file() or (path / INDEX).is_file()
                                 or (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS
                                 or any(step_dirs(path))):
        return None
    try:
        checkpoint = newest_complete(path)
    except CheckpointError:
        return ("it is an orch checkpoint or run directory, which init_from does not read, and "
                "holds no complete checkpoint (none has its manifest.json: no save finished), "
                "so --resume and orch ckpt export refuse it too: point init_from at a directory "
                "written by save_pretrained, or export a complete checkpoint of a run")
    return (f"it is an orch checkpoint or run directory, which init_from does not read: "
            f"continue it with --resume {checkpoint} (weights, optimizer and step), or start "
            f"from its weights alone with orch ckpt export {path} --to hf OUT and "
            "model.init_from=OUT")


_INT, _NUMBER, _BOOL = "a whole number", "a number", "true or false"
_NUMBERS, _BOOLS = {"rms_norm_eps", "rope_theta"}, {"tie_word_embeddings", "norm_topk_prob"}
_AS_JSON = {_INT: "a JSON integer (256, not \"256\")", _NUMBER: "a JSON number (1e-05, not "
            "\"1e-05\")", _BOOL: "a JSON true or false"}


def _mistyped(hf: dict, head_dim: object) -> dict[str, str]:
    """The checked config.json values ``hf`` (and ``head_dim``, if given) of the wrong JSON
    type, key -> the type wanted: a string "256" compared unequal to 256 and was answered with
    "set model.dim=256" (the value it already had), and a head_dim string multiplied as one."""
    values = {**hf, **({} if head_dim is None else {"head_dim": head_dim})}
    wanted = {key: _BOOL if key in _BOOLS else _NUMBER if key in _NUMBERS
              else _INT for key in values}
    ok = {_INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
          _NUMBER: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
          _BOOL: lambda v: isinstance(v, bool)}
    return {key: want for key, want in wanted.items() if not ok[want](values[key])}


BYTE_VOCAB = 256
"""The byte tokenizer's vocabulary: the one vocabulary orch's text data speaks."""


def text_data_problems(model: ModelConfig, data: DataConfig,
                       field: str = "data.path") -> list[Problem]:
    """Text data (the shipped corpus, a text ``data.path`` or ``data.blend`` file) with a
    checkpoint whose vocabulary is not the byte one: orch tokenizes text as bytes, ids 0-255,
    which mean whatever those ids meant to the checkpoint's own tokenizer, so a pretrained model
    would be fine-tuned on noise without a word. A checkpoint of 256 tokens (one orch exported,
    or another byte model) reads bytes as it was trained to. The vocabulary is the checkpoint's
    own (its config.json, as transformers reads it), not ``model.vocab_size``: a wrong one is
    already a problem of its own (``init_from_problems``), and would have this one name a
    checkpoint of its size. Nothing is said when config.json cannot be read
    (``init_from_problems`` says why). Problems of the data file itself are _check_data's.
    ``field``: the field holding ``data.path``'s file (``eval.path``, ``data.blend[i]``), which
    the problem is said of."""
    from orch.runtime.data import DataError, check_source, read_like_data

    vocab = _checkpoint_vocab(model)
    if vocab is None or vocab == BYTE_VOCAB:
        return []
    if data.blend:  # each file's, said of its entry
        return [problem for index, (_, path) in enumerate(parse_blend(data.blend)[0])
                for problem in text_data_problems(model, read_like_data(data, path),
                                                  blend_field(index))]
    if data.path:
        try:
            if check_source(data)[1] != "text":
                return []
        except DataError:
            return []
    what = f"{data.path!r} is text" if data.path else "empty: the shipped corpus, text,"
    then = (f"make {field} 'WEIGHT DATA.bin'" if field.startswith("data.blend")
            else f"set {field} to DATA.bin")
    return [Problem(field, f"{what} tokenized as bytes (ids 0-255), but model.init_from "
                    f"starts from a checkpoint of {vocab} tokens (its config.json's vocab_size), "
                    "whose ids are its own tokenizer's", "tokenize the text with the "
                    f"checkpoint's tokenizer: orch data prepare {data.path or 'FILE'} --tokenizer "
                    f"{model.init_from} --out DATA.bin, then {then} (a model trained on orch's "
                    "bytes: --tokenizer byte)", ("model.init_from", "data.format"))]


def _checkpoint_vocab(model: ModelConfig) -> int | None:
    """The vocabulary size of the checkpoint at ``model.init_from`` as transformers reads its
    config.json (absent: LlamaConfig's default); None when that cannot be read."""
    try:
        theirs = json.loads((Path(model.init_from) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(theirs, dict):
        return None
    vocab = _as_transformers_reads(theirs)["vocab_size"]
    return vocab if isinstance(vocab, int) else None


class HFCheckpoint:
    """The tensors of the checkpoint at ``cfg.init_from`` by orch parameter name: a
    :class:`~orch.models.weights.WeightSource`.

    Built from the shards' headers alone: every key without a place in ``model``, every shape
    that differs and every parameter left without a tensor is reported at once (a
    ProblemsError) before any weight is read, as the launcher's :func:`init_from_problems` did
    before any process started. :meth:`fill` then reads one tensor at a time, in
    any order, keeping one shard open (memory-mapped) at a time; a checkpoint written layer by
    layer is read shard by shard when filled in the model's order. :meth:`fill_shard` reads only
    a sharded parameter's local elements (a :class:`~orch.models.weights.ShardSource`): 70B
    over 64 FSDP ranks, each reads its 2.2 GB, not the 140 GB of every tensor whole.
    """

    def __init__(self, cfg: ModelConfig, model: nn.Module, checked: bool = False) -> None:
        """``checked``: the launcher's :func:`init_from_problems` passed this checkpoint, so
        its one costly check (a tied head against the embedding, two vocabulary matrices read)
        is not made again in every worker."""
        problems = _config_problems(cfg)
        if not problems:
            shapes = {name: p.shape for name, p in model.named_parameters()}
            self._where, problems = _locate(cfg, shapes, compare_tied_head=not checked)
            """Our parameter name -> the (shard, key) holding its tensor, or those of its
            experts, in order, for a stacked routed-expert weight."""
        if problems:
            raise ProblemsError(problems, title="cannot initialize from the checkpoint")
        self._open: tuple[Path, object] | None = None
        self.read = 0
        """Tensors read so far (a stack's experts one each; a shard's part counts as one)."""
        self.bytes_read = 0
        """Bytes of those tensors copied out of the shards: a sharded parameter's part only."""

    def fill(self, name: str, into: torch.Tensor) -> None:
        self.fill_shard(name, into, [torch.arange(n) for n in into.shape])

    def fill_shard(self, name: str, into: torch.Tensor, index: list[torch.Tensor]) -> None:
        """Parameter ``name``'s elements at ``index`` (per dim, ascending global indices) into
        ``into``, read a contiguous block at a time out of the memory-mapped shard (a strided
        shard, FSDP's over tensor parallelism, is a few such blocks per dim)."""
        pieces, runs = self._where[name], [_runs(i) for i in index]
        if is_expert_stack(name):  # expert j's projection is our [j] transposed (orch.models.hf)
            # shard by shard: save_pretrained orders keys as text (experts 1, 10, 100, 101, ...),
            # so a layer's experts spanning two shards alternate between them in expert order
            held = sorted(enumerate(index[0].tolist()), key=lambda e: pieces[e[1]][0])
            for at, expert in held:
                view = self._view(pieces[expert])
                for (ours_1, theirs_1), (ours_2, theirs_2) in itertools.product(*runs[1:]):
                    self._copy(into[at, ours_1, ours_2], view[theirs_2, theirs_1].T)
            self.read += len(index[0])
            return
        view = self._view(pieces[0])
        for blocks in itertools.product(*runs):
            self._copy(into[tuple(ours for ours, _ in blocks)],
                       view[tuple(theirs for _, theirs in blocks)])
        self.read += 1

    def _copy(self, into: torch.Tensor, block: torch.Tensor) -> None:
        into.copy_(block)
        self.bytes_read += block.numel() * block.element_size()

    def _view(self, piece: tuple[Path, str]) -> Any:
        """The safetensors slice of ``piece`` (shard, key): indexing it reads that block."""
        from safetensors import safe_open

        shard, key = piece
        if self._open is None or self._open[0] != shard:
            self._open = None  # the previous shard's mapping goes before the next one opens
            self._open = (shard, safe_open(str(shard), framework="pt"))
        return self._open[1].get_slice(key)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Let the open shard go (its mapped pages with it)."""
        self._open = None


def _locate(cfg: ModelConfig, shapes: dict[str, torch.Size], compare_tied_head: bool = True
            ) -> tuple[dict[str, list[tuple[Path, str]]], list[Problem]]:
    """Where each parameter named in ``shapes`` is in ``cfg.init_from``'s shards (shard, key:
    one, or one per expert of a stacked routed-expert weight, in order), and the problems: keys
    with no counterpart, shapes that differ, parameters (or experts) with no key, and
    (``compare_tied_head``) a tied model's saved head that is not its embedding."""
    from safetensors import safe_open

    located: dict[str, list[tuple[Path, str]]] = {}
    experts: dict[str, dict[int, tuple[Path, str]]] = {}  # stacked weight -> expert -> where
    found: dict[str, set[int]] = {}  # our name -> the experts (0 where not a stack) with a key
    problems = []
    tied_head: Path | None = None  # the shard of an lm_head.weight a tied model does not load
    for shard in _shards(Path(cfg.init_from)):
        try:
            handle = safe_open(str(shard), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors' errors: a cut or foreign file
            problems.append(Problem("model.init_from", f"{shard} cannot be read as safetensors "
                                    f"({exc})", "copy the file again, or re-save the "
                                    "checkpoint"))
            continue
        with handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if hf_ignored(key):
                    continue
                if cfg.tie_embeddings and key == _HEAD:
                    tied_head = shard  # the head is the embedding, as transformers ties it
                    continue  # when the two are equal (some checkpoints save the tied head too)
                ours, expert = hf_expert(key) or (hf_to_ours(key), None)
                if ours is None:
                    problems.append(Problem(key, f"in {shard.name} has no counterpart in "
                                            "orch's Transformer",
                                            f"use a bias-free {_KNOWN} checkpoint"))
                    continue
                if ours not in shapes or expert is not None and expert >= shapes[ours][0]:
                    problems.append(_unplaced(cfg, key, shard, ours, expert))
                    continue
                found.setdefault(ours, set()).add(expert or 0)
                dtype = handle.get_slice(key).get_dtype()
                if dtype not in _FLOATS:  # copied into the float parameters, silently
                    problems.append(Problem(key, f"is {dtype}, not a floating-point tensor",
                                            "use a checkpoint of float weights (F32, F16, BF16, "
                                            "F64)"))
                    continue
                shape = torch.Size(handle.get_slice(key).get_shape())
                wanted = shapes[ours] if expert is None else shapes[ours][1:][::-1]
                if shape != wanted:
                    problems.append(_misshapen(key, shape, ours if expert is None else
                                               f"{ours}[{expert}] transposed", wanted))
                elif expert is None:
                    located[ours] = [(shard, key)]
                else:
                    experts.setdefault(ours, {})[expert] = (shard, key)
    for name, held in experts.items():
        if len(held) == shapes[name][0]:
            located[name] = [held[j] for j in range(len(held))]
    problems += [problem for name in shapes for problem in _missing(cfg, name, shapes[name],
                                                                     found.get(name, set()))]
    embedding = located.get("tok_embeddings.weight")
    if (compare_tied_head and tied_head is not None and embedding is not None
            and not _equal(embedding[0], (tied_head, _HEAD))):
        problems.append(Problem("model.tie_embeddings", f"true, but {tied_head.name} holds an "
                                f"{_HEAD} that differs from the embedding (transformers then "
                                "unties the two and uses it)", "re-save the checkpoint with "
                                "tie_word_embeddings false and set model.tie_embeddings=false, "
                                f"or drop its {_HEAD} if the embedding is the head it meant"))
    return located, problems


_HEAD = "lm_head.weight"


def _runs(index: torch.Tensor) -> list[tuple[slice, slice]]:
    """Ascending global ``index`` as contiguous runs: (the run's slice of the shard, its slice
    of the whole tensor). Found where consecutive indices step by more than one, not element
    by element in Python: a whole tensor's (offload's fills, 128K vocabulary rows) is one run."""
    if len(index) == 0:
        return []
    breaks = ((index[1:] - index[:-1]) != 1).nonzero().flatten().add(1).tolist()
    starts, ends = [0, *breaks], [*breaks, len(index)]
    return [(slice(a, b), slice(int(index[a]), int(index[b - 1]) + 1))
            for a, b in zip(starts, ends, strict=True)]


def _misshapen(key: str, shape: torch.Size, ours: str, wanted: torch.Size) -> Problem:
    """The problem of tensor ``key`` whose ``shape`` is not that of our parameter ``ours``.
    Shapes are compared only once config.json equals model.* in every field a shape depends on
    (``_config_problems`` first), so the tensor disagrees with its own config.json: "check
    model.*" sent users to settings that were already right."""
    return Problem(key, f"has shape {tuple(shape)}, orch's {ours} {tuple(wanted)}, as the "
                   "checkpoint's own config.json (equal to model.*) gives it: the tensors do not "
                   "match their config.json", "re-save the checkpoint, or copy it again")


def _unplaced(cfg: ModelConfig, key: str, shard: Path, ours: str, expert: int | None
              ) -> Problem:
    """The problem of tensor ``key`` (in ``shard``), which orch's Transformer names ``ours``
    (expert ``expert`` of it) but the model of ``cfg`` has no place for: a layer, an expert,
    MoE tensors in a dense layer or a dense MLP in an MoE layer that the checkpoint's own
    config.json (equal to model.* once compared) does not have. "No counterpart in orch's
    Transformer, use a bias-free Qwen3MoeForCausalLM checkpoint" was said of a Qwen3-MoE
    checkpoint's own tensors."""
    layer = int(ours.split(".")[1]) if ours.startswith("layers.") else -1
    every = f"as model.moe_layer_interval: MoE every {cfg.moe_layer_interval} layers"
    routed = is_expert_stack(ours) or ours.endswith("feed_forward.router.weight")
    if layer >= cfg.layers:
        why = f"is of layer {layer}, but config.json has {cfg.layers} layers (as model.layers)"
    elif routed and expert is not None and cfg.is_moe_layer(layer):
        why = (f"is of expert {expert}, but config.json has {cfg.experts} experts a layer (as "
               f"model.experts), 0 to {cfg.experts - 1}")
    elif routed:
        why = (f"is an MoE layer's, but config.json makes layer {layer} dense ({every})"
               if cfg.is_moe else "is an MoE layer's, but config.json describes a dense model")
    elif ".feed_forward.w" in ours and cfg.is_moe_layer(layer):
        why = f"is a dense feed-forward's, but config.json makes layer {layer} MoE ({every})"
    else:
        why = f"would be orch's {ours}, but config.json describes a model without one"
    return Problem(key, f"in {shard.name} {why}: the tensors do not match the checkpoint's own "
                   "config.json",
                   "re-save the checkpoint, or copy it again")


def _missing(cfg: ModelConfig, name: str, shape: torch.Size, found: set[int]
             ) -> list[Problem]:
    """The problems of our parameter ``name`` (of ``shape``) whose tensors the checkpoint lacks
    (``found``: the experts of a stacked weight that have one, {0} for another parameter that
    has), each named by the HF key the user would look for in its shards (our name,
    "output.weight", is not in them). An untied model's missing head is most likely a
    checkpoint saved tied (config.json's tie_word_embeddings equals model.tie_embeddings here,
    both false, so neither side says so)."""
    keys = hf_keys(name, hf_family(cfg)[1], shape[0] if is_expert_stack(name) else 0) or [name]
    missing = [key for index, key in enumerate(keys) if index not in found]
    if missing != [_HEAD]:
        return [Problem(key, f"has no tensor in {cfg.init_from}", "use a complete checkpoint")
                for key in missing]
    return [Problem(_HEAD, f"has no tensor in {cfg.init_from}, {TIED_HEAD_ABSENT}, but its "
                    "config.json's tie_word_embeddings is false (as model.tie_embeddings)",
                    "if the checkpoint ties its head to the embedding, set tie_word_embeddings: "
                    "true in its config.json and model.tie_embeddings=true; else copy the whole "
                    "checkpoint")]


EQUAL_ROWS = 4096
"""Rows compared at a time: a vocabulary matrix (128k x 3072 in bf16, 0.8 GB) is never held
whole, twice."""


def _equal(first: tuple[Path, str], second: tuple[Path, str]) -> bool:
    """Whether the tensors at (shard, key) ``first`` and ``second`` hold the same values,
    compared ``EQUAL_ROWS`` rows at a time out of the memory-mapped shards."""
    from safetensors import safe_open

    with safe_open(str(first[0]), framework="pt") as a, \
            safe_open(str(second[0]), framework="pt") as b:
        left, right = a.get_slice(first[1]), b.get_slice(second[1])
        if left.get_shape() != right.get_shape():
            return False
        rows = left.get_shape()[0] if left.get_shape() else 0
        return all(torch.equal(left[lo:lo + EQUAL_ROWS], right[lo:lo + EQUAL_ROWS])
                   for lo in range(0, max(rows, 1), EQUAL_ROWS))


def load_hf_weights(model: nn.Module, cfg: ModelConfig) -> int:
    """Copy the checkpoint at ``cfg.init_from`` into ``model`` (orch's Transformer, its
    parameters allocated), tensor by tensor; returns how many tensors were read. Raises a
    ProblemsError naming every key it cannot place and every parameter left without a value."""
    source = HFCheckpoint(cfg, model)
    fill_all(model, source)
    source.close()
    return source.read


_INDEX = "model.safetensors.index.json"
_FLOATS = {"F16", "BF16", "F32", "F64"}
"""safetensors' names of the dtypes a weight may have."""


class CheckpointFileError(Exception):
    """A checkpoint file that cannot be read; carries the problem to report."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _shards(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names (which may be missing), else
    every one present; CheckpointFileError for an index that cannot be read."""
    index = path / _INDEX
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointFileError(Problem("model.init_from", f"{index} cannot be read: its "
                                          f"weight_map is missing or damaged ({exc!r})",
                                          "copy the file again, or re-save the checkpoint")
                                  ) from None
    return [path / str(name) for name in names]


__all__ = ["HFCheckpoint", "init_from_problems", "load_hf_weights", "text_data_problems"]
