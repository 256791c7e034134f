"""Continual-training freezes (mixtral_ms/run/freeze.py) through MindFormers' Trainer from a YAML:
frozen experts, router rows and non-MoE weights are bit-identical after training with AdamW weight
decay (which moves a weight whose gradient is zero), while the rest trains; bad freeze sections fail
with one line."""
import os

import numpy as np
import pytest

import mindspore as ms

from mixtral_ms import MixtralForCausalLM
from mixtral_ms.checkpoint.load import load_weights
from mixtral_ms.run.data import write_mindrecord
from mixtral_ms.run.freeze import check_freeze, trainable_count
from mixtral_ms.run import runner
from test_training import BATCH, SEQ, error_line, run, write_yaml

FREEZE = {"experts": {0: [0, 1], 1: [5]}, "router_rows": [0, 1, 2], "non_moe": True}
STEPS = 6


pytestmark = pytest.mark.usefixtures("trainer_context")  # PyNative and no parallel context after


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("freeze") / "data.mindrecord"
    rng = np.random.default_rng(0)
    write_mindrecord(str(path), {"input_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": rng.integers(3, 2000, SEQ + 1).astype(np.int32)} for _ in range(BATCH * STEPS)))
    return path


def _weights(config, path):
    model = MixtralForCausalLM(config)
    load_weights(model, str(path))
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def test_frozen_weights_are_bit_identical_after_training(tmp_path, data):
    """Graph mode, FusedAdamW with weight decay 0.01, lr 2e-2, 6 steps from a saved start checkpoint."""
    start = tmp_path / "start.ckpt"
    callbacks = [{"type": "CheckpointMonitor", "prefix": "f", "save_checkpoint_steps": STEPS,
                  "integrated_save": False, "async_save": False}]
    cfg = write_yaml(tmp_path, data, **{"runner_wrapper.freeze": FREEZE, "load_checkpoint": str(start),
                                        "callbacks": callbacks})
    config = runner.load_run(cfg).model_config
    ms.set_seed(3)
    ms.save_checkpoint(MixtralForCausalLM(config), str(start))
    status, _, stderr = run("--config", cfg, "--run_mode", "train")
    assert status == 0, stderr[-3000:]
    before = _weights(config, start)
    final = tmp_path / "checkpoint" / "rank_0" / f"f_rank_0-1_{STEPS}.ckpt"
    after = _weights(config, final)
    saved = ms.load_checkpoint(str(final))
    assert "adam_m.model.layers.0.block_sparse_moe.experts.w1" in saved  # a training checkpoint...
    assert not [n for n in saved if n.startswith("freeze_mask.")]  # ...without the masks: the YAML says what is frozen
    frozen_experts = {0: [0, 1], 1: [5]}
    for name, old in before.items():
        new = after[name]
        if ".block_sparse_moe.experts." in name:
            layer = int(name.split(".")[2])
            rows = frozen_experts[layer]
            assert np.array_equal(new[rows], old[rows]), name
            others = [e for e in range(8) if e not in rows]
            assert all(not np.array_equal(new[e], old[e]) for e in others), name
        elif name.endswith("gate.weight"):
            assert np.array_equal(new[:3], old[:3]), name
            assert all(not np.array_equal(new[e], old[e]) for e in range(3, 8)), name
        else:  # non_moe
            assert np.array_equal(new, old), name
    total, trainable = trainable_count(MixtralForCausalLM(config).get_parameters(), check_freeze(FREEZE, config))
    h, f = config.hidden_size, config.intermediate_size
    assert trainable == (16 - 3) * 3 * h * f + 2 * 5 * h, (total, trainable)


def test_bad_freeze_sections_fail_with_one_line(tmp_path, data):
    cases = [
        ({"experts": [0, 8]}, "runner_wrapper.freeze.experts: expert 8 out of range (the model has 8 experts)"),
        ({"router_rows": [1, 1]}, "runner_wrapper.freeze.router_rows: expert ids repeated in [1, 1]"),
        ({"experts": {2: [0]}}, "runner_wrapper.freeze.experts: layer 2 out of range (the model has 2 layers)"),
        ({"expert": [0]}, "runner_wrapper.freeze: unknown key(s) ['expert']"),
        ({"non_moe": "yes"}, "runner_wrapper.freeze.non_moe must be true or false"),
        ({"experts": 3}, "runner_wrapper.freeze.experts must be a list of expert ids"),
    ]
    for i, (freeze, message) in enumerate(cases):
        cfg = write_yaml(tmp_path, data, name=f"bad{i}.yaml", **{"runner_wrapper.freeze": freeze})
        assert message in error_line("--config", cfg, "--run_mode", "train"), freeze
    assert not os.path.exists(tmp_path / "checkpoint")
