"""Streaming checkpoint conversion between Hugging Face and mixtral-ms layouts.

Both directions read tensors lazily by safetensors offset and stream them into the output shard: with
the dtype unchanged each tensor's byte range is copied file to file (in-kernel where the OS allows), with
a dtype change it is converted in chunks of `CHUNK_BYTES`. Peak memory is therefore a constant (tens of
MB), below the bound of one output tensor (one layer's stacked w1, w3 or w2), never the model. With the
dtype unchanged every byte is copied verbatim, so hf2ms followed by ms2hf reproduces each tensor bit for bit.

Every tensor is checked for NaN/inf on the way (read once in chunks before its byte range is copied,
which then comes from the page cache; `allow_nonfinite` skips the read), and a dtype change that would
turn a finite value into inf (fp16 overflow) is refused.

Output and faults (docs/reliability.md): everything is written to `<dst>.tmp-<pid>` beside the destination
and renamed into place at the end; an error, Ctrl-C or SIGTERM removes the temp folder and leaves an
existing destination as it was. `--overwrite` replaces only a folder this converter wrote (its shards,
index, config.json and side files, nothing else) and keeps the old one as `<dst>.old-<pid>` until the new
one is in place; the next run to the same destination restores or removes what a killed run left. A `dst`
that is a symlink is written through (its target is replaced, the link stays).

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
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple, Union

from mixtral_ms.model.schema import hf_dims, read_hf_config
from mixtral_ms.checkpoint.name_map import (count_parameters, hf_sources, hf_to_ms, is_ms_layout, ms_tensors,
                                           parameter_specs, source_dtype)
from mixtral_ms.checkpoint.view import CheckpointView
from mixtral_ms.cli import BadInput
from mixtral_ms.outputs import refuse_overlap, replace_folder, stale, temp_path
from mixtral_ms.checkpoint.safetensors_io import (CHUNK_BYTES, ArrayTensor, CheckpointError, TensorInfo, convert_bytes,
                             count_nonfinite, has_nonfinite, nbytes_of, open_checkpoint, read_index, write_safetensors)

DTYPE_TAGS = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}
TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "surgery.json")  # surgery.json: experts.py's record of a model's experts
INDEX = "model.safetensors.index.json"
COMPRESSION_RECORD = "compression.json"  # what scripts/compress.py did to make a checkpoint (mixtral_ms/tools/compress)
MS_METADATA = {"format": "ms", "remove_redundancy": "False"}  # what mindspore.save_checkpoint writes
HF_METADATA = {"format": "pt"}  # transformers refuses safetensors without format pt/tf/flax/mlx
DEFAULT_SHARD = 5 << 30
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

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
        raise BadInput(f"not a size: {text!r} (use e.g. 2GB, 500MB or a byte count)") from None
    if value <= 0:
        raise BadInput(f"size must be positive: {text!r}")
    return value


def _dtype_tag(dtype: Optional[str]) -> Optional[str]:
    if dtype is None:
        return None
    if dtype.lower() not in DTYPE_TAGS:
        raise BadInput(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return DTYPE_TAGS[dtype.lower()]


def _refuse_nonfinite(info, chunk: bytes) -> None:
    if has_nonfinite(chunk, info.dtype):
        raise CheckpointError(f"tensor {info.name!r} holds NaN or inf values; pass --allow-nonfinite to convert "
                              "it anyway")


def _source(infos: List[TensorInfo], src_tag: str, tag: str, allow_nonfinite: bool = False):
    """With the dtype unchanged, byte ranges copied file to file (each read once for the NaN/inf check
    first, unless allowed: the copy then comes from the page cache); else a generator of checked,
    converted chunks (never a whole tensor)."""
    if src_tag == tag and all(isinstance(i, TensorInfo) for i in infos):
        if allow_nonfinite:
            return list(infos)

        def checked():
            for info in infos:
                for chunk in info.iter_chunks(CHUNK_BYTES):
                    _refuse_nonfinite(info, chunk)
                yield info
        return checked

    def chunks():
        for info in infos:
            for chunk in info.iter_chunks(CHUNK_BYTES):
                if not allow_nonfinite:
                    _refuse_nonfinite(info, chunk)
                out = convert_bytes(chunk, src_tag, tag)
                if src_tag != tag and has_nonfinite(out, tag) and \
                        count_nonfinite(out, tag) > count_nonfinite(chunk, src_tag):
                    raise CheckpointError(f"tensor {info.name!r} has values beyond the range of {TORCH_NAMES[tag]}, "
                                          f"which would become inf; convert to bf16 or fp32 instead")
                yield out
    return chunks


# ----------------------------------------------------------------------------------- output folder

def _own_file(name: str, shards=None) -> bool:
    """A file name this converter writes (`shards`: the shards an index names; None: any shard name)."""
    if name in ("config.json", INDEX, COMPRESSION_RECORD) or name in SIDE_FILES:
        return True
    shard = name[:-4] if shards is None and name.endswith(".tmp") else name
    return bool(SHARD_NAME.match(shard)) and (shards is None or shard in shards)


def _foreign(folder: str, temp: bool = False) -> Optional[str]:
    """Why `folder` is not wholly a checkpoint this converter wrote (None if it is): the first entry it does
    not write, or a missing index. `temp`: a temp folder of a killed run (index and shards may be partial)."""
    entries = sorted(os.listdir(folder))
    shards = None
    if not temp and INDEX in entries:
        try:
            shards = set(read_index(folder, INDEX).values())
        except CheckpointError:
            return f"its {INDEX} is not one the converter wrote"
    for entry in entries:
        path = os.path.join(folder, entry)
        if not _own_file(entry, shards) or os.path.islink(path) or not os.path.isfile(path):
            return f"{entry!r} is not a file the converter writes"
    if not temp and INDEX not in entries:
        return f"it has no {INDEX}"
    return None


def _recover(target: str, progress: Progress) -> None:
    """Undo what killed runs (their process gone) left beside `target`: the old checkpoint of an
    `--overwrite` killed between its two renames goes back into place (or, if the new one made it, is
    removed), and temp folders are removed. Anything not wholly the converter's own is left alone."""
    note = progress or (lambda _: None)
    for old in stale(target, "old"):
        if _foreign(old) is None:
            if os.path.lexists(target):
                shutil.rmtree(old)
                note(f"removed {old}, the replaced checkpoint of an --overwrite that was killed")
            else:
                os.replace(old, target)
                note(f"restored {target} from {old}, left by an --overwrite that was killed")
    for tmp in stale(target, "tmp"):
        if _foreign(tmp, temp=True) is None:
            shutil.rmtree(tmp)
            note(f"removed {tmp}, left by a conversion that was killed")


def _prepare_dst(src: str, dst: str, overwrite: bool, needed_bytes: int,
                 progress: Progress = None) -> Tuple[str, str, List[str]]:
    """Check the destination and make the temp folder beside it; returns (target, temp folder, missing
    parent folders made, so that a failure can remove them again). `target` is the real path: a `dst`
    that is a symlink is written through."""
    refuse_overlap([src], dst)
    target = os.path.realpath(os.path.abspath(dst).rstrip(os.sep) or os.sep)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise CheckpointError(f"destination {dst} exists and is not a folder")
    _recover(target, progress)
    if os.path.isdir(target) and os.listdir(target):
        why = _foreign(target)
        if why:
            raise CheckpointError(f"destination {dst} is a non-empty folder but not a checkpoint this converter "
                                  f"wrote ({why}); refusing to replace it; choose another folder")
        if not overwrite:
            raise CheckpointError(f"destination {dst} already holds a checkpoint; pass --overwrite to replace it")
    parent = os.path.dirname(target)
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
    tmp = temp_path(target)
    os.makedirs(tmp)
    return target, tmp, created


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


def json_files(records: Dict[str, object]) -> Callable[[str], None]:
    """A `write_files` for write_checkpoint: each {file name: value} written as indented JSON (config.json
    and a tool's record of what it did)."""
    def write(folder: str) -> None:
        for name, value in records.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(value, f, indent=2)
    return write


def _write_config(config_path: str, tmp: str, tag: Optional[str]) -> None:
    """config.json verbatim; with a dtype change, its dtype field (torch_dtype and/or dtype) updated."""
    if tag is None:
        shutil.copyfile(config_path, os.path.join(tmp, "config.json"))
        return
    with open(config_path, encoding="utf-8") as f:
        hf = json.load(f)
    keys = [k for k in ("torch_dtype", "dtype") if k in hf] or ["torch_dtype"]
    for k in keys:
        hf[k] = TORCH_NAMES[tag]
    json_files({"config.json": hf})(tmp)


def _copy_side_files(folder: str, tmp: str) -> List[str]:
    copied = []
    for side in SIDE_FILES:
        if os.path.isfile(os.path.join(folder, side)):
            shutil.copy2(os.path.join(folder, side), os.path.join(tmp, side))
            copied.append(side)
    return copied


def write_checkpoint(src: str, dst: str, items: List[Item], write_files: Callable[[str], None], side_folder: str,
                     overwrite: bool = False, shard_size: int = DEFAULT_SHARD,
                     metadata: Optional[Dict[str, str]] = None, progress: Progress = None) -> Dict[str, object]:
    """The one writer of checkpoint folders (converter, expert surgery, compression): `dst` written all at
    once, `items` as shards + index, the side files of `side_folder`, then `write_files(folder)` for
    config.json and any record (written last, so a record wins over the source's copy of it). Built in a
    temp folder beside `dst` and renamed into place (outputs.replace_folder), removed on any error or
    interrupt: an existing `dst` is left as it was. `dst` must be apart from `src` (outputs.refuse_overlap)
    and, unless `overwrite`, empty. Returns {tensors, bytes, files, side_files}."""
    needed = sum(nbytes_of(d, s) for _, d, s, _ in items) + (1 << 20)
    target, tmp, created_parents = _prepare_dst(src, dst, overwrite, needed, progress)
    try:
        total = write_sharded(tmp, items, shard_size, metadata or HF_METADATA, progress)
        side = _copy_side_files(side_folder, tmp)
        write_files(tmp)
        files = sorted(os.listdir(tmp))
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created_parents:  # innermost first; only while still empty
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    return {"tensors": len(items), "bytes": total, "files": files, "side_files": side}


def _convert(src: str, dst: str, items: List[Item], config_path: str, side_folder: str, tag: Optional[str],
             overwrite: bool, shard_size: int, metadata: Dict[str, str], progress: Progress) -> Dict[str, object]:
    return write_checkpoint(src, dst, items, lambda tmp: _write_config(config_path, tmp, tag), side_folder,
                            overwrite, shard_size, metadata, progress)


def open_tensors(src: str) -> Dict[str, Union[TensorInfo, ArrayTensor]]:
    """The tensors of a safetensors checkpoint, folder or file (headers only), or of a MindSpore .ckpt (read
    whole, through MindSpore: imported only then)."""
    if src.endswith(".ckpt"):
        from mixtral_ms.checkpoint.load import read_ckpt  # MindSpore's format needs MindSpore
        return read_ckpt(src)
    return open_checkpoint(src)


def folder_of(path: str) -> str:
    """The folder of a checkpoint path: a folder itself, or a checkpoint file's folder (its config.json and
    tokenizer files)."""
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def config_of(path: str) -> Tuple[str, object]:
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
    folder = folder_of(path)
    return os.path.join(folder, "config.json"), hf_dims(read_hf_config(folder))


# ----------------------------------------------------------------------------------- directions

def _check_convertible(src: str, config) -> None:
    """Both directions handle Mixtral float checkpoints; dense and int8 folders load with from_pretrained."""
    if config.hf_model_type != "mixtral":
        raise CheckpointError(f"{src} is a dense {config.hf_model_type} checkpoint; load it with "
                              "MixtralForCausalLM.from_pretrained (transformers reads it as it is)")
    if config.expert_quantization is not None:
        raise CheckpointError(f"{src} holds int8 experts (expert_quantization in config.json), which have no "
                              "Hugging Face layout; load it with MixtralForCausalLM.from_pretrained")


def hf2ms(src: str, dst: str, dtype: Optional[str] = None, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, progress: Progress = None,
          allow_nonfinite: bool = False) -> Dict[str, object]:
    """Hugging Face folder (config.json + model.safetensors or shards with an index) -> mixtral-ms folder
    (MindSpore safetensors shards with stacked experts + index, config.json, tokenizer and generation files).
    `dtype`: fp32 | bf16 | fp16 (default: keep each tensor's dtype). NaN/inf weights are refused unless
    `allow_nonfinite`. Returns {tensors, bytes, files, side_files}."""
    tag = _dtype_tag(dtype)
    if not os.path.exists(src):
        raise FileNotFoundError(f"no such folder {src}")
    if not os.path.isdir(src):
        raise CheckpointError(f"source {src} is not a folder (expected config.json and safetensors)")
    config_path, config = config_of(src)
    _check_convertible(src, config)
    tensors = open_checkpoint(src)
    if is_ms_layout(tensors):
        raise CheckpointError(f"{src} already holds stacked experts (a mixtral-ms checkpoint); use ms2hf")
    specs = parameter_specs(config)
    items: List[Item] = []
    for name, infos in hf_sources(tensors, config).items():
        src_tag = source_dtype(infos)
        items.append((name, tag or src_tag, specs[name].shape,
                      _source(infos, src_tag, tag or src_tag, allow_nonfinite)))
    return _convert(src, dst, items, config_path, src, tag, overwrite, shard_size, MS_METADATA, progress)


def _run_source(src: str, strategy: Optional[str], config, progress: Progress) -> Dict[str, object]:
    """The tensors of `src`: a complete checkpoint, or with `strategy` (a run's strategy folder or file) the
    per-rank checkpoints of a run (`src/rank_<i>/`) merged by it (mixtral_ms/checkpoint/distributed.py)."""
    if strategy is None:
        return open_tensors(src)
    from mixtral_ms.checkpoint.distributed import merge_ranks, read_strategy
    return merge_ranks(src, read_strategy(strategy), config, progress=progress)


def ms2hf(src: str, dst: str, dtype: Optional[str] = None, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, config_path: Optional[str] = None,
          progress: Progress = None, allow_nonfinite: bool = False, strategy: Optional[str] = None) -> Dict[str, object]:
    """mixtral-ms checkpoint (a folder from hf2ms, a folder of MindSpore shards, one training .safetensors
    file or a MindSpore training .ckpt; optimizer and training state are dropped) -> Hugging Face folder
    that `transformers.MixtralForCausalLM.from_pretrained` loads. `config_path`: a config.json or its
    folder (default: the source folder). A .ckpt is read whole by MindSpore (not streamed). With
    `strategy` (a run's strategy folder), `src` is the run's checkpoint folder of per-rank files, merged."""
    tag = _dtype_tag(dtype)
    cfg_path, config = config_of(config_path or src)
    _check_convertible(src, config)
    tensors = _run_source(src, strategy, config, progress)
    if not is_ms_layout(tensors) and any(hf_to_ms(n)[1] is not None for n in tensors):
        raise CheckpointError(f"{src} holds per-expert tensors (a Hugging Face checkpoint); use hf2ms")
    specs = parameter_specs(config)
    items: List[Item] = []
    for name, info in ms_tensors(tensors, config).items():
        src_tag = source_dtype([info])
        out_tag = tag or src_tag
        sources = specs[name].sources
        if not specs[name].stacked:
            items.append((sources[0], out_tag, info.shape, _source([info], src_tag, out_tag, allow_nonfinite)))
            continue
        for j, hf_name in enumerate(sources):
            piece = info.part(j, len(sources), hf_name)
            items.append((hf_name, out_tag, piece.shape, _source([piece], src_tag, out_tag, allow_nonfinite)))
    return _convert(src, dst, items, cfg_path, folder_of(src), tag, overwrite, shard_size, HF_METADATA, progress)


def merge(src: str, strategy: str, dst: str, config_path: str, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, progress: Progress = None) -> Dict[str, object]:
    """A run's per-rank checkpoints (`src/rank_<i>/`) and its strategy folder -> one mixtral-ms checkpoint
    folder (the weights, bit for bit; what hf2ms writes), with the config.json of `config_path`."""
    cfg_path, config = config_of(config_path)
    tensors = ms_tensors(_run_source(src, strategy, config, progress), config)
    items: List[Item] = [(name, info.dtype, info.shape, info.read) for name, info in tensors.items()]
    return _convert(src, dst, items, cfg_path, os.path.dirname(cfg_path) or ".", None, overwrite, shard_size,
                    MS_METADATA, progress)


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
    _, config = config_of(src)
    view = CheckpointView(open_checkpoint(src), config)
    specs, groups = view.specs, view.stored
    direction = "ms2hf (mixtral-ms -> Hugging Face)" if view.layout == "ms" else "hf2ms (Hugging Face -> mixtral-ms)"
    width = max(len(n) for n in specs) + 1
    lines = [f"source: {src}", f"direction: {direction}",
             f"{'mixtral-ms parameter':{width}} {'shape':>20} {'dtype':>5}  <-> Hugging Face"]
    src_bytes = out_bytes = 0
    largest = ("", 0)
    dtypes = set()
    for name, infos in groups.items():
        shape = specs[name].shape
        src_tag = source_dtype(infos)
        dtypes.add(src_tag)
        size_in = sum(i.nbytes for i in infos)
        size_out = nbytes_of(tag or src_tag, shape)
        src_bytes, out_bytes = src_bytes + size_in, out_bytes + size_out
        if size_out > largest[1]:
            largest = (name, size_out)
        hf = specs[name].sources
        hf_text = hf[0] if not specs[name].stacked else \
            hf[0].replace(".experts.0.", ".experts.{0..%d}." % (len(hf) - 1)) + \
            f" [{', '.join(map(str, shape[1:]))}] x{len(hf)} stacked on axis 0"
        lines.append(f"{name:{width}} {str(list(shape)):>20} {src_tag:>5}  <-> {hf_text}")
    total, active = count_parameters(config)
    files = sorted({i.path for infos in groups.values() for i in infos})
    convert_note = f"; --dtype {dtype} converts {_human(CHUNK_BYTES)} chunks (~6x that in temporaries)" if tag else \
        "; dtype unchanged: byte ranges copied file to file after a NaN/inf check (~3x a chunk)"
    lines += [
        f"layers: {config.num_hidden_layers}, experts: {config.num_local_experts} (top-{config.num_experts_per_tok}), "
        f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, vocab {config.vocab_size}",
        f"parameters: {total:,} total ({total / 1e9:.1f}B), {active:,} active per token ({active / 1e9:.1f}B)",
        f"checkpoint: {_human(src_bytes)} ({src_bytes:,} bytes) of {'/'.join(sorted(dtypes))} in {len(files)} "
        f"file(s), {len(groups)} mixtral-ms tensors; output {_human(out_bytes)}",
        f"largest output tensor: {largest[0]} ({_human(largest[1])}), the bound for one tensor in memory",
        f"conversion memory: streamed, at most {_human(CHUNK_BYTES)} of tensor data at a time{convert_note}; "
        f"expect a peak RSS under {_human((40 << 20) + (6 if tag else 3) * CHUNK_BYTES)}",
    ]
    return "\n".join(lines)
