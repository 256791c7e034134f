"""The checkpoint schema: which tensors each layout holds, their shapes, and the Hugging Face <->
mixtral-ms name map (the table in docs/design.md). Loading (checkpoint.py) and converting (convert.py)
both check a checkpoint here, so a checkpoint the converter accepts is exactly one the model loads.

Names are identical except the experts: the checkpoint has one w1/w3/w2 per expert
(`model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight [F, H]`), the model one stacked tensor per
layer (`model.layers.{i}.block_sparse_moe.experts.w1 [E, F, H]`) whose rows are the experts in order.
A dense Mistral checkpoint (`mlp.gate_proj/up_proj/down_proj`) maps to one expert, w1/w3/w2, and has no
router. int8 experts (mixtral_ms/model/moe.py, Int8Experts) add one `experts.w1_scale [E, out, in / group_size]` per weight.
The MoE options add tensors of the same name on both sides: the router bias of aux-loss-free balancing
(`gate.e_score_correction_bias [E]`, DeepSeek-V3's name; zeros when a checkpoint lacks it, so a model
starts balancing from any checkpoint) and the shared experts (`shared_expert.{gate,up,down}_proj.weight`,
`shared_expert_gate.weight [1, H]`: Qwen2-MoE's names under the block's `block_sparse_moe`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from mixtral_ms.checkpoint.safetensors_io import FLOAT_TAGS, ArrayTensor, CheckpointError, TensorInfo
from mixtral_ms.model.schema import hf_dims, moe_layers

# The freeze masks' names (training/freeze.py): `freeze_mask.<parameter>`; never loaded from a checkpoint.
FREEZE_MASK_PREFIX = "freeze_mask."
# Optimizer and training-loop state that a MindSpore training checkpoint carries beside the weights
# (and a distillation run's frozen teacher, training/distill.py).
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "global_step", "learning_rate",
                           "scale_sense", "loss_scale", "epoch_num", "step_num", "current_iterator_step",
                           "last_overflow_iterator_step", "accu_grads.", "beta1_power", "beta2_power",
                           "router_stats.", "global_batch_size", "teacher.", FREEZE_MASK_PREFIX)

_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")
_MS_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(w[123])$")


# Mistral's dense MLP names for the expert weights (w1 gate, w3 up, w2 down).
MISTRAL_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class ParamSpec(NamedTuple):
    shape: Tuple[int, ...]
    sources: List[str]  # Hugging Face names, stacked along a new axis 0 when `stacked`; none: no HF tensor
    stacked: bool = False  # experts: one Hugging Face tensor per row of axis 0
    zero_if_absent: bool = False  # a checkpoint may lack it (the router bias): then it reads as zeros


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
    """A MixtralConfig, a schema.ModelDims, or a config.json dict."""
    return hf_dims(config) if isinstance(config, dict) else config


def parameter_specs(config) -> Dict[str, ParamSpec]:
    """Every mixtral-ms parameter, in checkpoint order, with its shape and Hugging Face source names.
    `config`: a config.json dict (num_hidden_layers, num_local_experts, hidden_size, intermediate_size,
    num_attention_heads, num_key_value_heads, head_dim (optional), vocab_size, tie_word_embeddings),
    a MixtralConfig or a schema.ModelDims."""
    config = _shapes(config)
    h, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_local_experts
    dense, quant = config.hf_model_type == "mistral", config.expert_quantization
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    specs: Dict[str, ParamSpec] = {"model.embed_tokens.weight": ParamSpec((v, h), ["model.embed_tokens.weight"])}
    sparse = moe_layers(config)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        same = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
        }
        if i not in sparse:  # a dense layer of the layer pattern: Mistral's MLP
            same.update({"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)})
        for name, shape in same.items():
            specs[p + name] = ParamSpec(shape, [p + name])
        if i not in sparse:
            continue
        gate = p + "block_sparse_moe.gate.weight"
        specs[gate] = ParamSpec((e, h), [] if dense else [gate])  # a dense model has no router: zeros
        if config.router_bias_update_rate > 0:
            bias = p + "block_sparse_moe.gate.e_score_correction_bias"
            specs[bias] = ParamSpec((e,), [bias], zero_if_absent=True)
        for w, shape in (("w1", (e, f, h)), ("w3", (e, f, h)), ("w2", (e, h, f))):
            name = f"{p}block_sparse_moe.experts.{w}"
            sources = [f"{p}mlp.{MISTRAL_MLP[w]}.weight"] if dense else ms_to_hf(name, e)
            specs[name] = ParamSpec(shape, sources, stacked=True)
            if quant is not None:
                scale = f"{name}_scale"
                specs[scale] = ParamSpec(shape[:2] + (shape[2] // (quant.get("group_size") or shape[2]),), [scale])
        if config.num_shared_experts:
            width = config.num_shared_experts * config.shared_expert_intermediate_size
            shared = {f"{p}block_sparse_moe.shared_expert.{n}.weight": shape
                      for n, shape in (("gate_proj", (width, h)), ("up_proj", (width, h)), ("down_proj", (h, width)))}
            if config.shared_expert_gate:
                shared[f"{p}block_sparse_moe.shared_expert_gate.weight"] = (1, h)
            specs.update({name: ParamSpec(shape, [name]) for name, shape in shared.items()})
    specs["model.norm.weight"] = ParamSpec((h,), ["model.norm.weight"])
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = ParamSpec((v, h), ["lm_head.weight"])
    return specs


def hf_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every Hugging Face tensor the config implies, with its shape."""
    out = {}
    for name, spec in parameter_specs(config).items():
        for src in spec.sources:
            out[src] = spec.shape[1:] if spec.stacked else spec.shape
    return out


def count_parameters(config) -> Tuple[int, int]:
    """(total, active per token): active counts every dense weight and k of the E experts (int8 scales
    count as parameters of their experts)."""
    config = _shapes(config)
    total = active = 0
    for name, spec in parameter_specs(config).items():
        n = 1
        for d in spec.shape:
            n *= d
        total += n
        is_expert = spec.stacked or name.endswith("_scale")
        active += n * config.num_experts_per_tok // config.num_local_experts if is_expert else n
    return total, active


def source_dtype(infos: List[TensorInfo]) -> str:
    """The one float dtype tag (F32, BF16, F16) of a parameter's tensors (the experts of one layer stack)."""
    tags = sorted({i.dtype for i in infos})
    if len(tags) != 1:
        raise CheckpointError(f"tensor {infos[0].name!r}: experts of one layer have mixed dtypes {tags}")
    if tags[0] not in FLOAT_TAGS:
        raise CheckpointError(f"tensor {infos[0].name!r} has dtype {tags[0]}; expected one of {list(FLOAT_TAGS)}")
    return tags[0]


def _zeros(name: str, shape: Tuple[int, ...]) -> ArrayTensor:
    """A float32 zero tensor for a `zero_if_absent` entry a checkpoint lacks."""
    count = 1
    for d in shape:
        count *= d
    return ArrayTensor(name, "F32", shape, bytes(4 * count))


def _refuse_unexpected(tensors: Mapping[str, Any], wanted: Mapping[str, Any], what: str) -> None:
    unexpected = [n for n in tensors if n not in wanted]
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in checkpoint ({len(unexpected)} in all; "
                              f"not {what}?)")


def hf_sources(tensors: Dict[str, TensorInfo], config) -> Dict[str, List[TensorInfo]]:
    """For each mixtral-ms parameter, its Hugging Face tensors, with every name, shape and dtype checked."""
    specs = parameter_specs(config)
    wanted = hf_shapes(config)
    _refuse_unexpected(tensors, wanted, "a Mixtral with this config.json")
    tensors = {**{s: _zeros(s, wanted[s]) for sp in specs.values() if sp.zero_if_absent for s in sp.sources}, **tensors}
    out = {}
    for name, spec in specs.items():
        for src in spec.sources:
            if src not in tensors:
                missing = sum(s not in tensors for sp in specs.values() for s in sp.sources)
                raise CheckpointError(f"checkpoint is missing tensor {src!r} ({missing} missing in all)")
            if tensors[src].shape != wanted[src]:
                raise CheckpointError(f"tensor {src!r} has shape {list(tensors[src].shape)}, "
                                      f"config.json implies {list(wanted[src])}")
        out[name] = [tensors[s] for s in spec.sources]
        if out[name]:  # a dense model's router has no tensor
            source_dtype(out[name])
    return out


def ms_tensors(tensors: Mapping[str, TensorInfo], config, implied_by: str = "config.json") -> Dict[str, TensorInfo]:
    """The mixtral-ms parameters of a MindSpore checkpoint (training state dropped), names, shapes and
    dtypes checked. `tensors`: safetensors TensorInfo, or checkpoint.read_ckpt's ArrayTensor for a .ckpt."""
    tensors = {k: v for k, v in tensors.items() if not k.startswith(TRAINING_STATE_PREFIXES)}
    config = _shapes(config)
    specs = parameter_specs(config)
    _refuse_unexpected(tensors, specs, "a mixtral-ms checkpoint of this config")
    tensors = {**{n: _zeros(n, sp.shape) for n, sp in specs.items() if sp.zero_if_absent}, **tensors}
    for name, spec in specs.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        if tuple(tensors[name].shape) != spec.shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(tensors[name].shape)}, "
                                  f"{implied_by} implies {list(spec.shape)}")
        if spec.stacked and config.expert_quantization is not None:
            if tensors[name].dtype != "I8":
                raise CheckpointError(f"tensor {name!r} has dtype {tensors[name].dtype}; int8 experts "
                                      f"(expert_quantization in {implied_by}) are I8")
        else:
            source_dtype([tensors[name]])
    return {name: tensors[name] for name in specs}


def is_ms_layout(tensors: Mapping[str, TensorInfo]) -> bool:
    """Stacked experts (mixtral-ms) rather than one tensor per expert (Hugging Face)."""
    return any(n.endswith((".experts.w1", ".experts.w2", ".experts.w3")) for n in tensors)
