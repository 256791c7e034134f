"""MixtralConfig: the model schema (mixtral_ms/model/schema.py) as the MindFormers config class the trainer builds."""
from __future__ import annotations

import dataclasses
from typing import Any

from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mixtral_ms.model.schema import FIELDS, ConfigError, ModelDims, hf_config, hf_fields, model_dims, read_hf_config

# Keys MindFormers' trainer or PretrainedConfig attach to every model config; accepted, not validated.
_FRAMEWORK_KEYS = {
    "type", "parallel_config", "moe_config", "checkpoint_name_or_path", "batch_size", "use_past",
    "is_dynamic", "recompute_config", "architectures", "model_type", "name_or_path", "pretrained_model_dir",
    "mindformers_version", "tokenizer_class", "is_encoder_decoder", "quantization_config", "pet_config",
    "_commit_hash", "is_sample_acceleration", "quantization", "max_decode_length", "top_k", "top_p",
    "do_sample", "repetition_penalty", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "attention_dropout", "hidden_act", "output_router_logits", "use_cache",
    "rope_parameters", "rope_scaling", "auto_register", "calculate_per_token_loss", "dataset_config",
    "disable_lazy_inline",
}


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class MixtralConfig(PretrainedConfig):
    """Mixtral hyper-parameters as MindFormers' PretrainedConfig. The fields, their defaults
    (Mixtral-8x7B-v0.1's) and their checks are `mixtral_ms.model.schema.ModelDims`'."""

    model_type = "mixtral"

    def __init__(self, **kwargs: Any) -> None:
        fields = {k: kwargs.pop(k) for k in FIELDS if k in kwargs}
        unknown = sorted(k for k in kwargs if k not in _FRAMEWORK_KEYS)
        if unknown:
            raise ConfigError(f"MixtralConfig: unknown key(s) {unknown}; the fields are those of mixtral_ms.model.schema.ModelDims")
        rope = kwargs.get("rope_parameters") or kwargs.get("rope_scaling")
        if isinstance(rope, dict) and "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        dims = ModelDims(**fields)
        for key in ("type", "rope_parameters", "rope_scaling", "transformers_version", "torch_dtype", "dtype",
                    "attention_dropout", "hidden_act", "output_router_logits", "use_cache", "auto_register"):
            kwargs.pop(key, None)
        kwargs.setdefault("architectures", ["MixtralForCausalLM"])
        kwargs.setdefault("batch_size", 1)  # MindFormers' predict pipeline reads it
        super().__init__(bos_token_id=dims.bos_token_id, eos_token_id=dims.eos_token_id,
                         pad_token_id=dims.pad_token_id, **kwargs)
        for key, value in dataclasses.asdict(dims).items():
            setattr(self, key, value)
        self.rope_theta = float(dims.rope_theta)

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field (after fields were changed in place)."""
        model_dims(self)

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides: Any) -> "MixtralConfig":
        """Build from a Hugging Face config.json dict (top-level `rope_theta` or transformers-5 `rope_parameters`)."""
        return cls(**{**hf_fields(hf), **overrides})

    @classmethod
    def from_hf_dir(cls, path: str, **overrides: Any) -> "MixtralConfig":
        """Read `<path>/config.json` (a Hugging Face model folder)."""
        return cls.from_hf_config(read_hf_config(path), **overrides)

    def to_hf_config(self) -> dict:
        """The Hugging Face config.json dict (schema.hf_config)."""
        return hf_config(model_dims(self))
