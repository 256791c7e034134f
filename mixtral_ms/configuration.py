"""Mixtral configuration: Hugging Face field names, plus the MoE-capacity knobs HF lacks."""
from __future__ import annotations

import math
from typing import Any, Optional

from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .hf_config import ConfigError, hf_fields, read_hf_config

DROP_POLICIES = ("probs", "position")
ROUTER_TYPES = ("mixtral", "switch", "gshard", "rre")  # mixtral_ms/router.py
DTYPES = ("float32", "bfloat16", "float16")

# Keys MindFormers' trainer or PretrainedConfig attach to every model config; accepted, not validated.
_FRAMEWORK_KEYS = {
    "type", "parallel_config", "moe_config", "checkpoint_name_or_path", "batch_size", "use_past",
    "is_dynamic", "recompute_config", "architectures", "model_type", "name_or_path", "pretrained_model_dir",
    "mindformers_version", "tokenizer_class", "is_encoder_decoder", "quantization_config", "pet_config",
    "_commit_hash", "is_sample_acceleration", "quantization", "max_decode_length", "top_k", "top_p",
    "do_sample", "repetition_penalty", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "attention_dropout", "hidden_act", "initializer_range", "output_router_logits", "use_cache",
    "rope_parameters", "rope_scaling", "auto_register", "calculate_per_token_loss", "dataset_config",
    "disable_lazy_inline",
}


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class MixtralConfig(PretrainedConfig):
    """Mixtral hyper-parameters. Defaults are Mixtral-8x7B-v0.1's.

    `capacity_factor` bounds expert load in training (`<= 0`: dropless); `inference_capacity_factor`
    does the same in eval mode and defaults to dropless, since capacity only matters for training
    throughput. `moe_token_groups` splits the tokens into groups that get capacity separately; the
    parallel plan sets it to the data-parallel degree so capacity is per data-parallel shard.

    `router_type` (router.py): `mixtral` (top-k, renormalised), `switch` (top-1, un-renormalised
    probability), `gshard` (top-2, second choice sampled in training) or `rre` (Pangu-Sigma random
    routed experts: `rre_groups` equal expert groups, one per domain id of the data, and inside a
    group a fixed token-id -> expert map per layer drawn from `rre_seed`).
    """

    model_type = "mixtral"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim: Optional[int] = None,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        sliding_window: Optional[int] = None,
        num_local_experts: int = 8,
        num_experts_per_tok: int = 2,
        router_aux_loss_coef: float = 0.02,
        router_z_loss_coef: float = 0.0,
        router_jitter_noise: float = 0.0,
        capacity_factor: float = 1.1,
        inference_capacity_factor: float = 0.0,
        drop_policy: str = "probs",
        moe_token_groups: int = 1,
        router_type: str = "mixtral",
        rre_groups: int = 1,
        rre_seed: int = 0,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        seq_length: int = 4096,
        compute_dtype: str = "float32",
        param_init_type: str = "float32",
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        ignore_token_id: int = -100,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(k for k in kwargs if k not in _FRAMEWORK_KEYS)
        if unknown:
            raise ConfigError(f"MixtralConfig: unknown key(s) {unknown}; see mixtral_ms/configuration.py")
        rope = kwargs.get("rope_parameters") or kwargs.get("rope_scaling")
        if isinstance(rope, dict) and "rope_theta" in rope:
            rope_theta = rope["rope_theta"]
        for key in ("type", "rope_parameters", "rope_scaling", "transformers_version", "torch_dtype", "dtype",
                    "attention_dropout", "hidden_act", "output_router_logits", "use_cache", "auto_register"):
            kwargs.pop(key, None)
        kwargs.setdefault("architectures", ["MixtralForCausalLM"])
        kwargs.setdefault("batch_size", 1)  # MindFormers' predict pipeline reads it
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.sliding_window = sliding_window
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_jitter_noise = router_jitter_noise
        self.capacity_factor = capacity_factor
        self.inference_capacity_factor = inference_capacity_factor
        self.drop_policy = drop_policy
        self.moe_token_groups = moe_token_groups
        self.router_type = router_type
        self.rre_groups = rre_groups
        self.rre_seed = rre_seed
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.seq_length = seq_length
        self.compute_dtype = compute_dtype
        self.param_init_type = param_init_type
        self.ignore_token_id = ignore_token_id
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                    "max_position_embeddings", "moe_token_groups", "seq_length", "rre_groups")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MixtralConfig: {name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"MixtralConfig: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_local_experts ({self.num_local_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"MixtralConfig: num_attention_heads ({self.num_attention_heads}) is not divisible "
                              f"by num_key_value_heads ({self.num_key_value_heads})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"MixtralConfig: sliding_window must be null or a positive integer, "
                              f"got {self.sliding_window!r}")
        self._validate_router()
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"MixtralConfig: drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        for name in ("compute_dtype", "param_init_type"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"MixtralConfig: {name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("capacity_factor", "inference_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef",
                     "router_jitter_noise", "rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"MixtralConfig: {name} must be a number, got {value!r}")

    def _validate_router(self) -> None:
        kind, k, e, groups = self.router_type, self.num_experts_per_tok, self.num_local_experts, self.rre_groups
        if kind not in ROUTER_TYPES:
            raise ConfigError(f"MixtralConfig: router_type must be one of {ROUTER_TYPES}, got {kind!r}")
        if kind == "switch" and k != 1:
            raise ConfigError(f"MixtralConfig: router_type switch routes each token to one expert; "
                              f"num_experts_per_tok must be 1, got {k}")
        if kind == "gshard" and k != 2:
            raise ConfigError(f"MixtralConfig: router_type gshard samples the second of two experts; "
                              f"num_experts_per_tok must be 2, got {k}")
        if not isinstance(self.rre_seed, int) or isinstance(self.rre_seed, bool) or self.rre_seed < 0:
            raise ConfigError(f"MixtralConfig: rre_seed must be a non-negative integer, got {self.rre_seed!r}")
        if kind != "rre" and groups != 1:
            raise ConfigError(f"MixtralConfig: rre_groups {groups} needs router_type rre (got {kind!r})")
        if kind == "rre" and (e % groups or k > e // groups):
            raise ConfigError(f"MixtralConfig: router_type rre needs num_local_experts ({e}) divisible by "
                              f"rre_groups ({groups}) and num_experts_per_tok ({k}) <= experts per group")

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides: Any) -> "MixtralConfig":
        """Build from a Hugging Face config.json dict (top-level `rope_theta` or transformers-5 `rope_parameters`)."""
        return cls(**{**hf_fields(hf), **overrides})

    @classmethod
    def from_hf_dir(cls, path: str, **overrides: Any) -> "MixtralConfig":
        """Read `<path>/config.json` (a Hugging Face model folder)."""
        return cls.from_hf_config(read_hf_config(path), **overrides)

    def to_hf_config(self) -> dict:
        """The Hugging Face config.json dict (top-level `rope_theta`, as the released checkpoints)."""
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "sliding_window": self.sliding_window,
            "num_local_experts": self.num_local_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "router_aux_loss_coef": self.router_aux_loss_coef, "router_jitter_noise": self.router_jitter_noise,
            "output_router_logits": False, "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range, "hidden_act": "silu", "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[self.param_init_type],
            "use_cache": True,
            # Not Hugging Face fields: written only for the routers Hugging Face's Mixtral does not have.
            **({"router_type": self.router_type, "rre_groups": self.rre_groups, "rre_seed": self.rre_seed}
               if self.router_type != "mixtral" else {}),
        }
