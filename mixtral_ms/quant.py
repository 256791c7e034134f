"""Weight-only int8 experts: round to nearest, symmetric, one scale per output channel (or per group of
`group_size` input channels), stored as int8 + float32 scales and dequantised at compute.

MindSpore's own compression package (mindspore-gs 1.4) pins mindspore 2.7.1 and does not install beside
2.9, so this is written here. The format (`quantize_int8`, `dequantize_int8`) is plain numpy in
mixtral_ms/compress/int8.py (scripts/compress.py quantize writes it); `Int8Experts` here replaces
`moe.MixtralExperts` when config.json carries `expert_quantization`, and computes exactly as it does on
the dequantised weights. On CPU the dequantised copy of a layer's experts is transient (one
layer at a time); an Ascend build would call a fused weight-quant matmul behind the device check.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .moe import MixtralExperts


class Int8Experts(MixtralExperts):
    """Stacked int8 experts `w1/w3/w2 [E, out, in]` with `w1_scale/w3_scale/w2_scale [E, out, in / group]`:
    the compute of MixtralExperts on weights dequantised in the compute dtype as compress.int8.dequantize_int8
    does (frozen: no training)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, group_size: Optional[int],
                 compute_dtype: ms.dtype) -> None:
        nn.Cell.__init__(self)  # MixtralExperts.__init__ would allocate float weights
        e, h, f = num_experts, hidden_size, intermediate_size
        self.w1, self.w1_scale = self._weight("w1", (e, f, h), group_size)
        self.w3, self.w3_scale = self._weight("w3", (e, f, h), group_size)
        self.w2, self.w2_scale = self._weight("w2", (e, h, f), group_size)
        self._init_compute(compute_dtype)

    @staticmethod
    def _weight(name: str, shape: tuple, group_size: Optional[int]) -> Tuple[Parameter, Parameter]:
        groups = shape[2] // (group_size or shape[2])
        q = Parameter(Tensor(np.zeros(shape, np.int8)), name=name, requires_grad=False)
        scale = Parameter(Tensor(np.zeros(shape[:2] + (groups,), np.float32)), name=f"{name}_scale",
                          requires_grad=False)
        return q, scale

    def _dequantize(self, q: Parameter, scale: Parameter) -> Tensor:
        e, out, size = q.shape
        groups = scale.shape[2]
        w = ops.cast(q, ms.float32).reshape(e, out, groups, size // groups) * scale.reshape(e, out, groups, 1)
        return ops.cast(w.reshape(e, out, size), self.compute_dtype)

    def dense_weights(self) -> tuple:
        return (self._dequantize(self.w1, self.w1_scale), self._dequantize(self.w3, self.w3_scale),
                self._dequantize(self.w2, self.w2_scale))

    def routed_weights(self, expert: Tensor) -> tuple:
        take = self.gathered_weights
        return (self._dequantize(take(self.w1, expert, 0), take(self.w1_scale, expert, 0)),
                self._dequantize(take(self.w3, expert, 0), take(self.w3_scale, expert, 0)),
                self._dequantize(take(self.w2, expert, 0), take(self.w2_scale, expert, 0)))
