"""Train-one-step cell for every backend: MindFormers' MFTrainOneStepCell checks overflow with NPU-only
status ops; this one uses IsFinite, so it runs on CPU, GPU and Ascend alike.

One step: forward (loss scaled by the loss scale), backward, data-parallel gradient mean, unscale,
overflow check, global-norm clipping, and the optimizer update unless a gradient overflowed. The
router statistics of the step land in `router_stats.*` parameters for callbacks to read.
"""
from __future__ import annotations

from typing import Optional, Union

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.context import ParallelMode
from mindspore.parallel._utils import _get_device_num, _get_gradients_mean, _get_parallel_mode
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..run_checks import RunError
from ..schema import ConfigError
from .distill import check_distill, install
from .freeze import FrozenParameters

_DYNAMIC_SCALE_DEFAULTS = {"loss_scale_value": 2.0 ** 16, "scale_factor": 2, "scale_window": 1000}


class _ScaledLoss(nn.Cell):
    """(loss * scale, unscaled outputs...): differentiating the first output gives scaled gradients."""

    def __init__(self, network: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, scale, *inputs):
        outputs = self.network(*inputs)
        return outputs[0] * ops.cast(scale, outputs[0].dtype), outputs


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class MixtralTrainOneStepCell(nn.Cell):
    """Returns (loss, overflow, loss_scale, learning_rate, global_norm), the layout MindFormers' callbacks
    (MFLossMonitor, CheckpointMonitor) read: loss is the unscaled training loss, overflow True when the
    update was skipped, loss_scale the scale the next step uses (saved in checkpoints for a resume),
    global_norm the gradient norm before clipping. The step's CE, aux and z loss, tokens per expert and
    dropped assignments per layer are left in the `router_stats.*` parameters (stat_ce, stat_aux, stat_z,
    stat_load, stat_dropped) for MixtralProgressMonitor and RouterStatsMonitor.

    `freeze`: experts, router rows and non-MoE weights that training must leave bit-identical
    (training/freeze.py): their gradients are zeroed before the norm and their update is masked.
    `distill`: a frozen teacher and the distillation term added to the loss (training/distill.py); the
    step's KD term is left in `router_stats.kd_loss` (stat_kd).

    `scale_sense`: a fixed loss scale (1.0 for fp32/bf16), or a dict / `nn.DynamicLossScaleUpdateCell`
    for fp16 dynamic loss scaling (`loss_scale_value`, `scale_factor`, `scale_window`): on overflow the
    scale is divided by scale_factor (not below 1) and the update skipped; after scale_window finite
    steps it is multiplied by scale_factor. `max_grad_norm` (with `use_clip_grad`): clip by global norm.
    `max_skipped_steps`: after that many skipped steps in a row (default 10; 0 never) the run stops with
    RunError instead of finishing with exit 0 on unchanged weights; each call checks it, so with sink_mode
    only the last step of each sink counts.
    In DATA_PARALLEL / HYBRID_PARALLEL mode gradients are all-reduced (mean when `gradients_mean`) before
    the overflow check, so every rank skips the same steps, and the router statistics are summed (load,
    dropped) or averaged (CE, aux, z) over ranks; the returned loss stays the rank's own, as in MindFormers.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer,
                 scale_sense: Union[float, dict, nn.Cell, Tensor] = 1.0, max_grad_norm: Optional[float] = 1.0,
                 use_clip_grad: bool = True, lr_scheduler=None, freeze: Optional[dict] = None,
                 distill: Optional[dict] = None, max_skipped_steps: int = 10, **_framework_args) -> None:
        """`_framework_args`: what MindFormers' trainer passes every wrapper (calculate_per_token_loss,
        print_separate_loss, grouped_lr_scheduler, ...); YAML keys are checked by yaml_check.check_config."""
        super().__init__(auto_prefix=False)
        model = network
        while not hasattr(model, "config") and hasattr(model, "network"):  # MindFormers' DataOrderWrapperCell
            model = model.network
        self.distilling = distill is not None
        network = install(network, model, check_distill(distill, model.config))
        self.network = network
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.scaled = _ScaledLoss(network)
        self.grad_fn = ms.value_and_grad(self.scaled, None, self.weights, has_aux=True)
        self.l2 = ops.L2Loss()
        if isinstance(scale_sense, dict):
            unknown = sorted(set(scale_sense) - set(_DYNAMIC_SCALE_DEFAULTS))
            if unknown:
                raise ConfigError(f"runner_wrapper.scale_sense: unknown key(s) {unknown}; dynamic loss scaling "
                                  f"takes {sorted(_DYNAMIC_SCALE_DEFAULTS)}")
            scale_sense = nn.DynamicLossScaleUpdateCell(**{**_DYNAMIC_SCALE_DEFAULTS, **scale_sense})
        self.scale_manager = scale_sense if isinstance(scale_sense, nn.Cell) else None
        value = scale_sense.get_loss_scale() if self.scale_manager is not None else float(scale_sense)
        self.scale_sense = Parameter(Tensor(value, ms.float32), name="scale_sense", requires_grad=False)
        self.unit_scale = self.scale_manager is None and value == 1.0  # fp32/bf16: nothing to unscale
        self.one = Tensor(1.0, ms.float32)
        self.clip = use_clip_grad and max_grad_norm is not None and max_grad_norm > 0
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.lr_scheduler = lr_scheduler
        self.max_skipped_steps = int(max_skipped_steps)
        self.skipped_in_row = 0
        self.reducer_flag = _get_parallel_mode() in (ParallelMode.DATA_PARALLEL, ParallelMode.HYBRID_PARALLEL)
        self.grad_reducer = ops.identity
        if self.reducer_flag:
            self.grad_reducer = nn.DistributedGradReducer(self.weights, _get_gradients_mean(), _get_device_num())
            self.stats_sum = ops.AllReduce()  # router statistics of the global batch, not one rank's
            self.device_num = float(_get_device_num())
        layers, experts = model.config.num_hidden_layers, model.config.num_local_experts
        self.freeze = FrozenParameters(self.weights, model.config, freeze)
        zeros = lambda *shape: Tensor(ops.zeros(shape, ms.float32))  # noqa: E731
        self.stat_ce = Parameter(zeros(), name="router_stats.ce_loss", requires_grad=False)
        self.stat_aux = Parameter(zeros(), name="router_stats.aux_loss", requires_grad=False)
        self.stat_z = Parameter(zeros(), name="router_stats.z_loss", requires_grad=False)
        self.stat_kd = Parameter(zeros(), name="router_stats.kd_loss", requires_grad=False)
        self.stat_load = Parameter(zeros(layers, experts), name="router_stats.expert_load", requires_grad=False)
        self.stat_dropped = Parameter(zeros(layers, experts), name="router_stats.dropped", requires_grad=False)

    def __call__(self, *inputs):
        """The step (compiled in graph mode), then the count of skipped steps in a row, in Python."""
        outputs = super().__call__(*inputs)
        if self.max_skipped_steps:
            self.skipped_in_row = self.skipped_in_row + 1 if bool(outputs[1]) else 0
            if self.skipped_in_row >= self.max_skipped_steps:
                raise RunError(f"training diverged: {self.skipped_in_row} steps in a row skipped for a non-finite "
                               f"gradient (loss {float(outputs[0]):.4g}, loss scale {float(outputs[2]):g}); lower "
                               f"the learning rate or check the data (runner_wrapper.max_skipped_steps)")
        return outputs

    def construct(self, *inputs):
        # A fixed scale of 1 stays 1 even if a resumed checkpoint carries another `scale_sense`.
        scale = self.one if self.unit_scale else self.scale_sense
        (_, outputs), grads = self.grad_fn(scale, *inputs)
        loss, ce, aux, z, load, dropped = outputs[:6]
        kd = outputs[6] if self.distilling else self.stat_kd
        grads = self.freeze.mask(self.grad_reducer(grads))
        if not self.unit_scale:  # unscale in fp32 first: squares of scaled gradients could overflow
            grads = tuple(ops.cast(ops.cast(g, ms.float32) / scale, g.dtype) for g in grads)
        # One fused reduction per gradient (L2Loss = sum(g^2) / 2) gives the norm and the overflow check:
        # an inf or nan anywhere makes the norm non-finite (as does a norm beyond fp32, 1.8e19).
        global_norm = ops.sqrt(2.0 * ops.stack([self.l2(ops.cast(g, ms.float32)) for g in grads]).sum())
        overflow = ops.logical_not(ops.isfinite(global_norm))
        if self.scale_manager is not None:
            overflow = self.scale_manager(self.scale_sense, overflow)
        if self.clip:
            factor = ops.minimum(self.max_grad_norm / (global_norm + 1e-6), 1.0)
            grads = tuple(g * ops.cast(factor, g.dtype) for g in grads)
        lr = self._learning_rate()
        if not overflow:
            loss = ops.depend(loss, self.freeze.update(self.optimizer, grads))
        if self.reducer_flag:
            ce, aux, z, kd = (self.stats_sum(v) / self.device_num for v in (ce, aux, z, kd))
            load, dropped = self.stats_sum(load), self.stats_sum(dropped)
        loss = ops.depend(loss, ops.assign(self.stat_ce, ce))
        loss = ops.depend(loss, ops.assign(self.stat_aux, aux))
        loss = ops.depend(loss, ops.assign(self.stat_z, z))
        loss = ops.depend(loss, ops.assign(self.stat_kd, kd))
        loss = ops.depend(loss, ops.assign(self.stat_load, load))
        loss = ops.depend(loss, ops.assign(self.stat_dropped, dropped))
        # The scale the next step will use: what CheckpointMonitor saves as loss_scale for a resume.
        next_scale = ops.depend(ops.identity(self.scale_sense), overflow)
        return loss, overflow, next_scale, lr, global_norm

    def _learning_rate(self):
        """The learning rate of this step (read before the optimizer advances its global_step)."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler(self.optimizer.global_step).reshape(())
        rate = self.optimizer.learning_rate
        if self.optimizer.dynamic_lr:
            rate = rate[0] if self.optimizer.is_group_lr else rate
            return rate(self.optimizer.global_step).reshape(())
        if self.optimizer.is_group_lr:
            rate = rate[0]
        return ops.cast(rate, ms.float32).reshape(())
