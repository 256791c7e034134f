"""Worker of the 2-process msrun check in tests/test_parallel.py (all multi-process checks in one launch).

    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=P --join=True \
        --log_dir=D tests/dist/dp_train_check.py --workdir W

W holds `setup.json` (model config, optimizer settings), `init.npz` (initial parameters) and `batch.npy`
(the global batches, [steps, B, S+1] token ids). Each rank trains the tiny model DATA_PARALLEL in graph
mode on its half of every global batch (rank r takes rows r*B/2 .. (r+1)*B/2-1, its own MoE token
group, so moe_token_groups = 1 here): value_and_grad + DistributedGradReducer (gradient mean) +
MindFormers' AdamW. It writes `rank<r>.npz` (final parameters) and `rank<r>.json` (losses, world size).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also imported from tests/test_parallel.py
from worker import finish, start  # noqa: E402


class LossOnly(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids):
        return self.model(ids)[0]


class TrainStep(nn.Cell):
    """loss, grads = value_and_grad(model); grads = reducer(grads); optimizer(grads)."""

    def __init__(self, model, optimizer, reducer):
        super().__init__(auto_prefix=False)
        self.net, self.optimizer, self.reducer = LossOnly(model), optimizer, reducer
        self.grad_fn = ms.value_and_grad(self.net, None, optimizer.parameters)

    def construct(self, ids):
        loss, grads = self.grad_fn(ids)
        self.optimizer(self.reducer(grads))
        return loss


def main() -> None:
    workdir, rank, world = start()
    from mindformers.core.optim import AdamW
    from mixtral_ms import MixtralConfig, MixtralForCausalLM

    with open(os.path.join(workdir, "setup.json"), encoding="utf-8") as f:
        setup = json.load(f)
    model = MixtralForCausalLM(MixtralConfig(**setup["model"], moe_token_groups=1))
    init_params = np.load(os.path.join(workdir, "init.npz"))
    ms.load_param_into_net(model, {k: ms.Parameter(Tensor(init_params[k]), name=k) for k in init_params.files},
                           strict_load=True)
    model.set_train(True)
    optimizer = AdamW(model.trainable_params(), **setup["optimizer"])
    step = TrainStep(model, optimizer, nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=world))
    losses = []
    for batch in np.load(os.path.join(workdir, "batch.npy")):
        rows = batch.shape[0] // world
        losses.append(float(step(Tensor(batch[rank * rows:(rank + 1) * rows])).asnumpy()))
    finish(workdir, model, {"rank": rank, "world": world, "losses": losses})


if __name__ == "__main__":
    main()
