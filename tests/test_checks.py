"""mixtral_ms/run/checks.py: the checks of a run that need neither MindSpore nor MindFormers.

The helpers (positive_int, number), check_values on the shipped tiny YAML (read by the one reader) changed one
value at a time, the decoding settings, the distributed launch, the output folder and the launcher's worker
count: each refusal is one RunError line, asserted to the letter."""
import glob
import os

import pytest

from conftest import ROOT
from mixtral_ms.cli import BadInput
from mixtral_ms.run import RunError
from mixtral_ms.run.checks import (check_distributed_launch, check_generation, check_values, check_worker_num, number,
                                   output_dir, positive_int, prepare_output_dir)
from mixtral_ms.run.run_yaml import read_run_yaml

TINY = os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml")
DOT = "; write it with a dot, e.g. 1.0e-3"


def _refusal(call, *args, **kwargs) -> str:
    with pytest.raises(RunError) as err:
        call(*args, **kwargs)
    assert isinstance(err.value, BadInput) and "\n" not in str(err.value)
    return str(err.value)


def _tiny(**changes):
    """configs/mixtral_tiny_cpu.yaml as read_run_yaml gives it, with changes at paths such as
    `callbacks__2__keep_checkpoint_max` (`__` separates keys; a number indexes a list)."""
    config = read_run_yaml(TINY)
    for path, value in changes.items():
        *keys, last = [int(k) if k.isdigit() else k for k in path.split("__")]
        node = config
        for key in keys:
            node = node[key] if isinstance(node, list) or key in node else node.setdefault(key, {})
        node[last] = value
    return config


# ------------------------------------------------------------------------------------------ helpers

@pytest.mark.parametrize("value, described", [
    (0, "0"), (-3, "-3"), (2.0, "2.0"), (True, "True"), (None, "None"), ("8", "the string '8'"),
    ("1e3", "the string '1e3'" + DOT), ([1], "[1]"),
])
def test_positive_int_refuses_everything_but_an_integer_from_one(value, described):
    assert _refusal(positive_int, "runner_config.epochs", value) == \
        f"runner_config.epochs must be a positive integer, got {described}"


def test_positive_int_accepts_integers_from_one():
    for value in (1, 7, 10 ** 12):
        assert positive_int("x", value) is None


@pytest.mark.parametrize("value, bounds, interval, described", [
    (-0.5, {"low": 0}, "[0, inf]", "-0.5"),
    (float("nan"), {}, "[-inf, inf]", "nan"),
    (float("inf"), {"low": 0}, "[0, inf]", "inf"),
    (float("-inf"), {}, "[-inf, inf]", "-inf"),
    (0, {"low": 0, "low_open": True}, "(0, inf]", "0"),
    (1.0, {"low": 0, "high": 1, "high_open": True}, "[0, 1)", "1.0"),
    (1.5, {"low": 0, "high": 1}, "[0, 1]", "1.5"),
    (0.5, {"low": 1e-3, "high": 0.25}, "[0.001, 0.25]", "0.5"),
    (True, {"low": 0}, "[0, inf]", "True"),
    ("3e-3", {"low": 0}, "[0, inf]", "the string '3e-3'" + DOT),
    ("0.1", {"low": 0}, "[0, inf]", "the string '0.1'"),
    (None, {"low": 0}, "[0, inf]", "None"),
], ids=lambda v: str(v))
def test_number_refuses_what_is_outside_its_interval(value, bounds, interval, described):
    assert _refusal(number, "optimizer.eps", value, **bounds) == \
        f"optimizer.eps must be a finite number in {interval}, got {described}"


def test_number_accepts_the_closed_ends_and_integers():
    for value, bounds in ((0, {"low": 0}), (0.0, {"low": 0, "high": 1}), (1, {"low": 0, "high": 1}),
                          (1e-300, {"low": 0, "low_open": True}), (0.999, {"low": 0, "high": 1, "high_open": True}),
                          (-1e308, {})):
        assert number("x", value, **bounds) is None


# ------------------------------------------------------------------------------------------ check_values

@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_every_shipped_yaml_passes(path):
    assert check_values(read_run_yaml(path)) is None


@pytest.mark.parametrize("changes", [
    {"context__mode": 1}, {"context__mode": 0},
    {"runner_wrapper__max_grad_norm": None}, {"runner_wrapper__max_grad_norm": 0},
    {"runner_wrapper__max_skipped_steps": 0},
    {"runner_wrapper__scale_sense": {"loss_scale_value": 65536, "scale_factor": 2, "scale_window": 1000}},
    {"runner_wrapper__scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": -1}},  # MindFormers'
    {"optimizer__learning_rate": {"type": "ConstantWarmUpLR", "learning_rate": -1}},  # a schedule: MindFormers'
    {"optimizer__betas": [0, 0.999]}, {"optimizer__weight_decay": 0}, {"optimizer__betas": (0.5, 0.5)},
    {"lr_schedule__warmup_ratio": 0}, {"lr_schedule__warmup_ratio": 1}, {"lr_schedule__learning_rate": 0},
    {"lr_schedule__total_steps": 10, "lr_schedule__warmup_steps": 10}, {"lr_schedule__warmup_steps": 0},
    {"use_parallel": True, "parallel_config__pipeline_stage": 2},
    {"callbacks": [{"type": "MixtralCheckpointMonitor", "max_weight_abs": 1e-3}, "not a mapping"]},
], ids=lambda v: str(v)[:60])
def test_values_at_the_edges_pass(changes):
    assert check_values(_tiny(**changes)) is None


@pytest.mark.parametrize("changes, message", [
    ({"context__mode": 5}, "context.mode must be 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE), got 5"),
    ({"context__mode": "0"}, "context.mode must be 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE), got the string '0'"),
    ({"model__model_config__hidden_size": "64"},
     "model.model_config: hidden_size must be a positive integer, got '64'"),
    ({"model__model_config__num_experts_per_tok": 9},
     "model.model_config: num_experts_per_tok (9) exceeds num_local_experts (8)"),
    ({"model__model_config__num_key_value_heads": 3},
     "model.model_config: num_attention_heads (4) is not divisible by num_key_value_heads (3)"),
    ({"parallel_config__pipeline_stage": 2},
     "parallel_config.pipeline_stage 2 needs use_parallel: True and a launch of that many stages "
     "(scripts/msrun_launcher.sh); a single-process run has one stage"),
    ({"runner_config__batch_size": 0}, "runner_config.batch_size must be a positive integer, got 0"),
    ({"runner_config__epochs": 1.5}, "runner_config.epochs must be a positive integer, got 1.5"),
    ({"runner_config__epochs": True}, "runner_config.epochs must be a positive integer, got True"),
    ({"train_dataset__batch_size": -1}, "train_dataset.batch_size must be a positive integer, got -1"),
    ({"runner_wrapper__max_grad_norm": -0.5},
     "runner_wrapper.max_grad_norm must be a finite number in [0, inf], got -0.5"),
    ({"runner_wrapper__max_skipped_steps": -1},
     "runner_wrapper.max_skipped_steps must be an integer >= 0 (0: never stop), got -1"),
    ({"runner_wrapper__max_skipped_steps": 1.0},
     "runner_wrapper.max_skipped_steps must be an integer >= 0 (0: never stop), got 1.0"),
    ({"runner_wrapper__scale_sense": {"loss_scale_value": 0}},
     "runner_wrapper.scale_sense.loss_scale_value must be a finite number in (0, inf], got 0"),
    ({"runner_wrapper__scale_sense": {"scale_factor": 1}},
     "runner_wrapper.scale_sense.scale_factor must be a finite number in (1, inf], got 1"),
    ({"runner_wrapper__scale_sense": {"scale_window": 0}},
     "runner_wrapper.scale_sense.scale_window must be a positive integer, got 0"),
    ({"runner_wrapper__scale_sense": 0}, "runner_wrapper.scale_sense must be a finite number in (0, inf], got 0"),
    ({"runner_wrapper__scale_sense": "1e3"},
     "runner_wrapper.scale_sense must be a finite number in (0, inf], got the string '1e3'" + DOT),
    ({"optimizer__learning_rate": -1.0e-3}, "optimizer.learning_rate must be a finite number in [0, inf], got -0.001"),
    ({"optimizer__betas": [0.9]}, "optimizer.betas must be two numbers in [0, 1), got [0.9]"),
    ({"optimizer__betas": "0.9, 0.95"}, "optimizer.betas must be two numbers in [0, 1), got the string '0.9, 0.95'"),
    ({"optimizer__betas": [0.9, 1.0]}, "optimizer.betas[1] must be a finite number in [0, 1), got 1.0"),
    ({"optimizer__betas": [-0.1, 0.9]}, "optimizer.betas[0] must be a finite number in [0, 1), got -0.1"),
    ({"optimizer__eps": 0.0}, "optimizer.eps must be a finite number in (0, inf], got 0.0"),
    ({"optimizer__eps": "1e-8"}, "optimizer.eps must be a finite number in (0, inf], got the string '1e-8'" + DOT),
    ({"optimizer__weight_decay": -0.1}, "optimizer.weight_decay must be a finite number in [0, inf], got -0.1"),
    ({"lr_schedule__learning_rate": float("nan")},
     "lr_schedule.learning_rate must be a finite number in [0, inf], got nan"),
    ({"lr_schedule__lr_end": float("inf")}, "lr_schedule.lr_end must be a finite number in [0, inf], got inf"),
    ({"lr_schedule__warmup_ratio": 1.5}, "lr_schedule.warmup_ratio must be a finite number in [0, 1], got 1.5"),
    ({"lr_schedule__total_steps": 0},
     "lr_schedule.total_steps must be a positive integer or -1 (from the dataset), got 0"),
    ({"lr_schedule__total_steps": -2},
     "lr_schedule.total_steps must be a positive integer or -1 (from the dataset), got -2"),
    ({"lr_schedule__total_steps": 10.0},
     "lr_schedule.total_steps must be a positive integer or -1 (from the dataset), got 10.0"),
    ({"lr_schedule__warmup_steps": -1}, "lr_schedule.warmup_steps must be an integer >= 0, got -1"),
    ({"lr_schedule__warmup_steps": 0.5}, "lr_schedule.warmup_steps must be an integer >= 0, got 0.5"),
    ({"lr_schedule__total_steps": 10, "lr_schedule__warmup_steps": 11},
     "lr_schedule.warmup_steps 11 exceeds total_steps 10"),
    ({"callbacks__2__save_checkpoint_steps": 0},
     "callbacks[2] (CheckpointMonitor).save_checkpoint_steps must be a positive integer, got 0"),
    ({"callbacks__2__keep_checkpoint_max": -1},
     "callbacks[2] (CheckpointMonitor).keep_checkpoint_max must be a positive integer, got -1"),
    ({"callbacks__2__type": "MixtralCheckpointMonitor", "callbacks__2__max_weight_abs": 0},
     "callbacks[2] (MixtralCheckpointMonitor).max_weight_abs must be a finite number in (0, inf], got 0"),
    ({"callbacks__0__log_interval": 0},
     "callbacks[0] (MixtralProgressMonitor).log_interval must be a positive integer, got 0"),
    ({"callbacks__1__log_interval": "20"},
     "callbacks[1] (RouterStatsMonitor).log_interval must be a positive integer, got the string '20'"),
], ids=lambda v: str(v)[:60] if isinstance(v, dict) else None)
def test_each_bad_value_is_one_line(changes, message):
    assert _refusal(check_values, _tiny(**changes)) == message


def test_the_first_check_that_fails_is_named():
    """Two bad values: the check order (context, model, layout, runner, wrapper, optimizer, schedule,
    callbacks) decides which one line the user sees."""
    config = _tiny(optimizer__eps=0, runner_config__epochs=0, callbacks__0__log_interval=0)
    assert _refusal(check_values, config) == "runner_config.epochs must be a positive integer, got 0"


def test_the_exponent_hint_is_only_for_numbers_written_without_a_dot():
    assert _refusal(check_values, _tiny(context__mode="GRAPH_MODE")) == \
        "context.mode must be 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE), got the string 'GRAPH_MODE'"


# ------------------------------------------------------------------------------------------ generation, launch, output

GENERATION = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@pytest.mark.parametrize("key, value, message", [
    ("max_new_tokens", 0, "max_new_tokens must be a positive integer, got 0"),
    ("temperature", 0, "temperature must be a finite number in (0, inf], got 0"),
    ("temperature", float("inf"), "temperature must be a finite number in (0, inf], got inf"),
    ("top_k", -1, "top_k must be an integer >= 0 (0: no top-k filter), got -1"),
    ("top_k", 2.0, "top_k must be an integer >= 0 (0: no top-k filter), got 2.0"),
    ("top_p", 0.0, "top_p must be a finite number in (0, 1], got 0.0"),
    ("top_p", 1.01, "top_p must be a finite number in (0, 1], got 1.01"),
])
def test_generation_settings(key, value, message):
    assert check_generation(GENERATION) is None and check_generation({**GENERATION, "top_k": 50, "top_p": 0.5}) is None
    assert _refusal(check_generation, {**GENERATION, key: value}) == message


def test_use_parallel_needs_a_rank_environment(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    monkeypatch.delenv("RANK_SIZE", raising=False)
    assert check_distributed_launch({"use_parallel": False}) is None
    assert _refusal(check_distributed_launch, {"use_parallel": True}) == (
        "use_parallel: True needs a distributed launch (msrun, scripts/msrun_launcher.sh); this process has no rank "
        "environment (MS_ROLE / RANK_SIZE)")
    for variable, value in (("MS_ROLE", "MS_WORKER"), ("RANK_SIZE", "8")):
        monkeypatch.setenv(variable, value)
        assert check_distributed_launch({"use_parallel": True}) is None
        monkeypatch.delenv(variable)


def test_output_folder_is_created_and_proven_writable(tmp_path):
    nested = tmp_path / "a" / "b"
    assert prepare_output_dir(str(nested)) == str(nested) and os.listdir(nested) == []  # the probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _refusal(prepare_output_dir, str(blocker / "out")) == \
        f"output_dir {blocker / 'out'} is not writable (Not a directory)"
    assert _refusal(prepare_output_dir, str(blocker)) == f"output_dir {blocker} is not writable (File exists)"
    assert blocker.read_text() == "x"
    assert (output_dir("cli", {"output_dir": "yaml"}), output_dir(None, {"output_dir": "yaml"}), output_dir(None, {}),
            output_dir("", {"output_dir": ""})) == ("cli", "yaml", "./output", "./output")


# ------------------------------------------------------------------------------------------ check_worker_num

@pytest.mark.parametrize("name, workers", [
    ("parallel/mixtral_8x7b_pretrain_8p.yaml", 8), ("parallel/mixtral_8x7b_pretrain_32p.yaml", 32),
    ("parallel/mixtral_8x7b_finetune_16p.yaml", 16), ("parallel/mixtral_8x7b_predict_mp8.yaml", 8),
    ("parallel/dryrun/mixtral_tiny_8p.yaml", 8), ("mixtral_tiny_cpu.yaml", 1), ("compress/dense_tiny_cpu.yaml", 1),
])
def test_shipped_yamls_launch_as_many_workers_as_their_names_say(name, workers):
    path = os.path.join(ROOT, "configs", name)
    assert check_worker_num(path, workers) is None
    message = _refusal(check_worker_num, path, workers * 2)
    if workers == 1:
        assert message == (f"{path} does not set use_parallel: True, so each of the 2 workers would run the whole job "
                           "alone; launch it with --worker_num 1 or set use_parallel: True")
    else:
        layout = read_run_yaml(path)["parallel_config"]
        assert message == (f"--worker_num {workers * 2} does not match {path}: data_parallel "
                           f"{layout['data_parallel']} x model_parallel {layout['model_parallel']} x pipeline_stage "
                           f"{layout['pipeline_stage']} = {workers} processes")


def test_worker_num_of_written_yamls(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("use_parallel: True\n")
    assert check_worker_num(str(bare), 1) is None  # MindFormers' defaults: 1 x 1 x 1
    assert _refusal(check_worker_num, str(bare), 4) == \
        f"--worker_num 4 does not match {bare}: data_parallel 1 x model_parallel 1 x pipeline_stage 1 = 1 processes"
    child = tmp_path / "child.yaml"  # the layout and use_parallel come from the base
    child.write_text("base_config: layout.yaml\nparallel_config: {pipeline_stage: 3}\n")
    (tmp_path / "layout.yaml").write_text("use_parallel: True\n"
                                          "parallel_config: {data_parallel: 2, model_parallel: 2}\n")
    assert check_worker_num(str(child), 12) is None
    assert _refusal(check_worker_num, str(child), 4) == \
        f"--worker_num 4 does not match {child}: data_parallel 2 x model_parallel 2 x pipeline_stage 3 = 12 processes"
    for value, described in ((0, "0"), ("2", "the string '2'"), (1.0, "1.0")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"use_parallel: True\nparallel_config: {{data_parallel: 2, model_parallel: {value!r}}}\n")
        assert _refusal(check_worker_num, str(bad), 2) == \
            f"parallel_config.model_parallel must be a positive integer, got {described}"
    assert _refusal(check_worker_num, str(tmp_path / "none.yaml"), 1) == f"no config file {tmp_path / 'none.yaml'}"
