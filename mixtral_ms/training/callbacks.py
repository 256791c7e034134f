"""Training callbacks: progress (loss, aux losses, tokens/s, ETA) and router statistics to JSONL."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np

from mindspore.train.callback import Callback
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister


def _wrapper(cb_params):
    """Our train-one-step cell (it holds the router_stats parameters)."""
    net = cb_params.train_network
    while not hasattr(net, "stat_load") and hasattr(net, "network"):
        net = net.network
    return net


class _StepCounter(Callback):
    """Steps counted from the start of training, also after a resume: the optimizer's restored
    global_step at the start of this run plus the steps of this run."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0

    def on_train_begin(self, run_context):
        optimizer = getattr(_wrapper(run_context.original_args()), "optimizer", None)
        step = getattr(optimizer, "global_step", None)
        self.offset = int(step.asnumpy().reshape(-1)[0]) if step is not None else 0

    def step(self, cb_params) -> int:
        return self.offset + int(cb_params.cur_step_num)

    def total(self, cb_params) -> int:
        return self.offset + int(cb_params.batch_num * cb_params.epoch_num)


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class MixtralProgressMonitor(_StepCounter):
    """Prints step, loss, CE, aux loss, z-loss, lr, grad norm, tokens/s and ETA every `log_interval` steps."""

    def __init__(self, log_interval: int = 10, **_framework_args) -> None:
        super().__init__()
        self.log_interval = max(1, int(log_interval))
        self.start: Optional[float] = None
        self.last: Optional[float] = None
        self.last_step = 0
        self.history = []

    def on_train_step_begin(self, run_context):
        if self.start is None:
            self.start = self.last = time.time()
            self.last_step = self.step(run_context.original_args()) - 1

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        step = self.step(cb)
        loss, overflow, scale, lr, norm = (np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x)
                                           for x in cb.net_outputs)
        net = _wrapper(cb)
        ce, aux, z = (float(p.asnumpy()) for p in (net.stat_ce, net.stat_aux, net.stat_z))
        self.history.append({"step": step, "loss": float(loss), "ce_loss": ce, "aux_loss": aux, "z_loss": z})
        if step % self.log_interval and step != self.total(cb):
            return
        now = time.time()
        dataset = cb.train_dataset
        tokens = dataset.get_batch_size() * int(np.prod(dataset.output_shapes()[0][1:]))
        steps = step - self.last_step
        rate = tokens * steps / max(now - self.last, 1e-9)
        total = self.total(cb)
        eta = (total - step) * (now - self.last) / max(steps, 1)
        print(f"step {step}/{total} | loss {float(loss):.4f} | ce {ce:.4f} | aux {aux:.4f} | z {z:.3f} | "
              f"lr {float(lr):.2e} | grad_norm {float(norm):.3f} | {rate:,.0f} tokens/s | "
              f"ETA {eta:.0f} s{' | overflow: step skipped' if bool(overflow) else ''}", flush=True)
        self.last, self.last_step = now, step


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class RouterStatsMonitor(_StepCounter):
    """Appends per-layer tokens per expert, dropped fraction, aux and z loss to `<output_dir>/router_stats.jsonl`
    every `log_interval` steps; `scripts/plot_router.py` turns the file into a heatmap."""

    def __init__(self, output_dir: str = "./output", log_interval: int = 10, **_framework_args) -> None:
        super().__init__()
        self.path = os.path.join(output_dir, "router_stats.jsonl")
        self.log_interval = max(1, int(log_interval))
        os.makedirs(output_dir, exist_ok=True)

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        step = self.step(cb)
        if step % self.log_interval and step != self.total(cb):
            return
        net = _wrapper(cb)
        load = net.stat_load.asnumpy()
        dropped = net.stat_dropped.asnumpy()
        record = {
            "step": step,
            "tokens_per_expert": load.astype(int).tolist(),
            "dropped_fraction": (dropped.sum(-1) / np.maximum(load.sum(-1), 1)).round(6).tolist(),
            "aux_loss": float(net.stat_aux.asnumpy()), "z_loss": float(net.stat_z.asnumpy()),
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
