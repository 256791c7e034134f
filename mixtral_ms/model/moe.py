"""The sparse MoE block: router -> dispatch into `[E, C, H]` -> stacked SwiGLU experts -> combine, plus
optional always-on shared experts."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops.auto_generate import SiLU  # the primitive behind ops.silu (ops has no SiLU class)

from mixtral_ms.model.capacity import dropless_capacities, expert_capacity
from mixtral_ms.model.configuration import MixtralConfig
from mixtral_ms.model.dispatch import dispatch
from mixtral_ms.model.dtypes import embedding, emulated_dtype, matmul, native_dtype
from mixtral_ms.model.router import RandomRouter, TopKRouter

GROUPED_MIN_ROWS = 16  # mean rows per expert below which (decoding) the static capacity tiers are cheaper
# Routed assignments per expert at or below which (decoding a few rows) the gathered path reads less: it
# copies each routed expert's weights out (read + write) and reads the copy, against reading all E once.
GATHER_MAX_SHARE = 0.25


class Linear(nn.Cell):
    """y = x W^T with W stored [out, in] (the checkpoint's layout); no bias, as in Mixtral."""

    def __init__(self, in_features: int, out_features: int, init_std: float, param_dtype: ms.dtype,
                 compute_dtype: ms.dtype) -> None:
        super().__init__()
        self.weight = Parameter(initializer(Normal(init_std), (out_features, in_features), param_dtype), name="weight")
        self.compute_dtype = native_dtype(compute_dtype)
        self.round_dtype = emulated_dtype(compute_dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = matmul(self.matmul, x.reshape(-1, x.shape[-1]), ops.cast(self.weight, self.compute_dtype), self.round_dtype)
        return y.reshape(lead + (y.shape[-1],))


class SwiGLU(nn.Cell):
    """down(silu(gate x) * up x) with Hugging Face's `{gate,up,down}_proj` names: a dense layer's `mlp`
    (Mistral's) and the shared experts (Qwen2-MoE's `shared_expert`; N experts of width F fused into one
    of width N*F, as their outputs sum)."""

    def __init__(self, hidden_size: int, width: int, init_std: float, param_dtype: ms.dtype,
                 compute_dtype: ms.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, width, init_std, param_dtype, compute_dtype)
        self.up_proj = Linear(hidden_size, width, init_std, param_dtype, compute_dtype)
        self.down_proj = Linear(width, hidden_size, init_std, param_dtype, compute_dtype)
        self.act, self.gated = SiLU(), ops.Mul()  # primitives, so the plan shards them like the matmuls

    def construct(self, x: Tensor) -> Tensor:
        """x: [T, H] -> [T, H]."""
        return self.down_proj(self.gated(self.act(self.gate_proj(x)), self.up_proj(x)))


class MixtralExperts(nn.Cell):
    """E SwiGLU experts stored stacked `[E, out, in]`: w2(silu(w1 x) * w3 x), one batched matmul each."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float,
                 param_dtype: ms.dtype, compute_dtype: ms.dtype) -> None:
        super().__init__()
        e, h, f = num_experts, hidden_size, intermediate_size
        self.w1 = Parameter(initializer(Normal(init_std), (e, f, h), param_dtype), name="w1")
        self.w3 = Parameter(initializer(Normal(init_std), (e, f, h), param_dtype), name="w3")
        self.w2 = Parameter(initializer(Normal(init_std), (e, h, f), param_dtype), name="w2")
        self._init_compute(compute_dtype)

    def _init_compute(self, compute_dtype: ms.dtype) -> None:
        """What the SwiGLU compute needs besides the weights (shared with Int8Experts)."""
        self.compute_dtype = native_dtype(compute_dtype)
        self.round_dtype = emulated_dtype(compute_dtype)
        self.bmm_gate = ops.BatchMatMul(transpose_b=True)
        self.bmm_up = ops.BatchMatMul(transpose_b=True)
        self.bmm_down = ops.BatchMatMul(transpose_b=True)
        # SwiGLU's activation and product, one pair for every path (the same kernels, so the paths agree
        # bit for bit); primitives, so the plan shards them like the matmuls
        self.act, self.gated = SiLU(), ops.Mul()
        self.segment_matmul = ops.MatMul(transpose_b=True)  # eval-mode segments only; the plan leaves it unsharded
        self.gathered_weights = ops.Gather()  # eval-mode decoding only (gathered); unsharded too
        self.gathered_bmm = ops.BatchMatMul(transpose_b=True)

    def segments(self, rows: tuple) -> tuple:
        """rows: per expert e, the [R_e, H] tokens routed to it (R_e varies) -> per expert [R_e, H].

        Per-expert matmuls over exactly the routed rows (dynamic shapes: eval mode only, unsharded).
        One Unstack per weight: indexing `w1[e]` is a strided copy, several times slower on CPU."""
        w1, w3, w2 = self.dense_weights()
        w1, w3, w2 = ops.unstack(w1), ops.unstack(w3), ops.unstack(w2)
        outs = ()
        for e in range(len(rows)):
            gate = matmul(self.segment_matmul, rows[e], w1[e], self.round_dtype)
            up = matmul(self.segment_matmul, rows[e], w3[e], self.round_dtype)
            outs += (matmul(self.segment_matmul, self.gated(self.act(gate), up), w2[e], self.round_dtype),)
        return outs

    def dense_weights(self) -> tuple:
        """w1, w3, w2 in the compute dtype."""
        dt = self.compute_dtype
        return ops.cast(self.w1, dt), ops.cast(self.w3, dt), ops.cast(self.w2, dt)

    def routed_weights(self, expert: Tensor) -> tuple:
        """w1, w3, w2 of the experts `expert` [A] ([A, out, in] each) in the compute dtype."""
        dt = self.compute_dtype
        return (embedding(self.gathered_weights, self.w1, expert, dt),
                embedding(self.gathered_weights, self.w3, expert, dt),
                embedding(self.gathered_weights, self.w2, expert, dt))

    def gathered(self, x: Tensor, expert: Tensor) -> Tensor:
        """x: [A, H], row a routed to expert[a] -> [A, H]. Reads only the routed experts' weights (one
        Gather each): at a few rows per step, what decoding costs is the weight bytes it reads."""
        a, bmm = x.shape[0], self.gathered_bmm
        w1, w3, w2 = self.routed_weights(expert)
        x = x.reshape(a, 1, -1)
        gate = matmul(bmm, x, w1, self.round_dtype)
        up = matmul(bmm, x, w3, self.round_dtype)
        return matmul(bmm, self.gated(self.act(gate), up), w2, self.round_dtype).reshape(a, -1)

    def construct(self, x: Tensor) -> Tensor:
        """x: [E, M, H] (M token slots per expert) -> [E, M, H]."""
        w1, w3, w2 = self.dense_weights()
        gate = matmul(self.bmm_gate, x, w1, self.round_dtype)
        up = matmul(self.bmm_up, x, w3, self.round_dtype)
        return matmul(self.bmm_down, self.gated(self.act(gate), up), w2, self.round_dtype)


class Int8Experts(MixtralExperts):
    """Stacked int8 experts `w1/w3/w2 [E, out, in]` with `w1_scale/w3_scale/w2_scale [E, out, in / group]`:
    the compute of MixtralExperts on weights dequantised in the compute dtype as model.int8.dequantize_int8
    does (frozen: no training). The format is mixtral_ms/model/int8.py's (numpy: the compression tools stay
    light); an Ascend build would call a fused weight-quant matmul behind the device check."""

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


class MixtralSparseMoeBlock(nn.Cell):
    """Routed experts with a per-group capacity (see dispatch.py); the router is `config.router_type`'s
    (router.py). A choice the router skips (GShard's second expert) takes no capacity and adds nothing.

    A token whose assignments are all dropped gets zero from this block, so the decoder layer's
    residual carries it through unchanged. Returns the output and per-call router statistics:
    router logits (fp32 [T, E]), routed load and dropped count per expert, the sum of routing
    probabilities per expert and the sum of squared logsumexp over valid tokens ([1]; for the
    load-balancing and z losses, which the model pools over layers as Hugging Face does). Under
    router_aux_loss_scope `sequence` the load and the probability sums are per sequence ([B, E]).

    With num_shared_experts, every token also gets the shared experts' output on the routed experts'
    input (times sigmoid(x W^T), `shared_expert_gate` [1, H], when gated), dropped assignments or not.
    """

    def __init__(self, config: MixtralConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype, layer: int = 0) -> None:
        """`layer`: this block's depth, which seeds the random router's token -> expert map and picks its
        dynamic-skipping threshold."""
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.groups = config.moe_token_groups
        self.train_capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.inference_capacity_factor
        self.drop_policy = config.drop_policy
        self.jitter = config.router_jitter_noise
        self.compute_dtype = native_dtype(compute_dtype)
        self.random_routed = config.router_type == "rre"
        if self.random_routed:
            self.gate = RandomRouter(config.hidden_size, config.vocab_size, self.num_experts, self.top_k,
                                     config.rre_groups, config.rre_seed, layer, param_dtype, compute_dtype)
        else:
            betas = config.dynamic_skip_betas
            self.gate = TopKRouter(config.hidden_size, self.num_experts, self.top_k, config.initializer_range,
                                   param_dtype, compute_dtype, config.router_type,
                                   None if betas is None else float(betas[layer]), config.router_score_function,
                                   config.router_bias_update_rate > 0)
        if config.expert_quantization is not None:
            self.experts = Int8Experts(self.num_experts, config.hidden_size, config.intermediate_size,
                                       config.expert_quantization.get("group_size"), compute_dtype)
        else:
            self.experts = MixtralExperts(self.num_experts, config.hidden_size, config.intermediate_size,
                                          config.initializer_range, param_dtype, compute_dtype)
        self.shared_expert = self.shared_expert_gate = None
        if config.num_shared_experts:
            self.shared_expert = SwiGLU(config.hidden_size,
                                        config.num_shared_experts * config.shared_expert_intermediate_size,
                                        config.initializer_range, param_dtype, compute_dtype)
            if config.shared_expert_gate:
                self.shared_expert_gate = Linear(config.hidden_size, 1, config.initializer_range, param_dtype,
                                                 compute_dtype)
        self.sequence_stats = config.router_aux_loss_scope == "sequence"
        self.counts_tokens = config.router_bias_update_rate > 0  # the router counts its tokens for the bias
        # Eval-mode dropless, exact paths: with at least GROUPED_MIN_ROWS rows per expert, per-expert
        # segments of exactly the routed tokens (as Hugging Face's loop over experts), whatever the skew;
        # with at most GATHER_MAX_SHARE rows per expert (decoding), the routed experts' weights gathered.
        # Neither with static_dispatch (a sharded model: dispatch needs the static [E, C, H] layout), whose
        # dropless path is one capacity, N, not the tiers: the parallel compiler takes no branch on a tensor.
        self.grouped_inference = not config.static_dispatch
        # [G, E, C, H] <-> [E, G, C, H]: the expert-parallel AllToAll happens here (mixtral_ms/parallel/plan.py).
        self.to_experts = ops.Transpose()
        self.from_experts = ops.Transpose()
        self.combine = ops.BatchMatMul()

    def _experts_at_capacity(self, flat, weights, index, valid, capacity: int):
        """Dispatch into `[E, G*C, H]`, run the experts, combine: returns y [T, H], load and dropped [E].
        `valid`: float [T, k], 1 for the assignments to serve (valid tokens, choices the router kept)."""
        t, h = flat.shape
        e, k, g = self.num_experts, self.top_k, self.groups
        n = t // g
        slot_token, assignment_slot, load, dropped = dispatch(
            index.reshape(g, n, k), weights.reshape(g, n, k), valid.reshape(g, n, k), e, capacity, self.drop_policy)
        padded = ops.concat((flat.reshape(g, n, h), ops.zeros((g, 1, h), flat.dtype)), axis=1).reshape(-1, h)
        expert_in = ops.gather(padded, slot_token, 0).reshape(g, e * capacity + 1, h)
        expert_in = self.to_experts(expert_in[:, :e * capacity].reshape(g, e, capacity, h), (1, 0, 2, 3))
        expert_out = self.experts(expert_in.reshape(e, g * capacity, h))
        expert_out = self.from_experts(expert_out.reshape(e, g, capacity, h), (1, 0, 2, 3)).reshape(g, e * capacity, h)
        expert_out = ops.concat((expert_out, ops.zeros((g, 1, h), expert_out.dtype)), axis=1).reshape(-1, h)
        picked = ops.gather(expert_out, assignment_slot, 0).reshape(t, k, h)
        # [T, 1, k] @ [T, k, H]: a batched matmul, not a broadcast multiply and a reduction over the
        # middle axis (five times slower on CPU; slicing the k columns apart is slower still).
        return self.combine(weights.reshape(t, 1, k), picked).reshape(t, h), load, dropped

    def _experts_grouped(self, flat, weights, index, valid):
        """Dropless with no padding rows: each expert runs on exactly the assignments routed to it, and
        each token's k results are gathered back and combined by their weights. Padding tokens get zero."""
        t, h = flat.shape
        e, k = self.num_experts, self.top_k
        expert = index.reshape(t * k)
        # assignments not served (padding, choices the router did not keep) are not computed: their row is
        # the zero row below, so their weight needs no mask
        served = valid.reshape(-1) > 0
        picks = tuple(ops.nonzero(ops.logical_and(expert == i, served)).reshape(-1) for i in range(e))
        outs = self.experts.segments(tuple(ops.gather(flat, p // k, 0) for p in picks))
        # Back to the static [T, k, H] layout (each assignment's row of the outputs, row 0 a zero row for
        # those not served), then the batched-matmul combine: fewer kernels on dynamic shapes than a weight
        # multiply and a scatter-add of the rows (prefill 0.95x the time on CPU, docs/performance.md).
        pick = ops.concat(picks)
        rank = ops.cumsum(ops.ones_like(pick, dtype=ms.int32), 0)
        row = ops.tensor_scatter_elements(ops.zeros((t * k,), ms.int32), pick, rank, axis=0)
        picked = ops.gather(ops.concat((ops.zeros((1, h), flat.dtype),) + outs), row, 0).reshape(t, k, h)
        y = self.combine(weights.reshape(t, 1, k), picked).reshape(t, h)
        return y, self._group_load(index, valid, 1)[0], ops.zeros((e,), ms.float32)

    def _experts_gathered(self, flat, weights, index, valid):
        """Dropless for a few tokens: each (token, choice) runs its expert with that expert's weights
        gathered, so only the routed experts are read. Padding tokens get zero."""
        t, h = flat.shape
        e, k = self.num_experts, self.top_k
        rows = ops.broadcast_to(flat.reshape(t, 1, h), (t, k, h)).reshape(t * k, h)
        out = self.experts.gathered(rows, index.reshape(t * k)).reshape(t, k, h)
        weight = weights * ops.cast(valid, weights.dtype)
        y = self.combine(weight.reshape(t, 1, k), out).reshape(t, h)
        return y, self._group_load(index, valid, 1)[0], ops.zeros((e,), ms.float32)

    def _group_load(self, index, valid, groups: int):
        """Valid assignments to each expert, per token group: float32 [G, E]."""
        t = valid.shape[0]
        e, k = self.num_experts, self.top_k
        n = t // groups
        one_hot = ops.one_hot(index.reshape(groups, n * k), e, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        return (one_hot * valid.reshape(groups, n * k, 1)).sum(axis=1)

    def _dropless(self, flat, weights, index, valid):
        """Nothing dropped, at the cost of the smallest capacity tier that holds the busiest expert of
        every group (capacity.dropless_capacities, then N): one tensor condition per tier,
        compiled as branches in graph mode, and no layer is computed twice. With static_dispatch (a
        sharded model), capacity N alone: no branch."""
        n = flat.shape[0] // self.groups
        if not self.grouped_inference:
            return self._experts_at_capacity(flat, weights, index, valid, n)
        busiest = self._group_load(index, valid, self.groups).max()
        for capacity in dropless_capacities(n, self.top_k, self.num_experts):
            if busiest <= capacity:
                return self._experts_at_capacity(flat, weights, index, valid, capacity)
        return self._experts_at_capacity(flat, weights, index, valid, n)

    def construct(self, x: Tensor, token_mask: Tensor, token_ids=None, domain_ids=None):
        """x: [B, S, H]; token_mask: float32 [B, S], 0 for padding (padding takes no capacity);
        token_ids, domain_ids: int [B, S], read by the random router only."""
        b, s, h = x.shape
        e, k = self.num_experts, self.top_k
        n = b * s // self.groups
        factor = self.train_capacity_factor if self.training else self.eval_capacity_factor
        flat = x.reshape(b * s, h)
        if self.training and self.jitter > 0:
            flat = flat * ops.uniform(flat.shape, Tensor(1.0 - self.jitter, self.compute_dtype),
                                      Tensor(1.0 + self.jitter, self.compute_dtype), dtype=self.compute_dtype)
        if self.random_routed:
            logits, probs, weights, index, kept = self.gate(token_ids.reshape(b * s), domain_ids.reshape(b * s))
        else:
            logits, probs, weights, index, kept = self.gate(flat)
        mask = token_mask.reshape(b * s, 1)
        valid = mask * kept
        if factor > 0:
            y, load, dropped = self._experts_at_capacity(flat, weights, index, valid, expert_capacity(n, k, e, factor))
        elif not self.training and self.grouped_inference and k * b * s >= GROUPED_MIN_ROWS * e:
            y, load, dropped = self._experts_grouped(flat, weights, index, valid)
        elif not self.training and self.grouped_inference and k * b * s <= GATHER_MAX_SHARE * e:
            y, load, dropped = self._experts_gathered(flat, weights, index, valid)
        else:
            y, load, dropped = self._dropless(flat, weights, index, valid)

        if self.training and self.counts_tokens:
            y = ops.depend(y, self.gate.count_tokens(load))
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = shared * ops.sigmoid(self.shared_expert_gate(flat))
            y = y + shared
        if self.sequence_stats:
            load = self._group_load(index, valid, b)
            prob_sum = (probs * mask).reshape(b, s, e).sum(axis=1)
        else:
            prob_sum = (probs * mask).sum(axis=0)
        # [1], not 0-d: a pipeline stage receives a 0-d tensor as a Python scalar (and a Reshape may not end a stage)
        z_sum = (ops.square(ops.logsumexp(logits, -1, True)) * mask).sum(axis=0)
        return y.reshape(b, s, h), logits, load, dropped, prob_sum, z_sum
