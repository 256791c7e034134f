"""Loading weights into a model from any checkpoint layout users arrive with, strictly checked."""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

import mindspore as ms
from mindspore import Tensor

from .name_map import TRAINING_STATE_PREFIXES, parameter_specs
from .safetensors_io import CheckpointError, open_checkpoint, to_numpy



def _set(param, value: np.ndarray) -> None:
    param.set_data(Tensor(value.astype(np.float32), dtype=param.dtype))


def load_weights(model, path: str) -> None:
    """Fill `model` from a Hugging Face folder (per-expert tensors), a mixtral-ms folder or file
    (stacked experts; hf2ms output or a training .safetensors) or a MindSpore .ckpt. Every parameter
    must be present with the model's shape; anything but weights and training state is an error."""
    if path.endswith(".ckpt"):
        if not os.path.isfile(path):
            raise CheckpointError(f"no checkpoint file {path}")
        arrays = {k: v.asnumpy() if v.dtype != ms.bfloat16 else v.astype(ms.float32).asnumpy()
                  for k, v in ms.load_checkpoint(path).items()}
        _load_arrays(model, {k: (v.shape, lambda v=v: v) for k, v in arrays.items()})
        return
    tensors = open_checkpoint(path)
    if any(".experts.0.w1.weight" in name for name in tensors):
        _load_hf(model, tensors)
    else:
        _load_arrays(model, {k: (tuple(v.shape), lambda v=v: to_numpy(v)) for k, v in tensors.items()})


def _load_arrays(model, arrays: Dict[str, tuple]) -> None:
    arrays = {k: v for k, v in arrays.items() if not k.startswith(TRAINING_STATE_PREFIXES)}
    params = {p.name: p for p in model.get_parameters()}
    unexpected = sorted(set(arrays) - set(params))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in checkpoint ({len(unexpected)} in all): "
                              "is it from another model?")
    for name, param in params.items():
        if name not in arrays:
            raise CheckpointError(f"checkpoint is missing parameter {name!r}")
        shape, read = arrays[name]
        if tuple(shape) != tuple(param.shape):
            raise CheckpointError(f"parameter {name!r}: checkpoint has shape {list(shape)}, the model expects "
                                  f"{list(param.shape)} (checkpoint from another config?)")
        _set(param, read())


def _load_hf(model, tensors) -> None:
    specs = parameter_specs(model.config)
    wanted = {src for spec in specs.values() for src in spec.sources}
    unexpected = sorted(set(tensors) - wanted)
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in checkpoint ({len(unexpected)} in all)")
    params = {p.name: p for p in model.get_parameters()}
    for name, spec in specs.items():
        parts = []
        for src in spec.sources:
            if src not in tensors:
                raise CheckpointError(f"checkpoint is missing tensor {src!r}")
            want = spec.shape[1:] if len(spec.sources) > 1 else spec.shape
            if tuple(tensors[src].shape) != tuple(want):
                raise CheckpointError(f"tensor {src!r} has shape {list(tensors[src].shape)}, "
                                      f"the config expects {list(want)}")
            parts.append(to_numpy(tensors[src]))
        _set(params[name], np.stack(parts) if len(parts) > 1 else parts[0])
