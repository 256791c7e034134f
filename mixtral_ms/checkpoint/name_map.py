"""The checkpoint schema: which tensors each layout holds, their shapes, and the Hugging Face <->
mixtral-ms name map (the table in docs/design.md). Loading (load.py) and converting (convert.py)
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

`parse(name)` takes any parameter name of either layout apart (a ParamName: kind, layer, projection,
expert) and `ParamName.name` writes one back: `_PATTERNS` is the naming scheme, written down once, and
parameter_specs, the checkpoint view, the tools and freeze read and build names through it.
"""
from __future__ import annotations

import enum
import re
import string
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from mixtral_ms.checkpoint.safetensors_io import FLOAT_TAGS, ArrayTensor, CheckpointError, TensorInfo
from mixtral_ms.model.schema import hf_dims, moe_layers

# The freeze masks' names (run/freeze.py): `freeze_mask.<parameter>`; never loaded from a checkpoint.
FREEZE_MASK_PREFIX = "freeze_mask."
# The training side channel (losses.TrainingStats; `router_stats.` its older name): one step's statistics.
SIDE_CHANNEL_PREFIXES = ("training_stats.", "router_stats.")
# Optimizer and training-loop state that a MindSpore training checkpoint carries beside the weights
# (and a distillation run's frozen teacher, run/distill.py).
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "global_step", "learning_rate",
                           "scale_sense", "loss_scale", "epoch_num", "step_num", "current_iterator_step",
                           "last_overflow_iterator_step", "accu_grads.", "beta1_power", "beta2_power",
                           *SIDE_CHANNEL_PREFIXES, "global_batch_size", "teacher.", FREEZE_MASK_PREFIX)
# Training state a layer holds: each router's count of the step's tokens for the bias (router.TopKRouter).
TRAINING_STATE_SUFFIXES = (".gate.tokens_per_expert",)


def is_training_state(name: str) -> bool:
    """A name a training checkpoint carries that is no model weight: never converted, never required when
    loading weights."""
    return name.startswith(TRAINING_STATE_PREFIXES) or name.endswith(TRAINING_STATE_SUFFIXES)


def is_step_state(name: str) -> bool:
    """Training state that holds one step's counts (the side channel, the routers' token counts): never
    resumed."""
    return name.startswith(SIDE_CHANNEL_PREFIXES) or name.endswith(TRAINING_STATE_SUFFIXES)

# Mistral's dense MLP names for the expert weights (w1 gate, w3 up, w2 down).
MISTRAL_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_OF_MLP = {proj: w for w, proj in MISTRAL_MLP.items()}


class Kind(enum.Enum):
    """What a parameter is, whichever layout names it."""
    EMBEDDING = "embedding"
    ATTENTION = "attention"  # proj: q_proj, k_proj, v_proj, o_proj
    NORM = "norm"  # a layer's; proj: input_layernorm, post_attention_layernorm
    MLP = "mlp"  # a dense (Mistral) layer's FFN; proj: gate_proj, up_proj, down_proj
    ROUTER = "router"  # the gate's weight [E, H]
    ROUTER_BIAS = "router_bias"  # aux-loss-free balancing's bias [E]
    EXPERTS = "experts"  # mixtral-ms: a layer's experts stacked on axis 0; proj: w1, w2, w3
    EXPERT = "expert"  # Hugging Face: one expert's weight; expert: its index
    EXPERT_SCALE = "expert_scale"  # int8 experts' scales; proj: the weight they scale
    SHARED_EXPERT = "shared_expert"  # proj: gate_proj, up_proj, down_proj
    SHARED_EXPERT_GATE = "shared_expert_gate"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"


_MOE = "model.layers.{layer}.block_sparse_moe."
# Every parameter name, both layouts: the one place the naming scheme is written down.
_PATTERNS = {
    Kind.EMBEDDING: "model.embed_tokens.weight",
    Kind.ATTENTION: "model.layers.{layer}.self_attn.{proj}.weight",
    Kind.NORM: "model.layers.{layer}.{proj}.weight",
    Kind.MLP: "model.layers.{layer}.mlp.{proj}.weight",
    Kind.ROUTER: _MOE + "gate.weight",
    Kind.ROUTER_BIAS: _MOE + "gate.e_score_correction_bias",
    Kind.EXPERTS: _MOE + "experts.{proj}",
    Kind.EXPERT: _MOE + "experts.{expert}.{proj}.weight",
    Kind.EXPERT_SCALE: _MOE + "experts.{proj}_scale",
    Kind.SHARED_EXPERT: _MOE + "shared_expert.{proj}.weight",
    Kind.SHARED_EXPERT_GATE: _MOE + "shared_expert_gate.weight",
    Kind.FINAL_NORM: "model.norm.weight",
    Kind.LM_HEAD: "lm_head.weight",
}
_EXPERT_WEIGHTS = ("w1", "w2", "w3")
_FFN = ("gate_proj", "up_proj", "down_proj")
_PROJECTIONS = {Kind.ATTENTION: ("q_proj", "k_proj", "v_proj", "o_proj"),
                Kind.NORM: ("input_layernorm", "post_attention_layernorm"), Kind.MLP: _FFN,
                Kind.EXPERTS: _EXPERT_WEIGHTS, Kind.EXPERT: _EXPERT_WEIGHTS, Kind.EXPERT_SCALE: _EXPERT_WEIGHTS,
                Kind.SHARED_EXPERT: _FFN}
_MOE_KINDS = (Kind.ROUTER, Kind.ROUTER_BIAS, Kind.EXPERTS, Kind.EXPERT, Kind.EXPERT_SCALE, Kind.SHARED_EXPERT,
              Kind.SHARED_EXPERT_GATE)


def _regex(kind: Kind) -> "re.Pattern[str]":
    """A pattern of _PATTERNS as a regex whose groups are its fields."""
    fields = {"layer": r"(?P<layer>\d+)", "expert": r"(?P<expert>\d+)",
              "proj": "(?P<proj>" + "|".join(_PROJECTIONS.get(kind, ())) + ")"}
    return re.compile("".join(re.escape(text) + (fields[field] if field else "")
                              for text, field, _, _ in string.Formatter().parse(_PATTERNS[kind])))


_REGEXES = {kind: _regex(kind) for kind in _PATTERNS}


class ParamName(NamedTuple):
    """A parameter name taken apart: what it is, its layer and projection, and (Hugging Face experts) its
    expert. `name` puts it back together, so names are built and read by the same table."""
    kind: Kind
    layer: Optional[int] = None
    proj: Optional[str] = None
    expert: Optional[int] = None

    @property
    def name(self) -> str:
        return _PATTERNS[self.kind].format(layer=self.layer, proj=self.proj, expert=self.expert)

    @property
    def moe(self) -> bool:
        """Part of a layer's MoE block (router, experts, shared experts)."""
        return self.kind in _MOE_KINDS

    def stack(self) -> Optional["ParamName"]:
        """The mixtral-ms expert stack this tensor belongs to: a Hugging Face expert's, an int8 scale's
        weights, or a dense MLP's (Mistral's FFN read as one expert); None for any other parameter."""
        if self.kind in (Kind.EXPERTS, Kind.EXPERT, Kind.EXPERT_SCALE):
            return ParamName(Kind.EXPERTS, self.layer, self.proj)
        if self.kind is Kind.MLP:
            return ParamName(Kind.EXPERTS, self.layer, _EXPERT_OF_MLP[self.proj])
        return None

    def of_expert(self, expert: int) -> "ParamName":
        """Expert `expert` of this expert stack under its Hugging Face name."""
        return ParamName(Kind.EXPERT, self.layer, self.proj, expert)


def parse(name: str) -> Optional[ParamName]:
    """What a mixtral-ms or Hugging Face parameter name says; None for a name that is no Mixtral parameter
    (training state, a typo, another model's)."""
    for kind, regex in _REGEXES.items():
        m = regex.fullmatch(name)
        if m:
            fields = m.groupdict()
            layer, expert = fields.get("layer"), fields.get("expert")
            return ParamName(kind, None if layer is None else int(layer), fields.get("proj"),
                             None if expert is None else int(expert))
    return None


class ParamSpec(NamedTuple):
    shape: Tuple[int, ...]
    sources: List[str]  # Hugging Face names, stacked along a new axis 0 when `stacked`; none: no HF tensor
    stacked: bool = False  # experts: one Hugging Face tensor per row of axis 0
    zero_if_absent: bool = False  # a checkpoint may lack it (the router bias): then it reads as zeros


def hf_to_ms(hf_name: str) -> Tuple[str, Optional[int]]:
    """(mixtral-ms name, expert index or None): `...experts.3.w1.weight` -> (`...experts.w1`, 3)."""
    parsed = parse(hf_name)
    if parsed is not None and parsed.kind is Kind.EXPERT:
        return parsed.stack().name, parsed.expert
    return hf_name, None


def is_expert_stack(ms_name: str) -> bool:
    """Whether a mixtral-ms parameter stacks the experts on axis 0 (true even for a single expert)."""
    parsed = parse(ms_name)
    return parsed is not None and parsed.kind is Kind.EXPERTS


def ms_to_hf(ms_name: str, num_experts: int) -> List[str]:
    """The Hugging Face names a mixtral-ms parameter is made of (E names for stacked experts, in order)."""
    parsed = parse(ms_name)
    if parsed is not None and parsed.kind is Kind.EXPERTS:
        return [parsed.of_expert(e).name for e in range(num_experts)]
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
    specs: Dict[str, ParamSpec] = {}

    def add(param: ParamName, shape: Tuple[int, ...], sources: Optional[List[str]] = None, **flags: bool) -> str:
        specs[param.name] = ParamSpec(shape, [param.name] if sources is None else sources, **flags)
        return param.name

    add(ParamName(Kind.EMBEDDING), (v, h))
    sparse = moe_layers(config)
    for i in range(config.num_hidden_layers):
        add(ParamName(Kind.NORM, i, "input_layernorm"), (h,))
        for proj, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
            add(ParamName(Kind.ATTENTION, i, proj), shape)
        add(ParamName(Kind.NORM, i, "post_attention_layernorm"), (h,))
        if i not in sparse:  # a dense layer of the layer pattern: Mistral's MLP
            for proj, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
                add(ParamName(Kind.MLP, i, proj), shape)
            continue
        add(ParamName(Kind.ROUTER, i), (e, h), [] if dense else None)  # a dense model has no router: zeros
        if config.router_bias_update_rate > 0:
            add(ParamName(Kind.ROUTER_BIAS, i), (e,), zero_if_absent=True)
        for w, shape in (("w1", (e, f, h)), ("w3", (e, f, h)), ("w2", (e, h, f))):
            stack = ParamName(Kind.EXPERTS, i, w)
            sources = [ParamName(Kind.MLP, i, MISTRAL_MLP[w]).name] if dense else \
                [stack.of_expert(j).name for j in range(e)]
            add(stack, shape, sources, stacked=True)
            if quant is not None:
                groups = shape[2] // (quant.get("group_size") or shape[2])
                add(ParamName(Kind.EXPERT_SCALE, i, w), shape[:2] + (groups,))
        if config.num_shared_experts:
            width = config.num_shared_experts * config.shared_expert_intermediate_size
            for proj, shape in (("gate_proj", (width, h)), ("up_proj", (width, h)), ("down_proj", (h, width))):
                add(ParamName(Kind.SHARED_EXPERT, i, proj), shape)
            if config.shared_expert_gate:
                add(ParamName(Kind.SHARED_EXPERT_GATE, i), (1, h))
    add(ParamName(Kind.FINAL_NORM), (h,))
    if not config.tie_word_embeddings:
        add(ParamName(Kind.LM_HEAD), (v, h))
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
    tensors = {k: v for k, v in tensors.items() if not is_training_state(k)}
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
    return any(is_expert_stack(n) for n in tensors)
