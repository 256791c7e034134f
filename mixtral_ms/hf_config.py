"""Reading a Hugging Face Mixtral config.json without MindSpore, for tools (the converter) that must
stay light: importing MindSpore and MindFormers costs ~600 MB of RSS and seconds."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Dict


class ConfigError(ValueError):
    """A configuration that cannot describe a Mixtral model."""


_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window",
           "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
           "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
           "router_type", "rre_groups", "rre_seed")  # the last three: mixtral-ms routers (configuration.py)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_local_experts", "num_experts_per_tok")


def hf_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """MixtralConfig keyword arguments from a config.json dict: top-level `rope_theta` (released
    checkpoints) or transformers-5 `rope_parameters`; only default RoPE."""
    if not isinstance(hf, dict):
        raise ConfigError("config.json must hold a JSON object")
    if hf.get("model_type") != "mixtral":
        raise ConfigError(f"not a Mixtral config: model_type is {hf.get('model_type')!r}, expected 'mixtral'")
    kwargs = {k: hf[k] for k in _FIELDS if hf.get(k) is not None}
    if "sliding_window" in hf:
        kwargs["sliding_window"] = hf["sliding_window"]
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" in hf:
        kwargs["rope_theta"] = hf["rope_theta"]
    elif "rope_theta" in rope:
        kwargs["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"unsupported rope_type {rope['rope_type']!r}; only 'default' RoPE is implemented")
    return kwargs


def read_hf_config(folder: str) -> Dict[str, Any]:
    """`<folder>/config.json` as a dict, with one-line errors for a missing or malformed file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: malformed JSON ({err})") from None


def shape_config(hf: Dict[str, Any]) -> SimpleNamespace:
    """The fields that fix parameter names and shapes, checked for presence and divisibility."""
    fields = hf_fields(hf)
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise ConfigError(f"config.json lacks {missing[0]!r}")
    heads = fields["num_attention_heads"]
    kv = fields.get("num_key_value_heads", heads)
    if heads % kv:
        raise ConfigError(f"num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv})")
    if fields["num_experts_per_tok"] > fields["num_local_experts"]:
        raise ConfigError(f"num_experts_per_tok ({fields['num_experts_per_tok']}) exceeds num_local_experts "
                          f"({fields['num_local_experts']})")
    return SimpleNamespace(
        vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"], num_hidden_layers=fields["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=fields.get("head_dim") or fields["hidden_size"] // heads,
        num_local_experts=fields["num_local_experts"], num_experts_per_tok=fields["num_experts_per_tok"],
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)))
