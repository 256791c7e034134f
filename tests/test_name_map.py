"""name_map.parse: every kind of parameter name in both layouts, read and written by the same table, and
consistent with hf_to_ms / ms_to_hf and parameter_specs."""
import pytest

from mixtral_ms.checkpoint.name_map import (Kind, ParamName, hf_to_ms, is_expert_stack, is_ms_layout, is_step_state,
                                            is_training_state, ms_to_hf, parameter_specs, parse)

L = "model.layers.3."
MOE = L + "block_sparse_moe."

CASES = {
    "model.embed_tokens.weight": ParamName(Kind.EMBEDDING),
    L + "self_attn.q_proj.weight": ParamName(Kind.ATTENTION, 3, "q_proj"),
    L + "self_attn.o_proj.weight": ParamName(Kind.ATTENTION, 3, "o_proj"),
    L + "input_layernorm.weight": ParamName(Kind.NORM, 3, "input_layernorm"),
    L + "post_attention_layernorm.weight": ParamName(Kind.NORM, 3, "post_attention_layernorm"),
    L + "mlp.gate_proj.weight": ParamName(Kind.MLP, 3, "gate_proj"),
    L + "mlp.down_proj.weight": ParamName(Kind.MLP, 3, "down_proj"),
    MOE + "gate.weight": ParamName(Kind.ROUTER, 3),
    MOE + "gate.e_score_correction_bias": ParamName(Kind.ROUTER_BIAS, 3),
    MOE + "experts.w1": ParamName(Kind.EXPERTS, 3, "w1"),
    MOE + "experts.w2": ParamName(Kind.EXPERTS, 3, "w2"),
    MOE + "experts.12.w3.weight": ParamName(Kind.EXPERT, 3, "w3", 12),
    MOE + "experts.w2_scale": ParamName(Kind.EXPERT_SCALE, 3, "w2"),
    MOE + "shared_expert.up_proj.weight": ParamName(Kind.SHARED_EXPERT, 3, "up_proj"),
    MOE + "shared_expert_gate.weight": ParamName(Kind.SHARED_EXPERT_GATE, 3),
    "model.norm.weight": ParamName(Kind.FINAL_NORM),
    "lm_head.weight": ParamName(Kind.LM_HEAD),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parse_every_kind_and_back(name):
    parsed = parse(name)
    assert parsed == CASES[name]
    assert parsed.name == name
    assert parsed.moe == (".block_sparse_moe." in name)


def test_every_kind_has_a_case():
    assert {p.kind for p in CASES.values()} == set(Kind)


@pytest.mark.parametrize("name", [
    "adam_m.model.layers.0.block_sparse_moe.experts.w1",  # training state
    "teacher.model.embed_tokens.weight",
    "model.layers.0.block_sparse_moe.experts.w4",  # no such projection
    "model.layers.0.self_attn.gate_proj.weight",
    "model.layers.x.input_layernorm.weight",
    "model.layers.0.block_sparse_moe.experts.w1.weight",  # an HF expert without its index
    "model.layers.0.block_sparse_moe.experts.0.w1",  # a stack with an index
    "model.norm.weight.extra",
    "training_stats.expert_load",
    "",
])
def test_names_that_are_no_mixtral_parameter(name):
    assert parse(name) is None
    assert hf_to_ms(name) == (name, None) and ms_to_hf(name, 4) == [name] and not is_expert_stack(name)


def test_expert_stacks_and_their_hugging_face_experts():
    stack = parse(MOE + "experts.w3")
    assert [parse(n) for n in ms_to_hf(stack.name, 3)] == [stack.of_expert(e) for e in range(3)]
    for e, hf in enumerate(ms_to_hf(stack.name, 3)):
        assert hf == f"{MOE}experts.{e}.w3.weight" and hf_to_ms(hf) == (stack.name, e)
        assert parse(hf).stack() == stack
    assert parse(MOE + "experts.w3_scale").stack() == stack  # an int8 scale: its weights' stack
    assert parse(L + "mlp.up_proj.weight").stack() == stack  # Mistral's up_proj: w3 of its one expert
    assert parse(L + "mlp.gate_proj.weight").stack().proj == "w1"
    assert parse(L + "mlp.down_proj.weight").stack().proj == "w2"
    assert parse(MOE + "gate.weight").stack() is None and parse("lm_head.weight").stack() is None
    assert hf_to_ms(L + "mlp.up_proj.weight") == (L + "mlp.up_proj.weight", None)  # not an HF expert
    assert is_expert_stack(stack.name) and not is_expert_stack(MOE + "experts.w3_scale")


def test_leading_zeros_read_as_numbers():
    assert parse("model.layers.03.block_sparse_moe.experts.007.w1.weight") == ParamName(Kind.EXPERT, 3, "w1", 7)


CONFIG = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 4,
          "num_experts_per_tok": 2}


@pytest.mark.parametrize("changes", [
    {}, {"model_type": "mistral"}, {"tie_word_embeddings": True},
    {"router_bias_update_rate": 0.01, "num_shared_experts": 1, "shared_expert_intermediate_size": 8,
     "shared_expert_gate": True, "moe_layer_freq": 2},
    {"expert_quantization": {"bits": 8, "group_size": 8}},
])
def test_every_parameter_and_source_name_parses_back(changes):
    """parameter_specs builds its names from the table parse reads: each mixtral-ms name and each Hugging
    Face source parses, and writes back as itself; experts' sources are the stack's experts in order."""
    specs = parameter_specs(dict(CONFIG, **changes))
    for name, spec in specs.items():
        parsed = parse(name)
        assert parsed is not None and parsed.name == name
        assert parsed.kind is not Kind.EXPERT  # mixtral-ms stacks the experts
        assert spec.stacked == (parsed.kind is Kind.EXPERTS)
        for src in spec.sources:
            assert parse(src).name == src
            assert (parse(src).stack() if spec.stacked else parse(src)) == parsed
        if spec.stacked and changes.get("model_type") != "mistral":
            assert spec.sources == ms_to_hf(name, spec.shape[0])
    hf = {src: None for spec in specs.values() for src in spec.sources}
    assert is_ms_layout(specs) and not is_ms_layout(hf)


@pytest.mark.parametrize("name, training, step", [
    ("adam_m.model.norm.weight", True, False),
    ("global_step", True, False),
    ("training_stats.expert_load", True, True),
    ("router_stats.expert_load", True, True),  # the side channel's older name
    ("model.layers.3.block_sparse_moe.gate.tokens_per_expert", True, True),  # a router's count for the bias
    ("model.layers.3.block_sparse_moe.gate.e_score_correction_bias", False, False),  # the bias is a weight
    ("model.layers.3.block_sparse_moe.gate.weight", False, False),
])
def test_training_state_and_the_state_of_one_step(name, training, step):
    """Training state is never converted nor required when loading weights; the state of one step (the side
    channel, the routers' token counts) is not resumed either."""
    assert (is_training_state(name), is_step_state(name)) == (training, step)
