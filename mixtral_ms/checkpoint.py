"""Loading weights into a model from any checkpoint layout users arrive with, strictly checked.

Every layout is checked by the checkpoint schema (name_map.hf_sources, name_map.ms_tensors), the same
checks the converter runs, so a checkpoint the converter accepts is exactly one the model loads.
"""
from __future__ import annotations

import os

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor

from .name_map import TRAINING_STATE_PREFIXES, hf_sources, is_expert_stack, is_ms_layout, ms_tensors
from .safetensors_io import CheckpointError, open_checkpoint, to_numpy


def _set(param, value: np.ndarray) -> None:
    param.set_data(Tensor(value.astype(np.float32), dtype=param.dtype))


def load_weights(model, path: str) -> None:
    """Fill `model` from a Hugging Face folder (per-expert tensors), a mixtral-ms folder or file
    (stacked experts; hf2ms output or a training .safetensors) or a MindSpore .ckpt. Every parameter
    must be present with the model's shape; anything but weights and training state is an error."""
    if path.endswith(".ckpt"):
        _load_ckpt(model, path)
        return
    params = {p.name: p for p in model.get_parameters()}
    tensors = open_checkpoint(path)
    if is_ms_layout(tensors):
        for name, info in ms_tensors(tensors, model.config).items():
            _set(params[name], to_numpy(info))
        return
    for name, infos in hf_sources(tensors, model.config).items():
        parts = [to_numpy(info) for info in infos]
        _set(params[name], np.stack(parts) if is_expert_stack(name) else parts[0])


def _load_ckpt(model, path: str) -> None:
    """A MindSpore training checkpoint: the weights are read (optimizer moments and other training state
    are skipped unread), checked by the schema, cast to the model's dtypes and loaded strictly."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file {path}")
    state = ms.load_checkpoint(path, choice_func=lambda name: not name.startswith(TRAINING_STATE_PREFIXES))
    state = ms_tensors(state, model.config, implied_by="the model config")
    params = {p.name: p for p in model.get_parameters()}
    for name, value in state.items():
        if value.dtype != params[name].dtype:  # strict_load converts no dtype
            state[name] = Parameter(Tensor(value.astype(ms.float32).asnumpy(), dtype=params[name].dtype), name=name)
    not_loaded, _ = ms.load_param_into_net(model, state, strict_load=True)
    if not_loaded:  # a parameter the schema does not know (the model grew one): never leave it at its init
        raise CheckpointError(f"the checkpoint schema has no entry for model parameter {not_loaded[0]!r}")
