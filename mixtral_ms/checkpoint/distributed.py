"""Checkpoints of a cluster run: strategy files, each rank's slice, per-rank checkpoints merged and resharded.

A semi-auto-parallel run writes one strategy file per rank (every rank of a pipeline stage writes the same
layouts): for each parameter, and for each optimizer moment (`adam_m.<name>`, `adam_v.<name>`), the stage's
device matrix, the tensor map (which device axis splits which dimension) and the optimizer-shard group
(`opt_weight_shard_size`, `opt_weight_shard_step`: the slice split again over its replicas). It saves per-rank
checkpoints (`integrated_save: False`), `rank_<i>/<prefix>_rank_<i>-<epoch>_<step>.ckpt`, each holding its rank's
slices. Here:

- `read_strategy`: a run's strategy folder (or files, or one file) -> `Strategy`, the stages merged by
  MindSpore's `merge_pipeline_strategys`; `Strategy.box(name, shape, rank)` is the rank's slice as one
  index range per dimension. The layout arithmetic (optimizer shard included) is MindSpore's own
  (`mindspore.parallel._tensor`), so a slice is exactly the one `transform_checkpoints` gives that rank.
- `read_rank_slices`: one rank's slices of a complete checkpoint, read by byte range from safetensors
  (a converted folder, or a Hugging Face folder with per-expert tensors) or cut from a .ckpt: what a rank
  loads instead of the whole model.
- `split_checkpoint`: a complete checkpoint -> per-rank checkpoints of a strategy.
- `merge_ranks`: per-rank checkpoints + their strategy -> the complete tensors (weights; with
  `training_state`, the optimizer moments and counters too), which `convert.ms2hf` writes as a Hugging Face
  folder and `write_merged` as one mixtral-ms checkpoint.
- `reshard`: per-rank checkpoints of layout A -> per-rank checkpoints of layout B (resume on another device
  count), optimizer state included.

Bad input is one CheckpointError line: a strategy missing a stage, a rank missing, strategies of another
model, a slice whose shape is not the one the strategy gives. Outputs go to a temp folder renamed at the end.
"""
from __future__ import annotations

import glob
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mixtral_ms.checkpoint.name_map import hf_sources, is_ms_layout, is_step_state, is_training_state, ms_tensors
from mixtral_ms.outputs import replace_folder, temp_path
from mixtral_ms.checkpoint.safetensors_io import DTYPE_BYTES, ArrayTensor, CheckpointError, TensorInfo

Box = Tuple[Tuple[int, int], ...]  # per dimension [start, stop)
MOMENT_PREFIXES = ("adam_m.", "adam_v.")
RANK_FOLDER = re.compile(r"^rank_(\d+)$")
_STEP = re.compile(r"-(\d+)_(\d+)\.(ckpt|safetensors)$")
_RAW = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32,
        "I64": np.int64, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# ---------------------------------------------------------------------------------------------------------------
# Strategy files


@dataclass(frozen=True)
class ParamLayout:
    """One tensor's layout in a stage: device matrix (outermost axis first), tensor map (per dimension the
    device axis counted from the right, a tuple of them, or -1), optimizer shard step and size (0: none;
    size -1: over all the slice's replicas) and the pipeline stages holding it."""
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[Any, ...]
    opt_step: int
    opt_size: int
    stages: Tuple[int, ...]


class Strategy:
    """Every tensor's layout in a run: `layouts` (name -> ParamLayout), `stage_devices` (devices per stage)."""

    def __init__(self, layouts: Dict[str, ParamLayout], source: str) -> None:
        self.layouts, self.source = layouts, source
        sizes = {math.prod(layout.dev_matrix) for layout in layouts.values()}
        if len(sizes) != 1:
            raise CheckpointError(f"{source}: strategy files of different device counts per stage "
                                  f"({sorted(sizes)}); give one run's strategy files")
        self.stage_devices = sizes.pop()
        self.stages = sorted({s for layout in layouts.values() for s in layout.stages})

    @property
    def devices(self) -> int:
        return len(self.stages) * self.stage_devices

    def describe(self) -> str:
        return f"{len(self.stages)} stage(s) x {self.stage_devices} devices"

    def stage_of(self, rank: int) -> int:
        return rank // self.stage_devices

    def on_rank(self, name: str, rank: int) -> bool:
        """Whether `rank` holds a slice of `name` (its stage does)."""
        return self.stage_of(rank) in self.layouts[name].stages

    def box(self, name: str, shape: Sequence[int], rank: int) -> Box:
        """The slice of `name` (full shape `shape`) that `rank` holds."""
        return layout_box(self.layouts[name], tuple(shape), rank % self.stage_devices, name)

    def check_stages(self, devices: Optional[int] = None, what: str = "") -> None:
        """Every stage from 0 on has a strategy file and, given the run's rank count, as many stages as
        its ranks fill."""
        want = list(range(devices // self.stage_devices)) if devices else list(range(max(self.stages) + 1))
        missing = sorted(set(want) - set(self.stages))
        if devices and devices % self.stage_devices:
            raise CheckpointError(f"{what}{devices} ranks, but the strategy files give {self.stage_devices} devices "
                                  f"per stage: strategies of another layout")
        if missing:
            first = missing[0] * self.stage_devices
            raise CheckpointError(f"the strategy files {self.source} hold stage(s) {self.stages} but not stage "
                                  f"{missing[0]} (ranks {first}-{first + self.stage_devices - 1}); add that "
                                  f"stage's strategy file (one per pipeline stage), or give the strategies of "
                                  f"this run's layout")
        extra = sorted(set(self.stages) - set(want))
        if extra:
            raise CheckpointError(f"{what}{devices} ranks, but the strategy files {self.source} have stage "
                                  f"{extra[0]}: strategies of another layout")

    def check_model(self, weights: Mapping[str, Sequence[int]]) -> None:
        """The strategy covers every weight of the model (name -> full shape), names nothing else, and
        divides every shape."""
        names = {n for n in self.layouts if not is_training_state(n)}
        unknown = sorted(names - set(weights))
        if unknown:
            raise CheckpointError(f"the strategy files {self.source} name {unknown[0]!r}, which the model does "
                                  f"not have ({len(unknown)} such): strategies of another model")
        missing = sorted(set(weights) - names)
        if missing:
            raise CheckpointError(f"the strategy files {self.source} have no layout for {missing[0]!r} "
                                  f"({len(missing)} weights without one): strategies of another model, or a "
                                  f"pipeline stage's file is missing")
        for name, shape in weights.items():
            for rank in range(self.stage_devices):
                self.box(name, shape, rank)


def _tensor_map(layout) -> Tuple[Any, ...]:
    maps = [tuple(int(d) for d in m.dim) for m in layout.tensor_map]
    if len(maps) > 1:  # MindSpore's Layout: a dimension split over several axes (one list per dimension)
        return tuple(m if len(m) > 1 else m[0] for m in maps if m)
    return maps[0]


def _parse(path: str, merged: bool) -> Dict[str, ParamLayout]:
    from mindspore.train import node_strategy_pb2
    strategy = node_strategy_pb2.ParallelStrategyMap()
    try:
        with open(path, "rb") as f:
            strategy.ParseFromString(f.read())
    except Exception:  # protobuf's DecodeError and friends
        raise CheckpointError(f"{path}: not a MindSpore strategy file") from None
    if not strategy.parallel_layout_item:
        raise CheckpointError(f"{path}: a strategy file without parameter layouts")
    own_stage = strategy.parallel_strategy_item[0].parallel_strategys.stage if strategy.parallel_strategy_item else 0
    out: Dict[str, ParamLayout] = {}
    for item in strategy.parallel_layout_item:
        layout, name, stage = item.parallel_layouts, item.param_name, own_stage
        if merged and "-" in name and name.split("-", 1)[0].isdigit():
            stage, name = int(name.split("-", 1)[0]), name.split("-", 1)[1]
        if any(list(p.dim) for p in layout.param_split_shape) or layout.field:
            raise CheckpointError(f"{path}: {name!r} is split unevenly (param_split_shape / field), which "
                                  "mixtral-ms never does: strategies of another model")
        entry = ParamLayout(tuple(int(d) for d in layout.dev_matrix[0].dim), _tensor_map(layout),
                            int(layout.opt_weight_shard_step), int(layout.opt_weight_shard_size), (stage,))
        if name in out:
            entry = ParamLayout(*[getattr(entry, k) for k in ("dev_matrix", "tensor_map", "opt_step", "opt_size")],
                                tuple(sorted(set(out[name].stages + (stage,)))))
        out[name] = entry
    return out


def read_strategy(source) -> Strategy:
    """A run's strategy: a folder of strategy files (`<output_dir>/strategy/`: one per rank or per stage),
    a list of files, or one file (one stage, or a file merged by `merge_pipeline_strategys`). Files of the
    same stage are the same layouts; MindSpore's `merge_pipeline_strategys` keeps one per stage."""
    from mindspore.parallel import merge_pipeline_strategys
    files = [source] if isinstance(source, str) and os.path.isfile(source) else None
    if files is None:
        if isinstance(source, str):
            if not os.path.isdir(source):
                raise CheckpointError(f"no strategy file or folder {source}")
            files = sorted(glob.glob(os.path.join(source, "*.ckpt")))
            if not files:
                raise CheckpointError(f"{source}: no strategy files (*.ckpt) in it")
        else:
            files = list(source)
            for f in files:
                if not os.path.isfile(f):
                    raise CheckpointError(f"no strategy file {f}")
    label = source if isinstance(source, str) else ", ".join(files)
    if len(files) == 1:
        return Strategy(_parse(files[0], merged=True), label)
    for f in files:  # one line for a bad file, before MindSpore's merge reports it its way
        _parse(f, merged=False)
    with tempfile.TemporaryDirectory(prefix="mixtral-strategy-") as tmp:
        for i, f in enumerate(files):
            shutil.copyfile(f, os.path.join(tmp, f"s{i}.ckpt"))
        merged = os.path.join(tmp, "merged", "strategy.ckpt")
        merge_pipeline_strategys(tmp, merged)
        return Strategy(_parse(merged, merged=True), label)


# ---------------------------------------------------------------------------------------------------------------
# A rank's slice


def layout_box(layout: ParamLayout, shape: Tuple[int, ...], local_rank: int, name: str = "") -> Box:
    """The index ranges of `shape` that device `local_rank` of its stage holds, by MindSpore's layout
    arithmetic: the tensor map splits dimensions over device axes (rank -> coordinate row-major over the
    device matrix), the optimizer shard splits the first dimension again over the slice's replicas
    (`_construct_tensor_layout_for_opt_shard` reshapes the tensor so that this is one more axis)."""
    from mindspore.parallel._tensor import (_construct_tensor_layout_for_opt_shard, _expand_layout,
                                            _extract_layout_item, _get_tensor_strategy, _rank_to_coordinate)
    tmap = list(layout.tensor_map)
    if len(tmap) != len(shape):
        raise CheckpointError(f"{name!r}: the strategy gives a {len(tmap)}-d layout, the tensor is {list(shape)}: "
                              "strategies of another model")
    splits = _get_tensor_strategy(list(layout.dev_matrix), tmap)
    for dim, split in zip(shape, splits):
        if dim % split:
            raise CheckpointError(f"{name!r}: dimension {dim} of {list(shape)} does not split {split} ways as the "
                                  "strategy says: strategies of another model")
    dev, refined_map, refined = list(layout.dev_matrix), tmap, list(shape)
    # opt size -1 (all the slice's replicas) made a count, as transform_checkpoints does
    _, _, opt_step, opt_size = _extract_layout_item([dev, tmap, [], 0, layout.opt_step, layout.opt_size])
    if opt_size and opt_step and shape and opt_size != 1:
        dev, refined_map, refined = _construct_tensor_layout_for_opt_shard(dev, tmap, opt_step, int(opt_size),
                                                                            list(shape))
    if any(isinstance(m, (list, tuple)) for m in refined_map):
        dev, refined_map, refined = _expand_layout(dev, refined_map, refined)
    refined_splits = _get_tensor_strategy(dev, refined_map)
    coord = _rank_to_coordinate(local_rank, dev)
    ranges = []
    for size, m, split in zip(refined, refined_map, refined_splits):
        index = int(coord[len(dev) - 1 - m]) if m != -1 else 0
        step = size // split
        ranges.append((index * step, (index + 1) * step, size))
    return _fold(ranges, shape, name)


def _fold(ranges: List[Tuple[int, int, int]], shape: Tuple[int, ...], name: str) -> Box:
    """Refined ranges (start, stop, size; dimensions split into factors, outermost first) back to one
    contiguous range per dimension of `shape`."""
    out, i = [], 0
    for dim in shape:
        group, product = [], 1
        while product < dim:
            group.append(ranges[i])
            product *= ranges[i][2]
            i += 1
        start, length, inner, partial = 0, 1, 1, False
        for lo, hi, size in reversed(group):
            if partial and hi - lo > 1:
                raise CheckpointError(f"{name!r}: a slice that is not one block per dimension")
            start += lo * inner
            length *= hi - lo
            inner *= size
            partial = partial or hi - lo < size
        out.append((start, start + length))
    if i != len(ranges) and any(r[2] != 1 for r in ranges[i:]):
        raise CheckpointError(f"{name!r}: layout does not fold back onto {list(shape)}")
    return tuple(out)


def box_shape(box: Box) -> Tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def raw_array(tensor) -> np.ndarray:
    """A tensor (TensorInfo or ArrayTensor) as a numpy array of its raw element type (bf16 as uint16 bit
    patterns), bit for bit."""
    if tensor.dtype not in _RAW:
        raise CheckpointError(f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype}")
    return np.frombuffer(tensor.read(), _RAW[tensor.dtype]).reshape(tensor.shape)


def read_box(tensor, box: Box) -> np.ndarray:
    """The elements of `box` of a tensor. A TensorInfo (safetensors) is read by byte range: one read per
    contiguous run (the box's innermost partial dimension and the full ones after it), no other bytes."""
    shape = tuple(tensor.shape)
    if not isinstance(tensor, TensorInfo):
        return np.ascontiguousarray(raw_array(tensor)[tuple(slice(lo, hi) for lo, hi in box)])
    item = DTYPE_BYTES[tensor.dtype]
    out = np.empty(box_shape(box), _RAW[tensor.dtype])
    if out.size == 0:
        return out
    # the run: from the last dimension not taken whole, with every later dimension whole
    d = len(shape)
    while d > 0 and box[d - 1] == (0, shape[d - 1]):
        d -= 1
    run_dim = max(d - 1, 0)
    inner = math.prod(shape[run_dim + 1:]) if shape else 1
    run = (box[run_dim][1] - box[run_dim][0]) * inner if shape else 1
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    flat = out.reshape(-1, run) if shape else out.reshape(1, 1)
    with open(tensor.path, "rb") as f:
        fd = f.fileno()
        for row, outer in enumerate(np.ndindex(*[hi - lo for lo, hi in box[:run_dim]])):
            offset = sum((box[k][0] + outer[k]) * strides[k] for k in range(run_dim))
            offset += box[run_dim][0] * inner if shape else 0
            data = os.pread(fd, run * item, tensor.start + offset * item)
            if len(data) != run * item:
                raise CheckpointError(f"{tensor.path}: tensor {tensor.name!r} is truncated")
            flat[row] = np.frombuffer(data, out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Complete checkpoints: whole tensors by name


def open_complete(path: str, config) -> Dict[str, List[Any]]:
    """The model's weights in a complete checkpoint (a converted folder or file, a Hugging Face folder, or
    a .ckpt), checked by the schema: name -> its sources (one tensor; a Hugging Face folder's stacked
    experts, one per expert). Safetensors are headers only (nothing read); a .ckpt is read whole, as
    MindSpore reads it."""
    if path.endswith(".ckpt"):
        from mixtral_ms.checkpoint.load import read_ckpt
        return {n: [t] for n, t in ms_tensors(read_ckpt(path), config, implied_by="the model config").items()}
    from mixtral_ms.checkpoint.safetensors_io import open_checkpoint
    tensors = open_checkpoint(path)
    if is_ms_layout(tensors):
        return {n: [t] for n, t in ms_tensors(tensors, config).items()}
    return hf_sources(tensors, config)


def read_source_box(sources: List[Any], shape: Tuple[int, ...], box: Box) -> np.ndarray:
    """`box` of a weight given as its sources: one tensor, or stacked experts (one source per expert, the
    box's first range picks the experts)."""
    if len(sources) == 1 and tuple(sources[0].shape) == shape:
        return read_box(sources[0], box)
    if not sources:
        raise CheckpointError("a weight without a source (a dense model's router) has no slices to read")
    (lo, hi), rest = box[0], box[1:]
    return np.stack([read_box(sources[e], rest) for e in range(lo, hi)])


def source_tag(sources: List[Any]) -> str:
    tags = {s.dtype for s in sources}
    if len(tags) != 1:
        raise CheckpointError(f"{sources[0].name!r}: experts of different dtypes {sorted(tags)}")
    return tags.pop()


def read_rank_slices(path: str, config, strategy: Strategy, rank: int) -> Dict[str, Tuple[str, np.ndarray]]:
    """The slices `rank` holds of every weight of its stage, read from a complete checkpoint: name ->
    (dtype tag, array in raw element type). From safetensors only the slices' bytes are read; a .ckpt is
    read whole first (MindSpore's format has no random access)."""
    from mixtral_ms.checkpoint.name_map import parameter_specs
    specs = parameter_specs(config)
    strategy.check_model({n: s.shape for n, s in specs.items()})
    sources = open_complete(path, config)
    out = {}
    for name, spec in specs.items():
        if strategy.on_rank(name, rank):
            out[name] = (source_tag(sources[name]),
                         read_source_box(sources[name], spec.shape, strategy.box(name, spec.shape, rank)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-rank checkpoints


def is_rank_folder(path: str) -> bool:
    """Whether `path` is a run's folder of per-rank checkpoints (`rank_<i>/` subfolders)."""
    return os.path.isdir(path) and any(RANK_FOLDER.match(e) and os.path.isdir(os.path.join(path, e))
                                       for e in os.listdir(path))


def rank_files(folder: str, what: str = "checkpoint") -> Dict[int, str]:
    """rank -> checkpoint file of a run's checkpoint folder (`rank_<i>/`, the newest .ckpt of each, which
    must all be of the same step)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"no {what} folder {folder}")
    found: Dict[int, str] = {}
    for entry in os.listdir(folder):
        m = RANK_FOLDER.match(entry)
        if m and os.path.isdir(os.path.join(folder, entry)):
            files = glob.glob(os.path.join(folder, entry, "*.ckpt"))
            if not files:
                raise CheckpointError(f"{os.path.join(folder, entry)}: no .ckpt file in it")
            found[int(m.group(1))] = max(files, key=lambda f: (os.path.getmtime(f), f))
    if not found:
        raise CheckpointError(f"{folder}: no rank_<i>/ folders of per-rank checkpoints in it")
    steps = {r: _STEP.search(os.path.basename(f)) for r, f in found.items()}
    named = {r: m.group(2) for r, m in steps.items() if m}
    if len(set(named.values())) > 1:
        low, high = min(named, key=lambda r: int(named[r])), max(named, key=lambda r: int(named[r]))
        raise CheckpointError(f"{folder}: rank {high}'s newest checkpoint is step {named[high]}, rank {low}'s is "
                              f"step {named[low]}; keep one step's files")
    return dict(sorted(found.items()))


def _check_ranks(ranks: Iterable[int], strategy: Strategy, folder: str) -> None:
    ranks = sorted(ranks)
    devices = max(max(ranks) + 1, strategy.devices)
    strategy.check_stages(devices, what=f"{folder} holds ")
    missing = sorted(set(range(devices)) - set(ranks))
    if missing:
        raise CheckpointError(f"{folder}: no checkpoint for rank {missing[0]} (rank_{missing[0]}/) of the "
                              f"{devices} ranks of {strategy.describe()}")


def _read_rank_file(path: str) -> Dict[str, ArrayTensor]:
    from mixtral_ms.checkpoint.load import read_ckpt
    return read_ckpt(path, training_state=True)


def merge_ranks(folder: str, strategy: Strategy, config, training_state: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> Dict[str, ArrayTensor]:
    """The complete tensors of a run's per-rank checkpoints: every weight of the model (checked against
    `config` by the schema) and, with `training_state`, the optimizer moments (merged by their own layouts)
    and the counters (from rank 0). Each rank's file is read once, its slices put in place; memory is the
    merged tensors plus one rank's file."""
    from mixtral_ms.checkpoint.name_map import parameter_specs
    files = rank_files(folder)
    _check_ranks(files, strategy, folder)
    specs = parameter_specs(config)
    shapes = {n: s.shape for n, s in specs.items()}
    strategy.check_model(shapes)
    for name in list(strategy.layouts):
        if name.startswith(MOMENT_PREFIXES) and name.split(".", 1)[1] in shapes:
            shapes[name] = shapes[name.split(".", 1)[1]]
    merged: Dict[str, np.ndarray] = {}
    tags: Dict[str, str] = {}
    seen: Dict[str, set] = {}
    extra: Dict[str, ArrayTensor] = {}
    for rank, path in files.items():
        tensors = _read_rank_file(path)
        for name, tensor in tensors.items():
            if is_step_state(name):
                continue
            if name not in shapes:
                if name.startswith(MOMENT_PREFIXES) and training_state:
                    raise CheckpointError(f"{path} holds {name!r}, which the strategy files {strategy.source} have "
                                          "no layout for: strategies of another model or optimizer")
                if is_training_state(name):
                    if training_state and name not in extra:
                        extra[name] = tensor
                    continue
                raise CheckpointError(f"{path} holds {name!r}, which the model does not have: a checkpoint of "
                                      "another model")
            if not training_state and name not in specs:
                continue
            if not strategy.on_rank(name, rank):  # another stage's parameter: not this rank's to give
                continue
            box = strategy.box(name, shapes[name], rank)
            if tuple(tensor.shape) != box_shape(box):
                raise CheckpointError(f"{path}: {name!r} is {list(tensor.shape)}, the strategy gives rank {rank} a "
                                      f"{list(box_shape(box))} slice of {list(shapes[name])}: strategies of another "
                                      "model or layout")
            if name not in merged:
                merged[name] = np.empty(shapes[name], _RAW[tensor.dtype])
                tags[name] = tensor.dtype
            elif tags[name] != tensor.dtype:
                raise CheckpointError(f"{path}: {name!r} is {tensor.dtype}, other ranks hold {tags[name]}")
            merged[name][tuple(slice(lo, hi) for lo, hi in box)] = raw_array(tensor)
            seen.setdefault(name, set()).add(rank)
        del tensors
        if progress:
            progress(f"read rank {rank} ({os.path.basename(path)})")
    for name in specs:
        lacking = sorted(r for r in files if strategy.on_rank(name, r) and r not in seen.get(name, ()))
        if lacking:
            raise CheckpointError(f"{files[lacking[0]]}: no {name!r}, which the strategy gives rank {lacking[0]} "
                                  f"(stage {strategy.stage_of(lacking[0])})")
    out = {name: ArrayTensor(name, tags[name], merged[name].shape, merged[name].tobytes()) for name in merged}
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing per-rank checkpoints


def _ms_tensor(tag: str, array: np.ndarray):
    import mindspore as ms
    from mindspore import Tensor
    if tag == "BF16":  # bit patterns widened exactly to fp32, narrowed exactly back
        from mixtral_ms.checkpoint.safetensors_io import bf16_to_f32
        return Tensor(bf16_to_f32(array)).astype(ms.bfloat16)
    return Tensor(np.ascontiguousarray(array))


def write_rank_checkpoints(dst: str, per_rank: Callable[[int], Dict[str, Tuple[str, np.ndarray]]], ranks: int,
                           prefix: str = "mixtral", overwrite: bool = False) -> List[str]:
    """`dst/rank_<i>/<prefix>_rank_<i>.ckpt` for every rank (`per_rank(i)`: name -> (dtype tag, array)),
    MindSpore's per-rank layout, written in a temp folder beside `dst` and renamed into place (an existing
    `dst` is replaced only with `overwrite`)."""
    import mindspore as ms
    target = os.path.realpath(os.path.abspath(dst))
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)) and not overwrite:
        raise CheckpointError(f"destination {dst} already exists; pass --overwrite to replace it")
    tmp = temp_path(target)
    os.makedirs(tmp)
    written = []
    try:
        for rank in range(ranks):
            folder = os.path.join(tmp, f"rank_{rank}")
            os.makedirs(folder)
            tensors = per_rank(rank)
            path = os.path.join(folder, f"{prefix}_rank_{rank}.ckpt")
            ms.save_checkpoint([{"name": n, "data": _ms_tensor(tag, a)} for n, (tag, a) in tensors.items()], path)
            written.append(os.path.join(target, f"rank_{rank}", os.path.basename(path)))
        replace_folder(tmp, target)  # the old folder kept aside until the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def slice_for_rank(tensors: Mapping[str, ArrayTensor], strategy: Strategy, rank: int) -> Dict[str, Tuple[str, np.ndarray]]:
    """A rank's checkpoint of complete tensors: the slices of the tensors its stage holds; tensors the
    strategy does not name (counters: step, loss scale) whole, on every rank."""
    out = {}
    for name, tensor in tensors.items():
        if name in strategy.layouts:
            if strategy.on_rank(name, rank):
                out[name] = (tensor.dtype, read_box(tensor, strategy.box(name, tensor.shape, rank)))
        elif not name.startswith(MOMENT_PREFIXES):
            out[name] = (tensor.dtype, raw_array(tensor))
    return out


def split_checkpoint(src: str, config, strategy: Strategy, dst: str, overwrite: bool = False,
                     devices: Optional[int] = None) -> List[str]:
    """A complete checkpoint (converted folder, Hugging Face folder or .ckpt) -> per-rank checkpoints of
    `strategy` (`devices`: the rank count; default its stages x devices per stage), each rank's slices read
    from the source alone."""
    devices = devices or strategy.devices
    strategy.check_stages(devices)
    return write_rank_checkpoints(dst, lambda rank: read_rank_slices(src, config, strategy, rank), devices,
                                  overwrite=overwrite)


def reshard(src: str, src_strategy: Strategy, dst_strategy: Strategy, config, dst: str,
            training_state: bool = True, overwrite: bool = False, devices: Optional[int] = None,
            progress: Optional[Callable[[str], None]] = None) -> List[str]:
    """Per-rank checkpoints of layout A (`src`, `src_strategy`) -> per-rank checkpoints of layout B, with the
    optimizer moments (each by its own layout in both strategies) and counters when `training_state`
    (resuming), else the weights alone (fine-tuning)."""
    devices = devices or dst_strategy.devices
    dst_strategy.check_stages(devices)
    from mixtral_ms.checkpoint.name_map import parameter_specs
    dst_strategy.check_model({n: s.shape for n, s in parameter_specs(config).items()})
    tensors = merge_ranks(src, src_strategy, config, training_state, progress)
    if training_state:
        lacking = sorted(n for n in tensors if n.startswith(MOMENT_PREFIXES) and n not in dst_strategy.layouts)
        if lacking:
            raise CheckpointError(f"the target strategy {dst_strategy.source} has no layout for {lacking[0]!r}: "
                                  "strategies of another optimizer (or reshard the weights alone, without "
                                  "optimizer state, to fine-tune)")
    return write_rank_checkpoints(dst, lambda rank: slice_for_rank(tensors, dst_strategy, rank), devices,
                                  overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------------
# Sliced loading in a run: each weight's slice read when the parallel compiler initialises it


class SlicedLoad:
    """A rank's weights from a complete checkpoint, read slice by slice while the semi-auto compiler
    initialises the (lazy) parameters: `attach` gives each weight an initializer that, asked for this rank's
    slice, reads exactly that box (safetensors byte ranges; from a .ckpt, cut from the file MindSpore read
    whole). The slice is the one the strategy file this compile writes gives the rank (the file is written
    before the parameters are initialised); a slice of any other shape is an error, not a silent cut."""

    def __init__(self, path: str, config, strategy: Optional[str] = None, rank: Optional[int] = None) -> None:
        self.path, self.config = path, config
        self.sources = open_complete(path, config)  # names, shapes, dtypes checked now, before the compile
        self._strategy_source, self._rank, self._strategy = strategy, rank, None
        self.filled: Dict[str, Tuple[int, ...]] = {}

    def strategy(self) -> Strategy:
        if self._strategy is None:
            source = self._strategy_source
            if source is None:
                import mindspore as ms
                source = ms.get_auto_parallel_context("strategy_ckpt_save_file") or \
                    (ms.get_auto_parallel_context("strategy_ckpt_config") or {}).get("save_file")
            if not source or not os.path.exists(source):
                raise CheckpointError(f"sliced loading needs the strategy file the compiler writes; none at {source!r}")
            self._strategy = read_strategy(source)
        return self._strategy

    def rank(self) -> int:
        if self._rank is None:
            from mindspore.communication import get_rank
            self._rank = get_rank()
        return self._rank

    def fill(self, name: str, shape: Tuple[int, ...], arr: np.ndarray) -> None:
        """Write this rank's slice of `name` into `arr` (the compiler's slice buffer, the parameter's dtype)."""
        from mixtral_ms.checkpoint.safetensors_io import bf16_to_f32, has_nonfinite
        strategy, rank = self.strategy(), self.rank()
        if name in strategy.layouts:
            box = strategy.box(name, shape, rank)
        elif tuple(arr.shape) == tuple(shape):  # another stage's weight the compiler still initialises whole
            box = tuple((0, d) for d in shape)  # on this rank (a pipeline's embedding): read whole, as before
        else:
            raise CheckpointError(f"{name!r} is not in the compiled strategy {strategy.source}, and the compiler "
                                  f"asks rank {rank} for a {list(arr.shape)} slice of {list(shape)}")
        if tuple(arr.shape) != box_shape(box):
            raise CheckpointError(f"{name!r}: the compiler asks rank {rank} for a {list(arr.shape)} slice, the strategy "
                                  f"file gives {list(box_shape(box))}")
        sources = self.sources[name]
        if not sources:  # a dense (Mistral) model's router: one expert takes every token whatever the logit
            arr[...] = 0
            self.filled[name] = tuple(arr.shape)
            return
        tag = source_tag(sources)
        raw = read_source_box(sources, shape, box)
        if has_nonfinite(raw.tobytes(), tag):
            raise CheckpointError(f"tensor {name!r} holds NaN or inf values in rank {rank}'s slice; refusing to load it")
        if tag == "BF16" and arr.dtype.itemsize == 2 and arr.dtype.name == "bfloat16":
            arr.view(np.uint16)[...] = raw
        else:
            arr[...] = (bf16_to_f32(raw) if tag == "BF16" else raw.astype(np.float32)).astype(arr.dtype)
        self.filled[name] = tuple(arr.shape)

    def attach(self, model) -> int:
        """Point every weight of `model` (built in semi-auto parallel mode, so its parameters are lazy) at
        this loader; returns how many. Weights that already hold data are refused (they would load whole)."""
        from mindspore import Tensor
        from mindspore.common.initializer import Initializer
        loader = self

        class SliceInit(Initializer):
            def __init__(self, name, shape):
                super().__init__()
                self.name, self.shape = name, shape

            def _initialize(self, arr):
                loader.fill(self.name, self.shape, arr)

        count = 0
        for param in model.get_parameters():
            if param.name not in self.sources:
                continue
            if not param.has_init:
                raise CheckpointError(f"{param.name!r} already holds data; build the model after the parallel "
                                      "context is set (its parameters are then initialised slice by slice)")
            param.init_mode = Tensor(shape=param.shape, dtype=param.dtype, init=SliceInit(param.name, tuple(param.shape)))
            count += 1
        return count
