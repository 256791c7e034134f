"""Streaming checkpoint conversion between Hugging Face and mixtral-ms layouts.

Both directions read tensors lazily by safetensors offset and write one output tensor at a time, so
peak memory is the largest output tensor (one layer's stacked w1, w3 or w2) plus a constant, never
the model. Output goes to a temp folder beside the destination, renamed into place at the end: an
error leaves nothing behind and never touches an existing destination. With the dtype unchanged,
every tensor is copied byte for byte, so hf2ms followed by ms2hf reproduces the checkpoint exactly.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .hf_config import read_hf_config, shape_config
from .name_map import TRAINING_STATE_PREFIXES, count_parameters, parameter_specs
from .safetensors_io import (DTYPE_BYTES, CheckpointError, TensorInfo, bf16_to_f32, f32_to_bf16, open_checkpoint,
                             write_safetensors)

DTYPE_TAGS = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json")
MS_INDEX = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'2GB', '500MB', '64KB' or a byte count."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * factor)
    return int(t)


def _convert_bytes(data: bytes, src: str, dst: str) -> bytes:
    if src == dst:
        return data
    if src == "BF16":
        values = bf16_to_f32(np.frombuffer(data, np.uint16))
    else:
        values = np.frombuffer(data, {"F32": np.float32, "F16": np.float16}[src]).astype(np.float32)
    if dst == "BF16":
        return f32_to_bf16(values).tobytes()
    return values.astype({"F32": np.float32, "F16": np.float16}[dst]).tobytes()


def _check_dtype(infos: List[TensorInfo]) -> str:
    tags = {i.dtype for i in infos}
    if len(tags) != 1 or not tags <= {"F32", "BF16", "F16"}:
        raise CheckpointError(f"tensor {infos[0].name!r}: unsupported or mixed dtypes {sorted(tags)}")
    return tags.pop()


def _shard(items: List[Tuple[str, str, Tuple[int, ...], Callable[[], bytes]]], limit: int):
    """Split items into consecutive shards of at most `limit` bytes (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for item in items:
        nbytes = DTYPE_BYTES[item[1]] * int(np.prod(item[2], dtype=np.int64))
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _prepare_dst(dst: str, overwrite: bool) -> str:
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"destination {dst} exists and is not a folder")
    if os.path.isdir(dst) and any(f.endswith((".safetensors", ".ckpt", ".json")) for f in os.listdir(dst)) \
            and not overwrite:
        raise CheckpointError(f"destination {dst} already holds a checkpoint; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(f"destination's parent folder {parent} does not exist")
    tmp = os.path.abspath(dst).rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _write_sharded(tmp: str, items, limit: int, metadata: Dict[str, str]) -> int:
    shards = _shard(items, limit)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(tmp, name), shard, metadata)
        for item in shard:
            weight_map[item[0]] = name
            total += DTYPE_BYTES[item[1]] * int(np.prod(item[2], dtype=np.int64))
    with open(os.path.join(tmp, MS_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def _finish(tmp: str, dst: str) -> None:
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _read_hf_config(src: str):
    hf = read_hf_config(src)
    return hf, shape_config(hf)


def _gather_sources(tensors: Dict[str, TensorInfo], config) -> Dict[str, List[TensorInfo]]:
    """For each mixtral-ms parameter, its Hugging Face tensors, with every name and shape checked."""
    specs = parameter_specs(config)
    wanted = {src for spec in specs.values() for src in spec.sources}
    unexpected = sorted(set(tensors) - wanted)
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in checkpoint ({len(unexpected)} in all)")
    out = {}
    for name, spec in specs.items():
        infos = []
        for src in spec.sources:
            if src not in tensors:
                raise CheckpointError(f"checkpoint is missing tensor {src!r}")
            want = spec.shape[1:] if len(spec.sources) > 1 else spec.shape
            if tuple(tensors[src].shape) != tuple(want):
                raise CheckpointError(f"tensor {src!r} has shape {list(tensors[src].shape)}, "
                                      f"config.json implies {list(want)}")
            infos.append(tensors[src])
        out[name] = infos
    return out


def hf2ms(src: str, dst: str, dtype: Optional[str] = None, overwrite: bool = False,
          shard_size: int = 2 << 30) -> Dict[str, object]:
    """Hugging Face folder -> mixtral-ms folder (MindSpore safetensors shards + index, config, tokenizer)."""
    hf, config = _read_hf_config(src)
    sources = _gather_sources(open_checkpoint(src), config)
    out_tag = DTYPE_TAGS[dtype] if dtype else None
    items = []
    for name, infos in sources.items():
        src_tag = _check_dtype(infos)
        tag = out_tag or src_tag
        shape = parameter_specs(config)[name].shape

        def produce(infos=infos, src_tag=src_tag, tag=tag) -> bytes:
            return b"".join(_convert_bytes(i.read(), src_tag, tag) for i in infos)
        items.append((name, tag, shape, produce))
    tmp = _prepare_dst(dst, overwrite)
    try:
        total = _write_sharded(tmp, items, shard_size, {"format": "ms"})
        if out_tag:
            hf = dict(hf, torch_dtype={"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[out_tag])
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
        for side in SIDE_FILES:
            if os.path.isfile(os.path.join(src, side)):
                shutil.copy2(os.path.join(src, side), os.path.join(tmp, side))
        _finish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(items), "bytes": total}


def ms2hf(src: str, dst: str, dtype: Optional[str] = None, overwrite: bool = False,
          shard_size: int = 2 << 30, config_path: Optional[str] = None) -> Dict[str, object]:
    """mixtral-ms checkpoint (folder from hf2ms, or a training .safetensors file; `config_path`: a config.json
    or its folder, default the source folder)
    -> Hugging Face folder that `transformers.MixtralForCausalLM.from_pretrained` loads."""
    cfg_src = config_path or (src if os.path.isdir(src) else os.path.dirname(src))
    hf, config = _read_hf_config(cfg_src if os.path.isdir(cfg_src) else os.path.dirname(cfg_src))
    tensors = {k: v for k, v in open_checkpoint(src).items() if not k.startswith(TRAINING_STATE_PREFIXES)}
    specs = parameter_specs(config)
    unexpected = sorted(set(tensors) - set(specs))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in checkpoint ({len(unexpected)} in all)")
    out_tag = DTYPE_TAGS[dtype] if dtype else None
    items = []
    for name, spec in specs.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        info = tensors[name]
        if tuple(info.shape) != spec.shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)}, the config implies {list(spec.shape)}")
        src_tag = _check_dtype([info])
        tag = out_tag or src_tag
        if len(spec.sources) == 1:
            items.append((spec.sources[0], tag, spec.shape,
                          lambda info=info, s=src_tag, t=tag: _convert_bytes(info.read(), s, t)))
            continue
        per_expert = info.nbytes // len(spec.sources)
        for j, hf_name in enumerate(spec.sources):
            piece = TensorInfo(hf_name, src_tag, spec.shape[1:], info.path, info.start + j * per_expert,
                               info.start + (j + 1) * per_expert)
            items.append((hf_name, tag, spec.shape[1:],
                          lambda piece=piece, s=src_tag, t=tag: _convert_bytes(piece.read(), s, t)))
    tmp = _prepare_dst(dst, overwrite)
    try:
        total = _write_sharded(tmp, items, shard_size, {"format": "pt"})
        hf = dict(hf)
        if out_tag:
            hf["torch_dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[out_tag]
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
        folder = src if os.path.isdir(src) else os.path.dirname(src)
        for side in SIDE_FILES:
            if os.path.isfile(os.path.join(folder, side)):
                shutil.copy2(os.path.join(folder, side), os.path.join(tmp, side))
        _finish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(items), "bytes": total}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def plan(src: str) -> str:
    """The conversion plan from headers and index alone: mapping, shapes, parameter counts, memory."""
    _, config = _read_hf_config(src)
    sources = _gather_sources(open_checkpoint(src), config)
    lines = [f"{'mixtral-ms parameter':58} {'shape':>22}  <- Hugging Face"]
    largest, nbytes = 0, 0
    for name, infos in sources.items():
        shape = parameter_specs(config)[name].shape
        size = sum(i.nbytes for i in infos)
        largest, nbytes = max(largest, size), nbytes + size
        src_text = infos[0].name if len(infos) == 1 else \
            infos[0].name.replace(".experts.0.", ".experts.{0..%d}." % (len(infos) - 1))
        lines.append(f"{name:58} {str(list(shape)):>22}  <- {src_text}")
    total, active = count_parameters(config)
    lines += [
        f"parameters: {total:,} total ({total / 1e9:.1f}B), {active:,} active per token ({active / 1e9:.1f}B)",
        f"checkpoint: {_human(nbytes)} in {len(sources)} mixtral-ms tensors",
        f"conversion memory: about {_human(largest)} (largest output tensor) plus a constant",
    ]
    return "\n".join(lines)
