"""The Hugging Face <-> mixtral-ms parameter name map (see docs/design.md).

Names are identical except the experts: the checkpoint has one w1/w3/w2 per expert, the model one
stacked `[E, out, in]` tensor per layer, whose rows are the experts in order.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple



# Optimizer and training-loop state that a MindSpore training checkpoint carries beside the weights.
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "global_step", "learning_rate",
                           "scale_sense", "loss_scale", "epoch_num", "step_num", "current_iterator_step",
                           "last_overflow_iterator_step", "accu_grads.", "beta1_power", "beta2_power",
                           "router_stats.", "global_batch_size")


class ParamSpec(NamedTuple):
    shape: Tuple[int, ...]
    sources: List[str]  # Hugging Face names; several (stacked along a new axis 0) for experts


def parameter_specs(config) -> Dict[str, ParamSpec]:
    """Every mixtral-ms parameter, in checkpoint order, with its shape and Hugging Face source names.
    `config`: a MixtralConfig or hf_config.shape_config(...) (anything with those fields)."""
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
            specs[f"{p}block_sparse_moe.experts.{w}"] = ParamSpec(
                shape, [f"{p}block_sparse_moe.experts.{j}.{w}.weight" for j in range(e)])
    specs["model.norm.weight"] = ParamSpec((h,), ["model.norm.weight"])
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = ParamSpec((v, h), ["lm_head.weight"])
    return specs


def count_parameters(config) -> Tuple[int, int]:
    """(total, active per token): active counts k of the E experts and every dense weight."""
    total = active = 0
    for name, spec in parameter_specs(config).items():
        n = 1
        for d in spec.shape:
            n *= d
        total += n
        is_expert = ".experts." in name
        active += n * config.num_experts_per_tok // config.num_local_experts if is_expert else n
    return total, active
