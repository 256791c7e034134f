"""Top-k router: Hugging Face Mixtral's order of operations, exactly."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from .dtypes import emulated_dtype, matmul, native_dtype


class TopKRouter(nn.Cell):
    """`gate` of the sparse MoE block: logits = x W^T in the compute dtype, then softmax in float32,
    top-k, renormalise the k weights to sum to 1, cast back to the compute dtype.

    Returns (router_logits fp32 [T, E], probs fp32 [T, E], topk_weights [T, k], topk_index int32 [T, k]).
    The full probabilities feed the load-balancing loss; the logits feed the z-loss.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02,
                 param_dtype: ms.dtype = ms.float32, compute_dtype: ms.dtype = ms.float32) -> None:
        super().__init__()
        self.top_k = top_k
        self.compute_dtype = native_dtype(compute_dtype)
        self.weight = Parameter(initializer(Normal(init_std), (num_experts, hidden_size), param_dtype), name="weight")
        self.round_dtype = emulated_dtype(compute_dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: ms.Tensor):
        logits = matmul(self.matmul, x, ops.cast(self.weight, self.compute_dtype), self.round_dtype)
        logits = ops.cast(logits, ms.float32)
        probs = ops.softmax(logits, axis=-1)
        weights, index = ops.topk(probs, self.top_k)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return logits, probs, ops.cast(weights, self.compute_dtype), ops.cast(index, ms.int32)
