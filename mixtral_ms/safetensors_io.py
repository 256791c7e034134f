"""Safetensors without a framework: lazy reads by header offset, and shard writes via temp + rename.

Tensors are handled as raw little-endian bytes plus a dtype tag, so bf16 (which numpy lacks) passes
through bit for bit; `to_numpy` widens bf16 to float32 exactly when a caller needs numbers.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the model."""


class TensorInfo:
    """Where one tensor's bytes live."""
    __slots__ = ("name", "dtype", "shape", "path", "start", "end")

    def __init__(self, name: str, dtype: str, shape: Tuple[int, ...], path: str, start: int, end: int) -> None:
        self.name, self.dtype, self.shape, self.path, self.start, self.end = name, dtype, shape, path, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.nbytes)
        if len(data) != self.nbytes:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} is truncated")
        return data


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and validate one safetensors file's header; returns its tensors and metadata."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing safetensors file {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt or truncated header (declares {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors: Dict[str, TensorInfo] = {}
    end_of_data = 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end or end - start != expected:
            raise CheckpointError(f"{path}: tensor {name!r} offsets {start}..{end} do not match {dtype}{list(shape)}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        end_of_data = max(end_of_data, end)
        tensors[name] = TensorInfo(name, dtype, shape, path, base + start, base + end)
    if base + end_of_data != size:
        raise CheckpointError(f"{path}: {size - base - end_of_data} bytes beyond the last tensor (corrupt file)")
    return tensors, metadata


def open_checkpoint(folder_or_file: str) -> Dict[str, TensorInfo]:
    """Every tensor of a checkpoint: one .safetensors file, a folder with `model.safetensors`, or a
    folder of shards with `*.safetensors.index.json` (each indexed tensor must be in its shard)."""
    if os.path.isfile(folder_or_file):
        return read_header(folder_or_file)[0]
    if not os.path.isdir(folder_or_file):
        raise CheckpointError(f"no checkpoint at {folder_or_file} (neither a file nor a folder)")
    indexes = sorted(f for f in os.listdir(folder_or_file) if f.endswith(".safetensors.index.json"))
    if not indexes:
        single = os.path.join(folder_or_file, "model.safetensors")
        if os.path.isfile(single):
            return read_header(single)[0]
        shards = sorted(f for f in os.listdir(folder_or_file) if f.endswith(".safetensors"))
        if len(shards) == 1:
            return read_header(os.path.join(folder_or_file, shards[0]))[0]
        raise CheckpointError(f"{folder_or_file}: no model.safetensors and no *.safetensors.index.json")
    index_path = os.path.join(folder_or_file, indexes[0])
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path}: malformed index (needs a 'weight_map' object)") from None
    tensors: Dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder_or_file, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path} names shard {shard}, which is missing")
        found = read_header(shard_path)[0]
        for name, file in weight_map.items():
            if file == shard:
                if name not in found:
                    raise CheckpointError(f"{index_path} puts {name!r} in {shard}, which does not contain it")
                tensors[name] = found[name]
    return tensors


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bf16 bit patterns (uint16) to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns with round-to-nearest-even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def to_numpy(info: TensorInfo, data: Optional[bytes] = None) -> np.ndarray:
    """The tensor as a numpy array (bf16 widened to float32)."""
    data = info.read() if data is None else data
    if info.dtype == "BF16":
        return bf16_to_f32(np.frombuffer(data, np.uint16)).reshape(info.shape)
    return np.frombuffer(data, _NUMPY[info.dtype]).reshape(info.shape)


def numpy_dtype_tag(array: np.ndarray) -> str:
    for tag, dtype in _NUMPY.items():
        if array.dtype == dtype:
            return tag
    raise CheckpointError(f"unsupported numpy dtype {array.dtype}")


Source = Union[bytes, Callable[[], bytes]]


def write_safetensors(path: str, tensors: Sequence[Tuple[str, str, Tuple[int, ...], Source]],
                      metadata: Optional[Dict[str, str]] = None) -> int:
    """Write (name, dtype tag, shape, bytes or a function returning them) to `path` via `path.tmp` + rename.

    The header is built from names, dtypes and shapes alone; each tensor's bytes are produced only
    when written, so a shard's peak memory is its largest tensor. Returns the bytes written.
    """
    header: Dict[str, object] = {"__metadata__": metadata or {"format": "np"}}
    offset = 0
    for name, dtype, shape, _ in tensors:
        size = DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dtype, shape, source in tensors:
                data = source() if callable(source) else source
                start, end = header[name]["data_offsets"]
                if len(data) != end - start:
                    raise CheckpointError(f"tensor {name!r}: {len(data)} bytes do not match {dtype}{list(shape)}")
                f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return 8 + len(blob) + offset


def iter_numpy(tensors: Dict[str, TensorInfo]) -> Iterator[Tuple[str, np.ndarray]]:
    for name, info in tensors.items():
        yield name, to_numpy(info)
