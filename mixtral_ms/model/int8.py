"""The int8 weight format of quantised experts, in numpy (no MindSpore: the compression tools stay light):
round to nearest, symmetric, one float32 scale per output channel or per group of `group_size` inputs.
moe.Int8Experts computes with it in the model."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

QMAX = 127  # symmetric: -127..127, so that -x quantises to -q


def quantize_int8(weight: np.ndarray, group_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """[..., out, in] floats -> (int8 [..., out, in], float32 scales [..., out, in // group_size]).

    scale = max |w| / 127 over each output channel (or group); q = round(w / scale). Every weight is then
    within scale / 2 of q * scale; an all-zero channel gets scale 0 and q = 0."""
    size = weight.shape[-1]
    group = group_size or size
    if size % group:
        raise ValueError(f"group_size {group} does not divide the input width {size}")
    grouped = weight.astype(np.float64).reshape(weight.shape[:-1] + (size // group, group))
    scale = (np.abs(grouped).max(axis=-1) / QMAX).astype(np.float32)
    wide = scale.astype(np.float64)[..., None]
    ratio = np.divide(grouped, wide, out=np.zeros_like(grouped), where=wide > 0)
    q = np.clip(np.rint(ratio), -QMAX, QMAX).astype(np.int8)
    return q.reshape(weight.shape), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 weights int8 `q` with `scale` stand for (numpy; the model does the same in Int8Experts)."""
    groups = scale.shape[-1]
    grouped = q.astype(np.float32).reshape(q.shape[:-1] + (groups, q.shape[-1] // groups))
    return (grouped * scale[..., None]).reshape(q.shape)
