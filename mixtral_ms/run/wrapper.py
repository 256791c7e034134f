"""Train-one-step cell for every backend: MindFormers' MFTrainOneStepCell checks overflow with NPU-only
status ops; this one uses IsFinite, so it runs on CPU, GPU and Ascend alike.

One step: forward (loss scaled by the loss scale) and backward over each of the step's
`gradient_accumulation_steps` micro-batches, gradients summed, data-parallel gradient mean, unscale and
average, overflow check, global-norm clipping, and the optimizer update unless a gradient overflowed.
The network's training output is the loss alone (MixtralForCausalLM in training mode, possibly wrapped
in MindFormers' MicroBatchInterleaved); the loss terms and router statistics arrive through the model's
side channel (mixtral_ms.model.losses.TrainingStats), which this cell has reset before the step and, when
its counts are one rank's (DATA_PARALLEL), all-reduced after it, by the channel's own methods.
"""
from __future__ import annotations

from typing import Optional, Union

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.nn.wrap.cell_wrapper import _MicroBatch
from mindspore.parallel._utils import _get_device_num, _get_gradients_mean
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mixtral_ms.model.losses import TrainingStats, ranks_run_their_own_rows
from mixtral_ms.run import RunError
from mixtral_ms.model.schema import ConfigError
from mixtral_ms.run.distill import check_distill, install
from mixtral_ms.run.freeze import FrozenParameters

_DYNAMIC_SCALE_DEFAULTS = {"loss_scale_value": 2.0 ** 16, "scale_factor": 2, "scale_window": 1000}


def side_channel_model(network: nn.Cell) -> Optional[nn.Cell]:
    """The model inside `network` that holds the side channel (`training_stats`), whatever wraps it; None
    if there is none."""
    for _, cell in network.cells_and_names():
        if isinstance(getattr(cell, "training_stats", None), TrainingStats):
            return cell
    return None


def interleave_num(network: nn.Cell) -> int:
    """N when MindFormers wrapped the model in MicroBatchInterleaved(N) (its output is the sum of the
    N copies' losses), else 1."""
    for _, cell in network.cells_and_names():
        if isinstance(cell, nn.MicroBatchInterleaved):
            return int(cell.interleave_num)
    return 1


class _ScaledLoss(nn.Cell):
    """(loss * scale, loss): differentiating the first output gives scaled gradients. `loss` is the
    network's output divided by the interleave count, the mean over copies."""

    def __init__(self, network: nn.Cell, divisor: int) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.divisor = float(divisor)

    def construct(self, scale, *inputs):
        loss = self.network(*inputs)
        if self.divisor != 1.0:
            loss = loss / self.divisor
        return loss * ops.cast(scale, loss.dtype), loss


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class MixtralTrainOneStepCell(nn.Cell):
    """Returns (loss, overflow, loss_scale, learning_rate, global_norm), the layout MindFormers' callbacks
    (MFLossMonitor, CheckpointMonitor) read: loss is the unscaled training loss (the mean over
    micro-batches and interleaved copies), overflow True when the update was skipped, loss_scale the
    scale the next step uses (saved in checkpoints for a resume), global_norm the gradient norm before
    clipping. The step's CE, aux and z loss, tokens per expert and dropped assignments per layer are in
    the model's side channel (`side_channel_model(network).training_stats`) for MixtralProgressMonitor and RouterStatsMonitor.

    `freeze`: experts, router rows and non-MoE weights that training must leave bit-identical
    (run/freeze.py): their gradients are zeroed before the norm and their update is masked.
    `distill`: a frozen teacher and the distillation term added to the loss (run/distill.py); the
    step's KD term is the side channel's `training_stats.kd_loss`, which the model was built with.
    With `router_bias_update_rate` > 0 the routers' biases move after the update (not after a skipped
    step) by the tokens per expert each router counted: every pass of the step, every data-parallel rank.

    `scale_sense`: a fixed loss scale (1.0 for fp32/bf16), or a dict / `nn.DynamicLossScaleUpdateCell`
    for fp16 dynamic loss scaling (`loss_scale_value`, `scale_factor`, `scale_window`): on overflow the
    scale is divided by scale_factor (not below 1) and the update skipped; after scale_window finite
    steps it is multiplied by scale_factor. `max_grad_norm` (with `use_clip_grad`): clip by global norm.
    `gradient_accumulation_steps` N: the step's batch is cut into N micro-batches along axis 0 (rows
    i*B/N .. (i+1)*B/N - 1, as MindSpore's _MicroBatch cuts them), each run forward and backward in
    turn, and the update uses the mean gradient: one step on N times the batch with the MoE capacity of
    one micro-batch (run_mixtral.py moves runner_config.gradient_accumulation_steps here).
    Under MindFormers' MicroBatchInterleaved(N) the network returns the sum of N copies' losses; the
    step divides it by N.
    `max_skipped_steps`: after that many skipped steps in a row (default 10; 0 never) the run stops with
    RunError instead of finishing with exit 0 on unchanged weights; each call checks it, so with sink_mode
    only the last step of each sink counts.
    In DATA_PARALLEL / HYBRID_PARALLEL mode gradients are all-reduced (mean when `gradients_mean`) before
    the overflow check, so every rank skips the same steps, and the side channel is summed over ranks
    (load and dropped: global counts; terms: means over every rank's passes); the returned loss stays
    the rank's own, as in MindFormers.
    """
    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer,
                 scale_sense: Union[float, dict, nn.Cell, Tensor] = 1.0, max_grad_norm: Optional[float] = 1.0,
                 use_clip_grad: bool = True, gradient_accumulation_steps: int = 1, lr_scheduler=None,
                 freeze: Optional[dict] = None, distill: Optional[dict] = None, max_skipped_steps: int = 10,
                 **_framework_args) -> None:
        """`_framework_args`: what MindFormers' trainer passes every wrapper (calculate_per_token_loss,
        print_separate_loss, grouped_lr_scheduler, ...); YAML keys are checked by yaml_check.check_config."""
        super().__init__(auto_prefix=False)
        model = side_channel_model(network)
        if model is None:
            raise ConfigError("MixtralTrainOneStepCell needs a network holding MixtralForCausalLM (its side channel)")
        network = install(network, model, check_distill(distill, model.config))
        self.network = network
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.stats = model.training_stats
        self.balancer = model if model.config.router_bias_update_rate > 0 else None  # aux-loss-free balancing
        self.scaled = _ScaledLoss(network, interleave_num(network))
        if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
                or gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps must be an integer >= 1, "
                              f"got {gradient_accumulation_steps!r}")
        self.accumulation = gradient_accumulation_steps
        self.micro_batch = _MicroBatch(gradient_accumulation_steps)
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
        self.reducer_flag = ranks_run_their_own_rows()
        self.grad_reducer = ops.identity
        if self.reducer_flag:
            self.grad_reducer = nn.DistributedGradReducer(self.weights, _get_gradients_mean(), _get_device_num())
        self.freeze = FrozenParameters(self.weights, model.config, freeze)

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
        reset = self.stats.reset()  # what the side channel holds after the step is this step's alone
        scale = ops.depend(scale, reset)
        loss, grads = self._gradients(scale, inputs)
        grads = self.freeze.mask(self.grad_reducer(grads))
        divisor = float(self.accumulation)
        if not self.unit_scale or divisor != 1.0:  # unscale in fp32 first: squares of scaled gradients could overflow
            grads = tuple(ops.cast(ops.cast(g, ms.float32) / (scale * divisor), g.dtype) for g in grads)
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
        if self.stats.rank_sum is not None:  # the global batch's statistics, not one rank's
            loss = ops.depend(loss, self.stats.all_reduce())
        if self.balancer is not None:  # once per step, on the step's global tokens per expert
            keep = ops.cast(ops.logical_not(overflow), ms.float32)
            loss = ops.depend(loss, self.balancer.update_expert_bias(keep))
        # The scale the next step will use: what CheckpointMonitor saves as loss_scale for a resume.
        next_scale = ops.depend(ops.identity(self.scale_sense), overflow)
        return loss, overflow, next_scale, lr, global_norm

    def _gradients(self, scale, inputs):
        """(mean loss, summed scaled gradients) over the step's micro-batches."""
        if self.accumulation == 1:
            (_, loss), grads = self.grad_fn(scale, *inputs)
            return loss, grads
        (_, loss), grads = self.grad_fn(scale, *self.micro_batch(0, *inputs))
        for i in range(1, self.accumulation):
            (_, micro_loss), micro_grads = self.grad_fn(scale, *self.micro_batch(i, *inputs))
            loss = loss + micro_loss
            grads = tuple(g + m for g, m in zip(grads, micro_grads))
        return loss / float(self.accumulation), grads

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


def prepare_wrapper(config) -> None:
    """Hand `runner_config.gradient_accumulation_steps` to MixtralTrainOneStepCell (run_mixtral.py calls
    this on the MindFormerConfig before building the Trainer).

    MindFormers resets accumulation to 1 outside semi_auto_parallel and, inside it, swaps the YAML's
    wrapper for MFPipelineWithLossScaleCell around GradAccumulationCell; with this project's wrapper the
    wrapper accumulates instead, in every mode: the runner's batch grows N-fold (N micro-batches of
    `batch_size` rows per step, MindFormers' meaning of the key) and MindFormers sees N = 1. Under
    pipeline_stage > 1 nothing changes: MindFormers uses its pipeline wrapper (micro_batch_num
    micro-batches) and the YAML check refuses accumulation there."""
    wrapper, runner = config.get("runner_wrapper") or {}, config.get("runner_config") or {}
    steps = runner.get("gradient_accumulation_steps") or 1
    stages = (config.get("parallel_config") or {}).get("pipeline_stage") or 1
    if wrapper.get("type") != "MixtralTrainOneStepCell" or steps == 1 or stages > 1:
        return
    wrapper["gradient_accumulation_steps"] = steps
    runner["batch_size"] = runner.get("batch_size", 1) * steps
    if (config.get("train_dataset") or {}).get("batch_size") is not None:
        config.train_dataset["batch_size"] = runner["batch_size"]
    runner["gradient_accumulation_steps"] = 1
