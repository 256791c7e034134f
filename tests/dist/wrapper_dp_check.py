"""Worker of tests/test_training.py::test_wrapper_data_parallel_equals_one_process (2-process msrun).

    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=P --join=True \
        --log_dir=D tests/dist/wrapper_dp_check.py --workdir W

Each rank builds the tiny model of `wrapper_dp_setup()` (same seed, so the same initial weights), sets
DATA_PARALLEL with gradients_mean, and trains MixtralTrainOneStepCell (graph mode, clipping active) on
its half of every global batch; the wrapper's DistributedGradReducer averages the gradients. Writes
`rank<r>.npz` (final parameters) and `rank<r>.json` (local losses, global norms, overflow flags, and the
router statistics the wrapper all-reduced: tokens per expert, CE).
"""
from __future__ import annotations

import os
import sys

import numpy as np

import mindspore as ms
from mindspore import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also imported from tests/test_training.py
from worker import finish, start  # noqa: E402

STEPS, BATCH, TOKENS = 3, 4, 9


def wrapper_dp_setup():
    """(model, train-one-step cell, global batches [STEPS, BATCH, TOKENS]) for the current context.
    Aux and z loss are off: they are products of per-shard means, so only CE averages exactly over ranks."""
    from mindformers.core.optim import AdamW
    from mixtral_ms import MixtralConfig, MixtralForCausalLM
    from mixtral_ms.training import MixtralTrainOneStepCell
    ms.set_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           max_position_embeddings=64, capacity_factor=0.0, router_aux_loss_coef=0.0,
                           router_z_loss_coef=0.0)
    model = MixtralForCausalLM(config)
    model.set_train(True)
    optimizer = AdamW(model.trainable_params(), learning_rate=1e-2)
    step = MixtralTrainOneStepCell(model, optimizer, max_grad_norm=0.5)
    batches = np.random.default_rng(0).integers(0, 64, (STEPS, BATCH, TOKENS)).astype(np.int32)
    return model, step, batches


def main() -> None:
    workdir, rank, world = start()
    model, step, batches = wrapper_dp_setup()
    assert step.reducer_flag
    rows = BATCH // world
    record = {"rank": rank, "world": world, "losses": [], "norms": [], "overflow": []}
    for batch in batches:
        loss, overflow, _, _, norm = step(Tensor(batch[rank * rows:(rank + 1) * rows]))
        record["losses"].append(float(loss))
        record["norms"].append(float(norm))
        record["overflow"].append(bool(overflow))
        record.setdefault("load", []).append(step.stat_load.asnumpy().tolist())
        record.setdefault("ce", []).append(float(step.stat_ce.asnumpy()))
    finish(workdir, model, record)


if __name__ == "__main__":
    main()
