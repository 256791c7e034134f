"""Loading weights into a model from any checkpoint layout users arrive with, strictly checked.

Safetensors checkpoints go through the converter's own name and shape checks (convert.hf_sources,
convert.ms_tensors), so a checkpoint the converter accepts is exactly one the model loads.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

import mindspore as ms
from mindspore import Tensor

from .convert import hf_sources, is_ms_layout, ms_tensors
from .name_map import TRAINING_STATE_PREFIXES, is_expert_stack
from .safetensors_io import CheckpointError, open_checkpoint, to_numpy


def _set(param, value: np.ndarray) -> None:
    param.set_data(Tensor(value.astype(np.float32), dtype=param.dtype))


def load_weights(model, path: str) -> None:
    """Fill `model` from a Hugging Face folder (per-expert tensors), a mixtral-ms folder or file
    (stacked experts; hf2ms output or a training .safetensors) or a MindSpore .ckpt. Every parameter
    must be present with the model's shape; anything but weights and training state is an error."""
    params = {p.name: p for p in model.get_parameters()}
    if path.endswith(".ckpt"):
        if not os.path.isfile(path):
            raise CheckpointError(f"no checkpoint file {path}")
        _load_ckpt(params, ms.load_checkpoint(path))
        return
    tensors = open_checkpoint(path)
    if is_ms_layout(tensors):
        for name, info in ms_tensors(tensors, model.config).items():
            _set(params[name], to_numpy(info))
        return
    for name, infos in hf_sources(tensors, model.config).items():
        parts = [to_numpy(info) for info in infos]
        _set(params[name], np.stack(parts) if is_expert_stack(name) else parts[0])


def _load_ckpt(params: Dict[str, ms.Parameter], state: Dict[str, ms.Parameter]) -> None:
    """A MindSpore training checkpoint: the model's parameters, plus training state that is skipped."""
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_STATE_PREFIXES)}
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in checkpoint ({len(unexpected)} in all): "
                              "is it from another model?")
    for name, param in params.items():
        if name not in state:
            raise CheckpointError(f"checkpoint is missing parameter {name!r}")
        value = state[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"parameter {name!r}: checkpoint has shape {list(value.shape)}, the model expects "
                                  f"{list(param.shape)} (checkpoint from another config?)")
        _set(param, value.astype(ms.float32).asnumpy())
