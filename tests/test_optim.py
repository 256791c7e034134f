"""FusedAdamW (fused Adam kernel, bias correction folded into lr and eps) against MindFormers' AdamW."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn
from mindformers.core.optim import AdamW

from mixtral_ms.run.optim import FusedAdamW


def _run(optimizer_cls, w0, b0, grads):
    w = ms.Parameter(Tensor(w0.copy()), name="w")
    b = ms.Parameter(Tensor(b0.copy()), name="b")
    groups = [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]
    # eps large enough that its bias correction shows
    opt = optimizer_cls(groups, learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-3)

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            self.opt = opt

        def construct(self, gw, gb):
            return self.opt((gw, gb))

    step = Step()
    for g in grads:
        step(Tensor(g), Tensor(g[:, 0] * 3.0))
    return [w.asnumpy(), b.asnumpy()] + [p.asnumpy() for p in list(opt.exp_avg) + list(opt.exp_avg_sq)]


def test_fused_adamw_matches_mindformers_adamw(mode):
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(64,)).astype(np.float32)
    grads = [rng.normal(size=(64, 32)).astype(np.float32) for _ in range(6)]
    reference, fused = _run(AdamW, w0, b0, grads), _run(FusedAdamW, w0, b0, grads)
    assert np.abs(reference[0] - w0).max() > 0.05  # six steps of lr 1e-2 moved the weights
    for ref, got in zip(reference, fused):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    assert np.abs(fused[1] - b0).max() == pytest.approx(np.abs(reference[1] - b0).max(), rel=1e-4)
