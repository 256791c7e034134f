"""MixtralTrainOneStepCell (mixtral_ms/run/wrapper.py) as a module, in PyNative: after a step the model's side
channel holds that step's passes alone (the wrapper resets it first), summed over the step's micro-batches,
with the loss terms' means matching the returned loss; the channel's in-graph writes the wrapper calls
(reset, all_reduce); finding the channel through MindSpore's wrappers; prepare_wrapper moving gradient
accumulation into the wrapper. The graph-mode step runs in tests/test_training.py."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn
from mindformers import MindFormerConfig

from mixtral_ms import ConfigError, MixtralConfig, MixtralForCausalLM
from mixtral_ms.model.losses import LOSS_TERMS, TrainingStats
from mixtral_ms.run.wrapper import MixtralTrainOneStepCell, interleave_num, prepare_wrapper, side_channel_model

# capacity 1.1: the training forward drops assignments, so `dropped` is not all zeros
CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64, initializer_range=0.5,
              capacity_factor=1.1, router_z_loss_coef=0.01, router_aux_loss_coef=0.02)
BATCHES = np.random.default_rng(7).integers(0, 64, (2, 4, 9)).astype(np.int32)  # 2 steps x 4 rows x (8 + 1)


def _ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean next-token cross-entropy in numpy (every label counted)."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, labels[..., None], -1).mean())


def _micro_batch_passes(model, batch):
    """Each 2-row micro-batch's training forward, one at a time: (load, dropped, ce) of each pass."""
    passes = []
    for rows in (batch[:2], batch[2:]):
        model(Tensor(rows))
        values = model.training_stats.read_and_reset()
        assert values["passes"] == 1.0
        passes.append((values["expert_load"], values["dropped"], values["terms"]["ce_loss"]))
    return passes


def test_the_step_leaves_its_own_micro_batches_in_the_channel():
    """gradient_accumulation_steps 2: the channel holds 2 passes whose counts are the sums of the two
    micro-batches' forwards; CE is their mean, and the returned loss is the terms' combination. A pass left
    in the channel before the step (a forward outside it) is not counted: the wrapper resets first."""
    ms.set_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**CONFIG))
    model.set_train(True)
    step = MixtralTrainOneStepCell(model, nn.SGD(model.trainable_params(), learning_rate=0.1),
                                   gradient_accumulation_steps=2)
    dropped = 0.0
    for i, batch in enumerate(BATCHES):
        passes = _micro_batch_passes(model, batch)  # with the weights the step is about to use
        if i == 1:
            model(Tensor(batch))  # left in the channel
        loss, overflow, _, _, _ = step(Tensor(batch))
        assert not bool(overflow)
        values = model.training_stats.read_and_reset()
        assert values["passes"] == 2.0
        np.testing.assert_array_equal(values["expert_load"], passes[0][0] + passes[1][0])
        np.testing.assert_array_equal(values["dropped"], passes[0][1] + passes[1][1])
        terms = values["terms"]
        assert terms["ce_loss"] == pytest.approx((passes[0][2] + passes[1][2]) / 2, rel=1e-6)
        assert float(loss) == pytest.approx(terms["ce_loss"] + CONFIG["router_aux_loss_coef"] * terms["aux_loss"]
                                            + CONFIG["router_z_loss_coef"] * terms["z_loss"], rel=1e-6)
        dropped += values["dropped"].sum()
    assert dropped > 0, "the batches must overflow some expert"
    # the CE the channel reports is the forward's own: numpy on the eval logits of the same rows (dropless,
    # so that training and eval forwards agree)
    model = MixtralForCausalLM(MixtralConfig(**{**CONFIG, "capacity_factor": 0.0}))
    rows = BATCHES[0][:2]
    model.set_train(False)
    logits = model(Tensor(rows[:, :-1]))[0].asnumpy()
    model.set_train(True)
    model(Tensor(rows))
    assert model.training_stats.read_and_reset()["terms"]["ce_loss"] == pytest.approx(_ce(logits, rows[:, 1:]),
                                                                                       rel=1e-5)


def test_channel_reset_and_all_reduce_write_every_parameter():
    """The two in-graph calls the wrapper makes per step, on known values: all_reduce replaces each
    Parameter by its sum over ranks (a stand-in for AllReduce over 3 ranks; stand-alone there is none), reset
    zeroes them; step_load, inside the forward, is the step's load so far over every rank, pooled over layers."""
    stats = TrainingStats(2, 3, LOSS_TERMS + ("kd_loss",))
    assert stats.rank_sum is None  # one process: its counts are the step's
    load = np.array([[3, 0, 1], [2, 2, 0]], np.float32)
    dropped = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    for terms in ((2.0, 1.0, 0.5, 0.25), (4.0, 3.0, 1.5, 0.75)):
        stats(tuple(Tensor(t, ms.float32) for t in terms), Tensor(load), Tensor(dropped))
    np.testing.assert_array_equal(stats.step_load(Tensor(load)).asnumpy(), 3 * load.sum(0))
    stats.rank_sum = lambda x: 3 * x
    np.testing.assert_array_equal(stats.step_load(Tensor(load)).asnumpy(), 9 * load.sum(0))
    stats.all_reduce()
    values = stats.read_and_reset()
    assert values["passes"] == 6.0
    assert values["terms"] == {"ce_loss": 3.0, "aux_loss": 2.0, "z_loss": 1.0, "kd_loss": 0.5}  # means stay means
    np.testing.assert_array_equal(values["expert_load"], 6 * load)
    np.testing.assert_array_equal(values["dropped"], 6 * dropped)
    stats((Tensor(1.0), Tensor(1.0), Tensor(1.0), Tensor(1.0)), Tensor(load), Tensor(dropped))
    stats.reset()
    assert all(not p.asnumpy().any() for p in stats.get_parameters())
    assert [p.name for p in stats.get_parameters()] == ["ce_loss", "aux_loss", "z_loss", "kd_loss", "expert_load",
                                                        "dropped", "passes"]


def test_the_channel_is_found_through_wrappers():
    model = MixtralForCausalLM(MixtralConfig(**CONFIG))
    interleaved = nn.MicroBatchInterleaved(model, 2)
    assert side_channel_model(interleaved) is model and interleave_num(interleaved) == 2
    assert side_channel_model(nn.Dense(2, 2)) is None and interleave_num(model) == 1
    assert [p.name for p in model.training_stats.get_parameters()][:3] == [f"training_stats.{t}" for t in LOSS_TERMS]
    dense = nn.Dense(2, 2)
    with pytest.raises(ConfigError, match="needs a network holding MixtralForCausalLM"):
        MixtralTrainOneStepCell(dense, nn.SGD(dense.trainable_params(), learning_rate=0.1))


def _run_config(accumulation, stages=1, wrapper="MixtralTrainOneStepCell"):
    return MindFormerConfig(runner_wrapper={"type": wrapper}, parallel_config={"pipeline_stage": stages},
                            runner_config={"batch_size": 4, "gradient_accumulation_steps": accumulation},
                            train_dataset={"batch_size": 4})


def test_prepare_wrapper_moves_accumulation_into_the_wrapper():
    """N micro-batches of batch_size rows a step: the runner's batch grows N-fold and MindFormers sees N = 1;
    unchanged under pipeline stages, another wrapper, or N = 1."""
    config = _run_config(3)
    prepare_wrapper(config)
    assert config.runner_wrapper["gradient_accumulation_steps"] == 3
    assert (config.runner_config["batch_size"], config.train_dataset["batch_size"]) == (12, 12)
    assert config.runner_config["gradient_accumulation_steps"] == 1
    for args in ((3, 2), (3, 1, "MFTrainOneStepCell"), (1,)):
        config = _run_config(*args)
        prepare_wrapper(config)
        assert "gradient_accumulation_steps" not in config.runner_wrapper
        runner = config.runner_config
        assert (runner["batch_size"], runner["gradient_accumulation_steps"]) == (4, args[0])
