"""Streaming checkpoint conversion between Hugging Face and mixtral-ms layouts.

Both directions read tensors lazily by safetensors offset and stream them into the output shard: with
the dtype unchanged each tensor's byte range is copied file to file (in-kernel where the OS allows), with
a dtype change it is converted in chunks of `CHUNK_BYTES`. Peak memory is therefore a constant (tens of
MB), below the bound of one output tensor (one layer's stacked w1, w3 or w2), never the model. With the
dtype unchanged every byte is copied verbatim, so hf2ms followed by ms2hf reproduces each tensor bit for bit.

All output goes to `<dst>.tmp-<pid>` beside the destination and is renamed into place at the end: an
error (or Ctrl-C) removes the temp folder and leaves an existing destination as it was.

Layouts written:
- hf2ms: `<dst>/model-0000i-of-0000n.safetensors` (stacked experts, MindSpore metadata), `model.safetensors
  .index.json`, `config.json` (the Hugging Face config), tokenizer and generation_config files.
  `mindspore.load_checkpoint(shard, format="safetensors")` reads each shard, and MindFormers reads the
  folder with `load_checkpoint: <dst>` and `load_ckpt_format: safetensors`.
- ms2hf: the Hugging Face layout (`model-0000i-of-0000n.safetensors` + index with metadata.total_size,
  `config.json`) that `transformers.MixtralForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Dict, List, Optional, Tuple

from .schema import hf_dims, read_hf_config
from .name_map import count_parameters, hf_sources, is_expert_stack, is_ms_layout, ms_tensors, parameter_specs
from .safetensors_io import (CHUNK_BYTES, FLOAT_TAGS, CheckpointError, TensorInfo, convert_bytes, nbytes_of,
                             open_checkpoint, write_safetensors)

DTYPE_TAGS = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}
TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json")
INDEX = "model.safetensors.index.json"
MS_METADATA = {"format": "ms", "remove_redundancy": "False"}  # what mindspore.save_checkpoint writes
HF_METADATA = {"format": "pt"}  # transformers refuses safetensors without format pt/tf/flax/mlx
DEFAULT_SHARD = 5 << 30

Item = Tuple[str, str, Tuple[int, ...], object]  # name, dtype tag, shape, source (see write_safetensors)
Progress = Optional[Callable[[str], None]]


def parse_size(text) -> int:
    """'2GB', '500MB', '64KB', '1.5G' or a byte count (binary units)."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "K": 1 << 10, "M": 1 << 20,
             "G": 1 << 30, "T": 1 << 40, "B": 1}
    t = str(text).strip().upper().replace("IB", "B")
    try:
        for unit, factor in units.items():
            if t.endswith(unit):
                value = int(float(t[:-len(unit)]) * factor)
                break
        else:
            value = int(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 2GB, 500MB or a byte count)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def _dtype_tag(dtype: Optional[str]) -> Optional[str]:
    if dtype is None:
        return None
    if dtype.lower() not in DTYPE_TAGS:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return DTYPE_TAGS[dtype.lower()]


def _source_dtype(infos: List[TensorInfo]) -> str:
    tags = sorted({i.dtype for i in infos})
    if len(tags) != 1:
        raise CheckpointError(f"tensor {infos[0].name!r}: experts of one layer have mixed dtypes {tags}")
    if tags[0] not in FLOAT_TAGS:
        raise CheckpointError(f"tensor {infos[0].name!r} has dtype {tags[0]}; expected one of {list(FLOAT_TAGS)}")
    return tags[0]


def _source(infos: List[TensorInfo], src_tag: str, tag: str):
    """Byte ranges copied as they are, or a generator of converted chunks (never a whole tensor)."""
    if src_tag == tag:
        return list(infos)
    return lambda: (convert_bytes(chunk, src_tag, tag) for info in infos for chunk in info.iter_chunks(CHUNK_BYTES))


# ----------------------------------------------------------------------------------- output folder

def _holds_checkpoint(folder: str) -> bool:
    return any(f.endswith((".safetensors", ".ckpt", ".index.json")) or f == "config.json" for f in os.listdir(folder))


def _prepare_dst(src: str, dst: str, overwrite: bool, needed_bytes: int) -> Tuple[str, List[str]]:
    """Check the destination and make the temp folder beside it (and missing parent folders, returned so
    that a failure can remove them again)."""
    dst_abs = os.path.abspath(dst).rstrip(os.sep)
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst_abs)
    if dst_real == src_real or src_real.startswith(dst_real + os.sep) \
            or (os.path.isfile(src_real) and os.path.dirname(src_real) == dst_real):
        raise CheckpointError(f"destination {dst} is (or contains) the source {src}; choose another folder")
    if os.path.lexists(dst_abs) and not os.path.isdir(dst_abs):
        raise CheckpointError(f"destination {dst} exists and is not a folder")
    if os.path.isdir(dst_abs) and os.listdir(dst_abs):
        if not _holds_checkpoint(dst_abs):
            raise CheckpointError(f"destination {dst} is a non-empty folder without a checkpoint; refusing to replace it")
        if not overwrite:
            raise CheckpointError(f"destination {dst} already holds a checkpoint; pass --overwrite to replace it")
    parent = os.path.dirname(dst_abs)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"destination's parent {existing} is not a folder")
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise CheckpointError(f"not enough disk space in {existing}: the conversion writes {_human(needed_bytes)}, "
                              f"{_human(free)} free")
    created = []
    folder = parent
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    tmp = f"{dst_abs}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp, created


def _finish(tmp: str, dst: str) -> None:
    """Move the finished temp folder to `dst`; an old `dst` is kept aside until the new one is in place."""
    dst = os.path.abspath(dst).rstrip(os.sep)
    old = None
    if os.path.isdir(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old:
            os.replace(old, dst)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_sharded(folder: str, items: List[Item], limit: int, metadata: Dict[str, str],
                  progress: Progress = None) -> int:
    """Shards of at most `limit` bytes (a larger tensor gets one of its own) named as Hugging Face names
    them, plus the index; returns the tensor bytes written."""
    shards: List[List[Item]] = []
    size = 0
    for item in items:
        n = nbytes_of(item[1], item[2])
        if not shards or (shards[-1] and size + n > limit):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, name), shard, metadata)
        for item in shard:
            weight_map[item[0]] = name
            total += nbytes_of(item[1], item[2])
        if progress:
            progress(f"wrote {name} ({len(shard)} tensors, {_human(total)} so far)")
    with open(os.path.join(folder, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def _write_config(config_path: str, tmp: str, tag: Optional[str]) -> None:
    """config.json verbatim; with a dtype change, its dtype field (torch_dtype and/or dtype) updated."""
    out = os.path.join(tmp, "config.json")
    if tag is None:
        shutil.copyfile(config_path, out)
        return
    with open(config_path, encoding="utf-8") as f:
        hf = json.load(f)
    keys = [k for k in ("torch_dtype", "dtype") if k in hf] or ["torch_dtype"]
    for k in keys:
        hf[k] = TORCH_NAMES[tag]
    with open(out, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)


def _copy_side_files(folder: str, tmp: str) -> List[str]:
    copied = []
    for side in SIDE_FILES:
        if os.path.isfile(os.path.join(folder, side)):
            shutil.copy2(os.path.join(folder, side), os.path.join(tmp, side))
            copied.append(side)
    return copied


def _convert(src: str, dst: str, items: List[Item], config_path: str, side_folder: str, tag: Optional[str],
             overwrite: bool, shard_size: int, metadata: Dict[str, str], progress: Progress) -> Dict[str, object]:
    needed = sum(nbytes_of(d, s) for _, d, s, _ in items) + (1 << 20)
    tmp, created_parents = _prepare_dst(src, dst, overwrite, needed)
    try:
        total = write_sharded(tmp, items, shard_size, metadata, progress)
        _write_config(config_path, tmp, tag)
        side = _copy_side_files(side_folder, tmp)
        files = sorted(os.listdir(tmp))
        _finish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created_parents:  # innermost first; only while still empty
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    return {"tensors": len(items), "bytes": total, "files": files, "side_files": side}


def _config_of(path: str) -> Tuple[str, object]:
    """(config.json path, shape config) for a folder, a checkpoint file (its folder's config.json) or a .json file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder {path}")
    if os.path.isfile(path) and path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: malformed JSON ({err})") from None
        return path, hf_dims(hf)
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    return os.path.join(folder, "config.json"), hf_dims(read_hf_config(folder))


# ----------------------------------------------------------------------------------- directions

def hf2ms(src: str, dst: str, dtype: Optional[str] = None, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, progress: Progress = None) -> Dict[str, object]:
    """Hugging Face folder (config.json + model.safetensors or shards with an index) -> mixtral-ms folder
    (MindSpore safetensors shards with stacked experts + index, config.json, tokenizer and generation files).
    `dtype`: fp32 | bf16 | fp16 (default: keep each tensor's dtype). Returns {tensors, bytes, files, side_files}."""
    tag = _dtype_tag(dtype)
    if not os.path.exists(src):
        raise FileNotFoundError(f"no such folder {src}")
    if not os.path.isdir(src):
        raise CheckpointError(f"source {src} is not a folder (expected config.json and safetensors)")
    config_path, config = _config_of(src)
    tensors = open_checkpoint(src)
    if is_ms_layout(tensors):
        raise CheckpointError(f"{src} already holds stacked experts (a mixtral-ms checkpoint); use ms2hf")
    specs = parameter_specs(config)
    items: List[Item] = []
    for name, infos in hf_sources(tensors, config).items():
        src_tag = _source_dtype(infos)
        items.append((name, tag or src_tag, specs[name].shape, _source(infos, src_tag, tag or src_tag)))
    return _convert(src, dst, items, config_path, src, tag, overwrite, shard_size, MS_METADATA, progress)


def ms2hf(src: str, dst: str, dtype: Optional[str] = None, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, config_path: Optional[str] = None,
          progress: Progress = None) -> Dict[str, object]:
    """mixtral-ms checkpoint (a folder from hf2ms, a folder of MindSpore shards, or one training
    .safetensors file; optimizer state is dropped) -> Hugging Face folder that
    `transformers.MixtralForCausalLM.from_pretrained` loads. `config_path`: a config.json or its folder
    (default: the source folder)."""
    tag = _dtype_tag(dtype)
    cfg_path, config = _config_of(config_path or src)
    tensors = open_checkpoint(src)
    if not is_ms_layout(tensors) and any(".experts.0." in n for n in tensors):
        raise CheckpointError(f"{src} holds per-expert tensors (a Hugging Face checkpoint); use hf2ms")
    specs = parameter_specs(config)
    items: List[Item] = []
    for name, info in ms_tensors(tensors, config).items():
        src_tag = _source_dtype([info])
        out_tag = tag or src_tag
        sources = specs[name].sources
        if not is_expert_stack(name):
            items.append((sources[0], out_tag, info.shape, _source([info], src_tag, out_tag)))
            continue
        for j, hf_name in enumerate(sources):
            piece = info.part(j, len(sources), hf_name)
            items.append((hf_name, out_tag, piece.shape, _source([piece], src_tag, out_tag)))
    side_folder = src if os.path.isdir(src) else os.path.dirname(src) or "."
    return _convert(src, dst, items, cfg_path, side_folder, tag, overwrite, shard_size, HF_METADATA, progress)


# ----------------------------------------------------------------------------------- plan

def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan(src: str, dtype: Optional[str] = None) -> str:
    """The conversion plan from config.json and headers/index alone (no tensor data is read): the name
    map with every shape, parameter counts, checkpoint bytes and the memory a conversion needs.
    `src` may be a Hugging Face folder (plans hf2ms) or a mixtral-ms checkpoint (plans ms2hf)."""
    tag = _dtype_tag(dtype)
    _, config = _config_of(src)
    tensors = open_checkpoint(src)
    specs = parameter_specs(config)
    if is_ms_layout(tensors):
        direction = "ms2hf (mixtral-ms -> Hugging Face)"
        groups = {name: [info] for name, info in ms_tensors(tensors, config).items()}
    else:
        direction = "hf2ms (Hugging Face -> mixtral-ms)"
        groups = hf_sources(tensors, config)
    width = max(len(n) for n in specs) + 1
    lines = [f"source: {src}", f"direction: {direction}",
             f"{'mixtral-ms parameter':{width}} {'shape':>20} {'dtype':>5}  <-> Hugging Face"]
    src_bytes = out_bytes = 0
    largest = ("", 0)
    dtypes = set()
    for name, infos in groups.items():
        shape = specs[name].shape
        src_tag = _source_dtype(infos)
        dtypes.add(src_tag)
        size_in = sum(i.nbytes for i in infos)
        size_out = nbytes_of(tag or src_tag, shape)
        src_bytes, out_bytes = src_bytes + size_in, out_bytes + size_out
        if size_out > largest[1]:
            largest = (name, size_out)
        hf = specs[name].sources
        hf_text = hf[0] if not is_expert_stack(name) else hf[0].replace(".experts.0.", ".experts.{0..%d}." % (len(hf) - 1)) + \
            f" [{', '.join(map(str, shape[1:]))}] x{len(hf)} stacked on axis 0"
        lines.append(f"{name:{width}} {str(list(shape)):>20} {src_tag:>5}  <-> {hf_text}")
    total, active = count_parameters(config)
    files = sorted({i.path for infos in groups.values() for i in infos})
    convert_note = f"; --dtype {dtype} converts {_human(CHUNK_BYTES)} chunks (~6x that in temporaries)" if tag else \
        "; dtype unchanged: byte ranges copied file to file"
    lines += [
        f"layers: {config.num_hidden_layers}, experts: {config.num_local_experts} (top-{config.num_experts_per_tok}), "
        f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, vocab {config.vocab_size}",
        f"parameters: {total:,} total ({total / 1e9:.1f}B), {active:,} active per token ({active / 1e9:.1f}B)",
        f"checkpoint: {_human(src_bytes)} ({src_bytes:,} bytes) of {'/'.join(sorted(dtypes))} in {len(files)} "
        f"file(s), {len(groups)} mixtral-ms tensors; output {_human(out_bytes)}",
        f"largest output tensor: {largest[0]} ({_human(largest[1])}), the bound for one tensor in memory",
        f"conversion memory: streamed, at most {_human(CHUNK_BYTES)} of tensor data at a time{convert_note}; "
        f"expect a peak RSS under {_human((40 << 20) + (6 if tag else 1) * CHUNK_BYTES)}",
    ]
    return "\n".join(lines)
