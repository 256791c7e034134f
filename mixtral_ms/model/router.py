"""Routers of the sparse MoE block: learned top-k (Mixtral, Switch, GShard) and Pangu-Sigma's random
routed experts. Every router returns the same five tensors, so the block dispatches them alike:

  router_logits fp32 [T, E]  (the z-loss and the model's router_logits output)
  probs         fp32 [T, E]  (the load-balancing loss)
  weights       [T, k]       combine weight of each choice, in the compute dtype
  index         int32 [T, k] expert of each choice
  kept          fp32 [T, k]  1 where the choice is served, 0 where the router skipped it (GShard)
"""
from __future__ import annotations

from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mixtral_ms.model.dtypes import emulated_dtype, matmul, native_dtype

_NO_ROUTE = -1e30  # router "logit" of an expert the random router never picks for a token


class TopKRouter(nn.Cell):
    """`gate` of the sparse MoE block: logits = x W^T in the compute dtype, then softmax in float32, top-k.

    `mixtral` (Hugging Face's order of operations, exactly): the k weights renormalised to sum to 1.
    `switch` (Switch Transformer, k = 1): the weight is the un-renormalised probability, so the router
    gets a gradient through the expert output too.
    `gshard` (GShard, k = 2): renormalised as Mixtral; in training the second choice is served with
    probability 2 * w2 / (w1 + w2) (<= 1: always when the two tie, rarely when w2 is small) and skipped
    otherwise; the first keeps its weight w1 / (w1 + w2), as in GShard. Eval is deterministic top-2.
    `skip_beta` (dynamic skipping, Lu et al. 2024; mixtral_ms/tools/compress): each choice j >= 1 whose weight is
    below `skip_beta` times the first choice's is not kept, and the kept weights are renormalised.

    `score_function` sigmoid (DeepSeek-V3): each expert's score is sigmoid(logit), the k chosen are
    renormalised as above, and `probs` (for the load-balancing loss) are the scores normalised to sum 1.
    `expert_bias` (aux-loss-free balancing, DeepSeek-V3): `e_score_correction_bias` [E], a non-trained
    Parameter added to the scores to choose the top k; the weights are the unbiased scores of the chosen.
    The router counts its own tokens: `tokens_per_expert` [E] adds every training pass's load
    (`count_tokens`, called by the MoE block), and `update_bias` moves the bias by it once per optimizer
    step and zeroes it. Router-local, as Megatron-Core's `local_tokens_per_expert`: under pipeline parallel
    the count and the bias sit on the router's stage, where no step-wide table (the side channel, on the
    last stage) can reach without an exchange between stages.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02,
                 param_dtype: ms.dtype = ms.float32, compute_dtype: ms.dtype = ms.float32,
                 router_type: str = "mixtral", skip_beta: Optional[float] = None, score_function: str = "softmax",
                 expert_bias: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.skip_beta = skip_beta
        self.sigmoid = score_function == "sigmoid"
        self.e_score_correction_bias = None
        if expert_bias:  # primitives, so the parallel plan keeps the bias and the count replicated
            self.e_score_correction_bias = Parameter(initializer("zeros", (num_experts,), ms.float32),
                                                     name="e_score_correction_bias", requires_grad=False)
            self.tokens_per_expert = Parameter(initializer("zeros", (num_experts,), ms.float32),
                                               name="tokens_per_expert", requires_grad=False)
            self.biased_scores, self.bias_step = ops.Add(), ops.AssignAdd()
            self.count, self.zero_count = ops.AssignAdd(), ops.Assign()
        self.renormalize = router_type != "switch"
        self.sample_second = router_type == "gshard"
        self.compute_dtype = native_dtype(compute_dtype)
        self.weight = Parameter(initializer(Normal(init_std), (num_experts, hidden_size), param_dtype), name="weight")
        self.round_dtype = emulated_dtype(compute_dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor):
        logits = matmul(self.matmul, x, ops.cast(self.weight, self.compute_dtype), self.round_dtype)
        logits = ops.cast(logits, ms.float32)
        if self.sigmoid:
            scores = ops.sigmoid(logits)
            probs = scores / scores.sum(axis=-1, keepdims=True)
        else:
            scores = probs = ops.softmax(logits, axis=-1)
        if self.e_score_correction_bias is None:
            weights, index = ops.topk(scores, self.top_k)
        else:
            _, index = ops.topk(self.biased_scores(scores, self.e_score_correction_bias), self.top_k)
            weights = ops.gather_elements(scores, 1, index)
        kept = ops.ones_like(weights)
        if self.skip_beta is not None:
            kept = ops.concat((kept[:, :1], ops.cast(weights[:, 1:] >= self.skip_beta * weights[:, :1], ms.float32)),
                              axis=1)
            weights = weights * kept
        if self.renormalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        if self.sample_second and self.training:
            draw = ops.uniform((weights.shape[0], 1), Tensor(0.0, ms.float32), Tensor(1.0, ms.float32))
            second = ops.cast(draw < 2.0 * weights[:, 1:], ms.float32)
            kept = ops.concat((kept[:, :1], kept[:, 1:] * second), axis=1)
        return logits, probs, ops.cast(weights, self.compute_dtype), ops.cast(index, ms.int32), kept

    def count_tokens(self, load: Tensor) -> Tensor:
        """Add one training pass's routed assignments per expert `load` [E] to `tokens_per_expert`;
        returns a token."""
        return self.count(self.tokens_per_expert, ops.stop_gradient(load))

    def update_bias(self, rate: Tensor, reduce: Optional[nn.Cell] = None) -> Tensor:
        """Aux-loss-free balancing's step: the bias moves by rate * sign(mean load - load), towards the
        experts that got fewer than the mean of the step's tokens (`tokens_per_expert`, summed over
        data-parallel ranks by `reduce` when each rank counted its own rows), then the count restarts.
        Returns a token."""
        load = self.tokens_per_expert
        if reduce is not None:
            load = reduce(load)
        token = self.bias_step(self.e_score_correction_bias, rate * ops.sign(load.mean(keep_dims=True) - load))
        zeros = ops.depend(ops.zeros_like(load), token)
        return self.zero_count(self.tokens_per_expert, zeros)


def random_expert_map(vocab_size: int, group_size: int, top_k: int, seed: int, layer: int) -> np.ndarray:
    """int32 [V, k]: for each token id, k distinct experts of a group (local ids 0..group_size-1),
    drawn once from (seed, layer). Every group uses the same local map, so a group extracted as a
    model of its own (rre_groups 1, same seed) routes exactly as it did inside the full model."""
    rng = np.random.default_rng([seed, layer])
    return np.argsort(rng.random((vocab_size, group_size)), axis=1)[:, :top_k].astype(np.int32)


class RandomRouter(nn.Cell):
    """Pangu-Sigma's Random Routed Experts: nothing learned. The E experts form `groups` equal groups
    (one per domain); a token of domain d goes to the experts of group d that the fixed random map
    assigns to its token id in this layer (random_expert_map), each with weight 1 / k.

    `weight` is the gate's [E, H] matrix, kept only so the checkpoint layout (and every tool that
    reads it: converter, surgery, Hugging Face) is the same as for a learned router; it is never
    read and never trained (requires_grad False).
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_experts: int, top_k: int, groups: int, seed: int,
                 layer: int, param_dtype: ms.dtype = ms.float32, compute_dtype: ms.dtype = ms.float32) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.group_size = num_experts // groups
        self.compute_dtype = native_dtype(compute_dtype)
        self.weight = Parameter(initializer("zeros", (num_experts, hidden_size), param_dtype), name="weight",
                                requires_grad=False)
        self.expert_map = Tensor(random_expert_map(vocab_size, self.group_size, top_k, seed, layer))

    def construct(self, token_ids: Tensor, domain_ids: Tensor):
        """token_ids, domain_ids: int [T]."""
        t, k, e = token_ids.shape[0], self.top_k, self.num_experts
        index = ops.gather(self.expert_map, ops.cast(token_ids, ms.int32), 0) \
            + ops.cast(domain_ids, ms.int32).reshape(t, 1) * self.group_size
        weights = ops.full((t, k), 1.0 / k, dtype=ms.float32)
        probs = (ops.one_hot(index, e, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
                 * weights.reshape(t, k, 1)).sum(axis=1)
        # log p where routed, _NO_ROUTE elsewhere; a product rather than `where` with a scalar branch (the
        # parallel compiler's Select takes equal shapes only)
        logits = ops.log(ops.maximum(probs, 1e-30)) + ops.cast(probs <= 0, ms.float32) * _NO_ROUTE
        return logits, probs, ops.cast(weights, self.compute_dtype), index, ops.ones((t, k), ms.float32)
