"""MixtralConfig and the schema: HF field names, both rope layouts, defaults of the real 8x7B, and clear errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mixtral_ms import ConfigError, MixtralConfig
from mixtral_ms.model.schema import hf_dims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    """to_hf_config gives back every field of the released config.json (pad_token_id too)."""
    cfg = MixtralConfig.from_hf_config({**HF_8X7B, "pad_token_id": 5}, param_init_type="bfloat16")
    hf = cfg.to_hf_config()
    released = {k: v for k, v in HF_8X7B.items() if k != "transformers_version"}
    assert hf == {**released, "pad_token_id": 5, "head_dim": 128, "router_jitter_noise": 0.0}
    again = MixtralConfig.from_hf_config(json.loads(json.dumps(hf)), param_init_type="bfloat16")
    assert again.to_hf_config() == hf


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "not a Mixtral config"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) exceeds num_local_experts (8)"),
    ({"num_key_value_heads": 5}, "not divisible by num_key_value_heads (5)"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_type 'yarn'"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"hidden_size": 4096.0}, "hidden_size must be a positive integer, got 4096.0"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"torch_dtype": ["bfloat16"]}, "torch_dtype must be a dtype name such as 'bfloat16', got ['bfloat16']"),
])
def test_bad_hf_configs(change, message):
    """The model and the converter refuse the same config.json with the same one line."""
    for read in (MixtralConfig.from_hf_config, hf_dims):
        with pytest.raises(ConfigError) as err:
            read({**HF_8X7B, **change})
        assert message in str(err.value)
        assert "\n" not in str(err.value)


def test_converter_cli_refuses_a_string_hidden_size(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "tiny8"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_size": str(cfg["hidden_size"])}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_weight.py"), "hf2ms",
                          "--src", str(src), "--dst", str(tmp_path / "ms")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: hidden_size must be a positive integer, got "
                                               f"'{cfg['hidden_size']}'"]
    assert sorted(os.listdir(tmp_path)) == ["hf"]


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
