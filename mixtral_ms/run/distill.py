"""Output distillation against a frozen teacher in the same training graph: Lifelong-MoE's
`CE + lambda * KL(teacher || student)` against the pre-growth model, and classic distillation into a
smaller (dense: one expert) student, `alpha * CE + (1 - alpha) * T^2 * KL_T`. One loss serves both:

  loss = ce_coef * CE + aux_coef * aux + z_coef * z + kd_coef * T^2 * KL(softmax(t / T) || softmax(s / T))

  runner_wrapper:
    type: MixtralTrainOneStepCell
    distill:
      teacher: runs/tiny/checkpoint     # checkpoint file or folder (any layout run_mixtral loads; the
                                        # newest file of a folder of training checkpoints)
      teacher_config: configs/mixtral_tiny_cpu.yaml   # its run YAML, or a folder with config.json;
                                        # default: the teacher folder's own config.json
      kd_coef: 0.5                      # lambda; (1 - alpha) for classic distillation
      ce_coef: 1.0                      # alpha for classic distillation
      temperature: 1.0

The teacher may have another config (fewer experts, one expert, other sizes) but the same vocabulary.
It always runs in eval mode (dropless, no jitter, deterministic routing) and is never trained; its
parameters are named `teacher.*` in training checkpoints, so a resumed run gets it back.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Mapping, Optional, Tuple

from mindspore import nn, ops

from mixtral_ms.model.configuration import MixtralConfig
from mixtral_ms.run import RunError
from mixtral_ms.model.schema import ConfigError
from mixtral_ms.model.losses import LOSS_TERMS, distillation_loss

DISTILL_KEYS = ("teacher", "teacher_config", "kd_coef", "ce_coef", "temperature")
TEACHER_PREFIX = "teacher."
KD_TERM = "kd_loss"  # the distillation term's name in the side channel, the progress line and router_stats.jsonl


def extra_terms(run_config: Mapping) -> Tuple[str, ...]:
    """The loss terms a run's training forward adds to the model's own: the KD term when the YAML has
    runner_wrapper.distill. The runner builds the model with them (MixtralForCausalLM's `extra_terms`), so
    the side channel has every term before the parallel plan shards it."""
    return (KD_TERM,) if (run_config.get("runner_wrapper") or {}).get("distill") else ()


def teacher_config(spec: dict, where: str = "runner_wrapper.distill") -> MixtralConfig:
    """The teacher's MixtralConfig from `teacher_config` (a run YAML or a folder with config.json), or
    from the teacher folder's config.json."""
    source = spec.get("teacher_config") or spec["teacher"]
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ConfigError(f"{where}: no config.json in {source}; name the teacher's run YAML in teacher_config")
        return MixtralConfig.from_hf_dir(source)
    if not source.endswith((".yaml", ".yml")) or not os.path.isfile(source):
        raise ConfigError(f"{where}.teacher_config: {source!r} is neither a run YAML nor a folder with config.json")
    from mixtral_ms.run.run_yaml import read_run_yaml
    try:
        run = read_run_yaml(source)  # its base_config: files merged, as every run YAML is read
    except RunError as err:
        raise ConfigError(f"{where}.teacher_config: {err}") from None
    fields = (run.get("model") or {}).get("model_config")
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}.teacher_config: {source} has no model.model_config")
    return MixtralConfig(**{k: v for k, v in fields.items() if k != "type"})


def check_distill(spec: Optional[dict], student: MixtralConfig, where: str = "runner_wrapper.distill") -> Optional[dict]:
    """The distill section with defaults filled in (None when absent), and the teacher's config;
    ConfigError naming the YAML path for anything wrong."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with keys {list(DISTILL_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(DISTILL_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {list(DISTILL_KEYS)})")
    if not isinstance(spec.get("teacher"), str) or not spec["teacher"]:
        raise ConfigError(f"{where}.teacher must name the teacher's checkpoint file or folder")
    out = {"teacher": spec["teacher"], "teacher_config": spec.get("teacher_config"),
           "kd_coef": spec.get("kd_coef", 1.0), "ce_coef": spec.get("ce_coef", 1.0),
           "temperature": spec.get("temperature", 1.0)}
    for key in ("kd_coef", "ce_coef", "temperature"):
        value = out[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}.{key} must be a non-negative number, got {value!r}")
    if out["temperature"] == 0:
        raise ConfigError(f"{where}.temperature must be positive")
    config = teacher_config(out, where)
    if config.vocab_size != student.vocab_size:
        raise ConfigError(f"{where}: the teacher's vocab_size {config.vocab_size} differs from the student's "
                          f"{student.vocab_size}")
    out["config"] = config
    return out


class _EvalOnly(nn.Cell):
    """Holds the teacher; training-mode flags set on the network above never reach it."""

    def __init__(self, model) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        model.set_train(False)

    def add_flags_recursive(self, **flags):
        if "training" in flags:
            flags = {**flags, "training": False}
        return super().add_flags_recursive(**flags)

    def construct(self, input_ids, attention_mask=None, position_ids=None, domain_ids=None):
        return ops.stop_gradient(self.model.forward_logits(input_ids, attention_mask, position_ids, domain_ids)[0])


def teacher_layout(layout, config: MixtralConfig, where: str = "runner_wrapper.distill"):
    """The student's parallel layout for the teacher (same devices, same sharding, the teacher's layers)
    and the teacher's config with the fields that layout fixes; ConfigError if its shapes do not divide."""
    from mixtral_ms.parallel.plan import check_table, plan_spec
    if config.num_hidden_layers % layout.pipeline_stage:
        raise ConfigError(f"{where}: the teacher's {config.num_hidden_layers} layers do not split into "
                          f"pipeline_stage {layout.pipeline_stage}")
    layout = dataclasses.replace(layout, num_layers=config.num_hidden_layers)
    config = copy.deepcopy(config)  # the spec's stays as read
    for key, value in layout.model_fields().items():
        setattr(config, key, value)
    config.validate()
    problems = check_table(plan_spec(config, layout, "predict"), layout)
    if problems:
        raise ConfigError(f"{where}: the teacher does not fit the student's layout: {problems[0]}")
    return layout, config


def build_teacher(spec: dict, layout=None):
    """The frozen teacher: its config, its checkpoint strictly loaded, sharded like the student when a
    parallel `layout` is given (its eval forward, dropless, on the student's devices), parameters
    renamed `teacher.*`."""
    from mixtral_ms.checkpoint.load import load_weights, resolve_checkpoint
    from mixtral_ms.model.modeling import MixtralForCausalLM
    config = spec["config"]
    if layout is not None:
        layout, config = teacher_layout(layout, config)
    teacher = MixtralForCausalLM(config)
    load_weights(teacher, resolve_checkpoint(spec["teacher"]))
    if layout is not None:
        from mixtral_ms.parallel.plan import apply_plan
        apply_plan(teacher, layout, "predict")
    for param in teacher.get_parameters():
        param.requires_grad = False
        param.name = TEACHER_PREFIX + param.name
    return teacher


class Distillation(nn.Cell):
    """The student's training forward plus the distillation term. Takes the student's inputs and returns
    the loss alone; CE, aux, z and the KD term go to the student's side channel (losses.TrainingStats),
    which must have been built with the KD term (MixtralForCausalLM(config, extra_terms=(KD_TERM,))). Both
    models run on the first seq_length tokens of MindFormers' samples of seq_length + 1, and both terms
    score the next tokens, as the student's own training forward does."""

    def __init__(self, student, teacher, kd_coef: float, ce_coef: float, temperature: float) -> None:
        super().__init__(auto_prefix=False)
        terms = student.training_stats.terms
        if terms != LOSS_TERMS + (KD_TERM,):  # a bug of the caller, not bad input
            raise ValueError(f"the student's side channel has the terms {terms}; build it with "
                             f"MixtralForCausalLM(config, extra_terms=({KD_TERM!r},))")
        self.student = student
        self.teacher = _EvalOnly(teacher)
        self.config = student.config
        self.kd_scale = float(kd_coef) * float(temperature) ** 2
        self.ce_coef = float(ce_coef)
        self.temperature = float(temperature)
        self.ignore_index = student.ignore_index

    def construct(self, input_ids, labels=None, attention_mask=None, position_ids=None, domain_ids=None):
        input_ids, labels, attention_mask, position_ids, domain_ids = self.student.training_inputs(
            input_ids, labels, attention_mask, position_ids, domain_ids)
        logits, _, load, dropped, prob_sum, z_sum, valid = self.student.forward_logits(
            input_ids, attention_mask, position_ids, domain_ids)
        loss, ce, aux, z, load, dropped = self.student.training_loss(logits, labels, load, dropped, prob_sum, z_sum,
                                                                     valid, self.ce_coef, True)
        kd = distillation_loss(logits, self.teacher(input_ids, attention_mask, position_ids, domain_ids), labels,
                               self.temperature, self.ignore_index, shifted=True)
        return self.student.training_output(loss + self.kd_scale * kd, (ce, aux, z, kd), load, dropped)


def install(network, model, spec: Optional[dict]):
    """`network` (the model, or MindFormers' cells around it) with the model replaced by
    Distillation(model, teacher) when `spec` (check_distill's output) asks for it."""
    if spec is None:
        return network
    teacher = build_teacher(spec, getattr(model, "parallel_layout", None))
    distilled = Distillation(model, teacher, spec["kd_coef"], spec["ce_coef"], spec["temperature"])
    if network is model:
        return distilled
    if not _replace(network, model, distilled):
        raise ValueError("the model is not inside the network it was given")  # a bug, not bad input
    return network


def _replace(holder, model, new) -> bool:
    """Put `new` where `model` is among the cells below `holder` (MindFormers' and MindSpore's wrappers
    name the inner cell `network`, `_backbone`, ...)."""
    for name, child in holder.name_cells().items():
        if child is model:
            setattr(holder, name, new)
            return True
        if _replace(child, model, new):
            return True
    return False
