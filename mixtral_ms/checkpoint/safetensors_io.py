"""Safetensors without a framework: lazy reads by header offset, and streaming shard writes via temp + rename.

Tensors are handled as raw little-endian bytes plus a dtype tag, so bf16 (which numpy lacks) passes
through bit for bit; `to_numpy` widens bf16 to float32 exactly when a caller needs numbers, and
`f32_to_bf16` narrows with round-to-nearest-even (as torch and MindSpore do).

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {str: str}}`, then the data;
offsets are relative to the end of the header, and the tensors tile the data with no gap or overlap.

Not `safetensors.safe_open`: its numpy API has no bf16 and no byte offsets (needed to copy tensors file to
file in constant memory), and it silently keeps one of two entries with the same name.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from mixtral_ms.cli import BadInput

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.bool_}
FLOAT_TAGS = ("F32", "BF16", "F16")
_MAX_HEADER = 100 * 1024 * 1024  # the limit the reference implementation enforces
CHUNK_BYTES = 8 << 20  # streaming buffer: the most tensor data a conversion holds at once


class CheckpointError(BadInput, ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the model."""


def _unique_keys(pairs):
    """json object_pairs_hook: a name given twice is ambiguous (readers disagree on which copy wins)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"{key!r} appears twice")
        out[key] = value
    return out


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    return DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))


class TensorInfo:
    """Where one tensor's bytes live: `path`, absolute byte range [start, end)."""
    __slots__ = ("name", "dtype", "shape", "path", "start", "end")

    def __init__(self, name: str, dtype: str, shape: Tuple[int, ...], path: str, start: int, end: int) -> None:
        self.name, self.dtype, self.shape, self.path, self.start, self.end = name, dtype, tuple(shape), path, start, end

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.dtype}, {list(self.shape)}, {self.path}@{self.start})"

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def part(self, index: int, count: int, name: Optional[str] = None) -> "TensorInfo":
        """The `index`-th of `count` equal slices along axis 0 (one expert of a stacked tensor)."""
        step = self.nbytes // count
        return TensorInfo(name or f"{self.name}[{index}]", self.dtype, self.shape[1:], self.path,
                          self.start + index * step, self.start + (index + 1) * step)

    def read(self) -> bytes:
        """This tensor's bytes, and no other tensor's."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.nbytes)
        if len(data) != self.nbytes:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} is truncated")
        return data

    def iter_chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The bytes in pieces of at most `chunk_bytes` (a multiple of the element size)."""
        item = DTYPE_BYTES[self.dtype]
        chunk_bytes = max(item, chunk_bytes // item * item)
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = self.nbytes
            while left:
                data = f.read(min(left, chunk_bytes))
                if not data:
                    raise CheckpointError(f"{self.path}: tensor {self.name!r} is truncated")
                left -= len(data)
                yield data


class ArrayTensor:
    """A tensor held in memory as raw bytes (one read from a format that cannot be read lazily, the .ckpt),
    with TensorInfo's reading interface, so the same checks and writers take it."""
    __slots__ = ("name", "dtype", "shape", "data")

    def __init__(self, name: str, dtype: str, shape: Tuple[int, ...], data: bytes) -> None:
        self.name, self.dtype, self.shape, self.data = name, dtype, tuple(shape), data

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def part(self, index: int, count: int, name: Optional[str] = None) -> "ArrayTensor":
        step = self.nbytes // count
        return ArrayTensor(name or f"{self.name}[{index}]", self.dtype, self.shape[1:],
                           self.data[index * step:(index + 1) * step])

    def read(self) -> bytes:
        return self.data

    def iter_chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        view = memoryview(self.data)
        for start in range(0, len(view), chunk_bytes):
            yield bytes(view[start:start + chunk_bytes])


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and validate one safetensors file's header (reads no tensor data); returns its tensors
    (in file order) and metadata. Every inconsistency is a one-line CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing safetensors file {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > _MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt or truncated header (declares {header_len} bytes, file has {size})")
        blob = f.read(header_len)
    try:
        header = json.loads(blob, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt header (not JSON)") from None
    except CheckpointError as err:
        raise CheckpointError(f"{path}: corrupt header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt header (__metadata__ is not an object)")
    base = 8 + header_len
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(start, int) \
                    or not isinstance(end, int) or not isinstance(dtype, str):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        shape = tuple(shape)
        if not 0 <= start <= end or end - start != nbytes_of(dtype, shape):
            raise CheckpointError(f"{path}: tensor {name!r} offsets [{start}, {end}] do not hold "
                                  f"{dtype}{list(shape)} ({nbytes_of(dtype, shape)} bytes)")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        tensors[name] = TensorInfo(name, dtype, shape, path, base + start, base + end)
    position = base
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            kind = "overlaps the previous tensor" if info.start < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: corrupt offsets: tensor {info.name!r} {kind} (starts at byte "
                                  f"{info.start}, expected {position})")
        position = info.end
    if position != size:
        raise CheckpointError(f"{path}: {size - position} bytes beyond the last tensor (file has {size}, "
                              f"header and tensors end at {position})")
    return tensors, metadata


def read_index(folder: str, index_name: str) -> Dict[str, str]:
    """The weight_map (tensor name -> shard file) of an index; a name given twice is an error."""
    index_path = os.path.join(folder, index_name)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f, object_pairs_hook=_unique_keys)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except CheckpointError as err:
        raise CheckpointError(f"{index_path}: ambiguous index: {err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path}: malformed index (needs a 'weight_map' object of name -> file)") from None
    return weight_map


def open_checkpoint(folder_or_file: str) -> Dict[str, TensorInfo]:
    """Every tensor of a checkpoint, by name, reading headers only. Accepts one .safetensors file, or a
    folder with `model.safetensors`, or shards named by `model.safetensors.index.json` (any
    `*.safetensors.index.json`), or, without an index, a folder of shards (MindSpore/MindFormers layout).
    Whatever two readers could resolve differently is refused, naming the tensor: a name in two shards, a
    shard holding a tensor its index does not put there, `model.safetensors` beside an index."""
    if os.path.isfile(folder_or_file):
        return read_header(folder_or_file)[0]
    if not os.path.isdir(folder_or_file):
        raise CheckpointError(f"no checkpoint at {folder_or_file} (neither a file nor a folder)")
    listing = sorted(os.listdir(folder_or_file))
    indexes = [f for f in listing if f.endswith(".safetensors.index.json")]
    if indexes and "model.safetensors" in listing:
        raise CheckpointError(f"{folder_or_file} holds both model.safetensors and {indexes[0]}; "
                              "keep one (readers differ in which they load)")
    if not indexes:
        if "model.safetensors" in listing:
            return read_header(os.path.join(folder_or_file, "model.safetensors"))[0]
        shards = [f for f in listing if f.endswith(".safetensors")]
        if not shards:
            raise CheckpointError(f"{folder_or_file}: no model.safetensors, no *.safetensors.index.json "
                                  "and no .safetensors shards")
        tensors: Dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in read_header(os.path.join(folder_or_file, shard))[0].items():
                if name in tensors:
                    raise CheckpointError(f"{folder_or_file}: tensor {name!r} is in both "
                                          f"{os.path.basename(tensors[name].path)} and {shard}")
                tensors[name] = info
        return tensors
    index_name = "model.safetensors.index.json" if "model.safetensors.index.json" in indexes else indexes[0]
    weight_map = read_index(folder_or_file, index_name)
    index_path = os.path.join(folder_or_file, index_name)
    by_shard: Dict[str, List[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard):
        if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(folder_or_file, shard)):
            raise CheckpointError(f"{index_path} names shard {shard}, which is missing")
    tensors = {}
    for shard in sorted(by_shard):
        found = read_header(os.path.join(folder_or_file, shard))[0]
        for name in by_shard[shard]:
            if name not in found:
                raise CheckpointError(f"{index_path} puts tensor {name!r} in {shard}, which does not contain it")
            tensors[name] = found[name]
        for name in found:
            if name not in weight_map:
                raise CheckpointError(f"{shard} holds tensor {name!r}, which {index_name} does not list")
            if weight_map[name] != shard:
                raise CheckpointError(f"tensor {name!r} is in both {shard} and {weight_map[name]} "
                                      f"({index_name} names {weight_map[name]})")
    return tensors


# ---------------------------------------------------------------------------------------------- dtypes

def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bf16 bit patterns (uint16) to float32."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16) with round-to-nearest-even; every NaN becomes 0x7FC0
    (as torch's and MindSpore's conversion do); overflow rounds to +-inf."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = np.right_shift(bits, 16)
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits  # no uint32 wrap-around below the NaN range, which is replaced next
    rounded >>= 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def convert_bytes(data: bytes, src: str, dst: str) -> bytes:
    """Raw little-endian floats of tag `src` as tag `dst` (F32, BF16, F16); unchanged when equal.
    Overflow gives inf silently: callers check with `count_nonfinite`."""
    if src == dst:
        return data
    if src not in FLOAT_TAGS or dst not in FLOAT_TAGS:
        raise CheckpointError(f"cannot convert {src} to {dst}")
    if src == "BF16":
        values = bf16_to_f32(np.frombuffer(data, np.uint16))
    else:
        values = np.frombuffer(data, _NUMPY[src]).astype(np.float32)
    if dst == "BF16":
        return f32_to_bf16(values).tobytes()
    with np.errstate(over="ignore"):
        return values.astype(_NUMPY[dst]).tobytes()


_EXPONENT = {"F32": (np.uint32, 0x7F800000), "BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00)}


def has_nonfinite(data: bytes, tag: str) -> bool:
    """Whether raw floats of tag F32, BF16 or F16 hold a NaN or inf: one vectorised pass (~1 GB/s), as
    the exponent bits are all set exactly when `bits << 1` (sign dropped) reaches `exponent << 1`."""
    if tag == "F32":
        return not np.isfinite(np.frombuffer(data, np.float32)).all()
    kind, mask = _EXPONENT[tag]
    return int(np.left_shift(np.frombuffer(data, kind), kind(1)).max(initial=0)) >= mask << 1


def count_nonfinite(data: bytes, tag: str) -> int:
    """NaN and inf values among raw floats of tag F32, BF16 or F16 (all exponent bits set)."""
    kind, mask = _EXPONENT[tag]
    bits = np.frombuffer(data, kind)
    return int(np.count_nonzero((bits & kind(mask)) == kind(mask)))


def numpy_tag(dtype) -> str:
    """The safetensors tag of a numpy dtype (its name if safetensors has none)."""
    for tag, kind in _NUMPY.items():
        if np.dtype(kind) == np.dtype(dtype):
            return tag
    return str(np.dtype(dtype))


def to_numpy(info: TensorInfo, data: Optional[bytes] = None) -> np.ndarray:
    """The tensor as a numpy array (bf16 widened to float32)."""
    data = info.read() if data is None else data
    if info.dtype == "BF16":
        return bf16_to_f32(np.frombuffer(data, np.uint16)).reshape(info.shape)
    if info.dtype not in _NUMPY:
        raise CheckpointError(f"tensor {info.name!r}: no numpy type for {info.dtype}")
    return np.frombuffer(data, _NUMPY[info.dtype]).reshape(info.shape)


# ---------------------------------------------------------------------------------------------- writing

# A tensor's data: bytes (or a numpy array), a TensorInfo (its byte range is copied from its file without
# passing through Python where the OS allows), a list/iterator of those (concatenated: stacked experts),
# or a function returning any of these (called only when the tensor is written).
Source = Union[bytes, np.ndarray, TensorInfo, Iterable, Callable[[], object]]


def _write_all(fd: int, data) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def _copy_range(fd: int, info: TensorInfo) -> int:
    """Append `info`'s bytes to `fd`: copy_file_range (in-kernel) where available, else buffered reads."""
    left, offset = info.nbytes, info.start
    with open(info.path, "rb", buffering=0) as src:
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    n = os.copy_file_range(src.fileno(), fd, min(left, 1 << 30), offset)
                    if n == 0:
                        raise CheckpointError(f"{info.path}: tensor {info.name!r} is truncated")
                    left, offset = left - n, offset + n
                return info.nbytes
            except OSError:  # another filesystem or no kernel support: fall through, go on from `offset`
                pass
        done = info.nbytes - left
        part = TensorInfo(info.name, "U8", (left,), info.path, offset, info.end)
        for chunk in part.iter_chunks():
            done += _write_all(fd, chunk)
    return done


def _write_source(fd: int, source) -> int:
    if callable(source) and not isinstance(source, TensorInfo):
        source = source()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _write_all(fd, source)
    if isinstance(source, np.ndarray):
        return _write_all(fd, np.ascontiguousarray(source))
    if isinstance(source, TensorInfo):
        return _copy_range(fd, source)
    return sum(_write_source(fd, part) for part in source)


def write_safetensors(path: str, tensors: Iterable[Tuple[str, str, Sequence[int], Source]],
                      metadata: Optional[Dict[str, str]] = None) -> int:
    """Write (name, dtype tag, shape, source) to `path` via `path.tmp` + rename; returns the file's size.

    The header is built from names, dtypes and shapes alone; each tensor's data is produced (and, for a
    TensorInfo, copied from its file) only when written, so memory stays at one chunk, not one tensor.
    """
    tensors = list(tensors)
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in tensors:
        if name in header:
            raise CheckpointError(f"tensor {name!r} written twice to {path}")
        size = nbytes_of(dtype, shape)
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb", buffering=0) as f:
            fd = f.fileno()
            _write_all(fd, struct.pack("<Q", len(blob)) + blob)
            for name, dtype, shape, source in tensors:
                written = _write_source(fd, source)
                start, end = header[name]["data_offsets"]
                if written != end - start:
                    raise CheckpointError(f"tensor {name!r}: got {written} bytes for {dtype}{list(shape)} "
                                          f"({end - start} bytes)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return 8 + len(blob) + offset
