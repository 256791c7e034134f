"""mixtral_ms/run/yaml_check.py: registration with MindFormers and the structure check of a run YAML.

Importing the module registers every class REGISTERED names (really, in MindFormers' registry); check_config
passes every shipped run YAML (read by the one reader) and returns its MixtralConfig; each typo (an unknown
top-level key, an unregistered `type`, an argument the named class does not take) and each section that cannot
run is one ConfigError line naming the YAML path, with a suggestion where one is close."""
import copy
import glob
import os

import pytest

from conftest import ROOT
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mixtral_ms.cli import BadInput
from mixtral_ms.model.schema import ConfigError
from mixtral_ms.parallel.layout import ParallelConfigError, from_run_config
from mixtral_ms.run import yaml_check
from mixtral_ms.run.run_yaml import apply_settings, read_run_yaml
from mixtral_ms.run.yaml_check import REGISTERED, TOP_LEVEL_KEYS, MixtralConfig, check_config

CONFIGS = os.path.join(ROOT, "configs")
RUN_YAMLS = sorted(p for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
                   if os.path.basename(os.path.dirname(p)) != "base")  # base/: files other YAMLs inherit
TINY = read_run_yaml(os.path.join(CONFIGS, "mixtral_tiny_cpu.yaml"))
PRETRAIN_8P = read_run_yaml(os.path.join(CONFIGS, "parallel", "mixtral_8x7b_pretrain_8p.yaml"))
NEEDS_MODEL = "the YAML needs model: {model_config: {type: MixtralConfig, ...}, arch: {type: MixtralForCausalLM}}"


def _refusal(config, error=ConfigError) -> str:
    with pytest.raises(error) as err:
        check_config(config)
    assert type(err.value) is error and isinstance(err.value, BadInput) and "\n" not in str(err.value)
    return str(err.value)


def _changed(base, settings):
    config = copy.deepcopy(base)
    apply_settings(config, settings)
    return config


def test_registered_names_are_the_mixtral_classes_in_mindformers_registry():
    from mixtral_ms.model.modeling import MixtralForCausalLM, MixtralModel
    expected = {(MindFormerModuleType.CONFIG, "MixtralConfig"): MixtralConfig,
                (MindFormerModuleType.MODELS, "MixtralModel"): MixtralModel,
                (MindFormerModuleType.MODELS, "MixtralForCausalLM"): MixtralForCausalLM,
                (MindFormerModuleType.WRAPPER, "MixtralTrainOneStepCell"): yaml_check.MixtralTrainOneStepCell,
                (MindFormerModuleType.CALLBACK, "MixtralProgressMonitor"): yaml_check.MixtralProgressMonitor,
                (MindFormerModuleType.CALLBACK, "RouterStatsMonitor"): yaml_check.RouterStatsMonitor,
                (MindFormerModuleType.CALLBACK, "MixtralCheckpointMonitor"): yaml_check.MixtralCheckpointMonitor}
    listed = {(module_type, name) for module_type, names in REGISTERED.items() for name in names}
    assert listed == set(expected)
    for (module_type, name), cls in expected.items():
        assert MindFormerRegister.is_exist(module_type, name), (module_type, name)
        assert MindFormerRegister.get_cls(module_type, name) is cls and cls.__name__ == name
    from mixtral_ms.run.optim import FusedAdamW, OffloadAdamW  # the optimizers the shipped YAMLs name
    assert MindFormerRegister.get_cls(MindFormerModuleType.OPTIMIZER, "FusedAdamW") is FusedAdamW
    assert MindFormerRegister.get_cls(MindFormerModuleType.OPTIMIZER, "OffloadAdamW") is OffloadAdamW


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_shipped_run_yaml_passes_and_gives_its_model_and_layout(path):
    config = read_run_yaml(path)
    assert set(config) <= TOP_LEVEL_KEYS
    model, layout = check_config(config)
    assert type(model) is MixtralConfig
    assert layout == (from_run_config(config) if config.get("use_parallel") else None)
    fields = {k: v for k, v in config["model"]["model_config"].items() if k != "type"}
    assert {k: getattr(model, k) for k in fields} == fields


@pytest.mark.parametrize("settings, message", [
    ({"trainer_typo": 1}, "unknown top-level key(s) ['trainer_typo']; did you mean 'trainer'?"),
    ({"callbaks": [], "zzz": 1}, "unknown top-level key(s) ['callbaks', 'zzz']; did you mean 'callbacks'?"),
    ({"zzz": 1}, "unknown top-level key(s) ['zzz']"),
    ({"runner_wrapper.type": "MixtralTrainOneStepCel"},
     "runner_wrapper.type 'MixtralTrainOneStepCel' is not a registered MindFormers wrapper; did you mean "
     "'MixtralTrainOneStepCell'?"),
    ({"optimizer.type": "FusedAdamX"},
     "optimizer.type 'FusedAdamX' is not a registered MindFormers optimizer; did you mean 'FusedAdamW'?"),
    ({"lr_schedule.type": "CosineWithWarmUp"},
     "lr_schedule.type 'CosineWithWarmUp' is not a registered MindFormers lr; did you mean 'CosineWithWarmUpLR'?"),
    ({"trainer.type": "CausalLM"}, "trainer.type 'CausalLM' is not a registered MindFormers trainer"),
    ({"train_dataset.data_loader.type": "MindDatset"},
     "train_dataset.data_loader.type 'MindDatset' is not a registered MindFormers dataset_loader; did you mean "
     "'MindDataset'?"),
    ({"train_dataset_task.type": "CausalLanguageModelDatase"},
     "train_dataset_task.type 'CausalLanguageModelDatase' is not a registered MindFormers dataset; did you mean "
     "'CausalLanguageModelDataset'?"),
    ({"runner_wrapper.scale_sense": {"type": "DynamicLossScaleUpdateCel", "loss_scale_value": 1}},
     "runner_wrapper.scale_sense.type 'DynamicLossScaleUpdateCel' is not a registered MindFormers wrapper; did you "
     "mean 'DynamicLossScaleUpdateCell'?"),
    ({"callbacks": [{"type": "RouterStatMonitor"}]},
     "callbacks[0].type 'RouterStatMonitor' is not a registered MindFormers callback; did you mean "
     "'RouterStatsMonitor'?"),
    ({"runner_wrapper.max_grad_nrom": 1.0},
     "runner_wrapper: MixtralTrainOneStepCell takes no argument 'max_grad_nrom'; did you mean 'max_grad_norm'?"),
    ({"optimizer.beta": [0.9, 0.9]}, "optimizer: FusedAdamW takes no argument 'beta'; did you mean 'betas'?"),
    ({"callbacks": [{"type": "RouterStatsMonitor", "log_intervall": 5}]},
     "callbacks[0]: RouterStatsMonitor takes no argument 'log_intervall'; did you mean 'log_interval'?"),
    ({"callbacks": [{"type": "MixtralProgressMonitor", "per_print_times": 3}]},
     "callbacks[0]: MixtralProgressMonitor takes no argument 'per_print_times'"),
    ({"callbacks": [{"type": "MixtralCheckpointMonitor", "save_checkpoint_step": 5}]},  # the parent's vocabulary
     "callbacks[0]: MixtralCheckpointMonitor takes no argument 'save_checkpoint_step'; did you mean "
     "'save_checkpoint_steps'?"),
    ({"runner_wrapper.scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_valu": 1}},
     "runner_wrapper.scale_sense: DynamicLossScaleUpdateCell takes no argument 'loss_scale_valu'; did you mean "
     "'loss_scale_value'?"),
    ({"callbacks": ["RouterStatsMonitor"]}, "callbacks[0] must be a mapping with a 'type', got 'RouterStatsMonitor'"),
    ({"callbacks": [{"log_interval": 5}]}, "callbacks[0] has no 'type'"),
    ({"trainer": {"model_name": "x"}}, "trainer has no 'type'"),
], ids=lambda v: str(v)[:50] if isinstance(v, dict) else None)
def test_typos_are_one_line_naming_the_yaml_path(settings, message):
    assert _refusal(_changed(TINY, settings)) == message


@pytest.mark.parametrize("settings, message", [
    ({"model": None}, NEEDS_MODEL),
    ({"model.arch": None}, NEEDS_MODEL),
    ({"model.model_config": [1]}, NEEDS_MODEL),
    ({"model.model_config.type": "LlamaConfig"}, "model.model_config.type must be MixtralConfig, got 'LlamaConfig'"),
    ({"model.arch.type": "LlamaForCausalLM"}, "model.arch.type must be MixtralForCausalLM, got 'LlamaForCausalLM'"),
    ({"model.extra": 1}, "unknown key(s) ['extra'] in model (expected model_config and arch)"),
    ({"model.arch.foo": 1}, "unknown key(s) ['foo'] in model.arch (only type)"),
    ({"runner_wrapper.gradient_accumulation_steps": 2},
     "runner_wrapper.gradient_accumulation_steps: set runner_config.gradient_accumulation_steps (run_mixtral.py hands "
     "it to the wrapper)"),
    ({"runner_wrapper.scale_sense": {"loss_scale": 1024}},
     "runner_wrapper.scale_sense: unknown key(s) ['loss_scale']; dynamic loss scaling takes loss_scale_value, "
     "scale_factor and scale_window"),
    ({"micro_batch_interleave_num": 3},
     "micro_batch_interleave_num 3 does not divide runner_config.batch_size 8 (the rows MindFormers splits into the "
     "copies)"),
    ({"micro_batch_interleave_num": 2, "runner_config.batch_size": 1},
     "micro_batch_interleave_num 2 with runner_config.batch_size 1: a batch of one row cannot be split into "
     "interleaved copies"),
    ({"micro_batch_interleave_num": 0}, "micro_batch_interleave_num must be an integer >= 1, got 0"),
    ({"runner_config.gradient_accumulation_steps": True},
     "runner_config.gradient_accumulation_steps must be an integer >= 1, got True"),
    ({"runner_config.batch_size": 2.0}, "runner_config.batch_size must be an integer >= 1, got 2.0"),
    ({"parallel_config.pipeline_stage": 2, "runner_wrapper.scale_sense": {"loss_scale_value": 1024}},
     "runner_wrapper.scale_sense: with pipeline_stage > 1 MindFormers swaps in MFPipelineWithLossScaleCell, which "
     "takes a number or {type: DynamicLossScaleUpdateCell, loss_scale_value: ..., scale_factor: ..., "
     "scale_window: ...}"),
    ({"runner_wrapper.freeze": {"bogus": 1}},
     "runner_wrapper.freeze: unknown key(s) ['bogus'] (known: ['experts', 'router_rows', 'non_moe'])"),
    ({"parallel_config.pipeline_stage": 2, "model.model_config.router_bias_update_rate": 0.001,
      "callbacks": [{"type": "CheckpointMonitor"}]},
     "model.model_config.router_bias_update_rate: under pipeline_stage > 1 the routers' biases move in the callbacks' "
     "once-per-step read; add MixtralProgressMonitor or RouterStatsMonitor to callbacks"),
    ({"runner_wrapper.type": "TrainOneStepCell", "model.model_config.router_bias_update_rate": 0.001, "callbacks": []},
     "model.model_config.router_bias_update_rate: under runner_wrapper 'TrainOneStepCell' the routers' biases move "
     "in the callbacks' once-per-step read; add MixtralProgressMonitor or RouterStatsMonitor to callbacks"),
], ids=lambda v: str(v)[:50] if isinstance(v, dict) else None)
def test_sections_that_cannot_run_are_one_line(settings, message):
    assert _refusal(_changed(TINY, settings)) == message


def test_sections_that_can_run():
    for settings in ({"micro_batch_interleave_num": 2}, {"optimizer.type": "OffloadAdamW"},
                     {"runner_wrapper.scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024,
                                                     "scale_factor": 2, "scale_window": 1000}},
                     {"callbacks": [{"type": "MixtralCheckpointMonitor", "save_checkpoint_steps": 5,
                                     "max_weight_abs": 1.0}]},
                     {"model.model_config.router_bias_update_rate": 0.001, "callbacks": []},  # moved in-graph
                     {"model.model_config.router_bias_update_rate": 0.001, "parallel_config.pipeline_stage": 2,
                      "callbacks": [{"type": "RouterStatsMonitor"}]}):
        assert type(check_config(_changed(TINY, settings)).model_config) is MixtralConfig, settings


@pytest.mark.parametrize("settings, message", [
    ({"parallel_config.expert_parallel": 3}, "expert_parallel (3) must divide data_parallel * model_parallel (8)"),
    ({"parallel_config.data_paralel": 2}, "parallel_config: unknown key(s) ['data_paralel']"),
], ids=lambda v: str(v)[:50] if isinstance(v, dict) else None)
def test_a_layout_that_cannot_run_is_the_layouts_one_line(settings, message):
    """The layout's own refusals are tests/test_parallel.py's; here: check_config passes them on, with use_parallel."""
    assert _refusal(_changed(PRETRAIN_8P, settings), ParallelConfigError) == message


def test_the_layout_is_checked_only_with_use_parallel():
    assert type(check_config(_changed(TINY, {"parallel_config.data_paralel": 2})).model_config) is MixtralConfig


def test_a_model_config_typo_names_its_yaml_path():
    message = _refusal(_changed(TINY, {"model.model_config.num_expert": 8}))
    assert message.startswith("model.model_config: ") and message.count("'") % 2 == 0
