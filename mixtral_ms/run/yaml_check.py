"""Registration of every mixtral-ms piece with MindFormers, and a check of a run YAML before anything is built.

Importing this module registers:

  CONFIG    MixtralConfig
  MODELS    MixtralModel, MixtralForCausalLM
  WRAPPER   MixtralTrainOneStepCell
  CALLBACK  MixtralProgressMonitor, RouterStatsMonitor, MixtralCheckpointMonitor

so a YAML `model: {model_config: {type: MixtralConfig, ...}, arch: {type: MixtralForCausalLM}}` builds
through `mindformers.Trainer`. `check_config` turns the typos MindFormers reports late and obscurely
(an unregistered `type`, a misspelt argument of a class that takes fixed arguments, a wrapper option or
layout that cannot run) into one line naming the YAML path, before any model, dataset or graph is built.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterator, NamedTuple, Optional, Tuple

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mixtral_ms.model import modeling  # noqa: F401  (registers MixtralConfig, MixtralModel, MixtralForCausalLM)
from mixtral_ms.run import optim  # noqa: F401  (registers FusedAdamW and OffloadAdamW as optimizer types)
from mixtral_ms.model.configuration import MixtralConfig
from mixtral_ms.parallel.layout import ParallelLayout, from_run_config
from mixtral_ms.model.schema import ConfigError
from mixtral_ms.run.callbacks import MixtralCheckpointMonitor, MixtralProgressMonitor, RouterStatsMonitor
from mixtral_ms.run.distill import check_distill, teacher_layout
from mixtral_ms.run.freeze import check_freeze
from mixtral_ms.run.wrapper import MixtralTrainOneStepCell

REGISTERED = {
    MindFormerModuleType.CONFIG: ["MixtralConfig"],
    MindFormerModuleType.MODELS: ["MixtralModel", "MixtralForCausalLM"],
    MindFormerModuleType.WRAPPER: ["MixtralTrainOneStepCell"],
    MindFormerModuleType.CALLBACK: ["MixtralProgressMonitor", "RouterStatsMonitor", "MixtralCheckpointMonitor"],
}

# Top-level YAML keys that run_mixtral.py and MindFormers' trainer understand; anything else is a typo.
TOP_LEVEL_KEYS = {
    "seed", "output_dir", "run_mode", "use_parallel", "load_checkpoint", "load_ckpt_format", "auto_trans_ckpt",
    "resume_training", "src_strategy_path_or_dir", "only_save_strategy", "context", "parallel", "parallel_config",
    "trainer", "runner_config", "runner_wrapper", "optimizer", "lr_schedule", "train_dataset",
    "train_dataset_task", "model", "moe_config", "recompute_config", "callbacks", "tokenizer", "generation",
    "micro_batch_interleave_num", "monitor_config", "swap_config", "metric", "profile", "processor",
    "use_legacy", "ignore_data_skip", "data_skip_steps", "remove_redundancy",
}

# (YAML path, registry the `type` is looked up in). Lists (callbacks) are checked element by element.
_TYPED_SECTIONS = (
    ("trainer", MindFormerModuleType.TRAINER),
    ("runner_wrapper", MindFormerModuleType.WRAPPER),
    ("runner_wrapper.scale_sense", MindFormerModuleType.WRAPPER),
    ("optimizer", MindFormerModuleType.OPTIMIZER),
    ("lr_schedule", MindFormerModuleType.LR),
    ("train_dataset.data_loader", MindFormerModuleType.DATASET_LOADER),
    ("train_dataset_task", MindFormerModuleType.DATASET),
    ("callbacks", MindFormerModuleType.CALLBACK),
)

# Arguments MindFormers itself passes (default_args), never written in a YAML.
_FRAMEWORK_ARGS = {"network", "optimizer", "parallel_config", "lr_scheduler", "grouped_lr_scheduler",
                   "calculate_per_token_loss", "global_norm_spike_threshold", "print_separate_loss",
                   "use_skip_data_by_global_norm", "append_info", "global_batch_size", "embedding_size",
                   "embedding_local_norm_threshold", "use_checkpoint_health_monitor", "health_ckpts_record_dir",
                   "use_legacy_format", "remove_redundancy", "checkpoint_format"}


def _get(config: Any, path: str) -> Any:
    node = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _sections(config: Any) -> Iterator[Tuple[str, dict, MindFormerModuleType]]:
    for path, module_type in _TYPED_SECTIONS:
        node = _get(config, path)
        if isinstance(node, list):
            for i, item in enumerate(node):
                if not isinstance(item, dict):
                    raise ConfigError(f"{path}[{i}] must be a mapping with a 'type', got {item!r}")
                yield f"{path}[{i}]", item, module_type
        elif isinstance(node, dict) and (path != "runner_wrapper.scale_sense" or "type" in node):
            yield path, node, module_type


def _known_types(module_type: MindFormerModuleType) -> list:
    return sorted(MindFormerRegister.registry.get(module_type, {}))


def _accepted_keys(cls) -> Optional[set]:
    """The YAML keys `cls` takes, or None when it forwards **kwargs we cannot see through (MindFormers'
    own factories such as AdamW). Our own classes swallow only the framework's arguments, so their named
    parameters are the whole vocabulary; one that also takes *args extends a MindFormers class and forwards
    both (MixtralCheckpointMonitor): its vocabulary adds the parent's."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    named = {name for name, p in params.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if open_ended and not cls.__module__.startswith("mixtral_ms."):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        parent = _accepted_keys(cls.__mro__[1])
        return None if parent is None else named | parent
    return named


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_multi_batch(config: Any, wrapper: dict) -> None:
    """micro_batch_interleave_num and gradient_accumulation_steps against the batch (accumulation against
    the pipeline: parallel.config.validate, run below with use_parallel)."""
    runner = config.get("runner_config") or {}
    pc = config.get("parallel_config") or {}
    values = {"micro_batch_interleave_num": config.get("micro_batch_interleave_num", 1),
              "runner_config.gradient_accumulation_steps": runner.get("gradient_accumulation_steps", 1),
              "runner_config.batch_size": runner.get("batch_size", 1)}
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    interleave = values["micro_batch_interleave_num"] or 1
    rows = values["runner_config.batch_size"] or 1
    stages = pc.get("pipeline_stage") or 1
    semi_auto = bool(config.get("use_parallel")) and (config.get("parallel") or {}).get("parallel_mode", 1) in (
        1, 2, "semi_auto_parallel", "auto_parallel", "SEMI_AUTO_PARALLEL", "AUTO_PARALLEL")
    if interleave > 1 and not semi_auto:  # MindFormers splits the runner's rows into the copies
        if rows == 1:
            raise ConfigError(f"micro_batch_interleave_num {interleave} with runner_config.batch_size 1: a batch "
                              "of one row cannot be split into interleaved copies")
        if rows % interleave:
            raise ConfigError(f"micro_batch_interleave_num {interleave} does not divide runner_config.batch_size "
                              f"{rows} (the rows MindFormers splits into the copies)")
    scale = wrapper.get("scale_sense")
    if stages > 1 and wrapper.get("type") == "MixtralTrainOneStepCell" and isinstance(scale, dict) and "type" not in scale:
        raise ConfigError("runner_wrapper.scale_sense: with pipeline_stage > 1 MindFormers swaps in "
                          "MFPipelineWithLossScaleCell, which takes a number or {type: DynamicLossScaleUpdateCell, "
                          "loss_scale_value: ..., scale_factor: ..., scale_window: ...}")


def _check_bias_update(config: Any, wrapper: dict, mixtral: MixtralConfig) -> None:
    """The router bias moves in-graph under MixtralTrainOneStepCell; under any other wrapper (MindFormers'
    pipeline wrapper when pipeline_stage > 1) in the callbacks' once-per-step read (callbacks.step_stats),
    so a training YAML needs a callback that reads it."""
    if mixtral.router_bias_update_rate <= 0 or config.get("run_mode", "train") not in ("train", "finetune"):
        return
    stages = (config.get("parallel_config") or {}).get("pipeline_stage") or 1
    if stages == 1 and wrapper.get("type") == "MixtralTrainOneStepCell":
        return
    types = {c.get("type") for c in config.get("callbacks") or [] if isinstance(c, dict)}
    if not types & {"MixtralProgressMonitor", "RouterStatsMonitor"}:
        under = "pipeline_stage > 1" if stages > 1 else f"runner_wrapper {wrapper.get('type')!r}"
        raise ConfigError(f"model.model_config.router_bias_update_rate: under {under} the routers' biases move "
                          "in the callbacks' once-per-step read; add MixtralProgressMonitor or RouterStatsMonitor "
                          "to callbacks")


class RunSpec(NamedTuple):
    """What a run YAML describes, validated once: the model config and, with `use_parallel`, the layout."""
    model_config: MixtralConfig
    layout: Optional[ParallelLayout]


def check_config(config: Any) -> RunSpec:
    """Validate a run YAML (a MindFormerConfig or dict) and return the model config and layout it describes.

    Raises ConfigError for an unknown top-level key, a `type` MindFormers has no class for, an argument
    the named class does not take, a model_config MixtralConfig rejects, or a wrapper section (freeze,
    distill and its teacher's fit to the layout, scale_sense, accumulation / interleaving) that cannot
    run; ParallelConfigError for a layout that cannot (parallel/layout.py)."""
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}{_hint(unknown[0], TOP_LEVEL_KEYS)}")
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("model_config"), dict) \
            or not isinstance(model.get("arch"), dict):
        raise ConfigError("the YAML needs model: {model_config: {type: MixtralConfig, ...}, "
                          "arch: {type: MixtralForCausalLM}}")
    if model["model_config"].get("type") != "MixtralConfig":
        raise ConfigError(f"model.model_config.type must be MixtralConfig, got {model['model_config'].get('type')!r}")
    if model["arch"].get("type") != "MixtralForCausalLM":
        raise ConfigError(f"model.arch.type must be MixtralForCausalLM, got {model['arch'].get('type')!r}")
    extra = sorted(set(model) - {"model_config", "arch"})
    if extra:
        raise ConfigError(f"unknown key(s) {extra} in model (expected model_config and arch)")
    extra = sorted(set(model["arch"]) - {"type"})
    if extra:
        raise ConfigError(f"unknown key(s) {extra} in model.arch (only type)")
    try:
        mixtral = MixtralConfig(**{k: v for k, v in model["model_config"].items() if k != "type"})
    except ConfigError as err:  # name the YAML section, as checks.check_values does
        raise ConfigError(f"model.model_config: {err}") from None

    wrapper = config.get("runner_wrapper") or {}
    if "gradient_accumulation_steps" in wrapper:
        raise ConfigError("runner_wrapper.gradient_accumulation_steps: set runner_config.gradient_accumulation_steps "
                          "(run_mixtral.py hands it to the wrapper)")
    _check_multi_batch(config, wrapper)
    layout = from_run_config(config) if config.get("use_parallel") else None  # ParallelConfigError, one line
    if wrapper.get("type") == "MixtralTrainOneStepCell":
        check_freeze(wrapper.get("freeze"), mixtral)
        distill = check_distill(wrapper.get("distill"), mixtral)
        if distill and layout is not None and layout.parallel_mode == "semi_auto_parallel":
            teacher_layout(layout, distill["config"])
    _check_bias_update(config, wrapper, mixtral)
    scale = wrapper.get("scale_sense")
    if wrapper.get("type") == "MixtralTrainOneStepCell" and isinstance(scale, dict) and "type" not in scale:
        unknown = sorted(set(scale) - {"loss_scale_value", "scale_factor", "scale_window"})
        if unknown:
            raise ConfigError(f"runner_wrapper.scale_sense: unknown key(s) {unknown}; dynamic loss scaling takes "
                              "loss_scale_value, scale_factor and scale_window")

    for path, node, module_type in _sections(config):
        name = node.get("type")
        if not isinstance(name, str):
            raise ConfigError(f"{path} has no 'type'")
        if not MindFormerRegister.is_exist(module_type, name):
            known = _known_types(module_type)
            raise ConfigError(f"{path}.type {name!r} is not a registered MindFormers {module_type}"
                              f"{_hint(name, known)}")
        if module_type in (MindFormerModuleType.DATASET_LOADER, MindFormerModuleType.DATASET):
            continue  # MindFormers rewrites these sections (dataset_dir -> dataset_files, ...) before building
        keys = _accepted_keys(MindFormerRegister.get_cls(module_type, name))
        if keys is None:
            continue
        bad = sorted(k for k in node if k not in keys | {"type", "auto_register"})
        if bad:
            raise ConfigError(f"{path}: {name} takes no argument {bad[0]!r}{_hint(bad[0], keys - _FRAMEWORK_ARGS)}")
    return RunSpec(mixtral, layout)


__all__ = ["REGISTERED", "TOP_LEVEL_KEYS", "RunSpec", "check_config", "MixtralConfig", "MixtralCheckpointMonitor",
           "MixtralProgressMonitor", "MixtralTrainOneStepCell", "RouterStatsMonitor"]
