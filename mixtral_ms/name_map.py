"""The Hugging Face <-> mixtral-ms parameter name map (the table in docs/design.md).

Names are identical except the experts: the checkpoint has one w1/w3/w2 per expert
(`model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight [F, H]`), the model one stacked tensor per
layer (`model.layers.{i}.block_sparse_moe.experts.w1 [E, F, H]`) whose rows are the experts in order.
"""
from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Tuple

from .hf_config import shape_config

# Optimizer and training-loop state that a MindSpore training checkpoint carries beside the weights.
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "global_step", "learning_rate",
                           "scale_sense", "loss_scale", "epoch_num", "step_num", "current_iterator_step",
                           "last_overflow_iterator_step", "accu_grads.", "beta1_power", "beta2_power",
                           "router_stats.", "global_batch_size")

_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")
_MS_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(w[123])$")


class ParamSpec(NamedTuple):
    shape: Tuple[int, ...]
    sources: List[str]  # Hugging Face names; several (stacked along a new axis 0) for experts


def hf_to_ms(hf_name: str) -> Tuple[str, Optional[int]]:
    """(mixtral-ms name, expert index or None): `...experts.3.w1.weight` -> (`...experts.w1`, 3)."""
    m = _HF_EXPERT.match(hf_name)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return hf_name, None


def is_expert_stack(ms_name: str) -> bool:
    """Whether a mixtral-ms parameter stacks the experts on axis 0 (true even for a single expert)."""
    return _MS_EXPERT.match(ms_name) is not None


def ms_to_hf(ms_name: str, num_experts: int) -> List[str]:
    """The Hugging Face names a mixtral-ms parameter is made of (E names for stacked experts, in order)."""
    m = _MS_EXPERT.match(ms_name)
    if m:
        return [f"{m.group(1)}.{e}.{m.group(2)}.weight" for e in range(num_experts)]
    return [ms_name]


def _shapes(config):
    """A MixtralConfig, a hf_config.shape_config namespace, or a config.json dict."""
    return shape_config(config) if isinstance(config, dict) else config


def parameter_specs(config) -> Dict[str, ParamSpec]:
    """Every mixtral-ms parameter, in checkpoint order, with its shape and Hugging Face source names.
    `config`: a config.json dict (num_hidden_layers, num_local_experts, hidden_size, intermediate_size,
    num_attention_heads, num_key_value_heads, head_dim (optional), vocab_size, tie_word_embeddings),
    a MixtralConfig or hf_config.shape_config(...)."""
    config = _shapes(config)
    h, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_local_experts
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    specs: Dict[str, ParamSpec] = {"model.embed_tokens.weight": ParamSpec((v, h), ["model.embed_tokens.weight"])}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        same = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "block_sparse_moe.gate.weight": (e, h),
        }
        for name, shape in same.items():
            specs[p + name] = ParamSpec(shape, [p + name])
        for w, shape in (("w1", (e, f, h)), ("w3", (e, f, h)), ("w2", (e, h, f))):
            name = f"{p}block_sparse_moe.experts.{w}"
            specs[name] = ParamSpec(shape, ms_to_hf(name, e))
    specs["model.norm.weight"] = ParamSpec((h,), ["model.norm.weight"])
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = ParamSpec((v, h), ["lm_head.weight"])
    return specs


def hf_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every Hugging Face tensor the config implies, with its shape."""
    out = {}
    for name, spec in parameter_specs(config).items():
        for src in spec.sources:
            out[src] = spec.shape[1:] if is_expert_stack(name) else spec.shape
    return out


def count_parameters(config) -> Tuple[int, int]:
    """(total, active per token): active counts every dense weight and k of the E experts."""
    config = _shapes(config)
    total = active = 0
    for name, spec in parameter_specs(config).items():
        n = 1
        for d in spec.shape:
            n *= d
        total += n
        active += n * config.num_experts_per_tok // config.num_local_experts if is_expert_stack(name) else n
    return total, active
