"""Parallel layout: MindFormers' `parallel_config` / `parallel` / `moe_config` keys, validated against a
Mixtral model and a device count.

No MindSpore import here (the memory CLI and the docs use this module; importing MindSpore and
MindFormers costs seconds). The model is read through `mixtral_ms.model.schema.model_dims`, which accepts a
`MixtralConfig` or the `model.model_config` mapping of a YAML file.

Every error is a one-line `ParallelConfigError` naming the offending key and values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from mixtral_ms.cli import BadInput
from mixtral_ms.model.schema import ModelDims, model_dims  # the model side of every check


class ParallelConfigError(BadInput, ValueError):
    """A parallel layout that cannot run this model on this many devices."""


# MindFormers 1.9 TransformerOpParallelConfig keys and defaults (modules/transformer/transformer.py).
PARALLEL_CONFIG_DEFAULTS: Dict[str, Any] = {
    "data_parallel": 1,
    "model_parallel": 1,
    "context_parallel": 1,        # accepted at 1 only: mixtral-ms has no context-parallel attention
    "expert_parallel": 1,
    "pipeline_stage": 1,
    "micro_batch_num": 1,
    "seq_split_num": 1,           # accepted at 1 only (MindFormers' seq-pipe)
    "use_seq_parallel": False,
    "optimizer_shard": None,      # deprecated by MindFormers in favour of parallel.enable_parallel_optimizer
    "gradient_aggregation_group": 4,
    "vocab_emb_dp": True,
    "recompute": None,            # TransformerRecomputeConfig dict; mixtral-ms reads recompute_config instead
    "context_parallel_algo": "colossalai_cp",
    "ulysses_degree_in_cp": 1,
    "mem_coeff": 0.1,
    "swap": None,
}

# `parallel:` keys: mindspore.set_auto_parallel_context arguments (MindFormers passes the section through;
# tests check this set against mindspore.parallel._auto_parallel_context._set_auto_parallel_context_func_map).
PARALLEL_CONTEXT_KEYS = frozenset({
    "parallel_mode", "device_num", "global_rank", "gradients_mean", "gradient_fp32_sync", "loss_repeated_mean",
    "pipeline_stages", "pipeline_result_broadcast", "pipeline_segments", "search_mode", "auto_parallel_search_mode",
    "parameter_broadcast", "strategy_ckpt_load_file", "strategy_ckpt_save_file", "group_ckpt_save_file",
    "full_batch", "dataset_strategy", "enable_parallel_optimizer", "force_fp32_communication",
    "parallel_optimizer_config", "pipeline_config", "all_reduce_fusion_config", "optimizer_weight_shard_size",
    "optimizer_weight_shard_aggregated_save", "sharding_propagation", "enable_alltoall", "strategy_ckpt_config",
    "comm_fusion", "auto_pipeline",
})
PARALLEL_OPTIMIZER_KEYS = frozenset({"gradient_accumulation_shard", "parallel_optimizer_threshold",
                                     "optimizer_weight_shard_size", "optimizer_level"})
PIPELINE_CONFIG_KEYS = frozenset({"pipeline_interleave", "pipeline_scheduler"})
PIPELINE_SCHEDULERS = ("1f1b", "gpipe", "seqpipe", "seqvpp", "seqsmartvpp", "zero_bubble_v")
OPTIMIZER_LEVELS = ("level1", "level2", "level3")

# MindFormers' parallel_mode spellings (mindformers/tools/utils.py PARALLEL_MODE).
_MODES = {0: "data_parallel", 1: "semi_auto_parallel", 2: "auto_parallel", 3: "hybrid_parallel",
          "DATA_PARALLEL": "data_parallel", "SEMI_AUTO_PARALLEL": "semi_auto_parallel",
          "AUTO_PARALLEL": "auto_parallel", "HYBRID_PARALLEL": "hybrid_parallel", "STAND_ALONE": "stand_alone",
          "data_parallel": "data_parallel", "semi_auto_parallel": "semi_auto_parallel",
          "auto_parallel": "auto_parallel", "hybrid_parallel": "hybrid_parallel", "stand_alone": "stand_alone"}

# moe_config keys this project reads (the rest of MindFormers' MoEConfig configures MindFormers' own MoE
# module and is accepted only when it agrees with the model config, see _check_moe_config).
MOE_COMM_KEYS = ("group_wise_a2a", "comp_comm_parallel", "comp_comm_parallel_degree")
_MOE_MODEL_KEYS = {"expert_num": "num_local_experts", "num_experts_chosen": "num_experts_per_tok",
                   "capacity_factor": "capacity_factor"}
_MOE_IGNORED_KEYS = {"aux_loss_factor", "routing_policy", "norm_topk_prob", "enable_sdrop", "router_dense_type"}

# What `MindFormerConfig(path)` writes into `moe_config` for every key the YAML leaves out (MindFormers 1.9
# tools/register/template.py MoEConfig; a test keeps them equal). A key at this value asks for nothing and
# the check skips it, so a MindFormerConfig (template applied) and the bare YAML validate alike.
MOE_TEMPLATE_DEFAULTS: Dict[str, Any] = {
    "expert_num": 1, "capacity_factor": 1.1, "aux_loss_factor": 0.05, "num_experts_chosen": 1,
    "expert_group_size": None, "group_wise_a2a": False, "comp_comm_parallel": False, "comp_comm_parallel_degree": 2,
    "save_token_distribution": False, "cur_layer": 0, "enable_cold_hot_expert": False, "update_step": 10000,
    "hot_expert_num": 0, "cold_token_percent": 1.0, "moe_module_name": "", "routing_policy": "TopkRouterV1",
    "norm_topk_prob": True, "enable_sdrop": False, "use_fused_ops_topkrouter": False, "router_dense_type": "float32",
    "shared_expert_num": 0, "use_shared_expert_gating": False, "max_router_load": 128 * 1024,
    "topk_method": "greedy", "topk_group": None, "n_group": None, "first_k_dense_replace": True,
    "moe_intermediate_size": 1407, "routed_scaling_factor": 1.0, "aux_loss_types": None, "aux_loss_factors": None,
    "z_loss_factor": 0.0, "balance_via_topk_bias": False, "topk_bias_update_rate": 0.0,
    "use_allgather_dispatcher": False, "moe_shared_expert_overlap": False, "expert_model_parallel": None,
    "use_gating_sigmoid": False, "enable_deredundency": False, "npu_nums_per_device": 1, "use_gmm": False,
    "enable_gmm_safe_tokens": False, "use_fused_ops_permute": False, "callback_moe_droprate": False,
    "dispatch_global_max_bs": 0, "ep_extend_tp": True,
}


@dataclass(frozen=True)
class ParallelLayout:
    """A validated layout. `devices = dp * mp * pp`; each pipeline stage holds `dp * mp` devices.

    Expert layer: experts split `ep` ways; the remaining `dp * mp / ep` devices of a stage split into
    `expert_token_split` (token groups, the data-parallel part of the experts) times
    `expert_ffn_split` (columns of each expert's FFN, the model-parallel part; `gcd(mp, dp*mp/ep)`,
    which is `mp` whenever `ep` divides `dp`, MindFormers' layout).
    """
    data_parallel: int
    model_parallel: int
    expert_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    use_seq_parallel: bool
    vocab_emb_dp: bool
    gradient_aggregation_group: int
    optimizer_shard: bool
    parallel_mode: str
    enable_alltoall: bool
    full_batch: bool
    gradients_mean: bool
    parallel_optimizer_config: Dict[str, Any]
    pipeline_config: Dict[str, Any]
    micro_batch_interleave_num: int
    group_wise_a2a: bool
    recompute: bool
    batch_size: int
    num_layers: int
    gradient_accumulation_steps: int = 1
    context: Dict[str, Any] = field(default_factory=dict)  # other `parallel:` keys, passed through

    @property
    def devices(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def stage_devices(self) -> int:
        return self.data_parallel * self.model_parallel

    @property
    def expert_ffn_split(self) -> int:
        return math.gcd(self.model_parallel, self.stage_devices // self.expert_parallel)

    @property
    def expert_token_split(self) -> int:
        return self.stage_devices // self.expert_parallel // self.expert_ffn_split

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pipeline_stage

    @property
    def moe_token_groups(self) -> int:
        """Token groups with their own expert capacity: one per data-parallel shard."""
        return self.data_parallel

    def check_devices(self, devices: int) -> None:
        """The launch's world size must be the layout's dp * mp * pp (validated once, from the YAML)."""
        _check_device_count(self.data_parallel, self.model_parallel, self.pipeline_stage, devices)

    def model_fields(self) -> Dict[str, Any]:
        """The model fields this layout fixes, set before the model is built: capacity per data-parallel
        shard, and only the static [E, C, H] dispatch (the dynamic per-expert segments do not shard)."""
        return {"moe_token_groups": self.moe_token_groups, "static_dispatch": True}

    @property
    def effective_vocab_emb_dp(self) -> bool:
        """MindFormers resets vocab_emb_dp to False under pipeline parallelism (core/parallel_config.py)."""
        return self.vocab_emb_dp and self.pipeline_stage == 1

    def stage_of_layer(self, layer: int) -> int:
        return layer // self.layers_per_stage

    @property
    def passes_per_step(self) -> int:
        """Forward passes per optimizer step: micro-batches (pipeline micro_batch_num, else gradient
        accumulation steps) times interleaved copies; each has its own expert capacity."""
        micro = self.micro_batch_num if self.pipeline_stage > 1 else self.gradient_accumulation_steps
        return micro * self.micro_batch_interleave_num

    def micro_batch_rows(self) -> int:
        """Global rows in one forward pass (one micro-batch of one interleaved copy): batch_size * dp."""
        return self.batch_size * self.data_parallel

    def describe(self) -> str:
        return (f"dp{self.data_parallel} mp{self.model_parallel} ep{self.expert_parallel} "
                f"pp{self.pipeline_stage} ({self.devices} devices)")


def _int(section: str, key: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ParallelConfigError(f"{section}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(section: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParallelConfigError(f"{section}.{key} must be true or false, got {value!r}")
    return value


def _section(raw: Any, name: str) -> Dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ParallelConfigError(f"{name} must be a mapping, got {type(raw).__name__}")
    return {str(k): v for k, v in raw.items()}


def _unknown(section: Dict[str, Any], known, name: str) -> None:
    extra = sorted(set(section) - set(known))
    if extra:
        raise ParallelConfigError(f"{name}: unknown key(s) {extra}")


def _check_moe_config(moe: Dict[str, Any], dims: ModelDims) -> None:
    """Keys at MindFormers' template default are what MindFormerConfig filled in: skipped (see
    MOE_TEMPLATE_DEFAULTS). The rest must be this project's keys, and agree with the model."""
    moe = {k: v for k, v in moe.items() if not (k in MOE_TEMPLATE_DEFAULTS and _same(v, MOE_TEMPLATE_DEFAULTS[k]))}
    _unknown(moe, set(MOE_COMM_KEYS) | set(_MOE_MODEL_KEYS) | _MOE_IGNORED_KEYS, "moe_config")
    for key, field_name in _MOE_MODEL_KEYS.items():
        if key in moe and moe[key] != getattr(dims, field_name):
            raise ParallelConfigError(f"moe_config.{key} ({moe[key]!r}) disagrees with model_config.{field_name} "
                                      f"({getattr(dims, field_name)!r}); the model reads model_config")
    if moe.get("comp_comm_parallel", False):
        raise ParallelConfigError("moe_config.comp_comm_parallel: true is implemented only inside MindFormers' own "
                                  "MoE module (MoEV2), not for mixtral-ms; use micro_batch_interleave_num for overlap")
    if "comp_comm_parallel_degree" in moe:
        _int("moe_config", "comp_comm_parallel_degree", moe["comp_comm_parallel_degree"])
    if "group_wise_a2a" in moe:
        _bool("moe_config", "group_wise_a2a", moe["group_wise_a2a"])


def _same(value: Any, default: Any) -> bool:
    """YAML equality that does not confuse True with 1 or 0 with False."""
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def validate(parallel_config: Optional[Mapping] = None, parallel: Optional[Mapping] = None, model: Any = None,
             devices: Optional[int] = None, moe_config: Optional[Mapping] = None,
             micro_batch_interleave_num: int = 1, recompute_config: Optional[Mapping] = None,
             batch_size: int = 1, gradient_accumulation_steps: int = 1, training: bool = False) -> ParallelLayout:
    """Check a layout against a model and a device count (default: dp * mp * pp) and return it.

    `parallel_config`, `parallel`, `moe_config`, `recompute_config`: the YAML sections; `model`: a
    MixtralConfig or the `model.model_config` mapping; `batch_size`: rows per data-parallel rank per
    micro-batch (runner_config.batch_size, MindFormers' meaning); `training`: the run trains (MindFormers'
    Trainer checks more then).
    """
    dims = model_dims(model if model is not None else {})
    pc = _section(parallel_config, "parallel_config")
    ctx = _section(parallel, "parallel")
    moe = _section(moe_config, "moe_config")
    rc = _section(recompute_config, "recompute_config")
    _unknown(pc, PARALLEL_CONFIG_DEFAULTS, "parallel_config")
    _unknown(ctx, PARALLEL_CONTEXT_KEYS, "parallel")
    _check_moe_config(moe, dims)
    merged = {**PARALLEL_CONFIG_DEFAULTS, **pc}

    dp = _int("parallel_config", "data_parallel", merged["data_parallel"])
    mp = _int("parallel_config", "model_parallel", merged["model_parallel"])
    ep = _int("parallel_config", "expert_parallel", merged["expert_parallel"])
    pp = _int("parallel_config", "pipeline_stage", merged["pipeline_stage"])
    micro = _int("parallel_config", "micro_batch_num", merged["micro_batch_num"])
    gag = _int("parallel_config", "gradient_aggregation_group", merged["gradient_aggregation_group"])
    for key in ("context_parallel", "seq_split_num", "ulysses_degree_in_cp"):
        if _int("parallel_config", key, merged[key]) != 1:
            raise ParallelConfigError(f"parallel_config.{key} = {merged[key]} is not supported by mixtral-ms (only 1)")
    use_sp = _bool("parallel_config", "use_seq_parallel", merged["use_seq_parallel"])
    vocab_emb_dp = _bool("parallel_config", "vocab_emb_dp", merged["vocab_emb_dp"])
    interleave = _int("micro_batch_interleave_num", "value", micro_batch_interleave_num) \
        if micro_batch_interleave_num != 1 else 1
    batch_size = _int("runner_config", "batch_size", batch_size)
    accumulation = _int("runner_config", "gradient_accumulation_steps", gradient_accumulation_steps)
    if accumulation > 1 and pp > 1:
        raise ParallelConfigError(f"runner_config.gradient_accumulation_steps {accumulation} with pipeline_stage "
                                  f"{pp}: MindFormers ignores accumulation under pipeline parallel; raise "
                                  "parallel_config.micro_batch_num instead")

    if devices is None:
        devices = dp * mp * pp
    devices = _int("devices", "count", devices)
    _check_device_count(dp, mp, pp, devices)
    if (dp * mp) % ep:
        raise ParallelConfigError(f"expert_parallel ({ep}) must divide data_parallel * model_parallel ({dp * mp})")
    if dims.num_local_experts % ep:
        raise ParallelConfigError(f"expert_parallel ({ep}) must divide the number of experts "
                                  f"({dims.num_local_experts})")
    for name, key, degree in (("num_hidden_layers", "pipeline_stage", pp), ("num_attention_heads", "model_parallel", mp),
                              ("num_key_value_heads", "model_parallel", mp)):
        if getattr(dims, name) % degree:
            raise ParallelConfigError(f"{name} ({getattr(dims, name)}) is not divisible by {key} ({degree})")
    if pp > 1 and micro < pp:
        raise ParallelConfigError(f"micro_batch_num ({micro}) must be at least pipeline_stage ({pp})")
    if not (vocab_emb_dp and pp == 1) and dims.vocab_size % mp:
        raise ParallelConfigError(f"vocab_size ({dims.vocab_size}) is not divisible by model_parallel ({mp}); "
                                  f"set vocab_emb_dp: true (and pipeline_stage 1) or pad the vocabulary")
    if dims.intermediate_size % mp:
        raise ParallelConfigError(f"intermediate_size ({dims.intermediate_size}) is not divisible by "
                                  f"model_parallel ({mp})")

    mode = ctx.get("parallel_mode", 1 if dp * mp * pp > 1 else 0)
    if mode not in _MODES:
        raise ParallelConfigError(f"parallel.parallel_mode {mode!r} is not one of 0, 1, 2, 3 or a MindSpore name")
    mode = _MODES[mode]
    if mode in ("auto_parallel", "hybrid_parallel"):
        raise ParallelConfigError(f"parallel.parallel_mode {mode} is not supported: use 1 (semi_auto_parallel), "
                                  f"which applies mixtral_ms.parallel.plan, or 0 (data_parallel)")
    if mode in ("data_parallel", "stand_alone") and (mp > 1 or ep > 1 or pp > 1):
        raise ParallelConfigError(f"model_parallel, expert_parallel and pipeline_stage need parallel_mode 1 "
                                  f"(semi_auto_parallel); got {mode} with mp={mp} ep={ep} pp={pp}")
    if training and mode == "semi_auto_parallel" and mp > 1 and dims.num_local_experts > 1 and not use_sp:
        raise ParallelConfigError(f"training an MoE model with model_parallel {mp} needs parallel_config."
                                  "use_seq_parallel: true (MindFormers' Trainer refuses it otherwise)")
    if mode == "stand_alone" and dp > 1:
        raise ParallelConfigError(f"data_parallel {dp} needs parallel_mode 0 or 1, got stand_alone")

    enable_alltoall = _bool("parallel", "enable_alltoall", ctx.get("enable_alltoall", False))
    full_batch = _bool("parallel", "full_batch", ctx.get("full_batch", mode == "semi_auto_parallel"))
    # semi-auto graphs compute the global-batch loss, so gradients are already means; data parallel averages
    gradients_mean = _bool("parallel", "gradients_mean", ctx.get("gradients_mean", mode == "data_parallel"))
    shard = ctx.get("enable_parallel_optimizer")
    legacy = merged["optimizer_shard"]
    if shard is not None:
        shard = _bool("parallel", "enable_parallel_optimizer", shard)
    if legacy is not None:
        legacy = _bool("parallel_config", "optimizer_shard", legacy)
        if shard is not None and legacy != shard:
            raise ParallelConfigError(f"parallel_config.optimizer_shard ({legacy}) contradicts "
                                      f"parallel.enable_parallel_optimizer ({shard}); set only the latter")
    optimizer_shard = bool(shard if shard is not None else legacy)
    if optimizer_shard and mode != "semi_auto_parallel":
        raise ParallelConfigError("parallel.enable_parallel_optimizer needs parallel_mode 1 (semi_auto_parallel) "
                                  "for MindFormers' AdamW")

    po = _section(ctx.get("parallel_optimizer_config"), "parallel.parallel_optimizer_config")
    _unknown(po, PARALLEL_OPTIMIZER_KEYS, "parallel.parallel_optimizer_config")
    if po.get("optimizer_level", "level1") not in OPTIMIZER_LEVELS:
        raise ParallelConfigError(f"parallel.parallel_optimizer_config.optimizer_level must be one of "
                                  f"{OPTIMIZER_LEVELS}, got {po['optimizer_level']!r}")
    if "optimizer_weight_shard_size" in po and po["optimizer_weight_shard_size"] != -1:
        _int("parallel.parallel_optimizer_config", "optimizer_weight_shard_size", po["optimizer_weight_shard_size"])
    if "parallel_optimizer_threshold" in po:
        _int("parallel.parallel_optimizer_config", "parallel_optimizer_threshold",
             po["parallel_optimizer_threshold"], minimum=0)
    pcfg = _section(ctx.get("pipeline_config"), "parallel.pipeline_config")
    _unknown(pcfg, PIPELINE_CONFIG_KEYS, "parallel.pipeline_config")
    if pcfg.get("pipeline_scheduler", "1f1b") not in PIPELINE_SCHEDULERS:
        raise ParallelConfigError(f"parallel.pipeline_config.pipeline_scheduler must be one of "
                                  f"{PIPELINE_SCHEDULERS}, got {pcfg['pipeline_scheduler']!r}")
    if "pipeline_stages" in ctx and ctx["pipeline_stages"] != pp:
        raise ParallelConfigError(f"parallel.pipeline_stages ({ctx['pipeline_stages']}) differs from "
                                  f"parallel_config.pipeline_stage ({pp}); set only the latter")
    if "device_num" in ctx and ctx["device_num"] != devices:
        raise ParallelConfigError(f"parallel.device_num ({ctx['device_num']}) differs from the {devices} devices")

    recompute = rc.get("recompute", False)
    if not isinstance(recompute, bool):
        raise ParallelConfigError(f"recompute_config.recompute must be true or false for mixtral-ms "
                                  f"(whole decoder layers), got {recompute!r}")

    passthrough = {k: v for k, v in ctx.items() if k not in (
        "parallel_mode", "enable_alltoall", "full_batch", "gradients_mean", "enable_parallel_optimizer",
        "parallel_optimizer_config", "pipeline_config", "pipeline_stages", "device_num")}
    return ParallelLayout(
        data_parallel=dp, model_parallel=mp, expert_parallel=ep, pipeline_stage=pp, micro_batch_num=micro,
        use_seq_parallel=use_sp, vocab_emb_dp=vocab_emb_dp, gradient_aggregation_group=gag,
        optimizer_shard=optimizer_shard, parallel_mode=mode, enable_alltoall=enable_alltoall, full_batch=full_batch,
        gradients_mean=gradients_mean, parallel_optimizer_config=po, pipeline_config=pcfg,
        micro_batch_interleave_num=interleave, group_wise_a2a=bool(moe.get("group_wise_a2a", False)),
        recompute=recompute, batch_size=batch_size, num_layers=dims.num_hidden_layers,
        gradient_accumulation_steps=accumulation, context=passthrough)


def _check_device_count(dp: int, mp: int, pp: int, devices: int) -> None:
    if dp * mp * pp != devices:
        raise ParallelConfigError(f"data_parallel ({dp}) * model_parallel ({mp}) * pipeline_stage ({pp}) = "
                                  f"{dp * mp * pp}, but there are {devices} devices")


def from_run_config(config: Mapping, devices: Optional[int] = None) -> ParallelLayout:
    """Validate the parallel sections of a whole run config (a MindFormerConfig or the loaded YAML dict)."""
    model = (config.get("model") or {}).get("model_config") or {}
    runner = config.get("runner_config") or {}
    return validate(config.get("parallel_config"), config.get("parallel"), model, devices,
                    moe_config=config.get("moe_config"),
                    micro_batch_interleave_num=config.get("micro_batch_interleave_num") or 1,
                    recompute_config=config.get("recompute_config"),
                    batch_size=runner.get("batch_size", 1) or 1,
                    gradient_accumulation_steps=runner.get("gradient_accumulation_steps", 1) or 1,
                    training=config.get("run_mode", "train") in ("train", "finetune"))
