"""prune, merge, densify, quantize, skip: each writes a complete checkpoint folder (shards + index,
config.json, compression.json recording what was done, the source's tokenizer files) through
convert.write_checkpoint: built in a temp folder, renamed into place, removed on error or interrupt.
The source is read through its CheckpointView (source.SourceModel): one tensor per expert in either layout.

Layouts written (docs/compression.md):
- prune, merge: Hugging Face Mixtral layout with R experts (transformers and from_pretrained load it).
- densify: Hugging Face MistralForCausalLM (one SwiGLU MLP per layer); from_pretrained reads it as one
  expert, top-1, which computes exactly the dense MLP. Ungated shared experts are folded into it.
- quantize: mixtral-ms layout (stacked experts as int8 + float32 scales, model/int8.py); from_pretrained
  only (mixtral_ms/model/moe.py, Int8Experts computes with it).
- skip: the source's layout and tensors byte for byte, config.json gaining `dynamic_skip_betas`.
Tensors keep the source's dtype; computed ones (merged, averaged) are averaged in float64.
The MoE options (docs/design.md): the methods act on the MoE layers of the layer pattern (calibration's
rows); the router bias follows the experts (rows kept, or averaged as the router rows are); shared experts
and the pattern's dense layers are copied byte for byte (densify folds them into the dense MLP). Records
list per-layer values by model layer, None for a dense one.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from mixtral_ms.checkpoint.convert import (COMPRESSION_RECORD, DEFAULT_SHARD, HF_METADATA, MS_METADATA, json_files,
                                           write_checkpoint)
from mixtral_ms.model.schema import MOE_OPTIONS, hf_dims
from mixtral_ms.checkpoint.name_map import (MISTRAL_MLP, Kind, ParamName, count_parameters, ms_to_hf,
                                            parameter_specs, parse)
from mixtral_ms.checkpoint.safetensors_io import Source, convert_bytes
from mixtral_ms.tools.compress import CompressionError
from mixtral_ms.tools.compress.algorithms import average_linkage, experts_to_keep, skipped_fraction, usage_weights, weighted_average
from mixtral_ms.tools.compress.calibration import Calibration, load_calibration
from mixtral_ms.model.int8 import quantize_int8
from mixtral_ms.tools.compress.source import SourceModel

_MOE_KEYS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
             "output_router_logits", "dynamic_skip_betas", "expert_quantization", *MOE_OPTIONS,
             "shared_expert_intermediate_size")  # config.json keys a densified (Mistral) model drops


def _layer(name: str) -> int:
    return parse(name).layer


def _by_layer(source: SourceModel, values: Dict[int, object]) -> list:
    """A record's per-layer list: index i is model layer i, None for a dense layer of the pattern."""
    return [values.get(i) for i in range(source.num_layers)]


def _moe_rows(source: SourceModel, array: np.ndarray) -> Dict[int, np.ndarray]:
    """A calibration array's rows keyed by model layer (row l is the l-th MoE layer)."""
    return dict(zip(source.moe_layers, array))


def _as(tag: str, array: np.ndarray) -> bytes:
    return convert_bytes(np.ascontiguousarray(array, np.float32).tobytes(), "F32", tag)


def _averaged(source: SourceModel, name: str, members: List[int], weights: np.ndarray, tag: str) -> Callable:
    """The usage-weighted average of experts `members` of `name`, produced only when written."""
    return lambda: _as(tag, weighted_average([source.array(name, e) for e in members], weights))


def _quantized(source: SourceModel, name: str, index: int, group_size: Optional[int], part: int) -> Callable:
    """Expert `index` of `name` quantised: part 0 the int8 weights, 1 the scales."""
    return lambda: quantize_int8(source.array(name, index), group_size)[part]


def _check_float_moe(source: SourceModel, what: str) -> None:
    """int8 experts and dense models are refused (and, but for quantize, a router that is not learned)."""
    if what != "quantize":
        source.check_learned_router(what)
    if source.dims.expert_quantization is not None:
        raise CompressionError(f"{source.folder} holds int8 experts; {what} needs float experts: compress the "
                               "float checkpoint first, then quantize")
    if source.dims.hf_model_type != "mixtral":
        raise CompressionError(f"{source.folder} is a dense model; {what} needs a mixture of experts")


def _check_keep(source: SourceModel, keep: int) -> None:
    e, k = source.dims.num_local_experts, source.dims.num_experts_per_tok
    if not k <= keep <= e:
        raise CompressionError(f"--keep {keep} is out of range: between top-k ({k}) and the number of experts ({e})")


def _write(source: SourceModel, dst: str, items: list, hf: dict, record: dict, metadata: Dict[str, str],
           overwrite: bool, shard_size: int, progress) -> dict:
    result = write_checkpoint(source.folder, dst, items, json_files({"config.json": hf, COMPRESSION_RECORD: record}),
                              source.folder, overwrite, shard_size, metadata, progress)
    total, active = count_parameters(hf_dims(hf))
    return {**result, "parameters": total, "active_parameters": active, "record": record}


def _moe_items(source: SourceModel, experts: Callable, expert_rows: Callable) -> list:
    """Hugging Face layout items: `experts(name)` -> per new expert a source, `expert_rows(name)` -> the
    router's (and its bias's) rows, one per new expert, as a list of sources; everything else (attention,
    shared experts, the pattern's dense layers) copied byte for byte."""
    items = []
    for name, spec in source.specs.items():
        tag = source.stored[name][0].dtype
        if spec.stacked:
            sources = experts(name)
            for hf_name, src in zip(ms_to_hf(name, len(sources)), sources):
                items.append((hf_name, tag, spec.shape[1:], src))
        elif parse(name).kind in (Kind.ROUTER, Kind.ROUTER_BIAS):
            rows = expert_rows(name)
            items.append((name, tag, (len(rows),) + spec.shape[1:], rows))
        else:
            items.append((name, tag, source.tensor(name).shape, source.tensor(name)))
    return items


def _calibration_record(calib: Calibration, path: str) -> dict:
    return {"file": path, "fingerprint": calib.meta["fingerprint"], "tokens": calib.meta["tokens"]}


def prune(source: SourceModel, calib_path: str, keep: int, dst: str, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Keep, per MoE layer, the `keep` experts whose removal changes the layer output least (Lu et al. 2024),
    searched with the layer's own routing (bias, sigmoid scores), and their router and bias rows."""
    _check_float_moe(source, "prune")
    _check_keep(source, keep)
    calib = load_calibration(calib_path, source)
    k, e = source.dims.num_experts_per_tok, source.dims.num_local_experts
    kept, losses = {}, {}
    for row, layer in enumerate(source.moe_layers):
        kept[layer], losses[layer] = experts_to_keep(calib.sample_outputs[row], calib.sample_logits[row], k, keep,
                                                     source.scoring(layer))
    items = _moe_items(
        source,
        lambda name: [source.expert(name, i) for i in kept[_layer(name)]],
        lambda name: [source.tensor(name).part(i, e) for i in kept[_layer(name)]])
    hf = {key: value for key, value in source.hf.items() if key != "dynamic_skip_betas"}
    hf["num_local_experts"] = keep
    record = {"method": "prune", "source": source.folder, "keep": keep, "kept_experts": _by_layer(source, kept),
              "output_distance": _by_layer(source, losses), "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, items, hf, record, HF_METADATA, overwrite, shard_size, progress)


def merge(source: SourceModel, calib_path: str, keep: int, dst: str, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Cluster each MoE layer's experts by mean output (average linkage) and merge each cluster's weights,
    router rows and bias entries by usage-weighted averaging (HC-SMoE; the router and bias rules are argued
    in docs/compression.md)."""
    _check_float_moe(source, "merge")
    _check_keep(source, keep)
    calib = load_calibration(calib_path, source)
    e = source.dims.num_local_experts
    clusters = {layer: average_linkage(features, keep)
                for layer, features in _moe_rows(source, calib.mean_output).items()}
    counts = _moe_rows(source, calib.counts)

    def experts(name: str) -> list:
        tag, usage = source.expert(name, 0).dtype, counts[_layer(name)]
        return [source.expert(name, c[0]) if len(c) == 1 else
                _averaged(source, name, c, usage_weights(usage, c), tag) for c in clusters[_layer(name)]]

    def rows(name: str) -> list:
        """The router's rows or the bias's entries: a singleton's own, else the members' weighted mean."""
        info, usage = source.tensor(name), counts[_layer(name)]
        out = []
        for c in clusters[_layer(name)]:
            if len(c) == 1:
                out.append(info.part(c[0], e))
            else:
                out.append(lambda c=c, w=usage_weights(usage, c): _as(info.dtype, weighted_average(
                    [source.array(name)[i] for i in c], w)))
        return out

    hf = {key: value for key, value in source.hf.items() if key != "dynamic_skip_betas"}
    hf["num_local_experts"] = keep
    record = {"method": "merge", "source": source.folder, "keep": keep, "clusters": _by_layer(source, clusters),
              "usage": _by_layer(source, {layer: c.tolist() for layer, c in counts.items()}),
              "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, _moe_items(source, experts, rows), hf, record, HF_METADATA, overwrite,
                  shard_size, progress)


def _dense_mlp(source: SourceModel, stack: ParamName, weights: Dict[int, np.ndarray],
               width: int) -> Tuple[str, Source]:
    """(dtype tag, source) of the densified model's MLP weight `stack` (w1, w3 or w2 of one layer) at `width`
    units. A MoE layer's: the usage-weighted average of its experts (`weights[layer]`), then its shared
    experts' units: two SwiGLUs summed are one holding both's units (w1/w3 rows, w2 columns), so the fold
    is exact. A dense layer's: its MLP byte for byte, or with zero units appended up to `width` (silu(0) * 0
    adds 0: exact too)."""
    axis = 1 if stack.proj == "w2" else 0
    if stack.layer not in weights:
        mlp = source.tensor(ParamName(Kind.MLP, stack.layer, MISTRAL_MLP[stack.proj]).name)
        if mlp.shape[axis] == width:
            return mlp.dtype, mlp
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, width - mlp.shape[axis])
        return mlp.dtype, lambda: _as(mlp.dtype, np.pad(source.array(mlp.name), pad))
    experts = list(range(source.dims.num_local_experts))
    tag = source.expert(stack.name, 0).dtype
    if not source.dims.num_shared_experts:
        return tag, _averaged(source, stack.name, experts, weights[stack.layer], tag)
    shared = ParamName(Kind.SHARED_EXPERT, stack.layer, MISTRAL_MLP[stack.proj]).name
    return tag, lambda: _as(tag, np.concatenate(
        [weighted_average([source.array(stack.name, i) for i in experts], weights[stack.layer]),
         source.array(shared)], axis))


def densify(source: SourceModel, calib_path: str, dst: str, overwrite: bool = False,
            shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """One SwiGLU MLP per layer, as a MistralForCausalLM folder: a MoE layer's is the usage-weighted average
    of its experts plus its shared experts' units (intermediate_size F + N * F_s), a dense layer's its MLP
    (zero units appended to that width). A shared-expert gate scales a SwiGLU by a sigmoid of the input,
    which no SwiGLU unit computes: refused."""
    _check_float_moe(source, "densify")
    c = source.dims
    if c.shared_expert_gate:
        raise CompressionError(f"{source.folder} gates its shared experts (shared_expert_gate: sigmoid(x W_g) * "
                               "shared(x)), which no dense Mistral MLP computes: densify cannot fold them; prune, "
                               "merge or quantize instead")
    calib = load_calibration(calib_path, source)
    width = c.intermediate_size + c.num_shared_experts * c.shared_expert_intermediate_size
    hf = {key: value for key, value in source.hf.items() if key not in _MOE_KEYS}
    hf.update(architectures=["MistralForCausalLM"], model_type="mistral", intermediate_size=width)
    counts = _moe_rows(source, calib.counts)
    weights = {layer: usage_weights(usage, range(c.num_local_experts)) for layer, usage in counts.items()}
    items = []
    for name, spec in parameter_specs(hf_dims(hf)).items():
        if not spec.sources:  # the router: a dense model has none
            continue
        if spec.stacked:
            tag, src = _dense_mlp(source, parse(name), weights, width)
            items.append((spec.sources[0], tag, spec.shape[1:], src))
        else:
            items.append((name, source.tensor(name).dtype, source.tensor(name).shape, source.tensor(name)))
    record = {"method": "densify", "source": source.folder,
              "usage": _by_layer(source, {layer: usage.tolist() for layer, usage in counts.items()}),
              "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, items, hf, record, HF_METADATA, overwrite, shard_size, progress)


def quantize(source: SourceModel, dst: str, bits: int = 8, group_size: Optional[int] = None,
             overwrite: bool = False, shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Weight-only int8 routed experts (mixtral_ms/model/moe.py, Int8Experts), everything else copied as it
    is: shared experts and the pattern's dense MLPs stay in float (one SwiGLU each, run for every token,
    as attention is)."""
    if source.dims.expert_quantization is not None:
        raise CompressionError(f"{source.folder} is already quantised ({source.dims.expert_quantization})")
    _check_float_moe(source, "quantize")
    if bits != 8:
        raise CompressionError(f"--bits {bits} is not supported; int8 (--bits 8) is")
    h, f = source.dims.hidden_size, source.dims.intermediate_size
    if group_size is not None and (group_size <= 0 or h % group_size or f % group_size):
        raise CompressionError(f"--group_size {group_size} must divide hidden_size ({h}) and intermediate_size ({f})")
    hf = dict(source.hf, expert_quantization={"bits": 8, "group_size": group_size})
    items = []
    experts = range(source.dims.num_local_experts)
    for name, spec in parameter_specs(hf_dims(hf)).items():
        parsed = parse(name)
        if parsed.kind is Kind.EXPERT_SCALE:
            weight = parsed.stack().name
            items.append((name, "F32", spec.shape, [_quantized(source, weight, i, group_size, 1) for i in experts]))
        elif spec.stacked:
            items.append((name, "I8", spec.shape, [_quantized(source, name, i, group_size, 0) for i in experts]))
        else:
            items.append((name, source.tensor(name).dtype, spec.shape, source.tensor(name)))
    record = {"method": "quantize", "source": source.folder, "bits": 8, "group_size": group_size,
              "scheme": "round to nearest, symmetric (-127..127), per output channel" +
                        (f", groups of {group_size} inputs" if group_size else "")}
    return _write(source, dst, items, hf, record, MS_METADATA, overwrite, shard_size, progress)


def skip(source: SourceModel, calib_path: str, dst: str, overwrite: bool = False,
         shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Dynamic skipping (Lu et al. 2024): beta per MoE layer = the median w_2 / w_1 on the calibration data
    (config.json's list has one per layer: 0, never read, for a dense layer of the pattern)."""
    source.check_learned_router("skip")
    k = source.dims.num_experts_per_tok
    if k < 2:
        raise CompressionError(f"dynamic skipping drops the second expert; {source.folder} routes top-{k}")
    calib = load_calibration(calib_path, source)
    betas, saved = [0.0] * source.num_layers, {}
    for row, layer in enumerate(source.moe_layers):
        betas[layer] = float(calib.skip_ratio_median[row])
        saved[layer] = skipped_fraction(calib.sample_logits[row], k, betas[layer], source.scoring(layer))
    items = []
    for name, spec in source.specs.items():
        stored = source.stored[name]
        if source.layout == "ms":
            items.append((name, stored[0].dtype, spec.shape, stored))
        else:
            items.extend((hf_name, info.dtype, info.shape, info) for hf_name, info in zip(spec.sources, stored))
    hf = dict(source.hf, dynamic_skip_betas=betas)
    record = {"method": "skip", "source": source.folder, "betas": betas,
              "expert_flops_saved_on_sample": _by_layer(source, saved),
              "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, items, hf, record, MS_METADATA if source.layout == "ms" else HF_METADATA, overwrite,
                  shard_size, progress)
