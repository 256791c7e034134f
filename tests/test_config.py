"""MixtralConfig: HF field names, both rope layouts, defaults of the real 8x7B, and clear errors."""
import json

import pytest

from mixtral_ms import ConfigError, MixtralConfig

HF_8X7B = {  # Mixtral-8x7B-v0.1 config.json
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_defaults_are_mixtral_8x7b():
    cfg = MixtralConfig()
    real = MixtralConfig.from_hf_config(HF_8X7B)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "rope_theta",
                "max_position_embeddings", "rms_norm_eps", "router_aux_loss_coef", "head_dim", "sliding_window"):
        assert getattr(cfg, key) == getattr(real, key), key
    assert cfg.capacity_factor == 1.1 and cfg.inference_capacity_factor == 0.0


def test_rope_parameters_layout_of_transformers_5():
    hf = dict(HF_8X7B)
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    assert MixtralConfig.from_hf_config(hf).rope_theta == 12345.0


def test_round_trip_to_hf_config():
    cfg = MixtralConfig.from_hf_config(HF_8X7B)
    again = MixtralConfig.from_hf_config(json.loads(json.dumps(cfg.to_hf_config())))
    assert again.to_hf_config() == cfg.to_hf_config()


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "not a Mixtral config"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) exceeds num_local_experts (8)"),
    ({"num_key_value_heads": 5}, "not divisible by num_key_value_heads (5)"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_type 'yarn'"),
])
def test_bad_hf_configs(change, message):
    with pytest.raises(ConfigError) as err:
        MixtralConfig.from_hf_config({**HF_8X7B, **change})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_and_bad_policy():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_expert'\]"):
        MixtralConfig(num_expert=8)
    with pytest.raises(ConfigError, match="drop_policy must be one of"):
        MixtralConfig(drop_policy="random")
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        MixtralConfig(compute_dtype="float64")


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MixtralConfig.from_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        MixtralConfig.from_hf_dir(str(tmp_path))
