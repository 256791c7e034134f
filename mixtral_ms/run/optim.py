"""AdamW for MindFormers' trainer: `FusedAdamW`, one fused Adam kernel per parameter, and `OffloadAdamW`,
its moments in host memory and their update on the host (the "optimizer heterogeneity" of the original
Mixtral recipe). Both keep MindFormers' AdamW arithmetic, state names and checkpoint layout.

`optimizer: {type: FusedAdamW, betas: [0.9, 0.95], eps: 1.e-8, weight_decay: 0.1}` in a run YAML.
MindFormers' AdamW spends about twelve elementwise kernels per parameter per step (moments, bias
correction, step): on CPU that was 1.8 s of a 5.8 s training step of the benchmark model
(bench/bench_vs_hf.py). `FusedAdamW` folds the bias correction into the fused `Adam` (ApplyAdam) kernel,
which every backend has: with `lr` and the powers `b1^t`, `b2^t` it steps by
`lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps')`, which equals AdamW's
`lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)` for `eps' = eps * sqrt(1 - b2^t)`; the decoupled
weight decay `lr * wd * w` (of the weights before the step) is one multiply and one in-place subtract.

OffloadAdamW:

`optimizer: {type: OffloadAdamW, betas: [0.9, 0.95], eps: 1.e-8, weight_decay: 0.1}` in a run YAML
(`offload: False` turns the host placement off and leaves a plain AdamW).

What moves where (MindSpore heterogeneous execution):
- the moments `adam_m.*` / `adam_v.*` are created with `Parameter(..., device="CPU")`, as MindFormers'
  `AdamW(swap=True)` does, so they live in host DRAM (fp32, 8 bytes per parameter);
- every primitive that reads or writes a moment (moment update, bias correction, the step
  `m_hat / (sqrt(v_hat) + eps) * lr`) carries `primitive_target = CPU` (`.set_device("CPU")`, as
  `nn.AdamOffload`), so it runs on the host: gradients go host-wards, the fp32 step comes back;
- the decoupled weight decay and the parameter write stay on the device.

The arithmetic is MindFormers 1.9 `mindformers.core.optim.adamw.AdamW`'s, operation for operation
(w <- w * (1 - lr*wd) - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps), moments in fp32); on CPU
the results are bitwise identical (tests/test_parallel.py). On Ascend MindSpore requires, for host
parameters, `context.memory_optimize_level: "O0"` and env `MS_DEV_RUNTIME_CONF="switch_inline:False"`
(the same requirements as MindFormers' `swap: True`). On a CPU-only run nothing moves: host and
device memory are the same.

Parameter names (`adam_m.<param>`, `adam_v.<param>`, `global_step`) equal MindFormers' AdamW, so
checkpoints move between the two optimizers.
"""
from __future__ import annotations

from mindspore.common import dtype as mstype
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P
from mindformers.core.optim.adamw import AdamW as MindFormersAdamW
from mindformers.core.optim.adamw import _update_run_op as _mindformers_adamw_update
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister


_apply_adam, _assign_sub = P.Adam(), P.AssignSub()
_fused_adamw = C.MultitypeFuncGraph("fused_adamw")


@_fused_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _fused_update(beta1, beta2, eps, step, beta1_power, beta2_power, corrected_eps, lr, weight_decay, parameters,
                  grads, exp_avg, exp_avg_sq, optim_filter):
    """One parameter. fp32 weights take the fused kernel; others (bf16 weights, no fp32 kernel state
    to share) take MindFormers' per-operation update."""
    if not optim_filter:
        return grads
    if F.dtype(parameters) != mstype.float32:
        return _mindformers_adamw_update(beta1, beta2, eps, step, lr, weight_decay, parameters, grads, exp_avg,
                                         exp_avg_sq, optim_filter)
    decay = parameters * (lr * weight_decay)                          # of the weights before the step
    grads = F.depend(F.cast(grads, mstype.float32), decay)
    updated = _apply_adam(parameters, exp_avg, exp_avg_sq, beta1_power, beta2_power, lr, beta1, beta2,
                          corrected_eps, grads)
    return _assign_sub(parameters, F.depend(decay, updated))


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class FusedAdamW(MindFormersAdamW):
    """MindFormers' AdamW (same arguments, state names `adam_m.*`, `adam_v.*`, `global_step`, same
    arithmetic up to float rounding) with the fused Adam kernel doing the moment update and the step."""

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = F.cast(self.global_step, mstype.float32)
        beta1_power = P.Pow()(self.beta1, step)
        beta2_power = P.Pow()(self.beta2, step)
        corrected_eps = self.eps * P.Sqrt()(1.0 - beta2_power)
        if self.is_group and self.is_group_lr:
            result = self.hyper_map(
                F.partial(_fused_adamw, self.beta1, self.beta2, self.eps, self.global_step, beta1_power,
                          beta2_power, corrected_eps),
                lr, weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
        elif self.is_group:
            result = self.hyper_map(
                F.partial(_fused_adamw, self.beta1, self.beta2, self.eps, self.global_step, beta1_power,
                          beta2_power, corrected_eps, lr),
                weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
        else:
            result = self.hyper_map(
                F.partial(_fused_adamw, self.beta1, self.beta2, self.eps, self.global_step, beta1_power,
                          beta2_power, corrected_eps, lr, weight_decay),
                self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
        if self.use_parallel:
            self.broadcast_params(result)
        return result


def _host(prim):
    return prim.set_device("CPU")


# Host-side primitives (moments and the step); device-side ones (weight decay, parameter update).
_h_mul, _h_add, _h_sub, _h_div = _host(P.Mul()), _host(P.Add()), _host(P.Sub()), _host(P.Div())
_h_pow, _h_sqrt, _h_addcmul, _h_cast = _host(P.Pow()), _host(P.Sqrt()), _host(P.Addcmul()), _host(P.Cast())
_h_assign = _host(P.Assign())
_d_mul, _d_sub, _d_cast, _d_assign = P.Mul(), P.Sub(), P.Cast(), P.Assign()

_offload_adamw = C.MultitypeFuncGraph("offload_adamw")


@_offload_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                         "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _update(beta1, beta2, eps, step, lr, weight_decay, parameters, grads, exp_avg, exp_avg_sq, optim_filter):
    """One parameter: MindFormers' _update_run_op with every moment operation on the host."""
    if optim_filter:
        param_fp32 = _d_cast(parameters, mstype.float32)
        next_param = _d_mul(param_fp32, 1 - lr * weight_decay)
        gradient_fp32 = _h_cast(grads, mstype.float32)
        one = _h_cast(F.tuple_to_array((1.0,)), mstype.float32)
        next_param = F.depend(next_param, _h_assign(
            exp_avg, _h_add(_h_mul(exp_avg, beta1), _h_mul(gradient_fp32, _h_sub(one, beta1)))))
        next_param = F.depend(next_param, _h_assign(
            exp_avg_sq, _h_addcmul(_h_mul(exp_avg_sq, beta2), gradient_fp32, gradient_fp32, _h_sub(one, beta2))))
        bias_correction1 = _h_sub(one, _h_pow(_h_cast(beta1, mstype.float32), step))
        bias_correction2 = _h_sub(one, _h_pow(_h_cast(beta2, mstype.float32), step))
        step_size = _h_div(lr, bias_correction1)
        denom = _h_add(_h_sqrt(_h_div(exp_avg_sq, bias_correction2)), eps)
        update = _h_mul(_h_div(exp_avg, denom), step_size)          # fp32, computed on the host
        return_param = _d_sub(next_param, update)
        F.assign(parameters, _d_cast(return_param, F.dtype(parameters)))
        return _d_cast(return_param, F.dtype(parameters))
    return _d_cast(grads, F.dtype(parameters))


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class OffloadAdamW(MindFormersAdamW):
    """MindFormers' AdamW with the moments in host memory and their update on the host.

    Args: as MindFormers' AdamW (params, learning_rate, betas, eps, weight_decay); `offload`
    (default True) places the moments in host memory; False gives MindFormers' AdamW placement with
    the host-tagged update primitives (still a host update on heterogeneous backends).
    """

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 offload: bool = True):
        super().__init__(params, learning_rate=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay,
                         swap=bool(offload))

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.is_group:
            if self.is_group_lr:
                result = self.hyper_map(
                    F.partial(_offload_adamw, self.beta1, self.beta2, self.eps, self.global_step),
                    lr, weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
            else:
                result = self.hyper_map(
                    F.partial(_offload_adamw, self.beta1, self.beta2, self.eps, self.global_step, lr),
                    weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
        else:
            result = self.hyper_map(
                F.partial(_offload_adamw, self.beta1, self.beta2, self.eps, self.global_step, lr, weight_decay),
                self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
        if self.use_parallel:
            self.broadcast_params(result)
        return result
