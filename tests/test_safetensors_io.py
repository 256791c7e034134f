"""mixtral_ms/checkpoint/safetensors_io.py: the framework-free safetensors reader and writer.

Every dtype tag round-trips bit for bit (bf16 and fp8 as raw bytes); the header is validated and each
inconsistency is one CheckpointError line naming the file; reads are lazy (the header alone, then one
tensor's byte range); the writer takes every source kind, refuses what it cannot write and leaves no temp
file; bf16 <-> f32 and the F32/BF16/F16 conversions match MindSpore's casts bit for bit; non-finite values
are found in every float encoding; folders of shards are resolved one way or refused."""
import json
import os
import struct

import numpy as np
import pytest

import mindspore as ms

from mixtral_ms.checkpoint import safetensors_io as st
from mixtral_ms.checkpoint.safetensors_io import (DTYPE_BYTES, ArrayTensor, CheckpointError, TensorInfo, bf16_to_f32,
                                                  convert_bytes, count_nonfinite, f32_to_bf16, has_nonfinite,
                                                  nbytes_of, numpy_tag, open_checkpoint, read_header, to_numpy,
                                                  write_safetensors)
from mixtral_ms.cli import BadInput


def _refusal(call, *args) -> str:
    """The message of the CheckpointError `call(*args)` raises, checked to be one line of a BadInput."""
    with pytest.raises(CheckpointError) as err:
        call(*args)
    message = str(err.value)
    assert isinstance(err.value, BadInput) and "\n" not in message
    return message


def _raw(path, header, data: bytes = b"", header_len=None):
    """A file of 8-byte length + `header` (JSON of a dict/list, or raw bytes/str) + `data`; returns
    (path, byte where the data starts, file size)."""
    blob = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return str(path), 8 + len(blob), os.path.getsize(path)


def _sample(tag: str, shape) -> bytes:
    """Bytes of `shape` elements of `tag`, every byte value used (valid 0/1 for BOOL)."""
    count = int(np.prod(shape))
    if tag == "BOOL":
        return (np.arange(count) % 2).astype(np.uint8).tobytes()
    return np.random.default_rng(len(tag) * 7 + count).integers(0, 256, count * DTYPE_BYTES[tag], np.uint8).tobytes()


def _bf16_cast(values: np.ndarray) -> np.ndarray:
    """MindSpore's float -> bf16 cast, as bit patterns."""
    return ms.Tensor(values).astype(ms.bfloat16).view(ms.int16).asnumpy().view(np.uint16)


def _from_bf16_cast(bits: np.ndarray, dtype) -> np.ndarray:
    """MindSpore's bf16 -> `dtype` cast of bf16 bit patterns."""
    return ms.Tensor(bits.view(np.int16)).view(ms.bfloat16).astype(dtype).asnumpy()


# ------------------------------------------------------------------------------------------ round trips

def test_every_dtype_round_trips_bit_exact_with_its_header(tmp_path):
    path = str(tmp_path / "all.safetensors")
    items = [(tag.lower(), tag, (2, 3), _sample(tag, (2, 3))) for tag in DTYPE_BYTES] + [("empty", "F32", (0, 4), b"")]
    size = write_safetensors(path, items, {"step": "7"})
    assert size == os.path.getsize(path)
    (header_len,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert header_len % 8 == 0  # the data starts 8-byte aligned
    header = json.loads(open(path, "rb").read()[8:8 + header_len])
    offsets, expected = 0, {"__metadata__": {"step": "7"}}
    for name, tag, shape, data in items:
        expected[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offsets, offsets + len(data)]}
        offsets += len(data)
    assert header == expected and size == 8 + header_len + offsets

    tensors, metadata = read_header(path)
    assert metadata == {"step": "7"} and list(tensors) == [name for name, *_ in items]  # file order
    for name, tag, shape, data in items:
        info = tensors[name]
        assert (info.name, info.dtype, info.shape, info.nbytes, info.read()) == (name, tag, shape, len(data), data)
        if tag == "BF16":
            expected_array = bf16_to_f32(np.frombuffer(data, np.uint16)).reshape(shape)
        elif tag.startswith("F8"):
            assert _refusal(to_numpy, info) == f"tensor {name!r}: no numpy type for {tag}"
            continue
        else:
            expected_array = np.frombuffer(data, st._NUMPY[tag]).reshape(shape)
        array = to_numpy(info)
        assert array.dtype == expected_array.dtype and array.shape == shape
        assert array.tobytes() == expected_array.tobytes()


def test_default_metadata_and_numpy_arrays_written_in_c_order(tmp_path):
    path = str(tmp_path / "t.safetensors")
    matrix = np.arange(6, dtype=np.int16).reshape(2, 3)
    write_safetensors(path, [("t", "I16", (3, 2), matrix.T)])  # a transposed (Fortran-ordered) view
    tensors, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    np.testing.assert_array_equal(to_numpy(tensors["t"]), matrix.T)
    assert tensors["t"].read() == np.ascontiguousarray(matrix.T).tobytes() == \
        bytes([0, 0, 3, 0, 1, 0, 4, 0, 2, 0, 5, 0])


def test_every_kind_of_source_is_written_when_its_turn_comes(tmp_path):
    src = str(tmp_path / "src.safetensors")
    write_safetensors(src, [("a", "U8", (3,), b"abc"), ("b", "U8", (4,), b"wxyz")])
    info = read_header(src)[0]["b"]
    calls = []

    def later():
        calls.append("called")
        return [b"12", np.frombuffer(b"34", np.uint8)]

    path = str(tmp_path / "out.safetensors")
    sources = [("bytes", b"ab"), ("bytearray", bytearray(b"cd")), ("memoryview", memoryview(b"ef")),
               ("array", np.frombuffer(b"gh", np.uint8)), ("range", info), ("parts", [b"i", [b"j", info.part(0, 4)]]),
               ("generator", (bytes([c]) for c in b"kl")), ("callable", later),
               ("chunks", ArrayTensor("s", "U8", (2,), b"mn").iter_chunks(1))]
    assert calls == []  # nothing is produced before the file is written
    write_safetensors(path, [(name, "U8", (len(value),), source) for (name, source), value in zip(
        sources, [b"ab", b"cd", b"ef", b"gh", b"wxyz", b"ijw", b"kl", b"1234", b"mn"])])
    got = {name: info.read() for name, info in read_header(path)[0].items()}
    assert got == {"bytes": b"ab", "bytearray": b"cd", "memoryview": b"ef", "array": b"gh", "range": b"wxyz",
                   "parts": b"ijw", "generator": b"kl", "callable": b"1234", "chunks": b"mn"}
    assert calls == ["called"] and sorted(os.listdir(tmp_path)) == ["out.safetensors", "src.safetensors"]


@pytest.mark.parametrize("kernel", ["refuses", "stops half way", "absent"])
def test_byte_range_copy_falls_back_to_reads_from_where_the_kernel_stopped(tmp_path, monkeypatch, kernel):
    src = str(tmp_path / "src.safetensors")
    payload = bytes(range(256)) * 40  # 10240 bytes
    write_safetensors(src, [("pad", "U8", (3,), b"xyz"), ("w", "F32", (2560,), payload)])
    info = read_header(src)[0]["w"]
    real = os.copy_file_range
    calls = []

    def copy_file_range(src_fd, dst_fd, count, offset_src=None):
        calls.append(offset_src)
        if kernel == "stops half way" and len(calls) == 1:
            return real(src_fd, dst_fd, 4001, offset_src)
        raise OSError(18, "Invalid cross-device link")

    if kernel == "absent":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    out = str(tmp_path / "out.safetensors")
    write_safetensors(out, [("w", "F32", (2560,), info)])
    assert read_header(out)[0]["w"].read() == payload
    assert calls == {"refuses": [info.start], "stops half way": [info.start, info.start + 4001], "absent": []}[kernel]


# ------------------------------------------------------------------------------------------ writer refusals

def test_writer_refuses_a_name_twice_and_a_wrong_byte_count_keeping_the_old_file(tmp_path):
    path = str(tmp_path / "t.safetensors")
    assert _refusal(write_safetensors, path, [("a", "U8", (1,), b"x"), ("a", "U8", (1,), b"y")]) == \
        f"tensor 'a' written twice to {path}"
    assert os.listdir(tmp_path) == []
    write_safetensors(path, [("old", "U8", (1,), b"o")])
    before = open(path, "rb").read()
    assert _refusal(write_safetensors, path, [("a", "F32", (1,), b"\0" * 4), ("b", "F32", (2,), b"\0" * 4)]) == \
        "tensor 'b': got 4 bytes for F32[2] (8 bytes)"
    assert _refusal(write_safetensors, path, [("c", "BF16", (2, 2), [b"\0" * 4, b"\0" * 6])]) == \
        "tensor 'c': got 10 bytes for BF16[2, 2] (8 bytes)"

    def broken():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        write_safetensors(path, [("a", "U8", (1,), b"x"), ("b", "U8", (1,), broken)])
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["t.safetensors"]  # no .tmp left


# ------------------------------------------------------------------------------------------ header refusals

W2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, header_len, message", [
    ({"w": W2}, b"\0" * 8, 1000, "{p}: corrupt or truncated header (declares 1000 bytes, file has {size})"),
    (b"{nope", b"", None, "{p}: corrupt header (not JSON)"),
    (b"\xff\xfe{}", b"", None, "{p}: corrupt header (not JSON)"),
    (b"", b"", None, "{p}: corrupt header (not JSON)"),
    ([1, 2], b"", None, "{p}: corrupt header (not a JSON object)"),
    ({"__metadata__": "pt"}, b"", None, "{p}: corrupt header (__metadata__ is not an object)"),
    ('{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
     '"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"ab", None,
     "{p}: corrupt header ('w' appears twice)"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "{p}: corrupt header entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "{p}: corrupt header entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "{p}: corrupt header entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, b"\0" * 8, None,
     "{p}: corrupt header entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, b"\0" * 8, None,
     "{p}: corrupt header entry for tensor 'w'"),
    ({"w": "F32"}, b"\0" * 8, None, "{p}: corrupt header entry for tensor 'w'"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None,
     "{p}: tensor 'w' has unsupported dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "{p}: tensor 'w' offsets [0, 8] do not hold F32[3] (12 bytes)"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None,
     "{p}: tensor 'w' offsets [8, 0] do not hold F32[2] (8 bytes)"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8, None,
     "{p}: tensor 'w' offsets [-8, 0] do not hold F32[2] (8 bytes)"),
    ({"w": W2}, b"\0" * 4, None, "{p}: truncated: tensor 'w' ends at byte {base_8}, file has {size}"),
    ({"w": W2, "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
     "{p}: corrupt offsets: tensor 'v' overlaps the previous tensor (starts at byte {base_4}, expected {base_8})"),
    ({"w": W2, "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, b"\0" * 8, None,
     "{p}: corrupt offsets: tensor 'z' overlaps the previous tensor (starts at byte {base_4}, expected {base_8})"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
     "{p}: corrupt offsets: tensor 'w' leaves a gap before it (starts at byte {base_4}, expected {base})"),
    ({"w": W2}, b"\0" * 12, None,
     "{p}: 4 bytes beyond the last tensor (file has {size}, header and tensors end at {base_8})"),
], ids=lambda v: str(v)[:30] if isinstance(v, str) else None)
def test_header_refusals_are_one_line_naming_the_file(tmp_path, header, data, header_len, message):
    path, base, size = _raw(tmp_path / "bad.safetensors", header, data, header_len)
    assert _refusal(read_header, path) == message.format(p=path, size=size, base=base, base_4=base + 4, base_8=base + 8)


def test_short_missing_and_oversized_files(tmp_path):
    for length in (0, 5):
        path = tmp_path / f"short{length}.safetensors"
        path.write_bytes(b"\x01" * length)
        assert _refusal(read_header, str(path)) == \
            f"{path}: not a safetensors file ({length} bytes, shorter than the 8-byte header length)"
    nope = str(tmp_path / "nope.safetensors")
    assert _refusal(read_header, nope) == f"missing safetensors file {nope}"
    assert _refusal(read_header, str(tmp_path)) == f"missing safetensors file {tmp_path}"
    # a header over the reference implementation's 100 MiB limit, in a (sparse) file large enough to hold it
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:
        f.write(struct.pack("<Q", 100 * 1024 * 1024 + 1))
        f.truncate(100 * 1024 * 1024 + 64)
    assert _refusal(read_header, str(huge)) == \
        f"{huge}: corrupt or truncated header (declares 104857601 bytes, file has 104857664)"


def test_an_unhashable_dtype_is_a_corrupt_entry(tmp_path):
    path, _, _ = _raw(tmp_path / "bad.safetensors", {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
                      b"\0" * 4)
    assert _refusal(read_header, path) == f"{path}: corrupt header entry for tensor 'w'"


# ------------------------------------------------------------------------------------------ lazy reads

class _Counting:
    """`open` for the module under test that counts the bytes its files read."""

    def __init__(self):
        self.read = 0

    def __call__(self, *args, **kwargs):
        f = open(*args, **kwargs)
        real, counter = f.read, self

        def read(n=-1):
            data = real(n)
            counter.read += len(data)
            return data

        f.read = read
        return f


def test_reads_touch_the_header_then_only_the_tensors_own_bytes(tmp_path, monkeypatch):
    path = str(tmp_path / "t.safetensors")
    big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB that a header read must not touch
    ten = np.arange(10, dtype=np.float32) - 4.5
    write_safetensors(path, [("big", "F32", big.shape, big), ("ten", "F32", (10,), ten), ("tail", "U8", (3,), b"end")])
    counting = _Counting()
    monkeypatch.setattr(st, "open", counting, raising=False)
    tensors, _ = read_header(path)
    (header_len,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert counting.read == 8 + header_len
    info = tensors["ten"]
    base = 8 + header_len
    assert (info.path, info.start, info.end, info.nbytes) == (path, base + big.nbytes, base + big.nbytes + 40, 40)

    counting.read = 0
    assert info.read() == ten.tobytes() and counting.read == 40
    with open(path, "r+b") as f:  # rewrite every byte around the tensor: its reads do not change
        f.seek(base)
        f.write(b"\xff" * big.nbytes)
        f.seek(info.end)
        f.write(b"XYZ")
    counting.read = 0
    assert info.read() == ten.tobytes() and counting.read == 40
    assert [len(c) for c in info.iter_chunks(12)] == [12, 12, 12, 4]
    assert [len(c) for c in info.iter_chunks(5)] == [4] * 10  # whole elements only
    assert [len(c) for c in info.iter_chunks(1)] == [4] * 10
    assert b"".join(info.iter_chunks(12)) == ten.tobytes()
    np.testing.assert_array_equal(to_numpy(info), ten)


def test_parts_of_a_stacked_tensor_and_the_in_memory_tensor(tmp_path):
    path = str(tmp_path / "t.safetensors")
    stacked = np.arange(24, dtype=np.int32).reshape(3, 2, 4)
    write_safetensors(path, [("experts", "I32", stacked.shape, stacked)])
    info = read_header(path)[0]["experts"]
    part = info.part(1, 3)
    assert isinstance(part, TensorInfo) and (part.name, part.dtype, part.shape) == ("experts[1]", "I32", (2, 4))
    assert (part.start, part.end) == (info.start + 32, info.start + 64)
    np.testing.assert_array_equal(to_numpy(part), stacked[1])
    assert info.part(2, 3, name="e2").name == "e2" and to_numpy(info.part(2, 3)).tolist() == stacked[2].tolist()

    memory = ArrayTensor("experts", "I32", stacked.shape, stacked.tobytes())
    piece = memory.part(2, 3, name="last")
    assert (piece.name, piece.dtype, piece.shape, piece.nbytes) == ("last", "I32", (2, 4), 32)
    assert piece.read() == stacked[2].tobytes() == info.part(2, 3).read()
    assert [len(c) for c in memory.iter_chunks(40)] == [40, 40, 16]
    assert b"".join(memory.iter_chunks(40)) == stacked.tobytes()


def test_a_file_truncated_after_its_header_was_read(tmp_path):
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, [("a", "U8", (4,), b"abcd"), ("b", "U8", (6,), b"efghij")])
    info = read_header(path)[0]["b"]
    with open(path, "r+b") as f:
        f.truncate(info.start + 2)
    expected = f"{path}: tensor 'b' is truncated"
    assert _refusal(info.read) == expected
    assert _refusal(lambda: list(info.iter_chunks(4))) == expected
    assert _refusal(write_safetensors, str(tmp_path / "copy.safetensors"), [("b", "U8", (6,), info)]) == expected
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]


# ------------------------------------------------------------------------------------------ dtypes

def test_bf16_widening_of_every_pattern_is_mindspores_cast():
    bits = np.arange(1 << 16, dtype=np.uint16)
    wide = bf16_to_f32(bits)
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(wide.view(np.uint32), bits.astype(np.uint32) << 16)
    np.testing.assert_array_equal(wide.view(np.uint32), _from_bf16_cast(bits, ms.float32).view(np.uint32))


def test_f32_to_bf16_rounds_to_nearest_even_as_mindspore_casts():
    rng = np.random.default_rng(3)
    with np.errstate(over="ignore"):
        values = (rng.standard_normal(50000) * 10.0 ** rng.integers(-45, 39, 50000)).astype(np.float32)
    every_exponent = np.arange(0, 1 << 32, 65521 * 3, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([values, every_exponent])  # NaNs of every payload and sign included
    np.testing.assert_array_equal(f32_to_bf16(values), _bf16_cast(values))
    cases = [  # (float32 bits, bf16 bits)
        (0x3F808000, 0x3F80),  # 1 + 2^-8: a tie, to the even 0x3F80
        (0x3F818000, 0x3F82),  # 1 + 3 * 2^-8: a tie, to the even 0x3F82
        (0x3F808001, 0x3F81),  # just above the tie
        (0x7F7FFFFF, 0x7F80),  # the largest float32 overflows to inf
        (0xFF800000, 0xFF80),  # -inf
        (0x80000000, 0x8000),  # -0.0
        (0x000116C2, 0x0001),  # a subnormal
        (0xFFC12345, 0x7FC0),  # every NaN: the canonical quiet NaN
        (0x7F800001, 0x7FC0),
    ]
    f32 = np.array([c[0] for c in cases], np.uint32).view(np.float32)
    assert [hex(b) for b in f32_to_bf16(f32)] == [hex(c[1]) for c in cases]
    finite = ~np.isnan(bf16_to_f32(np.arange(1 << 16, dtype=np.uint16)))
    bits = np.arange(1 << 16, dtype=np.uint16)[finite]
    np.testing.assert_array_equal(f32_to_bf16(bf16_to_f32(bits)), bits)  # narrowing inverts widening


def test_convert_bytes_between_float_tags_as_mindspore_casts():
    f16_bits = np.arange(1 << 16, dtype=np.uint16)
    f16 = f16_bits.view(np.float16)
    np.testing.assert_array_equal(np.frombuffer(convert_bytes(f16.tobytes(), "F16", "BF16"), np.uint16),
                                  _bf16_cast(f16.astype(np.float32)))
    bf16_bits = np.arange(1 << 16, dtype=np.uint16)
    got = np.frombuffer(convert_bytes(bf16_bits.tobytes(), "BF16", "F16"), np.float16)
    want = _from_bf16_cast(bf16_bits, ms.float16)
    keep = ~np.isnan(want)
    np.testing.assert_array_equal(got[keep].view(np.uint16), want[keep].view(np.uint16))
    assert np.isnan(got[~keep]).all() and (~keep).sum() == 254
    np.testing.assert_array_equal(np.frombuffer(convert_bytes(bf16_bits.tobytes(), "BF16", "F32"), np.uint32),
                                  bf16_bits.astype(np.uint32) << 16)
    with np.errstate(over="raise"):  # overflow is silent (callers count non-finite values)
        assert np.frombuffer(convert_bytes(np.array([1e5, -7e4, 1.5], np.float32).tobytes(), "F32", "F16"),
                             np.float16).tolist() == [np.inf, -np.inf, 1.5]
    data = b"\x00\x00\x80\x3f"
    assert convert_bytes(data, "F32", "F32") is data and convert_bytes(data, "I8", "I8") is data
    assert _refusal(convert_bytes, data, "I8", "F32") == "cannot convert I8 to F32"
    assert _refusal(convert_bytes, data, "F32", "F8_E4M3") == "cannot convert F32 to F8_E4M3"


@pytest.mark.parametrize("tag", ["BF16", "F16"])
def test_nonfinite_detection_in_16_bit_floats(tag):
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = bf16_to_f32(bits) if tag == "BF16" else bits.view(np.float16).astype(np.float32)
    bad = ~np.isfinite(values)
    assert count_nonfinite(bits.tobytes(), tag) == bad.sum() == {"BF16": 256, "F16": 2048}[tag]
    assert not has_nonfinite(bits[~bad].tobytes(), tag) and count_nonfinite(bits[~bad].tobytes(), tag) == 0
    finite = bits[~bad]
    for pattern in bits[bad]:  # each NaN or inf alone at the end of a finite buffer
        assert has_nonfinite(np.append(finite[:300], pattern).tobytes(), tag), hex(pattern)
    assert not has_nonfinite(b"", tag) and count_nonfinite(b"", tag) == 0


def test_nonfinite_detection_in_f32():
    values = np.array([0.0, -0.0, 1e-45, 3.4028235e38, -3.4028235e38, 1.0], np.float32)
    assert not has_nonfinite(values.tobytes(), "F32") and count_nonfinite(values.tobytes(), "F32") == 0
    for bad in (np.inf, -np.inf, np.nan, np.uint32(0xFF800001).view(np.float32)):
        data = np.append(values, np.float32(bad)).tobytes()
        assert has_nonfinite(data, "F32") and count_nonfinite(data, "F32") == 1
    assert count_nonfinite(np.array([np.nan, 1, np.inf, -np.inf], np.float32).tobytes(), "F32") == 3


def test_numpy_tags_and_byte_counts():
    assert [numpy_tag(d) for d in (np.float32, np.float16, np.int64, np.uint8, np.bool_, np.int8)] == \
        ["F32", "F16", "I64", "U8", "BOOL", "I8"]
    assert numpy_tag(np.complex64) == "complex64" and numpy_tag("<f8") == "F64"
    assert (nbytes_of("BF16", (3, 5)), nbytes_of("F8_E5M2", (7,)), nbytes_of("F64", ()), nbytes_of("I32", (4, 0))) == \
        (30, 7, 8, 0)


# ------------------------------------------------------------------------------------------ checkpoints

def _shard(folder, name, tensors):
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, name), [(t, "U8", (1,), t[:1].encode()) for t in tensors])


def _index(folder, weight_map, name="model.safetensors.index.json"):
    with open(os.path.join(folder, name), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_open_checkpoint_resolves_a_file_a_folder_shards_and_an_index(tmp_path):
    _shard(tmp_path / "one", "model.safetensors", ["a", "b"])
    _shard(tmp_path / "plain", "x-1.safetensors", ["a"])
    _shard(tmp_path / "plain", "x-2.safetensors", ["b", "c"])
    _shard(tmp_path / "indexed", "p1.safetensors", ["a", "b"])
    _shard(tmp_path / "indexed", "p2.safetensors", ["c"])
    _index(tmp_path / "indexed", {"a": "p1.safetensors", "b": "p1.safetensors", "c": "p2.safetensors"})
    _shard(tmp_path / "other_index", "q.safetensors", ["z"])
    _index(tmp_path / "other_index", {"z": "q.safetensors"}, name="pytorch_model.safetensors.index.json")

    def where(source):
        return {name: (os.path.relpath(info.path, tmp_path), info.read())
                for name, info in open_checkpoint(source).items()}

    assert where(str(tmp_path / "one")) == where(str(tmp_path / "one" / "model.safetensors")) == \
        {"a": ("one/model.safetensors", b"a"), "b": ("one/model.safetensors", b"b")}
    assert where(str(tmp_path / "plain")) == {"a": ("plain/x-1.safetensors", b"a"),
                                              "b": ("plain/x-2.safetensors", b"b"),
                                              "c": ("plain/x-2.safetensors", b"c")}
    assert where(str(tmp_path / "indexed")) == {"a": ("indexed/p1.safetensors", b"a"),
                                                "b": ("indexed/p1.safetensors", b"b"),
                                                "c": ("indexed/p2.safetensors", b"c")}
    assert where(str(tmp_path / "other_index")) == {"z": ("other_index/q.safetensors", b"z")}


def test_open_checkpoint_refuses_what_two_readers_could_resolve_differently(tmp_path):
    def case(name, shards, weight_map=None, raw_index=None):
        folder = tmp_path / name
        folder.mkdir()
        for shard, tensors in shards.items():
            _shard(folder, shard, tensors)
        if weight_map is not None:
            _index(folder, weight_map)
        if raw_index is not None:
            (folder / "model.safetensors.index.json").write_text(raw_index)
        return str(folder)

    both = case("both", {"model.safetensors": ["a"]}, {"a": "model.safetensors"})
    assert _refusal(open_checkpoint, both) == \
        f"{both} holds both model.safetensors and model.safetensors.index.json; keep one (readers differ in which " \
        "they load)"
    twice = case("twice", {"s1.safetensors": ["a"], "s2.safetensors": ["a"]})
    assert _refusal(open_checkpoint, twice) == f"{twice}: tensor 'a' is in both s1.safetensors and s2.safetensors"
    empty = case("empty", {})
    assert _refusal(open_checkpoint, empty) == \
        f"{empty}: no model.safetensors, no *.safetensors.index.json and no .safetensors shards"
    missing = case("missing", {"s1.safetensors": ["a"]}, {"a": "s1.safetensors", "b": "s9.safetensors"})
    assert _refusal(open_checkpoint, missing) == \
        f"{missing}/model.safetensors.index.json names shard s9.safetensors, which is missing"
    outside = case("outside", {"s1.safetensors": ["a"]}, {"a": "../outside/s1.safetensors"})
    assert _refusal(open_checkpoint, outside) == \
        f"{outside}/model.safetensors.index.json names shard ../outside/s1.safetensors, which is missing"
    absent = case("absent", {"s1.safetensors": ["a"]}, {"a": "s1.safetensors", "b": "s1.safetensors"})
    assert _refusal(open_checkpoint, absent) == \
        f"{absent}/model.safetensors.index.json puts tensor 'b' in s1.safetensors, which does not contain it"
    unlisted = case("unlisted", {"s1.safetensors": ["a", "b"]}, {"a": "s1.safetensors"})
    assert _refusal(open_checkpoint, unlisted) == \
        "s1.safetensors holds tensor 'b', which model.safetensors.index.json does not list"
    moved = case("moved", {"s1.safetensors": ["a", "b"], "s2.safetensors": ["b"]},
                 {"a": "s1.safetensors", "b": "s2.safetensors"})
    assert _refusal(open_checkpoint, moved) == \
        "tensor 'b' is in both s1.safetensors and s2.safetensors (model.safetensors.index.json names s2.safetensors)"
    for i, raw in enumerate(['{"weight_map": []}', '{"metadata": {}}', "{not json", '{"weight_map": {"a": 1}}']):
        bad = case(f"malformed{i}", {"s1.safetensors": ["a"]}, raw_index=raw)
        assert _refusal(open_checkpoint, bad) == \
            f"{bad}/model.safetensors.index.json: malformed index (needs a 'weight_map' object of name -> file)"
    dup = case("dup", {"s1.safetensors": ["a"]},
               raw_index='{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}')
    assert _refusal(open_checkpoint, dup) == f"{dup}/model.safetensors.index.json: ambiguous index: 'a' appears twice"
    nowhere = str(tmp_path / "nowhere")
    assert _refusal(open_checkpoint, nowhere) == f"no checkpoint at {nowhere} (neither a file nor a folder)"
