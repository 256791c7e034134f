"""A checkpoint folder to compress, seen as a Mixtral through checkpoint/view.CheckpointView (either
layout, read lazily, the converter's own name and shape checks), plus the fingerprint that ties a
calibration file to it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from mixtral_ms.checkpoint.name_map import Kind, ParamName, parse
from mixtral_ms.checkpoint.view import CheckpointView
from mixtral_ms.model.schema import read_hf_config
from mixtral_ms.checkpoint.safetensors_io import TensorInfo, open_checkpoint, to_numpy
from mixtral_ms.tools.compress import CompressionError
from mixtral_ms.tools.compress.algorithms import Scoring

_FINGERPRINT_VALUES = 256
_READ_WHOLE = (Kind.ROUTER, Kind.ROUTER_BIAS, Kind.NORM, Kind.FINAL_NORM)  # small tensors the fingerprint hashes whole


class SourceModel(CheckpointView):
    """A model folder: config.json (`hf`: the dict, `dims`: its shape fields) and its tensors as a
    CheckpointView."""

    def __init__(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise CompressionError(f"no model folder {folder}")
        self.folder = folder
        self.hf = read_hf_config(folder)
        super().__init__(open_checkpoint(folder), self.hf)

    def scoring(self, layer: int) -> Scoring:
        """How MoE layer `layer`'s router chooses experts beyond softmax top-k: sigmoid scores, the bias."""
        bias = None
        if self.dims.router_bias_update_rate > 0:
            bias = self.array(ParamName(Kind.ROUTER_BIAS, layer).name)
        return Scoring(self.dims.router_score_function == "sigmoid", bias)

    def check_learned_router(self, what: str) -> None:
        """Calibration and every method built on it read the learned router (its logits, weights, usage);
        Pangu-Sigma's RRE routes by token id inside the domain's group and never reads it."""
        if self.dims.router_type == "rre":
            raise CompressionError(f"{self.folder} routes with router_type rre (a fixed token-id -> expert map per "
                                   f"domain group; the router weight is unread): {what} needs a learned router")

    def fingerprint(self) -> str:
        """sha256 of the shape fields, every router and norm, and the first and last values of every other
        tensor (each expert's own), all as float32 (so either layout and any dtype of one model agree): reads
        kilobytes per tensor where hashing every expert would read the whole model again."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.dims), sort_keys=True).encode())
        for name in self.stored:
            whole = parse(name).kind in _READ_WHOLE
            for info in self.parts(name):
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
