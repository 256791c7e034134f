"""Mixtral as MindSpore Cells. Parameter names match the Hugging Face checkpoint (docs/design.md);
only the experts differ, stacked `[E, out, in]` per layer. No parallelism here: the parallel plan
(mixtral_ms/parallel/plan.py) shards the primitives these cells hold as attributes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mixtral_ms.model.configuration import MixtralConfig
from mixtral_ms.inference.prompts import check_batch
from mixtral_ms.inference.text_generation import text_generate
from mixtral_ms.model.dtypes import arange, embedding, emulated_dtype, matmul, native_dtype
from mixtral_ms.model.losses import (LOSS_TERMS, TrainingStats, causal_lm_loss, global_balancing_loss,
                                    load_balancing_loss, rank_sum, router_z_loss, sequence_balancing_loss)
from mixtral_ms.model.moe import Linear, MixtralSparseMoeBlock, SwiGLU
from mixtral_ms.model.schema import moe_layers

_DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}
_MASK_MIN = -1e30


class MixtralRMSNorm(nn.Cell):
    """RMSNorm computed in float32, cast back before the weight (Hugging Face's order)."""

    def __init__(self, hidden_size: int, eps: float, param_dtype: ms.dtype) -> None:
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), param_dtype), name="weight")
        self.eps = eps

    def construct(self, x: Tensor) -> Tensor:
        h = ops.cast(x, ms.float32)
        h = h * ops.rsqrt(ops.square(h).mean(axis=-1, keep_dims=True) + self.eps)
        return ops.cast(self.weight, x.dtype) * ops.cast(h, x.dtype)


def rope_tables(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `[max_positions, head_dim]`, computed in float32 like Hugging Face's default RoPE."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim)))
    freqs = np.outer(np.arange(max_positions, dtype=np.float32), inv_freq.astype(np.float32)).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rotate_half(x: Tensor) -> Tensor:
    """One Split, not two slices: two StridedSlice kernels cost a decode step more (docs/performance.md)."""
    first, second = ops.split(x, x.shape[-1] // 2, axis=-1)
    return ops.concat((-second, first), axis=-1)


class MixtralAttention(nn.Cell):
    """Grouped-query attention; softmax in float32. `bias` carries the causal/padding/window mask."""

    def __init__(self, config: MixtralConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.scale = d ** -0.5
        std = config.initializer_range
        self.q_proj = Linear(h, self.num_heads * d, std, param_dtype, compute_dtype)
        self.k_proj = Linear(h, self.num_kv_heads * d, std, param_dtype, compute_dtype)
        self.v_proj = Linear(h, self.num_kv_heads * d, std, param_dtype, compute_dtype)
        self.o_proj = Linear(self.num_heads * d, h, std, param_dtype, compute_dtype)
        self.round_dtype = emulated_dtype(compute_dtype)
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)
        self.bmm_pv = ops.BatchMatMul()

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past_k=None, past_v=None):
        """x [B, S, H]; cos/sin [B, 1, S, D]; bias fp32 [B, 1, S, P+S]; past_k/v [B, KV, P, D] or None.

        Returns the output and this call's rotated keys and values [B, KV, S, D] for the KV cache.
        """
        b, s, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).reshape(b, s, self.num_heads, d).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, d).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, d).transpose(0, 2, 1, 3)
        cos, sin = ops.cast(cos, q.dtype), ops.cast(sin, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = k, v
        if past_k is not None:
            keys = ops.concat((past_k, k), axis=2)
            values = ops.concat((past_v, v), axis=2)
        # Grouped-query attention without repeating keys and values: the heads sharing a KV head are
        # stacked as rows of one batched matmul against it (head h uses KV head h // (heads / KV)).
        kv, p = self.num_kv_heads, keys.shape[2]
        q = q.reshape(b, kv, self.num_heads // kv * s, d)
        scores = matmul(self.bmm_qk, q, keys, self.round_dtype).reshape(b, self.num_heads, s, p) * self.scale
        probs = ops.softmax(ops.cast(scores, ms.float32) + bias, axis=-1)
        probs = ops.cast(probs, q.dtype).reshape(b, kv, self.num_heads // kv * s, p)
        out = matmul(self.bmm_pv, probs, values, self.round_dtype).reshape(b, self.num_heads, s, d)
        out = out.transpose(0, 2, 1, 3).reshape(b, s, self.num_heads * d)
        return self.o_proj(out), k, v


class MixtralDecoderLayer(nn.Cell):
    """Pre-norm attention and pre-norm sparse MoE (or, outside the config's MoE layers, a dense SwiGLU
    `mlp`), each with a residual. `moe_row`: this layer's row of the per-MoE-layer router outputs, -1 if dense."""

    def __init__(self, config: MixtralConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.self_attn = MixtralAttention(config, param_dtype, compute_dtype)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        rows = moe_layers(config)
        self.moe_row = rows.index(layer) if layer in rows else -1
        if self.moe_row >= 0:
            self.block_sparse_moe = MixtralSparseMoeBlock(config, param_dtype, compute_dtype, layer)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.initializer_range, param_dtype,
                              compute_dtype)

    def construct(self, x, cos, sin, bias, token_mask, past_k=None, past_v=None, token_ids=None, domain_ids=None):
        """(x, k, v) for a dense layer; (x, k, v, router logits, load, dropped, prob_sum, z_sum) for MoE."""
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = x + attn
        if self.moe_row < 0:
            b, s, h = x.shape
            return x + self.mlp(self.post_attention_layernorm(x).reshape(b * s, h)).reshape(b, s, h), k, v
        moe, logits, load, dropped, prob_sum, z_sum = self.block_sparse_moe(self.post_attention_layernorm(x),
                                                                            token_mask, token_ids, domain_ids)
        return x + moe, k, v, logits, load, dropped, prob_sum, z_sum


class MixtralPreTrainedModel(PreTrainedModel):
    """Registers the config class with MindFormers' PreTrainedModel machinery."""
    config_class = MixtralConfig
    base_model_prefix = "model"


def attention_bias(q_cols: Tensor, k_cols: Tensor, k_valid: Tensor, sliding_window) -> Tensor:
    """fp32 additive mask [B, 1, Sq, Sk]: key j visible to query i iff valid, k_col <= q_col and,
    with a sliding window W, q_col - k_col < W. Columns are sequence slots, not position ids, as in
    Hugging Face (left padding shifts position ids, not columns)."""
    diff = q_cols.reshape(-1, 1) - k_cols.reshape(1, -1)
    allowed = diff >= 0
    if sliding_window is not None:
        allowed = ops.logical_and(allowed, diff < sliding_window)
    allowed = ops.logical_and(allowed.expand_dims(0), (k_valid > 0).expand_dims(1))
    # A product, not `where` with scalar branches: the parallel compiler's Select takes equal shapes only.
    return (ops.cast(ops.logical_not(allowed), ms.float32) * _MASK_MIN).expand_dims(1)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class MixtralModel(MixtralPreTrainedModel):
    """Embedding, decoder stack and final norm."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        param_dtype, compute_dtype = _DTYPES[config.param_init_type], _DTYPES[config.compute_dtype]
        self.compute_dtype = native_dtype(compute_dtype)
        self.sliding_window = config.sliding_window
        self.embed_tokens = nn.Cell()
        self.embed_tokens.weight = Parameter(
            initializer(Normal(config.initializer_range), (config.vocab_size, config.hidden_size), param_dtype),
            name="weight")
        self.embed_tokens.gather = ops.Gather()  # with its table: the pipeline stage of the cell owning both
        self.layers = nn.CellList([MixtralDecoderLayer(config, param_dtype, compute_dtype, i)
                                   for i in range(config.num_hidden_layers)])
        self.random_routed = config.router_type == "rre"
        self.rre_groups = config.rre_groups
        self.norm = MixtralRMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        cos, sin = rope_tables(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)

    def construct(self, input_ids, attention_mask=None, position_ids=None, cols=None,
                  past_keys=None, past_values=None, past_cols=None, past_valid=None, domain_ids=None):
        """input_ids int [B, S]; attention_mask [B, S] (1 = token, 0 = padding); position_ids [B, S]
        (default 0..S-1); cols [S]: sequence slots of these tokens (default 0..S-1). With a KV cache:
        past_keys/values [L, B, KV, P, D], past_cols int [P] (-1 for empty slots), past_valid [B, P].
        domain_ids int [B, S]: each token's domain, which picks its expert group under router_type rre
        (optional, and ignored, with one group); other routers ignore it.

        Returns hidden [B, S, H], new keys and values [L, B, KV, S, D], per-layer router outputs and the
        valid token count [1] (1-d, as z_sum's entries: pipeline stages exchange no 0-d tensors).
        """
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = ops.ones((b, s), ms.float32)
        token_mask = ops.cast(attention_mask, ms.float32)
        if position_ids is None:
            position_ids = ops.broadcast_to(arange(s).reshape(1, s), (b, s))
        if cols is None:
            cols = arange(s)
        k_cols, k_valid = cols, token_mask
        if past_keys is not None:
            k_cols = ops.concat((past_cols, cols))
            k_valid = ops.concat((ops.cast(past_valid, ms.float32), token_mask), axis=1)
        bias = attention_bias(cols, k_cols, k_valid, self.sliding_window)
        cos = ops.gather(self.rope_cos, position_ids, 0).expand_dims(1)
        sin = ops.gather(self.rope_sin, position_ids, 0).expand_dims(1)

        token_ids = None
        if self.random_routed:
            token_ids = input_ids
            if self.rre_groups == 1:  # one group serves every domain id (an extracted group keeps its data's ids)
                domain_ids = ops.zeros_like(input_ids)
            elif domain_ids is None:
                raise ValueError(f"router_type rre with {self.rre_groups} expert groups needs domain_ids "
                                 "(a dataset column); extract one group to run a single domain")
        x = embedding(self.embed_tokens.gather, self.embed_tokens.weight, input_ids, self.compute_dtype)
        keys, values, logits, loads, dropped, prob_sums, z_sums = (), (), (), (), (), (), ()
        if past_keys is not None:  # one Unstack each: indexing [i] is a strided copy per layer, far slower
            past_keys, past_values = ops.unstack(past_keys), ops.unstack(past_values)
        for i, layer in enumerate(self.layers):
            pk = past_keys[i] if past_keys is not None else None
            pv = past_values[i] if past_values is not None else None
            out = layer(x, cos, sin, bias, token_mask, pk, pv, token_ids, domain_ids)
            x = out[0]
            keys += (out[1],)
            values += (out[2],)
            if len(out) > 3:  # router outputs: MoE layers only
                logits += (out[3],)
                loads += (out[4],)
                dropped += (out[5],)
                prob_sums += (out[6],)
                z_sums += (out[7],)
        return (self.norm(x), ops.stack(keys), ops.stack(values), ops.stack(logits), ops.stack(loads),
                ops.stack(dropped), ops.stack(prob_sums), ops.concat(z_sums), token_mask.reshape(-1, 1).sum(axis=0))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class MixtralForCausalLM(MixtralPreTrainedModel):
    """Mixtral with the LM head and the training loss (CE + aux * load balancing + z * router z-loss).

    In eval mode (`set_train(False)`), `model(input_ids, attention_mask=mask)` returns (logits [B, S, V],
    router_logits [L, B*S, E], expert load [L, E], dropped assignments [L, E]); with labels (Hugging Face
    semantics: same length as input_ids, shifted inside; -100 ignored) it returns (loss, ce_loss,
    aux_loss, z_loss, expert load [L, E], dropped [L, E]). L counts the MoE layers (all, for Mixtral).

    In training mode it follows MindFormers' models: samples hold seq_length + 1 tokens, the network runs
    on the first seq_length (inputs) and scores the last seq_length (labels: `labels[:, 1:]`, or
    `input_ids[:, 1:]` when none are given), and the output is the loss alone, what PipelineCell,
    MicroBatchInterleaved and gradient accumulation sum. The loss terms and router statistics of the
    pass go to `self.training_stats` (losses.TrainingStats, the side channel callbacks read).
    `domain_ids` [B, S] (a dataset column) picks each token's expert group under router_type rre.
    """

    def __init__(self, config: MixtralConfig, extra_terms: Sequence[str] = (), **_framework_args) -> None:
        """`extra_terms`: loss terms a forward built around this model adds to its own (LOSS_TERMS), e.g.
        distillation's kd_loss (run/distill.py extra_terms): the side channel is built once, with every
        term, before the parallel plan shards it. `_framework_args`: what MindFormers' trainer passes every
        model (parallel_config, moe_config, dataset_config, ...); parallelism here comes from
        mixtral_ms.parallel, not from the model."""
        super().__init__(config)
        param_dtype, compute_dtype = _DTYPES[config.param_init_type], _DTYPES[config.compute_dtype]
        self.config = config
        self.model = MixtralModel(config)
        self.tie_word_embeddings = config.tie_word_embeddings
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, config.initializer_range, param_dtype,
                                  compute_dtype)
        self.head_matmul = ops.MatMul(transpose_b=True)
        self.round_dtype = emulated_dtype(compute_dtype)
        self.aux_coef = config.router_aux_loss_coef
        self.z_coef = config.router_z_loss_coef
        self.ignore_index = config.ignore_token_id
        self.aux_scope = config.router_aux_loss_scope
        self.top_k = config.num_experts_per_tok
        self.bias_rate = float(config.router_bias_update_rate)
        self.training_stats = TrainingStats(len(moe_layers(config)), config.num_local_experts,
                                            LOSS_TERMS + tuple(extra_terms))
        self.rank_sum = rank_sum() if self.bias_rate > 0 else None  # the routers' counts are one rank's

    def lm_logits(self, hidden: Tensor) -> Tensor:
        if self.tie_word_embeddings:
            b, s, h = hidden.shape
            weight = ops.cast(self.model.embed_tokens.weight, hidden.dtype)
            return matmul(self.head_matmul, hidden.reshape(b * s, h), weight, self.round_dtype).reshape(b, s, -1)
        return self.lm_head(hidden)

    @classmethod
    def from_pretrained(cls, path: str, **config_overrides) -> "MixtralForCausalLM":
        """Load a folder with config.json and weights in either layout: Hugging Face (model.safetensors or
        index + shards) or mixtral-ms (hf2ms output)."""
        config = MixtralConfig.from_hf_dir(path, **config_overrides)
        model = cls(config)
        from mixtral_ms.checkpoint.load import load_weights
        load_weights(model, path)
        return model

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Incremental decoding with a KV cache, with Hugging Face's generate arguments as users and
        MindFormers' text-generation pipeline (Trainer.predict) pass them: mixtral_ms/inference."""
        return text_generate(self, input_ids, attention_mask, **kwargs)

    def __call__(self, *args, **kwargs):
        """A call from Python (not one compiled inside a train step) checks its batch first
        (inference.prompts.check_batch): a bad id never reaches the graph, which stays usable."""
        named = dict(zip(("input_ids", "labels", "attention_mask"), args), **kwargs)
        if named.get("input_ids") is not None:
            check_batch(self.config.vocab_size, named["input_ids"], named.get("attention_mask"), named.get("labels"),
                        self.ignore_index, batch_only=True,  # a training sample holds seq_length + 1 tokens
                        max_positions=self.config.max_position_embeddings + (1 if self.training else 0))
        return super().__call__(*args, **kwargs)

    def forward_logits(self, input_ids, attention_mask=None, position_ids=None, domain_ids=None):
        """(logits [B, S, V], router_logits [L, B*S, E], load [L, E], dropped [L, E], and the pooled
        router sums the training loss needs: prob_sum [L, E], z_sum [L], valid token count [1])."""
        hidden, _, _, router_logits, load, dropped, prob_sum, z_sum, valid = self.model(
            input_ids, attention_mask, position_ids, domain_ids=domain_ids)
        return self.lm_logits(hidden), router_logits, load, dropped, prob_sum, z_sum, valid

    def training_loss(self, logits, labels, load, dropped, prob_sum, z_sum, valid, ce_coef, shifted):
        """(loss, ce, aux, z, load, dropped) with loss = ce_coef * CE + aux_coef * aux + z_coef * z
        (`ce_coef` below 1: distillation's alpha, run/distill.py); `shifted`: labels are already the
        next tokens (the training forward's MindFormers convention), else Hugging Face's shift."""
        num_layers = load.shape[0]
        ce = causal_lm_loss(logits, labels, self.ignore_index, shifted=shifted)
        pooled_tokens = valid.sum() * num_layers
        if self.aux_scope == "sequence":  # load and prob_sum per sequence, [L, B, E]
            aux = sequence_balancing_loss(load.sum(axis=0), prob_sum.sum(axis=0))
            load = load.sum(axis=1)
        elif self.aux_scope == "global_batch" and self.training:
            # the side channel's earlier passes and this one (added to the channel after the loss), every rank's
            step_load = self.training_stats.step_load(load)
            aux = global_balancing_loss(step_load, prob_sum.sum(axis=0), pooled_tokens, self.top_k)
        else:
            aux = load_balancing_loss(load.sum(axis=0), prob_sum.sum(axis=0), pooled_tokens)
        z = router_z_loss(z_sum.sum(), pooled_tokens)
        loss = ce_coef * ce + self.aux_coef * aux + self.z_coef * z
        return loss, ce, aux, z, load, dropped

    def update_expert_bias(self, keep: Tensor) -> Tensor:
        """Aux-loss-free balancing, once per optimizer step (MixtralTrainOneStepCell after the update; the
        callbacks under any other wrapper, MindFormers' pipeline wrapper included): each router's bias moves
        by rate * sign(mean - load) of the tokens per expert it counted over the step's passes, on every
        data-parallel rank; `keep` 0.0 for a skipped step. Returns a token."""
        rate = keep * self.bias_rate
        token = rate
        for layer in self.model.layers:
            if layer.moe_row >= 0:
                token = ops.depend(token, layer.block_sparse_moe.gate.update_bias(rate, self.rank_sum))
        return token

    @staticmethod
    def training_inputs(input_ids, labels=None, attention_mask=None, position_ids=None, domain_ids=None):
        """MindFormers' samples hold seq_length + 1 tokens: the model runs on the first seq_length, and the
        labels are the next tokens (the last seq_length)."""
        labels = (input_ids if labels is None else labels)[:, 1:]
        if attention_mask is not None:
            attention_mask = attention_mask[:, :-1]
        if position_ids is not None:
            position_ids = position_ids[:, :-1]
        if domain_ids is not None:
            domain_ids = domain_ids[:, :-1]
        return input_ids[:, :-1], labels, attention_mask, position_ids, domain_ids

    def construct(self, input_ids, labels=None, attention_mask=None, position_ids=None, domain_ids=None):
        if self.training:
            input_ids, labels, attention_mask, position_ids, domain_ids = self.training_inputs(
                input_ids, labels, attention_mask, position_ids, domain_ids)
        logits, router_logits, load, dropped, prob_sum, z_sum, valid = self.forward_logits(
            input_ids, attention_mask, position_ids, domain_ids)
        if labels is None:
            return logits, router_logits, load.sum(axis=1) if self.aux_scope == "sequence" else load, dropped
        loss, ce, aux, z, load, dropped = self.training_loss(logits, labels, load, dropped, prob_sum, z_sum, valid,
                                                             1.0, self.training)
        if self.training:
            return self.training_output(loss, (ce, aux, z), load, dropped)
        return loss, ce, aux, z, load, dropped

    def training_output(self, loss: Tensor, terms: tuple, load: Tensor, dropped: Tensor) -> Tensor:
        """What a training forward returns: the loss alone, once the pass's `terms` (in the order of
        `training_stats.terms`), load and dropped are in the side channel (the model's construct and
        run/distill.py's Distillation, which adds kd_loss)."""
        return ops.depend(loss, self.training_stats(terms, load, dropped))
