"""MoE options (issue 24) against numpy references: aux-loss-free balancing (biased top-k selection, the bias
update once per optimizer step over every micro-batch), sigmoid scores, the load-balancing loss per sequence
and over the global batch, shared experts with Qwen2-MoE's gate; their checkpoint names, plan entries and
one-line refusals; the layer pattern (dense SwiGLU layers with Mistral's MLP names). Trainer coverage:
tests/test_training.py (the accumulation and interleaving run)."""
import json

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mixtral_ms import ConfigError, MixtralConfig, MixtralForCausalLM
from mixtral_ms.model.moe import MixtralSparseMoeBlock
from mixtral_ms.checkpoint.name_map import is_training_state, parameter_specs
from mixtral_ms.checkpoint.safetensors_io import open_checkpoint
from mixtral_ms.parallel.layout import validate
from mixtral_ms.parallel.plan import STATS_PREFIX, apply_plan

BASE = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64, initializer_range=0.5,
            capacity_factor=0.0, seq_length=8, router_z_loss_coef=0.0)
SHARED = dict(num_shared_experts=2, shared_expert_intermediate_size=8, shared_expert_gate=True)


def _config(**kw):
    return MixtralConfig(**{**BASE, **kw})


def _scores(logits, sigmoid):
    """(scores that pick and weight, probabilities of the load-balancing loss)."""
    if sigmoid:
        s = 1 / (1 + np.exp(-logits))
        return s, s / s.sum(-1, keepdims=True)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p, p


def _route(logits, bias, k, sigmoid):
    """Reference routing: top-k of scores + bias; weights the unbiased scores of the chosen, renormalised."""
    scores, probs = _scores(logits, sigmoid)
    index = np.argsort(-(scores + bias), -1, kind="stable")[..., :k]
    w = np.take_along_axis(scores, index, -1)
    return index, w / w.sum(-1, keepdims=True), probs


def _swiglu(x, w1, w3, w2):
    gate = x @ w1.T
    return (gate / (1 + np.exp(-gate)) * (x @ w3.T)) @ w2.T


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_bias_picks_the_experts_but_not_their_weights_and_shared_experts_add(sigmoid):
    """Block output == sum over the chosen of weight * expert(x) + sigmoid(x W_g) * shared(x), with the choice
    made on scores + bias and the weights from the scores alone (numpy)."""
    ms.set_seed(0)
    config = _config(router_bias_update_rate=0.1, router_score_function="sigmoid" if sigmoid else "softmax", **SHARED)
    block = MixtralSparseMoeBlock(config, ms.float32, ms.float32)
    block.set_train(False)
    bias = np.array([0.0, 0.6, -0.4, 0.2], np.float32)
    block.gate.e_score_correction_bias.set_data(Tensor(bias))
    x = np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)
    y, _, load, _, _, _ = block(Tensor(x), Tensor(np.ones((2, 16), np.float32)))
    tokens = x.reshape(-1, 16)
    index, weights, _ = _route(tokens @ block.gate.weight.asnumpy().T, bias, 2, sigmoid)
    unbiased = _route(tokens @ block.gate.weight.asnumpy().T, 0, 2, sigmoid)[0]
    assert (np.sort(index, -1) != np.sort(unbiased, -1)).any()  # the bias changes some choices
    w1, w3, w2 = (p.asnumpy() for p in (block.experts.w1, block.experts.w3, block.experts.w2))
    routed = sum(weights[:, j, None] * np.stack([_swiglu(t, w1[e], w3[e], w2[e]) for t, e in zip(tokens, index[:, j])])
                 for j in range(2))
    shared = block.shared_expert
    gate = 1 / (1 + np.exp(-(tokens @ block.shared_expert_gate.weight.asnumpy().T)))
    ref = routed + gate * _swiglu(tokens, shared.gate_proj.weight.asnumpy(), shared.up_proj.weight.asnumpy(),
                                  shared.down_proj.weight.asnumpy())
    np.testing.assert_allclose(y.asnumpy().reshape(-1, 16), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(load.asnumpy(), np.bincount(index.ravel(), minlength=4))


def test_bias_moves_once_per_step_by_the_whole_steps_load():
    """MixtralTrainOneStepCell with 2 accumulation micro-batches: after each step every layer's bias moved by
    rate * sign(mean - load), load the tokens per expert of both micro-batches (each one's eval-mode routing,
    computed before the step), and the router's count restarts; a model without the option keeps no bias.
    PyNative here; in graph mode the msrun launch (tests/test_parallel.py) gives the same biases as this
    step in PyNative, and the Trainer run in tests/test_training.py moves them by whole multiples of the rate."""
    from mixtral_ms.run.wrapper import MixtralTrainOneStepCell
    rate = 0.05
    batches = np.random.default_rng(3).integers(0, 64, (2, 4, 9)).astype(np.int32)
    ms.set_seed(0)
    model = MixtralForCausalLM(_config(router_bias_update_rate=rate, num_hidden_layers=1))
    gate = model.model.layers[0].block_sparse_moe.gate
    step = MixtralTrainOneStepCell(model, ms.nn.SGD(model.trainable_params(), learning_rate=0.1),
                                   gradient_accumulation_steps=2)
    expected = np.zeros((1, 4), np.float32)
    for batch in batches:
        model.set_train(False)
        load = sum(model(Tensor(batch[i:i + 2, :-1]))[2].asnumpy() for i in (0, 2))
        model.set_train(True)
        step(Tensor(batch))
        np.testing.assert_array_equal(model.training_stats.read_and_reset()["expert_load"], load)
        expected += rate * np.sign(load.mean(-1, keepdims=True) - load)
        np.testing.assert_allclose(gate.e_score_correction_bias.asnumpy()[None], expected, atol=1e-7)
        assert not gate.tokens_per_expert.asnumpy().any()
    assert np.abs(expected).max() > 0
    assert not any("e_score_correction_bias" in p.name for p in MixtralForCausalLM(_config()).get_parameters())


def test_bias_moves_in_the_callbacks_under_another_wrapper():
    """MindSpore's TrainOneStepCell (no update of ours; MindFormers' pipeline wrapper is such a wrapper): the
    callbacks' once-per-step read moves each router's bias, once, however many callbacks ask, by the tokens it
    counted, which are the side channel's load."""
    from types import SimpleNamespace
    from mixtral_ms.run.callbacks import step_stats

    class Params(SimpleNamespace):
        def get(self, key, default=None):
            return getattr(self, key, default)

    ms.set_seed(0)
    model = MixtralForCausalLM(_config(router_bias_update_rate=0.5, num_hidden_layers=1))
    model.set_train(True)
    step = ms.nn.TrainOneStepCell(model, ms.nn.SGD(model.trainable_params(), learning_rate=0.1))
    loss = step(Tensor(np.random.default_rng(6).integers(0, 64, (2, 9)).astype(np.int32)))
    cb = Params(cur_step_num=1, train_network=step, net_outputs=loss)
    load = step_stats(cb)["expert_load"]
    step_stats(cb)
    expected = 0.5 * np.sign(load.mean(-1, keepdims=True) - load)
    assert np.abs(expected).max() > 0
    gate = model.model.layers[0].block_sparse_moe.gate
    np.testing.assert_array_equal(gate.e_score_correction_bias.asnumpy(), expected[0])
    assert not gate.tokens_per_expert.asnumpy().any()  # the router's count restarts


def _aux_reference(logits, bias, mask, k, sigmoid, scope, step_load=None):
    """The load-balancing loss from the router logits [L, B, S, E] (Hugging Face's pooling over layers)."""
    index, _, probs = _route(logits, bias[:, None, None], k, sigmoid)
    e = logits.shape[-1]
    load = np.eye(e)[index].sum(-2) * mask[None, ..., None]  # [L, B, S, E]
    probs = probs * mask[None, ..., None]
    if scope == "sequence":
        tokens = logits.shape[0] * mask.sum(-1)  # [B]
        per = e * (load.sum((0, 2)) * probs.sum((0, 2))).sum(-1)
        return (per[tokens > 0] / tokens[tokens > 0] ** 2).mean()
    tokens = logits.shape[0] * mask.sum()
    share = load.sum((0, 1, 2)) / tokens if step_load is None else k * step_load / step_load.sum()
    return e * (share * probs.sum((0, 1, 2)) / tokens).sum()


@pytest.mark.parametrize("scope,sigmoid", [("micro_batch", True), ("sequence", False), ("sequence", True)])
def test_aux_loss_per_scope_matches_numpy(scope, sigmoid):
    """Eval mode with labels: the aux loss over the micro-batch or per sequence (a half-padded sequence
    counts its valid tokens, an all-padding one is left out), softmax or sigmoid scores, biased choice."""
    ms.set_seed(0)
    model = MixtralForCausalLM(_config(router_aux_loss_scope=scope, router_bias_update_rate=0.01,
                                       router_score_function="sigmoid" if sigmoid else "softmax"))
    model.set_train(False)
    bias = np.array([[0.3, 0.0, -0.2, 0.1], [0.0, 0.5, 0.0, -0.5]], np.float32)
    for layer, b in zip(model.model.layers, bias):
        layer.block_sparse_moe.gate.e_score_correction_bias.set_data(Tensor(b))
    ids = np.random.default_rng(1).integers(0, 64, (3, 8)).astype(np.int32)
    mask = np.ones((3, 8), np.float32)
    mask[1, 5:] = 0
    mask[2] = 0
    out = model(Tensor(ids), labels=Tensor(ids), attention_mask=Tensor(mask))
    logits = model(Tensor(ids), attention_mask=Tensor(mask))[1].asnumpy().reshape(2, 3, 8, 4)
    ref = _aux_reference(logits, bias, mask, 2, sigmoid, scope)
    assert float(out[2]) == pytest.approx(ref, rel=1e-5)
    assert out[4].shape == (2, 4)  # tokens per expert per layer, whatever the scope


def test_global_batch_aux_loss_uses_the_steps_load_so_far():
    """Two training passes without a reset: the first pass's aux loss is the micro-batch one, the second
    weighs its probabilities by the load of both passes (the side channel's sum)."""
    ms.set_seed(0)
    model = MixtralForCausalLM(_config(router_aux_loss_scope="global_batch"))
    ids = np.random.default_rng(2).integers(0, 64, (2, 2, 9)).astype(np.int32)
    model.set_train(False)
    logits = [model(Tensor(b[:, :-1]))[1].asnumpy().reshape(2, 2, 8, 4) for b in ids]
    model.set_train(True)
    for b in ids:
        model(Tensor(b))
    zero, ones = np.zeros((2,)), np.ones((2, 8), np.float32)
    first = _aux_reference(logits[0], zero, ones, 2, False, "micro_batch")
    index = [_route(lg, 0, 2, False)[0] for lg in logits]
    step_load = sum(np.eye(4)[i].sum((0, 1, 2, 3)) for i in index)
    second = _aux_reference(logits[1], zero, ones, 2, False, "global_batch", step_load)
    assert abs(first - second) > 1e-4
    values = model.training_stats.read_and_reset()
    assert values["passes"] * values["terms"]["aux_loss"] == pytest.approx(first + second, rel=1e-5)


def test_checkpoint_names_config_json_and_a_checkpoint_without_the_bias(tmp_path):
    """Qwen2-MoE's shared-expert names under block_sparse_moe, the bias as DeepSeek-V3 names it; the options
    round-trip through config.json and the converter (ms2hf, from_pretrained); a checkpoint lacking the bias
    (any made before the option) loads it as zeros."""
    from mixtral_ms.checkpoint.load import load_weights
    from mixtral_ms.checkpoint.convert import ms2hf
    config = _config(router_bias_update_rate=0.01, router_aux_loss_scope="sequence", mlp_only_layers=[0], **SHARED)
    names = set(parameter_specs(config))
    p = "model.layers.1.block_sparse_moe."
    assert {p + "shared_expert.gate_proj.weight", p + "shared_expert.up_proj.weight",
            p + "shared_expert.down_proj.weight", p + "shared_expert_gate.weight", p + "gate.e_score_correction_bias",
            "model.layers.0.mlp.up_proj.weight"} <= names
    ms.set_seed(0)
    model = MixtralForCausalLM(config)
    assert names == {q.name for q in model.get_parameters() if not is_training_state(q.name)}
    hf = config.to_hf_config()
    again = MixtralConfig.from_hf_config(json.loads(json.dumps(hf)))
    options = {"router_bias_update_rate": 0.01, "router_aux_loss_scope": "sequence", "num_shared_experts": 2,
               "shared_expert_intermediate_size": 8, "shared_expert_gate": True, "mlp_only_layers": [0]}
    assert {k: getattr(again, k) for k in options} == options
    assert "router_bias_update_rate" not in _config().to_hf_config()
    gate = model.model.layers[1].block_sparse_moe.gate
    gate.e_score_correction_bias.set_data(Tensor(np.arange(4, dtype=np.float32)))
    gate.tokens_per_expert.set_data(Tensor(np.array([5, 0, 3, 0], np.float32)))  # a step's count: training state
    with open(tmp_path / "config.json", "w") as f:  # the converter's round trip keeps every weight, bias included
        json.dump(hf, f)
    ms.save_checkpoint([{"name": q.name, "data": q.value()} for q in model.get_parameters()], str(tmp_path / "o.ckpt"))
    ms2hf(str(tmp_path / "o.ckpt"), str(tmp_path / "hf"), config_path=str(tmp_path / "config.json"))
    assert not any("tokens_per_expert" in name for name in open_checkpoint(str(tmp_path / "hf")))
    back = MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert not back.model.layers[1].block_sparse_moe.gate.tokens_per_expert.asnumpy().any()
    for q, r in zip(model.get_parameters(), back.get_parameters()):
        assert q.name == r.name
        assert is_training_state(q.name) or np.array_equal(q.asnumpy(), r.asnumpy()), q.name
    plain = MixtralForCausalLM(_config(mlp_only_layers=[0], **SHARED))
    path = str(tmp_path / "plain.ckpt")
    ms.save_checkpoint([{"name": q.name, "data": q.value()} for q in plain.get_parameters()], path)
    load_weights(model, path)
    assert not model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.asnumpy().any()
    np.testing.assert_array_equal(model.model.layers[1].block_sparse_moe.shared_expert.up_proj.weight.asnumpy(),
                                  plain.model.layers[1].block_sparse_moe.shared_expert.up_proj.weight.asnumpy())


def test_layer_pattern_dense_layers_are_mistral_mlps():
    """Which layers are MoE (every k-th, the first n dense, an explicit list); a dense layer is x + SwiGLU
    named as Mistral's `mlp.*` (numpy), and the router outputs cover the MoE layers only."""
    from mixtral_ms.model.schema import moe_layers
    assert moe_layers(_config(num_hidden_layers=6, moe_layer_freq=2)) == (1, 3, 5)  # GShard's every other layer
    assert moe_layers(_config(num_hidden_layers=5, first_k_dense=1, mlp_only_layers=[3])) == (1, 2, 4)
    config = _config(num_hidden_layers=3, moe_layer_freq=2, router_aux_loss_scope="sequence")
    ms.set_seed(0)
    model = MixtralForCausalLM(config)
    names = {q.name for q in model.get_parameters() if not q.name.startswith(STATS_PREFIX)}
    assert names == set(parameter_specs(config))
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.2.mlp.down_proj.weight"} <= names
    assert not any(n.startswith(("model.layers.0.block", "model.layers.1.mlp")) for n in names)
    mlp = model.model.layers[0].mlp
    x = np.random.default_rng(4).normal(size=(6, 16)).astype(np.float32)
    ref = _swiglu(x, mlp.gate_proj.weight.asnumpy(), mlp.up_proj.weight.asnumpy(), mlp.down_proj.weight.asnumpy())
    np.testing.assert_allclose(mlp(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)
    model.set_train(False)
    ids = Tensor(np.random.default_rng(5).integers(0, 64, (2, 8)).astype(np.int32))
    _, router_logits, load, _ = model(ids)
    assert router_logits.shape == (1, 16, 4) and load.shape == (1, 4) and load.asnumpy().sum() == 32


def test_plan_covers_the_options_and_stages_each_routers_bias_with_it():
    options = dict(router_bias_update_rate=0.01, router_score_function="sigmoid", router_aux_loss_scope="global_batch",
                   moe_layer_freq=2, **SHARED)
    semi = {"parallel_mode": 1, "enable_alltoall": True, "full_batch": True}
    layout = validate({"data_parallel": 2, "model_parallel": 2, "expert_parallel": 2}, semi, {**BASE, **options}, 4)
    model = MixtralForCausalLM(_config(**options, **layout.model_fields()))
    table = apply_plan(model, layout)  # every primitive and parameter planned, strategies checked
    assert table["model.layers.1.block_sparse_moe.gate.bias_step"].strategy == ((1,), (1,))
    assert table["model.layers.1.block_sparse_moe.shared_expert.down_proj.matmul"].strategy == ((2, 2), (1, 2))
    stats = STATS_PREFIX + "step_load_sum"
    assert table[stats].strategy == ((1, 1),) and table[stats].shapes == ((1, 4),)
    assert table["model.layers.0.mlp.down_proj.matmul"].strategy == ((2, 2), (1, 2))  # layer 0 dense
    every_layer = {k: v for k, v in options.items() if k != "moe_layer_freq"}
    piped = validate({"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2}, semi, {**BASE, **every_layer}, 2)
    table = apply_plan(MixtralForCausalLM(_config(**every_layer, **piped.model_fields())), piped)
    for layer in (0, 1):  # each router's bias, count and their updates on the router's own stage
        gate = f"model.layers.{layer}.block_sparse_moe.gate."
        assert {table[gate + n].stage for n in ("e_score_correction_bias", "tokens_per_expert", "count",
                                                "zero_count", "bias_step")} == {layer}
    assert table[STATS_PREFIX + "expert_load"].stage == table[STATS_PREFIX + "step_load_add"].stage == 1


@pytest.mark.parametrize("change,message", [
    ({"router_bias_update_rate": -0.1}, "router_bias_update_rate must be a number >= 0"),
    ({"router_score_function": "tanh"}, "router_score_function must be one of ('softmax', 'sigmoid')"),
    ({"router_aux_loss_scope": "batch"}, "router_aux_loss_scope must be one of"),
    ({"router_type": "rre", "router_bias_update_rate": 0.01}, "router_type rre routes by token id"),
    ({"num_shared_experts": -1}, "num_shared_experts must be an integer >= 0"),
    ({"num_shared_experts": 1, "shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size must be a"),
    ({"shared_expert_gate": True}, "shared_expert_gate needs num_shared_experts > 0"),
    ({"moe_layer_freq": 0}, "moe_layer_freq must be a positive integer"),
    ({"mlp_only_layers": [2]}, "mlp_only_layers must be null or a list of layer indices 0..1"),
    ({"first_k_dense": 1, "mlp_only_layers": [1]}, "no MoE layer: moe_layer_freq 1, first_k_dense 1"),
])
def test_inconsistent_options_are_one_line(change, message):
    with pytest.raises(ConfigError) as err:
        _config(**change)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_expert_surgery_carries_the_router_bias_and_the_layer_pattern(tmp_path):
    """experts.py on a model with the bias, a dense first layer and shared experts: extracting every expert
    in another order routes every token as before (bias permuted with its experts: the logits are equal),
    and a copy-grow gives the new experts their sources' bias (compression of such models: test_compress.py)."""
    import subprocess
    import sys
    from conftest import ROOT
    from mixtral_ms.checkpoint.convert import ms2hf
    config = _config(router_bias_update_rate=0.01, mlp_only_layers=[0], **SHARED)
    ms.set_seed(1)
    model = MixtralForCausalLM(config)
    bias = np.array([0.3, -0.2, 0.1, 0.0], np.float32)
    model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.set_data(Tensor(bias))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config.to_hf_config(), f)
    ms.save_checkpoint([{"name": q.name, "data": q.value()} for q in model.get_parameters()
                        if not q.name.startswith(STATS_PREFIX)], str(tmp_path / "o.ckpt"))
    ms2hf(str(tmp_path / "o.ckpt"), str(tmp_path / "hf"), config_path=str(tmp_path / "config.json"))
    experts = [sys.executable, f"{ROOT}/scripts/experts.py"]
    for args in (["extract", "--experts", "2,0,3,1", "--dst", str(tmp_path / "perm")],
                 ["grow", "--add", "2", "--init", "copy", "--dst", str(tmp_path / "grown")]):
        done = subprocess.run(experts + args + ["--src", str(tmp_path / "hf")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    ids = Tensor(np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32))
    model.set_train(False)
    perm = MixtralForCausalLM.from_pretrained(str(tmp_path / "perm"))
    perm.set_train(False)
    assert np.array_equal(perm.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.asnumpy(), bias[[2, 0, 3, 1]])
    np.testing.assert_allclose(perm(ids)[0].asnumpy(), model(ids)[0].asnumpy(), atol=1e-6)
    grown = MixtralForCausalLM.from_pretrained(str(tmp_path / "grown"))
    assert np.array_equal(grown.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.asnumpy(),
                          bias[[0, 1, 2, 3, 0, 1]])
