"""The sharding plan for MindSpore semi-auto parallel, applied from outside the model.

The model holds its matmuls, batched matmuls, the embedding gather and the two MoE transposes as
primitive attributes; it is built for the layout (`ParallelLayout.model_fields()`: MoE token groups =
dp, static dispatch). `apply_plan` runs the plan's steps: `shard` calls `.shard()` on each primitive
(all but those UNSHARDED names) and returns a table (name -> Entry) of every sharded primitive and
every parameter with its shape, strategy and stage; `assign_stages` sets pipeline stages;
`mark_recompute` marks decoder layers for recomputation. `plan_spec` builds the same table
from the config alone (no weights), so the shipped 8x7B configs can be checked without materialising
them; `check_table` verifies every strategy against its shapes.

Strategies (dp, mp, ep, pp from parallel_config; per stage, dp*mp devices; t*f = dp*mp/ep, see
ParallelLayout.expert_token_split / expert_ffn_split; G = dp token groups, C = capacity per group):

| primitive | inputs | strategy |
|---|---|---|
| q/k/v_proj.matmul (column parallel) | x [T, H], W [heads*D, H] | ((dp, 1), (mp, 1)) |
| o_proj.matmul (row parallel) | x [T, nH*D], W [H, nH*D] | ((dp, mp), (1, mp)); out ((dp*mp, 1),) if seq-par |
| self_attn.bmm_qk / bmm_pv | [B, nKV, nH/nKV*S, *] (a KV head's query heads stacked) | ((dp, mp, 1, 1), (dp, mp, 1, 1)) |
| block_sparse_moe.gate.matmul (router) | x [T, H], W [E, H] | ((dp, 1), (1, 1)) |
| block_sparse_moe.to_experts (Transpose) | [G, E, C, H] | ((t, ep, a, 1),): dp-sharded groups -> AllToAll over ep |
| experts.bmm_gate / bmm_up | [E, G*C, H], W [E, F, H] | ((ep, t, 1), (ep, f, 1)) |
| experts.act / gated (SiLU, Mul) | [E, G*C, F] | ((ep, t, f),) / ((ep, t, f), (ep, t, f)) |
| experts.bmm_down | [E, G*C, F], W [E, H, F] | ((ep, t, f), (ep, 1, f)) |
| block_sparse_moe.from_experts | [E, G, C, H] | ((ep, t, a, 1),): AllToAll back to dp-sharded groups |
| model.embed_tokens.gather (embedding) | W [V, H], ids [B, S] | ((1, 1), (dp, 1)); ((mp, 1), (dp, 1)) if vocab split |
| lm_head.matmul, head_matmul | x [T, H], W [V, H] | ((dp, 1), (1, 1)); ((dp, 1), (mp, 1)) unless vocab_emb_dp |
| training_stats.add_* / zero_* / step_load_* (side channel, global-batch aux) | [L, E], scalars | replicated |
| gate.biased_scores; gate.bias_step / count / zero_count (aux-loss-free bias) | scores [T, E] + bias [E] | ((dp, 1), (1,)); replicated |
| shared_expert.*, dense layers' mlp.*: gate/up_proj.matmul, act, gated | x [T, H], W [W, H] | ((dp, 1), (mp, 1)); ((dp, mp),) |
| shared_expert.down_proj / mlp.down_proj.matmul | [T, W], W [H, W] | row parallel ((dp, mp), (1, mp)) |
| shared_expert_gate.matmul | x [T, H], W [1, H] | ((dp, 1), (1, 1)) |

`a` is f with moe_config.group_wise_a2a (each model-parallel rank sends 1/f of the capacity through the
AllToAll and the slices are all-gathered inside the model-parallel group afterwards, MindFormers'
group-wise AllToAll), else 1. RMSNorm weights are replicated. Layers go to stage layer // (L/pp), the
embedding to stage 0, the final norm, the LM head and the training side channel (`training_stats.*`,
replicated) to the last stage. Shapes are those of the network's input: seq_length tokens per row
(training samples hold seq_length + 1; the model runs on the first seq_length).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mixtral_ms.model.capacity import expert_capacity
from mixtral_ms.model.schema import ModelDims, model_dims, moe_layers
from mixtral_ms.parallel.layout import ParallelConfigError, ParallelLayout

Strategy = Tuple[Tuple[int, ...], ...]
STATS_PREFIX = "training_stats."  # the training side channel, losses.TrainingStats (MixtralForCausalLM.training_stats)
STATS_TERMS = ("ce_loss", "aux_loss", "z_loss")  # losses.LOSS_TERMS (no MindSpore here); apply_plan reads the model's


@dataclass(frozen=True)
class Entry:
    """One row of the plan: a primitive (`kind == "op"`: input shapes and in_strategy, optional
    out_strategy) or a parameter (`kind == "param"`: its shape and the layout of its slices)."""
    kind: str
    shapes: Tuple[Tuple[int, ...], ...]
    strategy: Strategy
    stage: int
    out_strategy: Optional[Strategy] = None
    note: str = ""
    layout: Optional["AxisLayout"] = None  # named device axes instead of `strategy` (the expert ops)

    def slice_shape(self, index: int = 0) -> Tuple[int, ...]:
        return tuple(d // s for d, s in zip(self.shapes[index], self.strategy[index]))


@dataclass(frozen=True)
class AxisLayout:
    """A strategy over named device axes (MindSpore's `Layout`): `axes` name the stage's device matrix,
    outermost first, with sizes `sizes`; `maps` give, per input, each dimension's axis (a name, a tuple of
    names, or "None"). Plain strategies order the device matrix by tensor dimension, so two operators
    whose first dimensions differ (tokens [G, E, C, H], experts [E, G*C, H]) would put expert parallelism
    on different devices and the compiler would shuffle between them; one named matrix keeps them equal."""
    axes: Tuple[str, ...]
    sizes: Tuple[int, ...]
    maps: Tuple[Tuple[Any, ...], ...]

    def to_mindspore(self) -> tuple:
        from mindspore.parallel import Layout
        layout = Layout(self.sizes, self.axes)
        return tuple(layout(*m) for m in self.maps)


def expert_axes(layout: ParallelLayout) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """The device matrix of the expert layer: ("g", "e2", "t", "f") of sizes (g, ep/g, dp/g, mp/(ep/g)) with
    g = gcd(ep, dp), what the experts' batched matmuls ((ep, t, 1), (ep, f, 1)) imply. Experts split over
    ("g", "e2") (= ep), the tokens an expert sees over "t" (= expert_token_split), each expert's FFN
    columns over "f" (= expert_ffn_split). Over a stage's dp x mp grid (rank = i_dp * mp + i_mp) data
    parallelism is ("g", "t") and model parallelism ("e2", "f"): the same devices whenever e2 or t is 1
    (every power-of-two layout), so the token exchange is one AllToAll over "g"."""
    dp, mp, ep = layout.data_parallel, layout.model_parallel, layout.expert_parallel
    g = math.gcd(ep, dp)
    e2 = ep // g
    return ("g", "e2", "t", "f"), (g, e2, dp // g, mp // e2)


def pass_capacity(dims: ModelDims, layout: ParallelLayout, capacity_factor: Optional[float] = None) -> Tuple[int, int]:
    """(N, C): tokens of one MoE token group in one forward pass, and the expert capacity over them.

    A forward pass is one micro-batch (pipeline micro-batch or accumulation step) of one interleaved
    copy; its token groups are the data-parallel shards, so N = batch_size * seq_length whatever
    micro_batch_num, gradient_accumulation_steps or micro_batch_interleave_num are (they add passes, not
    tokens per pass), and C = ceil(k * N * cf / E). Dropless (cf <= 0): the 2x-mean-load tier shown."""
    n = layout.batch_size * dims.seq_length
    factor = dims.capacity_factor if capacity_factor is None else capacity_factor
    k, e = dims.num_experts_per_tok, dims.num_local_experts
    return n, expert_capacity(n, k, e, factor if factor > 0 else 2.0)


def plan_spec(model: Any, layout: ParallelLayout, run_mode: str = "train", capacity_factor: Optional[float] = None,
              stats_terms: Sequence[str] = STATS_TERMS) -> Dict[str, Entry]:
    """The plan from shapes alone: every sharded primitive and every parameter of MixtralForCausalLM
    (`stats_terms`: the loss terms of its side channel).

    `model`: MixtralConfig or model_config mapping. Shapes are global (semi-auto parallel graphs are
    written for the whole batch): rows B = batch_size * dp per micro-batch, T = B * tokens per row.
    Capacity (pass_capacity) uses the training capacity factor in train/finetune; predict runs the
    model in eval mode, dropless at the default inference_capacity_factor 0, which a sharded model runs
    at capacity N (no tiers: the parallel compiler takes no branch on a tensor).
    """
    d = model_dims(model)
    dp, mp, ep, pp = layout.data_parallel, layout.model_parallel, layout.expert_parallel, layout.pipeline_stage
    t, f = layout.expert_token_split, layout.expert_ffn_split
    a = f if layout.group_wise_a2a else 1
    if d.num_hidden_layers != layout.num_layers:
        raise ParallelConfigError(f"the layout was validated for {layout.num_layers} layers, the model has "
                                  f"{d.num_hidden_layers}")
    b = layout.micro_batch_rows()
    s = d.seq_length
    tok = b * s
    h, v, e, ff = d.hidden_size, d.vocab_size, d.num_local_experts, d.intermediate_size
    nh, nkv, hd = d.num_attention_heads, d.num_key_value_heads, d.head_dim
    g = layout.moe_token_groups
    if capacity_factor is None:
        capacity_factor = d.capacity_factor if run_mode in ("train", "finetune") else 0.0
    k = d.num_experts_per_tok
    n, c = pass_capacity(d, layout, capacity_factor)  # n = tok // g
    if capacity_factor <= 0:  # a sharded model's dropless path: capacity N, no tiers (moe.py _dropless)
        c = n
    if c % a:
        raise ParallelConfigError(f"moe_config.group_wise_a2a splits the expert capacity over {a} model-parallel "
                                  f"ranks, but the capacity is {c} ({n} tokens per group, capacity_factor "
                                  f"{capacity_factor}); change batch_size, seq_length or capacity_factor, or "
                                  "turn it off")
    last = pp - 1
    sparse = moe_layers(d)
    vocab_split = 1 if layout.effective_vocab_emb_dp else mp
    axes, sizes = expert_axes(layout)
    experts = ("g", "e2")  # ep
    slots = "f" if a > 1 else "None"  # C, split over the FFN axis by the group-wise AllToAll
    table: Dict[str, Entry] = {}

    def op(name, shapes, strategy, stage, out=None, note="", maps=None):
        named = AxisLayout(axes, sizes, tuple(map(tuple, maps))) if maps else None
        table[name] = Entry("op", tuple(map(tuple, shapes)), tuple(map(tuple, strategy)), stage,
                            tuple(map(tuple, out)) if out else None, note, named)

    def param(name, shape, strategy, stage, note=""):
        table[name] = Entry("param", (tuple(shape),), (tuple(strategy),), stage, None, note)

    param("model.embed_tokens.weight", (v, h), (vocab_split, 1), 0, "model.embed_tokens.gather table")
    op("model.embed_tokens.gather", [(v, h), (b, s)], [(vocab_split, 1), (dp, 1)], 0, note="embedding lookup")
    for i in range(d.num_hidden_layers):
        st = layout.stage_of_layer(i)
        p = f"model.layers.{i}."
        param(p + "input_layernorm.weight", (h,), (1,), st, "replicated")
        for proj, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            op(p + f"self_attn.{proj}.matmul", [(tok, h), (rows, h)], [(dp, 1), (mp, 1)], st, note="column parallel")
            param(p + f"self_attn.{proj}.weight", (rows, h), (mp, 1), st)
        op(p + "self_attn.o_proj.matmul", [(tok, nh * hd), (h, nh * hd)], [(dp, mp), (1, mp)], st,
           out=[(dp * mp, 1)] if layout.use_seq_parallel else None,
           note="row parallel: AllReduce" + (" -> ReduceScatter (use_seq_parallel)" if layout.use_seq_parallel else ""))
        param(p + "self_attn.o_proj.weight", (h, nh * hd), (1, mp), st)
        q_rows = nh // nkv * s  # the query heads sharing a KV head, stacked
        op(p + "self_attn.bmm_qk", [(b, nkv, q_rows, hd), (b, nkv, s, hd)], [(dp, mp, 1, 1), (dp, mp, 1, 1)], st,
           note="KV heads over mp")
        op(p + "self_attn.bmm_pv", [(b, nkv, q_rows, s), (b, nkv, s, hd)], [(dp, mp, 1, 1), (dp, mp, 1, 1)], st,
           note="KV heads over mp")
        param(p + "post_attention_layernorm.weight", (h,), (1,), st, "replicated")
        if i not in sparse:
            _swiglu(op, param, p + "mlp.", tok, h, ff, dp, mp, st, "dense layer")
            continue
        m = p + "block_sparse_moe."
        if d.router_type != "rre":  # the random router has no matmul (router.RandomRouter)
            op(m + "gate.matmul", [(tok, h), (e, h)], [(dp, 1), (1, 1)], st, note="router, tokens over dp")
        param(m + "gate.weight", (e, h), (1, 1), st, "replicated")
        if d.router_bias_update_rate > 0:
            param(m + "gate.e_score_correction_bias", (e,), (1,), st, "router bias, replicated")
            param(m + "gate.tokens_per_expert", (e,), (1,), st, "the router's count for the bias, replicated")
            op(m + "gate.biased_scores", [(tok, e), (e,)], [(dp, 1), (1,)], st, note="scores + bias, to choose")
            for name, what in (("bias_step", "bias update"), ("count", "count of a pass"),
                               ("zero_count", "count restarts")):
                op(m + "gate." + name, [(e,), (e,)], [(1,), (1,)], st, note=what + ", replicated")
        if d.num_shared_experts:
            _swiglu(op, param, m + "shared_expert.", tok, h, d.num_shared_experts * d.shared_expert_intermediate_size,
                    dp, mp, st, "shared experts")
            if d.shared_expert_gate:
                op(m + "shared_expert_gate.matmul", [(tok, h), (1, h)], [(dp, 1), (1, 1)], st,
                   note="shared experts' sigmoid gate")
                param(m + "shared_expert_gate.weight", (1, h), (1, 1), st, "replicated")
        op(m + "to_experts", [(g, e, c, h)], [(t, ep, a, 1)], st,
           note="AllToAll: dp token groups -> ep expert shards" + (" (group-wise)" if a > 1 else ""),
           maps=[("t", experts, slots, "None")])
        op(m + "experts.bmm_gate", [(e, g * c, h), (e, ff, h)], [(ep, t, 1), (ep, f, 1)], st, note="experts over ep")
        op(m + "experts.bmm_up", [(e, g * c, h), (e, ff, h)], [(ep, t, 1), (ep, f, 1)], st, note="experts over ep")
        op(m + "experts.act", [(e, g * c, ff)], [(ep, t, f)], st, note="SiLU of the gate, as the matmul's output")
        op(m + "experts.gated", [(e, g * c, ff), (e, g * c, ff)], [(ep, t, f), (ep, t, f)], st, note="silu(gate) * up")
        op(m + "experts.bmm_down", [(e, g * c, ff), (e, h, ff)], [(ep, t, f), (ep, 1, f)], st,
           note="experts over ep" + (", AllReduce over f" if f > 1 else ""))
        op(m + "from_experts", [(e, g, c, h)], [(ep, t, a, 1)], st, note="AllToAll back to dp token groups")
        op(m + "combine", [(tok, 1, k), (tok, k, h)], [(dp, 1, 1), (dp, 1, 1)], st,
           note="routing-weighted sum of the k outputs, tokens over dp")
        param(m + "experts.w1", (e, ff, h), (ep, f, 1), st)
        param(m + "experts.w3", (e, ff, h), (ep, f, 1), st)
        param(m + "experts.w2", (e, h, ff), (ep, 1, f), st)
    param("model.norm.weight", (h,), (1,), last, "replicated")
    head = [(dp, 1), (vocab_split, 1)]
    op("lm_head.matmul", [(tok, h), (v, h)], head, last,
       note="LM head" + (", vocab over mp" if vocab_split > 1 else ""))
    op("head_matmul", [(tok, h), (v, h)], head, last, note="tied-embedding LM head (used when tie_word_embeddings)")
    if not d.tie_word_embeddings:
        param("lm_head.weight", (v, h), (vocab_split, 1), last)
    else:
        del table["lm_head.matmul"]
    for term in (*stats_terms, "passes"):  # the training side channel (losses.TrainingStats), where the loss is
        param(STATS_PREFIX + term, (), (), last, "training statistics, replicated")
    for name in ("expert_load", "dropped"):
        param(STATS_PREFIX + name, (len(sparse), e), (1, 1), last, "training statistics, replicated")
    stats_table = (len(sparse), e)
    for name in ("add_table", "zero_table"):
        op(STATS_PREFIX + name, [stats_table, stats_table], [(1, 1), (1, 1)], last, note="side channel, replicated")
    for name in ("add_scalar", "zero_scalar"):
        op(STATS_PREFIX + name, [(), ()], [(), ()], last, note="side channel, replicated")
    # the step's load so far (TrainingStats.step_load: the global-batch aux loss)
    op(STATS_PREFIX + "step_load_add", [stats_table, stats_table], [(1, 1), (1, 1)], last,
       note="side channel, replicated")
    op(STATS_PREFIX + "step_load_sum", [stats_table], [(1, 1)], last, note="side channel, replicated")
    return table


def _swiglu(op, param, prefix: str, tok: int, h: int, width: int, dp: int, mp: int, stage: int, what: str) -> None:
    """The plan rows of a SwiGLU MLP (moe.SwiGLU at `prefix`): gate/up column parallel, down row parallel."""
    for proj in ("gate_proj", "up_proj"):
        op(prefix + f"{proj}.matmul", [(tok, h), (width, h)], [(dp, 1), (mp, 1)], stage,
           note=f"{what}, column parallel")
        param(prefix + f"{proj}.weight", (width, h), (mp, 1), stage)
    op(prefix + "act", [(tok, width)], [(dp, mp)], stage, note=f"SiLU of the {what}' gate")
    op(prefix + "gated", [(tok, width), (tok, width)], [(dp, mp), (dp, mp)], stage, note="silu(gate) * up")
    op(prefix + "down_proj.matmul", [(tok, width), (h, width)], [(dp, mp), (1, mp)], stage,
       note=f"{what}, row parallel: AllReduce")
    param(prefix + "down_proj.weight", (h, width), (1, mp), stage)


def check_table(table: Dict[str, Entry], layout: ParallelLayout) -> List[str]:
    """Every strategy has one entry per dimension, divides its dimension, and uses at most the devices
    of a stage; stages are in range. Returns the problems (empty when consistent)."""
    problems = []
    for name, entry in table.items():
        strategies = list(entry.strategy) + list(entry.out_strategy or ())
        if entry.out_strategy and len(entry.out_strategy[0]) != len(entry.shapes[0]):
            problems.append(f"{name}: out_strategy rank")
        if not 0 <= entry.stage < layout.pipeline_stage:
            problems.append(f"{name}: stage {entry.stage} outside 0..{layout.pipeline_stage - 1}")
        for shape, strategy in zip(entry.shapes, entry.strategy):
            if len(shape) != len(strategy):
                problems.append(f"{name}: strategy {strategy} does not match shape {shape}")
                continue
            for dim, split in zip(shape, strategy):
                if split < 1 or dim % split:
                    problems.append(f"{name}: dimension {dim} of {shape} not divisible by {split} ({strategy})")
        for strategy in strategies:
            if math.prod(strategy) > layout.stage_devices or layout.stage_devices % math.prod(strategy):
                problems.append(f"{name}: strategy {strategy} does not fit {layout.stage_devices} devices per stage")
    return problems


def replication(entry: Entry, layout: ParallelLayout) -> int:
    """How many devices of a stage hold the same slice of a parameter (the optimizer-shard group)."""
    return layout.stage_devices // math.prod(entry.strategy[0])


# ---------------------------------------------------------------------------------------------------------------
# Applying the plan to a model


# Primitives the plan leaves unsharded, by name (fnmatch patterns), and why.
UNSHARDED = {
    "gather": "MindFormers' text generator's (mindformers/generation/text_generator.py), never in mixtral-ms's graph",
    "model.gather": "the same, on MixtralModel (also a PreTrainedModel); the embedding's is embed_tokens.gather",
    "model.layers.*.block_sparse_moe.experts.segment_matmul":
        "eval-mode per-expert segments (MixtralExperts.segments), never run with static_dispatch",
    "model.layers.*.block_sparse_moe.experts.gathered_*":
        "eval-mode decoding on the routed experts' weights (MixtralExperts.gathered), never with static_dispatch",
}


def _primitives(model) -> Dict[str, Any]:
    """name -> primitive for every primitive a cell of `model` holds as an attribute, but UNSHARDED's."""
    found = {}
    for cell_name, cell in model.cells_and_names():
        for attr, prim in getattr(cell, "_primitives", {}).items():
            name = f"{cell_name}.{attr}" if cell_name else attr
            if prim is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in UNSHARDED):
                found[name] = prim
    return found


def shard(model, layout: ParallelLayout, run_mode: str = "train") -> Dict[str, Entry]:
    """`.shard()` every primitive of a MixtralForCausalLM built for `layout` (its config holds
    `layout.model_fields()`) and return the plan's table.

    Raises ParallelConfigError if the model was built for another layout, holds a primitive or a
    parameter the plan does not cover, or if a strategy does not divide its shape.
    """
    config = model.config
    wrong = {k: getattr(config, k) for k, v in layout.model_fields().items() if getattr(config, k) != v}
    if wrong:
        raise ParallelConfigError(f"the model was built with {wrong}; build it from a config with "
                                  f"layout.model_fields() ({layout.model_fields()})")
    table = plan_spec(config, layout, run_mode, stats_terms=model.training_stats.terms)
    problems = check_table(table, layout)
    if problems:
        raise ParallelConfigError(f"sharding plan inconsistent with the model: {problems[0]} "
                                  f"(+{len(problems) - 1} more)")
    prims = _primitives(model)
    ops = {k for k, e in table.items() if e.kind == "op"}
    missing = sorted(set(prims) - ops)
    if missing:
        raise ParallelConfigError(f"no sharding strategy for primitive(s) {missing[:4]}; "
                                  f"update mixtral_ms/parallel/plan.py")
    unused = sorted(ops - set(prims))
    if unused:
        raise ParallelConfigError(f"the model lacks primitive(s) {unused[:4]} the plan shards (moe.py hooks?)")
    params = {p.name: p for p in model.get_parameters()}
    planned = {k for k, e in table.items() if e.kind == "param"}
    if set(params) != planned:
        extra, absent = sorted(set(params) - planned), sorted(planned - set(params))
        raise ParallelConfigError(f"parameters not in the plan: {extra[:4]}; planned but absent: {absent[:4]}")
    for name, prim in prims.items():
        entry = table[name]
        if entry.layout is not None:
            prim.shard(entry.layout.to_mindspore())
        elif entry.out_strategy:
            prim.shard(entry.strategy, entry.out_strategy)
        else:
            prim.shard(entry.strategy)
    return table


def assign_stages(model, layout: ParallelLayout) -> None:
    """Pipeline stages: layer i to stage i // (L/pp), the embedding to the first, norm and head to the last."""
    if layout.pipeline_stage == 1:
        return
    inner = model.model
    inner.embed_tokens.pipeline_stage = 0
    for i, layer in enumerate(inner.layers):
        layer.pipeline_stage = layout.stage_of_layer(i)
    inner.norm.pipeline_stage = layout.pipeline_stage - 1
    if not model.config.tie_word_embeddings:
        model.lm_head.pipeline_stage = layout.pipeline_stage - 1
    model.training_stats.pipeline_stage = layout.pipeline_stage - 1  # the side channel, where the loss is


def mark_recompute(model, layout: ParallelLayout) -> None:
    """Every decoder layer recomputed in backward when the layout asks (recompute_config.recompute)."""
    if layout.recompute:
        for layer in model.model.layers:
            layer.recompute()


def apply_plan(model, layout: ParallelLayout, run_mode: str = "train") -> Dict[str, Entry]:
    """The plan's three steps on a model built for `layout`: shard, assign_stages, mark_recompute; the
    model keeps the layout as `parallel_layout`. Returns the table."""
    table = shard(model, layout, run_mode)
    assign_stages(model, layout)
    mark_recompute(model, layout)
    model.parallel_layout = layout  # what was applied, for cells built beside it (a distillation teacher)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Parallel context


def context_kwargs(layout: ParallelLayout, strategy_file: Optional[str] = None) -> Dict[str, Any]:
    """Arguments for mindspore.set_auto_parallel_context for this layout: parallel_mode, device_num,
    gradients_mean, full_batch, and in semi-auto mode enable_alltoall, pipeline_stages,
    enable_parallel_optimizer (+ parallel_optimizer_config), pipeline_config and the strategy file;
    other keys of the YAML's `parallel:` section pass through."""
    kwargs: Dict[str, Any] = dict(layout.context)
    kwargs.update(parallel_mode=layout.parallel_mode, device_num=layout.devices,
                  gradients_mean=layout.gradients_mean)
    if "dataset_strategy" not in kwargs:
        kwargs["full_batch"] = layout.full_batch
    if layout.parallel_mode == "semi_auto_parallel":
        kwargs.update(enable_alltoall=layout.enable_alltoall, pipeline_stages=layout.pipeline_stage,
                      enable_parallel_optimizer=layout.optimizer_shard)
        if layout.optimizer_shard and layout.parallel_optimizer_config:
            kwargs["parallel_optimizer_config"] = dict(layout.parallel_optimizer_config)
        if layout.pipeline_stage > 1 and layout.pipeline_config:
            kwargs["pipeline_config"] = dict(layout.pipeline_config)
        if strategy_file and "strategy_ckpt_config" not in kwargs:
            kwargs["strategy_ckpt_save_file"] = strategy_file
    return kwargs


def setup_context(layout: ParallelLayout, strategy_file: Optional[str] = None) -> Dict[str, Any]:
    """Apply context_kwargs on top of what MindFormers' build_context set, plus MindFormers'
    semi-auto algorithm settings (element-wise ops follow their producer's strategy)."""
    import mindspore as ms
    from mindspore.parallel import set_algo_parameters
    kwargs = context_kwargs(layout, strategy_file)
    ms.set_auto_parallel_context(**kwargs)
    if layout.parallel_mode == "semi_auto_parallel":
        set_algo_parameters(elementwise_op_strategy_follow=True, fully_use_devices=True)
    return kwargs


def prepare_parallel(config, layout: ParallelLayout, devices: Optional[int] = None,
                     rank: Optional[int] = None) -> None:
    """For scripts/run_mixtral.py with `use_parallel: True`, after MindFormers' build_context(config)
    has initialised communication and before the model is built: check the run's layout (validated once,
    from the YAML as written) against the world size and set the auto-parallel context (strategy file
    `<output_dir>/strategy/ckpt_strategy_rank_<rank>.ckpt`, MindFormers' naming). The runner then builds the
    model and calls `apply_plan(model, layout, config.run_mode)` (mixtral_ms/run/runner.py).
    """
    import os
    if devices is None or rank is None:
        from mindspore.communication import get_group_size, get_rank
        devices = get_group_size() if devices is None else devices
        rank = get_rank() if rank is None else rank
    layout.check_devices(devices)
    name = os.path.basename(str((config.get("parallel") or {}).get("strategy_ckpt_save_file") or "ckpt_strategy.ckpt"))
    strategy_file = os.path.join(str(config.get("output_dir") or "./output"), "strategy",
                                 name.replace(".ckpt", f"_rank_{rank}.ckpt"))
    os.makedirs(os.path.dirname(strategy_file), exist_ok=True)
    setup_context(layout, strategy_file)
