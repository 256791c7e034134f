"""Loading weights into a model from any checkpoint layout users arrive with, strictly checked.

Every layout is seen through view.CheckpointView (the checkpoint schema's names, shapes and dtypes), the
same checks the converter runs, so a checkpoint the converter accepts is exactly one the model loads;
NaN/inf weights are refused here as the converter refuses them.
"""
from __future__ import annotations

import glob
import os
from typing import Dict

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor

from mixtral_ms.checkpoint.name_map import is_training_state
from mixtral_ms.checkpoint.safetensors_io import (ArrayTensor, CheckpointError, f32_to_bf16, numpy_tag, open_checkpoint,
                                                  to_numpy)
from mixtral_ms.checkpoint.view import CheckpointView


def resolve_checkpoint(path: str) -> str:
    """A file or folder users name; for a folder of training checkpoints, the newest file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if os.path.isfile(os.path.join(path, "config.json")) or glob.glob(os.path.join(path, "*.safetensors.index.json")):
        return path
    files = glob.glob(os.path.join(path, "**", "*.ckpt"), recursive=True) + \
        glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True)
    if not files:
        raise CheckpointError(f"no .ckpt or .safetensors checkpoint under {path}")
    return max(files, key=lambda f: (os.path.getmtime(f), f))


def read_ckpt(path: str, training_state: bool = False) -> Dict[str, ArrayTensor]:
    """The weights of a MindSpore .ckpt (optimizer moments and other training state skipped unread unless
    `training_state`), as raw bytes and dtype tags. MindSpore reads the file whole: a .ckpt cannot be read
    lazily."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file {path}")
    try:
        state = ms.load_checkpoint(path, choice_func=None if training_state else
                                   lambda name: not is_training_state(name))
    except (ValueError, RuntimeError, TypeError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({first})") from None
    out = {}
    for name, value in state.items():
        if value.dtype == ms.bfloat16:  # numpy has no bf16: widen (exact) and narrow back (exact)
            tag, data = "BF16", f32_to_bf16(value.astype(ms.float32).asnumpy()).tobytes()
        else:
            array = value.asnumpy()
            tag, data = numpy_tag(array.dtype), np.ascontiguousarray(array).tobytes()
        out[name] = ArrayTensor(name, tag, tuple(value.shape), data)
    return out


def _checked(info, allow_nonfinite: bool) -> np.ndarray:
    """The tensor's values, refused (by its checkpoint name) if it holds NaN or inf."""
    value = to_numpy(info)
    if not allow_nonfinite and not np.isfinite(value).all():
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        raise CheckpointError(f"tensor {info.name!r} holds NaN or inf values ({bad} of {value.size}); refusing to "
                              "load it (allow_nonfinite=True loads it anyway)")
    return value


def _set(param, value: np.ndarray) -> None:
    param.set_data(Tensor(value.astype(np.float32), dtype=param.dtype))


def load_weights(model, path: str, allow_nonfinite: bool = False) -> None:
    """Fill `model` from a Hugging Face folder (per-expert tensors), a mixtral-ms folder or file
    (stacked experts; hf2ms output or a training .safetensors) or a MindSpore .ckpt. Every parameter
    must be present with the model's shape and a float dtype (F32, BF16, F16) and, unless
    `allow_nonfinite`, finite; anything but weights and training state is an error. The model's own
    training state (the training_stats side channel) is not loaded."""
    if path.endswith(".ckpt"):
        _load_ckpt(model, path, allow_nonfinite)
        return
    params = {p.name: p for p in model.get_parameters()}
    for name, infos in CheckpointView(open_checkpoint(path), model.config).stored.items():
        param = params[name]
        values = [_checked(info, allow_nonfinite) for info in infos]
        # no source: a dense (Mistral) model's router, whose one expert takes every token whatever the logit
        value = values[0] if len(values) == 1 else np.stack(values) if values else np.zeros(param.shape, np.float32)
        _set(param, value.reshape(param.shape))


def _load_ckpt(model, path: str, allow_nonfinite: bool) -> None:
    """A MindSpore training checkpoint: the weights (read_ckpt), checked by the schema, cast to the model's
    dtypes and loaded strictly."""
    view = CheckpointView(read_ckpt(path), model.config, implied_by="the model config")
    params = {p.name: p for p in model.get_parameters()}
    state = {name: Parameter(Tensor(_checked(view.tensor(name), allow_nonfinite).astype(np.float32),
                                    dtype=params[name].dtype), name=name) for name in view.stored}
    not_loaded, _ = ms.load_param_into_net(model, state, strict_load=True)
    not_loaded = [name for name in not_loaded if not is_training_state(name)]
    if not_loaded:  # a parameter the schema does not know (the model grew one): never leave it at its init
        raise CheckpointError(f"the checkpoint schema has no entry for model parameter {not_loaded[0]!r}")
