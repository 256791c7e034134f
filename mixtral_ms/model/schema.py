"""The Mixtral model schema, MindSpore-free: every hyper-parameter with its default (Mixtral-8x7B-v0.1's),
the sizes derived from them and the checks, plus reading a Hugging Face config.json.

`MixtralConfig` (the MindFormers config), the checkpoint converter (config.json) and the parallel layout
(a YAML's model_config) all read the model through `ModelDims`. Tools that only need shapes stay light:
importing MindSpore and MindFormers costs ~600 MB of RSS and seconds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

from mixtral_ms.cli import BadInput


class ConfigError(BadInput, ValueError):
    """A configuration that cannot describe a Mixtral model."""


DROP_POLICIES = ("probs", "position")
ROUTER_TYPES = ("mixtral", "switch", "gshard", "rre")  # mixtral_ms/model/router.py
SCORE_FUNCTIONS = ("softmax", "sigmoid")
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global_batch")
MODEL_TYPES = ("mixtral", "mistral")  # config.json model_type: a Mistral (dense) folder reads as one expert
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Mixtral hyper-parameters, Hugging Face field names plus the MoE-capacity knobs HF lacks; checked on
    construction (one-line ConfigError naming the field).

    `capacity_factor` bounds expert load in training (`<= 0`: dropless); `inference_capacity_factor`
    does the same in eval mode and defaults to dropless, since capacity only matters for training
    throughput. `moe_token_groups` splits the tokens into groups that get capacity separately (one per
    data-parallel shard under the parallel plan); `static_dispatch` keeps eval mode on the static
    `[E, C, H]` dispatch, as sharding needs (ParallelLayout.model_fields sets both). `num_key_value_heads`
    None means multi-head attention;
    `head_dim` None means hidden_size // num_attention_heads.

    Compression (scripts/compress.py, docs/compression.md): `dynamic_skip_betas` (one per layer) drops a
    token's j-th expert (j >= 1) when its routing weight is below beta times the first one's;
    `expert_quantization` ({"bits": 8, "group_size": G or null}) stores experts as int8 + scales;
    `hf_model_type` "mistral" marks a dense checkpoint (one expert per layer, top-1, named `mlp.*`).

    `router_type` (router.py): `mixtral` (top-k, renormalised), `switch` (top-1, un-renormalised
    probability), `gshard` (top-2, second choice sampled in training) or `rre` (Pangu-Sigma random
    routed experts: `rre_groups` equal expert groups, one per domain id of the data, and inside a
    group a fixed token-id -> expert map per layer drawn from `rre_seed`).

    Balancing and scoring (docs/experts.md, "MoE options"): `router_score_function` sigmoid scores experts
    independently and renormalises the top k (DeepSeek-V3); `router_bias_update_rate` > 0 adds a per-expert
    bias to the scores for top-k selection only, moved once per optimizer step by rate * sign(mean load -
    load) (aux-loss-free balancing); `router_aux_loss_scope` is the token set the load-balancing loss
    averages over: each forward pass (`micro_batch`, Hugging Face's), each `sequence`, or the step's
    `global_batch`. `num_shared_experts` N > 0 adds N always-on SwiGLU experts of width
    `shared_expert_intermediate_size` (default intermediate_size), stored fused as one of width N times
    that, optionally scaled by a sigmoid gate (`shared_expert_gate`, Qwen2-MoE).

    Layer pattern (`moe_layers`): layer i is MoE when i >= `first_k_dense`, (i + 1) % `moe_layer_freq` == 0
    (Qwen2-MoE's decoder_sparse_step: 2 is GShard's and Switch's every other layer) and i is not in
    `mlp_only_layers`; the others are dense SwiGLU (`mlp.{gate,up,down}_proj`, Mistral's names). Default:
    every layer MoE (Mixtral).
    """
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: Optional[int] = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    capacity_factor: float = 1.1
    inference_capacity_factor: float = 0.0
    drop_policy: str = "probs"
    moe_token_groups: int = 1
    static_dispatch: bool = False
    router_type: str = "mixtral"
    rre_groups: int = 1
    rre_seed: int = 0
    router_score_function: str = "softmax"
    router_bias_update_rate: float = 0.0
    router_aux_loss_scope: str = "micro_batch"
    num_shared_experts: int = 0
    shared_expert_intermediate_size: Optional[int] = None
    shared_expert_gate: bool = False
    moe_layer_freq: int = 1
    first_k_dense: int = 0
    mlp_only_layers: Optional[list] = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    seq_length: int = 4096
    compute_dtype: str = "float32"
    param_init_type: str = "float32"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = 0
    ignore_token_id: int = -100
    dynamic_skip_betas: Optional[list] = None
    expert_quantization: Optional[dict] = None
    hf_model_type: str = "mixtral"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads"):
            _positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                     "num_local_experts", "num_experts_per_tok", "max_position_embeddings", "moe_token_groups",
                     "seq_length"):
            _positive_int(name, getattr(self, name))
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_local_experts ({self.num_local_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not divisible "
                              f"by num_key_value_heads ({self.num_key_value_heads})")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window, " or null")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        self._check_router()
        for name in ("compute_dtype", "param_init_type"):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("capacity_factor", "inference_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef",
                     "router_jitter_noise", "rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        for name in ("tie_word_embeddings", "static_dispatch", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_compression()

    def _check_router(self) -> None:
        kind, k, e, groups = self.router_type, self.num_experts_per_tok, self.num_local_experts, self.rre_groups
        if kind not in ROUTER_TYPES:
            raise ConfigError(f"router_type must be one of {ROUTER_TYPES}, got {kind!r}")
        if kind == "switch" and k != 1:
            raise ConfigError(f"router_type switch routes each token to one expert; num_experts_per_tok must be 1, "
                              f"got {k}")
        if kind == "gshard" and k != 2:
            raise ConfigError(f"router_type gshard samples the second of two experts; num_experts_per_tok must be 2, "
                              f"got {k}")
        _positive_int("rre_groups", groups)
        if not isinstance(self.rre_seed, int) or isinstance(self.rre_seed, bool) or self.rre_seed < 0:
            raise ConfigError(f"rre_seed must be a non-negative integer, got {self.rre_seed!r}")
        if kind != "rre" and groups != 1:
            raise ConfigError(f"rre_groups {groups} needs router_type rre (got {kind!r})")
        if kind == "rre" and (e % groups or k > e // groups):
            raise ConfigError(f"router_type rre needs num_local_experts ({e}) divisible by rre_groups ({groups}) "
                              f"and num_experts_per_tok ({k}) <= experts per group")
        self._check_balancing()

    def _check_balancing(self) -> None:
        rate = self.router_bias_update_rate
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < math.inf:
            raise ConfigError(f"router_bias_update_rate must be a number >= 0 (0: off), got {rate!r}")
        if self.router_score_function not in SCORE_FUNCTIONS:
            raise ConfigError(f"router_score_function must be one of {SCORE_FUNCTIONS}, "
                              f"got {self.router_score_function!r}")
        if self.router_aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ConfigError(f"router_aux_loss_scope must be one of {AUX_LOSS_SCOPES}, "
                              f"got {self.router_aux_loss_scope!r}")
        if self.router_type == "rre" and (rate or self.router_score_function != "softmax"):
            raise ConfigError("router_type rre routes by token id, without scores: router_bias_update_rate and "
                              "router_score_function sigmoid need a learned router")
        if not isinstance(self.num_shared_experts, int) or isinstance(self.num_shared_experts, bool) \
                or self.num_shared_experts < 0:
            raise ConfigError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.shared_expert_intermediate_size is None:
            object.__setattr__(self, "shared_expert_intermediate_size", self.intermediate_size)
        _positive_int("shared_expert_intermediate_size", self.shared_expert_intermediate_size)
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError("shared_expert_gate needs num_shared_experts > 0")
        _positive_int("moe_layer_freq", self.moe_layer_freq)
        layers, only = self.num_hidden_layers, self.mlp_only_layers
        if not isinstance(self.first_k_dense, int) or isinstance(self.first_k_dense, bool) or self.first_k_dense < 0:
            raise ConfigError(f"first_k_dense must be an integer >= 0, got {self.first_k_dense!r}")
        if only is not None and (not isinstance(only, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in only)):
            raise ConfigError(f"mlp_only_layers must be null or a list of layer indices 0..{layers - 1}, got {only!r}")
        if not moe_layers(self):
            raise ConfigError(f"no MoE layer: moe_layer_freq {self.moe_layer_freq}, first_k_dense {self.first_k_dense} "
                              f"and mlp_only_layers {only} leave all {layers} layers dense")

    def _check_compression(self) -> None:
        betas = self.dynamic_skip_betas
        if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) != self.num_hidden_layers
                                  or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                             and 0 <= b < math.inf for b in betas)):
            raise ConfigError(f"dynamic_skip_betas must be null or {self.num_hidden_layers} non-negative numbers "
                              f"(one per layer), got {betas!r}")
        quant = self.expert_quantization
        if quant is not None:
            if not isinstance(quant, dict) or quant.get("bits") != 8 or set(quant) - {"bits", "group_size"}:
                raise ConfigError(f"expert_quantization must be {{'bits': 8, 'group_size': G or null}}, got {quant!r}")
            group = quant.get("group_size")
            if group is not None and (not isinstance(group, int) or group <= 0 or self.hidden_size % group
                                      or self.intermediate_size % group):
                raise ConfigError(f"expert_quantization group_size {group!r} must divide hidden_size "
                                  f"({self.hidden_size}) and intermediate_size ({self.intermediate_size})")
        if self.hf_model_type not in MODEL_TYPES:
            raise ConfigError(f"hf_model_type must be one of {MODEL_TYPES}, got {self.hf_model_type!r}")
        if self.hf_model_type == "mistral" and (self.num_local_experts, self.num_experts_per_tok) != (1, 1):
            raise ConfigError("a dense (mistral) model has one expert, top-1")


FIELDS = tuple(f.name for f in dataclasses.fields(ModelDims))


def moe_layers(config: Any) -> tuple:
    """The indices of the MoE layers of a ModelDims or MixtralConfig (the rule in ModelDims' docstring)."""
    dense = set(config.mlp_only_layers or ())
    return tuple(i for i in range(config.num_hidden_layers) if i >= config.first_k_dense
                 and (i + 1) % config.moe_layer_freq == 0 and i not in dense)


MAX_DIM = 2 ** 31 - 1  # token ids and positions are int32; MindSpore fails in C++ on a size beyond its shapes


def _positive_int(name: str, value: Any, alternative: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer{alternative}, got {value!r}")
    if value > MAX_DIM:
        raise ConfigError(f"{name} {value} is beyond any model this code can build (at most {MAX_DIM})")


def model_dims(model: Any) -> ModelDims:
    """ModelDims from a MixtralConfig (or any object with its fields) or a mapping such as a YAML's
    `model_config` (other keys, such as `type`, are ignored); missing fields take the defaults."""
    if isinstance(model, ModelDims):
        return model
    if isinstance(model, Mapping):
        return ModelDims(**{k: model[k] for k in FIELDS if k in model})
    return ModelDims(**{k: getattr(model, k) for k in FIELDS if hasattr(model, k)})


# Fields of the MoE options (schema docstring) with their defaults: config.json carries those set otherwise.
MOE_OPTIONS = {"router_score_function": "softmax", "router_bias_update_rate": 0.0,
               "router_aux_loss_scope": "micro_batch", "num_shared_experts": 0, "shared_expert_gate": False,
               "moe_layer_freq": 1, "first_k_dense": 0, "mlp_only_layers": None}
# Hugging Face config.json fields MixtralConfig takes as they are (rope_theta is read separately).
_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window",
              "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
              "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
              "router_type", "rre_groups", "rre_seed",  # mixtral-ms routers, absent from HF's
              "dynamic_skip_betas", "expert_quantization",  # compression (mixtral_ms/tools/compress), likewise
              *MOE_OPTIONS, "shared_expert_intermediate_size")
# Fields a config.json must name: they fix the parameter shapes and have no safe default.
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_local_experts", "num_experts_per_tok")


def hf_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """MixtralConfig keyword arguments from a config.json dict: top-level `rope_theta` (released
    checkpoints) or transformers-5 `rope_parameters`; only default RoPE. A Mistral config (a dense model,
    e.g. `scripts/compress.py densify` output) reads as one expert taking every token (top-1)."""
    if not isinstance(hf, dict):
        raise ConfigError("config.json must hold a JSON object")
    if hf.get("model_type") not in MODEL_TYPES:
        raise ConfigError(f"not a Mixtral config: model_type is {hf.get('model_type')!r}, expected 'mixtral' "
                          "(or 'mistral' for a dense model)")
    for key in ("torch_dtype", "dtype"):
        if hf.get(key) is not None and not isinstance(hf[key], str):
            raise ConfigError(f"config.json {key} must be a dtype name such as 'bfloat16', got {hf[key]!r}")
    kwargs = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
    if hf["model_type"] == "mistral":
        kwargs.update(num_local_experts=1, num_experts_per_tok=1, hf_model_type="mistral")
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


def hf_config(dims: ModelDims) -> Dict[str, Any]:
    """The Hugging Face config.json dict (top-level `rope_theta`, as the released checkpoints); a
    MistralForCausalLM config for a dense (hf_model_type mistral) model. MindSpore-free: expert surgery reads
    a run YAML's model through it without importing MindFormers (MixtralConfig.to_hf_config is this)."""
    hf = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": dims.vocab_size, "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size, "num_hidden_layers": dims.num_hidden_layers,
        "num_attention_heads": dims.num_attention_heads, "num_key_value_heads": dims.num_key_value_heads,
        "head_dim": dims.head_dim, "max_position_embeddings": dims.max_position_embeddings,
        "rms_norm_eps": dims.rms_norm_eps, "rope_theta": float(dims.rope_theta),
        "sliding_window": dims.sliding_window,
        "num_local_experts": dims.num_local_experts, "num_experts_per_tok": dims.num_experts_per_tok,
        "router_aux_loss_coef": dims.router_aux_loss_coef, "router_jitter_noise": dims.router_jitter_noise,
        "output_router_logits": False, "tie_word_embeddings": dims.tie_word_embeddings,
        "initializer_range": dims.initializer_range, "hidden_act": "silu", "attention_dropout": 0.0,
        "bos_token_id": dims.bos_token_id, "eos_token_id": dims.eos_token_id, "pad_token_id": dims.pad_token_id,
        "torch_dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dims.param_init_type],
        "use_cache": True,
        # Not Hugging Face fields: written only for the routers Hugging Face's Mixtral does not have.
        **({"router_type": dims.router_type, "rre_groups": dims.rre_groups, "rre_seed": dims.rre_seed}
           if dims.router_type != "mixtral" else {}),
    }
    hf.update({k: getattr(dims, k) for k, default in MOE_OPTIONS.items() if getattr(dims, k) != default})
    if dims.mlp_only_layers is not None:
        hf["mlp_only_layers"] = list(dims.mlp_only_layers)
    if dims.num_shared_experts:
        hf["shared_expert_intermediate_size"] = dims.shared_expert_intermediate_size
    if dims.dynamic_skip_betas is not None:
        hf["dynamic_skip_betas"] = list(dims.dynamic_skip_betas)
    if dims.expert_quantization is not None:
        hf["expert_quantization"] = dict(dims.expert_quantization)
    if dims.hf_model_type == "mistral":
        for key in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
                    "output_router_logits"):
            del hf[key]
        hf.update(architectures=["MistralForCausalLM"], model_type="mistral")
    return hf


def read_hf_config(folder: str) -> Dict[str, Any]:
    """`<folder>/config.json` as a dict, with one-line errors for a missing or malformed file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: malformed JSON ({err})") from None


def hf_dims(hf: Dict[str, Any]) -> ModelDims:
    """The checked ModelDims of a config.json dict, which must name every shape-fixing field."""
    fields = hf_fields(hf)
    missing = [k for k in _HF_REQUIRED if k not in fields]
    if missing:
        raise ConfigError(f"config.json lacks {missing[0]!r}")
    return ModelDims(**fields)
