"""A checkpoint folder to compress, read lazily and checked with the converter's own name and shape
checks (either layout), plus the fingerprint that ties a calibration file to it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, List

import numpy as np

from mixtral_ms.checkpoint.name_map import ParamSpec, hf_sources, is_ms_layout, ms_tensors, parameter_specs
from mixtral_ms.model.schema import hf_dims, moe_layers, read_hf_config
from mixtral_ms.checkpoint.safetensors_io import TensorInfo, open_checkpoint, to_numpy
from mixtral_ms.tools.compress import CompressionError

_FINGERPRINT_VALUES = 256


class SourceModel:
    """config.json (`hf`: the dict, `config`: its shape fields) and, for every mixtral-ms parameter, its
    tensors: one per expert for stacked experts (whatever the layout on disk), else one (none for a
    dense model's router)."""

    def __init__(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise CompressionError(f"no model folder {folder}")
        self.folder = folder
        self.hf = read_hf_config(folder)
        self.config = hf_dims(self.hf)
        c = self.config
        unsupported = [what for what, used in (
            ("the aux-loss-free router bias (router_bias_update_rate)", c.router_bias_update_rate > 0),
            ("shared experts (num_shared_experts)", c.num_shared_experts > 0),
            ("dense layers (moe_layer_freq / first_k_dense / mlp_only_layers)",
             len(moe_layers(c)) != c.num_hidden_layers)) if used]
        if unsupported:  # their tensors would be copied unchanged beside changed experts: refused, not guessed
            raise CompressionError(f"{folder}: compression does not handle {unsupported[0]} yet")
        self.specs: Dict[str, ParamSpec] = parameter_specs(self.config)
        tensors = open_checkpoint(folder)
        self.ms_layout = is_ms_layout(tensors)
        if self.ms_layout:
            found = ms_tensors(tensors, self.config)
            self.params: Dict[str, List[TensorInfo]] = {
                name: [found[name].part(e, spec.shape[0]) for e in range(spec.shape[0])] if spec.stacked
                else [found[name]] for name, spec in self.specs.items()}
        else:
            self.params = hf_sources(tensors, self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def check_learned_router(self, what: str) -> None:
        """Calibration and every method built on it read the learned router (its logits, weights, usage);
        Pangu-Sigma's RRE routes by token id inside the domain's group and never reads it."""
        if self.config.router_type == "rre":
            raise CompressionError(f"{self.folder} routes with router_type rre (a fixed token-id -> expert map per "
                                   f"domain group; the router weight is unread): {what} needs a learned router")

    def array(self, name: str) -> np.ndarray:
        """A parameter as float32 (stacked experts stacked again)."""
        parts = [to_numpy(info).astype(np.float32) for info in self.params[name]]
        return np.stack(parts) if self.specs[name].stacked else parts[0]

    def expert(self, name: str, index: int) -> np.ndarray:
        """Expert `index` of a stacked parameter, as float32."""
        return to_numpy(self.params[name][index]).astype(np.float32)

    def fingerprint(self) -> str:
        """sha256 of the shape fields, every router and norm, and the first and last values of every other
        tensor, all as float32 (so either layout and any dtype of one model agree): reads kilobytes per
        tensor where hashing every expert would read the whole model again."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        for name, infos in self.params.items():
            whole = name.endswith(("gate.weight", "norm.weight", "layernorm.weight"))
            for info in infos:
                digest.update(np.ascontiguousarray(to_numpy(info) if whole else _ends(info), np.float32).tobytes())
        return digest.hexdigest()[:20]


def _ends(info: TensorInfo, count: int = _FINGERPRINT_VALUES) -> np.ndarray:
    """The first and last `count` values of a tensor, read by byte range."""
    n = int(np.prod(info.shape))
    if n <= 2 * count:
        return to_numpy(info).reshape(-1)
    width = info.nbytes // n
    head = TensorInfo(info.name, info.dtype, (count,), info.path, info.start, info.start + count * width)
    tail = TensorInfo(info.name, info.dtype, (count,), info.path, info.end - count * width, info.end)
    return np.concatenate([to_numpy(head), to_numpy(tail)])
