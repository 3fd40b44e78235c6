"""Start training from a HuggingFace Llama checkpoint directory (``model.init_from``).

The directory holds ``config.json`` and one or more ``*.safetensors`` shards (with
``model.safetensors.index.json`` when sharded), as ``save_pretrained`` writes them. The config
is checked against orch's model config first, every mismatch reported at once with the value to
set. Weights are then read one tensor at a time from memory-mapped shards (``safe_open``) and
copied into the model's parameters where they live (on the CPU, which for an offloaded model is
their home tier), so the checkpoint is never held in memory beside the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from orch.config.schema import ModelConfig
from orch.errors import Problem, ProblemsError
from orch.models.hf import hf_ignored, hf_llama_config, hf_to_ours

# config.json key -> the ModelConfig field it must equal (and how to print it)
_CHECKED = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "ffn_dim",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings",
}


def init_from_problems(model: ModelConfig) -> list[Problem]:
    """What stops ``model.init_from`` from loading into ``model``: a missing directory or file,
    a config that is not a bias-free Llama, or dimensions that differ (each with its fix)."""
    where, path = "model.init_from", Path(model.init_from)
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "has no config.json" if path.is_dir() else "is not a directory"
        return [Problem(where, f"{model.init_from!r} {what}",
                        "point it at a directory written by save_pretrained (config.json and "
                        "*.safetensors)")]
    if not _shards(path):
        return [Problem(where, f"{model.init_from!r} has no *.safetensors file",
                        "save the checkpoint with safe_serialization=True")]
    try:
        theirs = json.loads(config_file.read_text())
        ours = hf_llama_config(model)
    except (json.JSONDecodeError, ProblemsError) as exc:
        return [Problem(where, f"{config_file}: {exc}", "use a LlamaForCausalLM checkpoint")]
    problems = []
    rope = theirs.get("rope_parameters") or {}  # transformers 5 keeps rope_theta there
    if theirs.get("rope_theta") is None and "rope_theta" in rope:
        theirs["rope_theta"] = rope["rope_theta"]
    scaling = theirs.get("rope_scaling") or (rope if rope.get("rope_type", "default")
                                             != "default" else None)
    if scaling:
        problems.append(Problem(where, f"{config_file} scales RoPE ({scaling})",
                                "orch's RoPE has no scaling: use an unscaled checkpoint"))
    if "LlamaForCausalLM" not in theirs.get("architectures", ["LlamaForCausalLM"]):
        problems.append(Problem(where, f"{config_file} describes {theirs['architectures']}",
                                "use a LlamaForCausalLM checkpoint"))
    for flag in ("attention_bias", "mlp_bias"):
        if theirs.get(flag):
            problems.append(Problem(where, f"{config_file} has {flag}: true",
                                    "orch's Llama has no biases: use a bias-free checkpoint"))
    for key, field in _CHECKED.items():
        if key not in theirs or theirs[key] == ours[key]:
            continue
        problems.append(Problem(f"model.{field}", f"{getattr(model, field)!r} but {config_file} "
                                f"has {key}: {theirs[key]!r}", f"set model.{field}={theirs[key]}"))
    return problems


def load_hf_weights(model: nn.Module, cfg: ModelConfig) -> int:
    """Copy the checkpoint at ``cfg.init_from`` into ``model`` (orch's Transformer), tensor by
    tensor; returns how many tensors were read. Raises a ProblemsError naming every key it
    cannot place and every parameter left without a value."""
    from safetensors import safe_open

    if problems := init_from_problems(cfg):
        raise ProblemsError(problems, title="cannot initialize from the checkpoint")
    params = dict(model.named_parameters())
    filled: set[str] = set()
    problems = []
    read = 0
    for shard in _shards(Path(cfg.init_from)):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if hf_ignored(key):
                    continue
                ours = hf_to_ours(key)
                if ours is None or ours not in params:
                    problems.append(Problem(key, f"in {shard.name} has no counterpart in "
                                            "orch's Llama Transformer",
                                            "use a bias-free Llama checkpoint"))
                    continue
                tensor = handle.get_tensor(key)
                target = params[ours]
                if tensor.shape != target.shape:
                    problems.append(Problem(key, f"has shape {tuple(tensor.shape)}, orch's "
                                            f"{ours} {tuple(target.shape)}", "check model.*"))
                    continue
                with torch.no_grad():
                    target.copy_(tensor)
                filled.add(ours)
                read += 1
    if cfg.tie_embeddings:  # the head is the embedding's parameter; checkpoints may omit it
        filled.add("output.weight")
    missing = [name for name in params if name not in filled]
    problems += [Problem(name, f"has no tensor in {cfg.init_from}", "use a complete checkpoint")
                 for name in missing]
    if problems:
        raise ProblemsError(problems, title="cannot initialize from the checkpoint")
    return read


def _shards(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names, else every one present."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


__all__ = ["init_from_problems", "load_hf_weights"]
