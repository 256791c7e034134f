"""Checks of a run that need neither MindSpore nor MindFormers: the command line, the YAML's values and the
output folder, so scripts/run_mixtral.py refuses bad input in a fraction of a second (importing MindFormers
takes 5-20 s) with one line instead of a traceback from deep inside a build.

Values are checked where MindFormers would take them: the optimizer's and schedule's hyper-parameters,
batch sizes, the context mode, checkpoint and logging intervals, decoding settings. Structure and names
(unknown keys, unregistered types) are mixtral_ms/run/yaml_check.py's.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

from mixtral_ms.run import RunError
from mixtral_ms.run.run_yaml import read_run_yaml
from mixtral_ms.outputs import check_writable
from mixtral_ms.model.schema import model_dims


# MindFormers' progress and checkpoint callbacks; both names of the checkpoint one (runner.train swaps in ours).
CHECKPOINT_CALLBACKS = ("CheckpointMonitor", "MixtralCheckpointMonitor")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _exponent_without_dot(text: str) -> bool:
    """A number such as 1e-3 that YAML 1.1 reads as text (it wants a dot in the mantissa)."""
    try:
        float(text)
    except ValueError:
        return False
    return "e" in text.lower()


def _describe(value: Any) -> str:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        return f"the string {value!r}" + ("; write it with a dot, e.g. 1.0e-3" if _exponent_without_dot(value) else "")
    return repr(value)


def positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise RunError(f"{name} must be a positive integer, got {_describe(value)}")


def number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> None:
    """A finite number in [low, high] (open ends where asked)."""
    inside = is_number(value) and math.isfinite(value) and \
        (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise RunError(f"{name} must be a finite number in {interval}, got {_describe(value)}")


def _section(config: Mapping, name: str) -> Mapping:
    node = config.get(name)
    return node if isinstance(node, Mapping) else {}


def check_values(config: Mapping) -> None:
    """Raise RunError for a value no run can use (see the module docstring). `config`: the YAML's dict."""
    mode = _section(config, "context").get("mode")
    if mode is not None and mode not in (0, 1):
        raise RunError(f"context.mode must be 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE), got {_describe(mode)}")
    model = _section(config, "model")
    if isinstance(model.get("model_config"), Mapping):
        try:
            model_dims(model["model_config"])
        except ValueError as err:
            raise RunError(f"model.model_config: {err}") from None
    stages = _section(config, "parallel_config").get("pipeline_stage", 1)
    if not config.get("use_parallel") and stages != 1:  # one process runs every layer: the setting would be ignored
        raise RunError(f"parallel_config.pipeline_stage {_describe(stages)} needs use_parallel: True and a launch of "
                       "that many stages (scripts/msrun_launcher.sh); a single-process run has one stage")
    runner = _section(config, "runner_config")
    for key in ("batch_size", "epochs"):
        if key in runner:
            positive_int(f"runner_config.{key}", runner[key])
    if "batch_size" in _section(config, "train_dataset"):
        positive_int("train_dataset.batch_size", config["train_dataset"]["batch_size"])

    wrapper = _section(config, "runner_wrapper")
    if wrapper.get("max_grad_norm") is not None:
        number("runner_wrapper.max_grad_norm", wrapper["max_grad_norm"], 0)
    skips = wrapper.get("max_skipped_steps", 0)
    if not _is_int(skips) or skips < 0:
        raise RunError(f"runner_wrapper.max_skipped_steps must be an integer >= 0 (0: never stop), got {_describe(skips)}")
    scale = wrapper.get("scale_sense")
    if isinstance(scale, Mapping) and "type" not in scale:
        if "loss_scale_value" in scale:
            number("runner_wrapper.scale_sense.loss_scale_value", scale["loss_scale_value"], 0, low_open=True)
        if "scale_factor" in scale:
            number("runner_wrapper.scale_sense.scale_factor", scale["scale_factor"], 1, low_open=True)
        if "scale_window" in scale:
            positive_int("runner_wrapper.scale_sense.scale_window", scale["scale_window"])
    elif scale is not None and not isinstance(scale, Mapping):
        number("runner_wrapper.scale_sense", scale, 0, low_open=True)

    optimizer = _section(config, "optimizer")
    if "learning_rate" in optimizer and not isinstance(optimizer["learning_rate"], Mapping):
        number("optimizer.learning_rate", optimizer["learning_rate"], 0)
    if "betas" in optimizer:
        betas = optimizer["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise RunError(f"optimizer.betas must be two numbers in [0, 1), got {_describe(betas)}")
        for i, beta in enumerate(betas):
            number(f"optimizer.betas[{i}]", beta, 0, 1, high_open=True)
    if "eps" in optimizer:
        number("optimizer.eps", optimizer["eps"], 0, low_open=True)
    if "weight_decay" in optimizer:
        number("optimizer.weight_decay", optimizer["weight_decay"], 0)

    schedule = _section(config, "lr_schedule")
    for key in ("learning_rate", "lr_end"):
        if key in schedule:
            number(f"lr_schedule.{key}", schedule[key], 0)
    if "warmup_ratio" in schedule:
        number("lr_schedule.warmup_ratio", schedule["warmup_ratio"], 0, 1)
    total = schedule.get("total_steps")
    if total is not None and total != -1:
        if not _is_int(total) or total < 1:
            raise RunError(f"lr_schedule.total_steps must be a positive integer or -1 (from the dataset), "
                           f"got {_describe(total)}")
    warmup = schedule.get("warmup_steps")
    if warmup is not None:
        if not _is_int(warmup) or warmup < 0:
            raise RunError(f"lr_schedule.warmup_steps must be an integer >= 0, got {_describe(warmup)}")
        if _is_int(total) and total > 0 and warmup > total:
            raise RunError(f"lr_schedule.warmup_steps {warmup} exceeds total_steps {total}")

    callbacks = config.get("callbacks")
    for i, callback in enumerate(callbacks if isinstance(callbacks, list) else []):
        if not isinstance(callback, Mapping):
            continue
        name = f"callbacks[{i}] ({callback.get('type')})"
        if callback.get("type") in CHECKPOINT_CALLBACKS:
            for key in ("save_checkpoint_steps", "keep_checkpoint_max"):
                if key in callback:
                    positive_int(f"{name}.{key}", callback[key])
            if "max_weight_abs" in callback:
                number(f"{name}.max_weight_abs", callback["max_weight_abs"], 0, low_open=True)
        if "log_interval" in callback:
            positive_int(f"{name}.log_interval", callback["log_interval"])


def check_generation(settings: Mapping[str, Any]) -> None:
    """Decoding settings (runner.generation_settings' result) that generate() could not honour."""
    positive_int("max_new_tokens", settings["max_new_tokens"])
    number("temperature", settings["temperature"], 0, low_open=True)
    if not _is_int(settings["top_k"]) or settings["top_k"] < 0:
        raise RunError(f"top_k must be an integer >= 0 (0: no top-k filter), got {_describe(settings['top_k'])}")
    number("top_p", settings["top_p"], 0, 1, low_open=True)


def check_distributed_launch(config: Mapping) -> None:
    """`use_parallel: True` needs the rank environment msrun (or a rank table launch) provides."""
    if config.get("use_parallel") and not (os.environ.get("MS_ROLE") or os.environ.get("RANK_SIZE")):
        raise RunError("use_parallel: True needs a distributed launch (msrun, scripts/msrun_launcher.sh); "
                       "this process has no rank environment (MS_ROLE / RANK_SIZE)")


def prepare_output_dir(path: str) -> str:
    """Create `path` if needed and prove it writable; returns it. Called before MindFormers is imported,
    which would otherwise fail (or write its logs elsewhere) on its own."""
    try:
        os.makedirs(path, exist_ok=True)
        check_writable(path)
    except OSError as err:
        raise RunError(f"output_dir {path} is not writable ({err.strerror})") from None
    return path


def output_dir(cli: Optional[str], config: Mapping) -> str:
    return str(cli or config.get("output_dir") or "./output")


def check_worker_num(path: str, workers: int) -> None:
    """scripts/msrun_launcher.sh, before msrun starts: the job's processes must be the YAML's layout,
    data_parallel x model_parallel x pipeline_stage (MindFormers' defaults 1), and a YAML without
    `use_parallel: True` runs as one process. Else every worker fails after minutes of imports, or each
    of them trains the whole job alone."""
    config = read_run_yaml(path)
    if not config.get("use_parallel"):
        if workers != 1:
            raise RunError(f"{path} does not set use_parallel: True, so each of the {workers} workers would run "
                           "the whole job alone; launch it with --worker_num 1 or set use_parallel: True")
        return
    layout = config.get("parallel_config") if isinstance(config.get("parallel_config"), Mapping) else {}
    sizes = {}
    for key in ("data_parallel", "model_parallel", "pipeline_stage"):
        value = layout.get(key, 1)
        positive_int(f"parallel_config.{key}", value)
        sizes[key] = value
    need = math.prod(sizes.values())
    if workers != need:
        raise RunError(f"--worker_num {workers} does not match {path}: data_parallel {sizes['data_parallel']} x "
                       f"model_parallel {sizes['model_parallel']} x pipeline_stage {sizes['pipeline_stage']} = "
                       f"{need} processes")


if __name__ == "__main__":  # scripts/msrun_launcher.sh: python -m mixtral_ms.run.checks CONFIG WORKER_NUM
    import sys
    from mixtral_ms.cli import run
    sys.exit(run(lambda argv: check_worker_num(argv[0], int(argv[1])), sys.argv[1:], temp_logs=False))
