"""prune, merge, densify, quantize, skip: each writes a complete checkpoint folder (shards + index,
config.json, compression.json recording what was done, the source's tokenizer files) through
convert.write_checkpoint: built in a temp folder, renamed into place, removed on error or interrupt.

Layouts written (docs/compression.md):
- prune, merge: Hugging Face Mixtral layout with R experts (transformers and from_pretrained load it).
- densify: Hugging Face MistralForCausalLM (one SwiGLU MLP per layer); from_pretrained reads it as one
  expert, top-1, which computes exactly the dense MLP.
- quantize: mixtral-ms layout (stacked experts as int8 + float32 scales, compress/int8.py); from_pretrained
  only (mixtral_ms/model/moe.py, Int8Experts computes with it).
- skip: the source's layout and tensors byte for byte, config.json gaining `dynamic_skip_betas`.
Tensors keep the source's dtype; computed ones (merged, averaged) are averaged in float64.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from mixtral_ms.checkpoint.convert import COMPRESSION_RECORD, DEFAULT_SHARD, HF_METADATA, MS_METADATA, write_checkpoint
from mixtral_ms.model.schema import hf_dims
from mixtral_ms.checkpoint.name_map import count_parameters, ms_to_hf, parameter_specs
from mixtral_ms.outputs import refuse_overlap
from mixtral_ms.checkpoint.safetensors_io import convert_bytes
from mixtral_ms.tools.compress import CompressionError
from mixtral_ms.tools.compress.algorithms import average_linkage, experts_to_keep, skipped_fraction, usage_weights, weighted_average
from mixtral_ms.tools.compress.calibration import Calibration, load_calibration
from mixtral_ms.model.int8 import quantize_int8
from mixtral_ms.tools.compress.source import SourceModel

_MOE_KEYS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
             "output_router_logits", "dynamic_skip_betas", "expert_quantization")


def _layer(name: str) -> int:
    return int(name.split(".")[2])


def _as(tag: str, array: np.ndarray) -> bytes:
    return convert_bytes(np.ascontiguousarray(array, np.float32).tobytes(), "F32", tag)


def _averaged(source: SourceModel, name: str, members: List[int], weights: np.ndarray, tag: str) -> Callable:
    """The usage-weighted average of experts `members` of `name`, produced only when written."""
    return lambda: _as(tag, weighted_average([source.expert(name, e) for e in members], weights))


def _quantized(source: SourceModel, name: str, index: int, group_size: Optional[int], part: int) -> Callable:
    """Expert `index` of `name` quantised: part 0 the int8 weights, 1 the scales."""
    return lambda: quantize_int8(source.expert(name, index), group_size)[part]


def _check_float_moe(source: SourceModel, what: str) -> None:
    """int8 experts and dense models are refused (and, but for quantize, a router that is not learned)."""
    if what != "quantize":
        source.check_learned_router(what)
    if source.config.expert_quantization is not None:
        raise CompressionError(f"{source.folder} holds int8 experts; {what} needs float experts: compress the "
                               "float checkpoint first, then quantize")
    if source.config.hf_model_type != "mixtral":
        raise CompressionError(f"{source.folder} is a dense model; {what} needs a mixture of experts")


def _check_keep(source: SourceModel, keep: int) -> None:
    e, k = source.config.num_local_experts, source.config.num_experts_per_tok
    if not k <= keep <= e:
        raise CompressionError(f"--keep {keep} is out of range: between top-k ({k}) and the number of experts ({e})")


def _write(source: SourceModel, dst: str, items: list, hf: dict, record: dict, metadata: Dict[str, str],
           overwrite: bool, shard_size: int, progress) -> dict:
    def write_config(folder: str) -> None:
        for name, content in (("config.json", hf), (COMPRESSION_RECORD, record)):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
    refuse_overlap([source.folder], dst)
    result = write_checkpoint(source.folder, dst, items, write_config, source.folder, overwrite, shard_size,
                              metadata, progress)
    total, active = count_parameters(hf_dims(hf))
    return {**result, "parameters": total, "active_parameters": active, "record": record}


def _moe_items(source: SourceModel, experts: Callable, gate_rows: Callable) -> list:
    """Hugging Face layout items: `experts(name)` -> per new expert a source, `gate_rows(name)` -> the
    router's rows as a list of sources; everything else copied byte for byte."""
    items = []
    for name, spec in source.specs.items():
        infos = source.params[name]
        tag = infos[0].dtype
        if spec.stacked:
            sources = experts(name)
            for hf_name, src in zip(ms_to_hf(name, len(sources)), sources):
                items.append((hf_name, tag, spec.shape[1:], src))
        elif name.endswith("block_sparse_moe.gate.weight"):
            rows = gate_rows(name)
            items.append((name, tag, (len(rows), spec.shape[1]), rows))
        else:
            items.append((name, tag, infos[0].shape, infos[0]))
    return items


def _calibration_record(calib: Calibration, path: str) -> dict:
    return {"file": path, "fingerprint": calib.meta["fingerprint"], "tokens": calib.meta["tokens"]}


def prune(source: SourceModel, calib_path: str, keep: int, dst: str, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Keep, per layer, the `keep` experts whose removal changes the layer output least (Lu et al. 2024)."""
    _check_float_moe(source, "prune")
    _check_keep(source, keep)
    calib = load_calibration(calib_path, source)
    k, e = source.config.num_experts_per_tok, source.config.num_local_experts
    kept, losses = [], []
    for layer in range(source.num_layers):
        subset, loss = experts_to_keep(calib.sample_outputs[layer], calib.sample_logits[layer], k, keep)
        kept.append(subset)
        losses.append(loss)
    items = _moe_items(
        source,
        lambda name: [source.params[name][i] for i in kept[_layer(name)]],
        lambda name: [source.params[name][0].part(i, e) for i in kept[_layer(name)]])
    hf = {key: value for key, value in source.hf.items() if key != "dynamic_skip_betas"}
    hf["num_local_experts"] = keep
    record = {"method": "prune", "source": source.folder, "keep": keep, "kept_experts": kept,
              "output_distance": losses, "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, items, hf, record, HF_METADATA, overwrite, shard_size, progress)


def merge(source: SourceModel, calib_path: str, keep: int, dst: str, overwrite: bool = False,
          shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Cluster each layer's experts by mean output (average linkage) and merge each cluster's weights and
    router rows by usage-weighted averaging (HC-SMoE; the router rule is argued in docs/compression.md)."""
    _check_float_moe(source, "merge")
    _check_keep(source, keep)
    calib = load_calibration(calib_path, source)
    e = source.config.num_local_experts
    clusters = [average_linkage(calib.mean_output[layer], keep) for layer in range(source.num_layers)]

    def experts(name: str) -> list:
        tag, counts = source.params[name][0].dtype, calib.counts[_layer(name)]
        return [source.params[name][c[0]] if len(c) == 1 else
                _averaged(source, name, c, usage_weights(counts, c), tag) for c in clusters[_layer(name)]]

    def gate_rows(name: str) -> list:
        info, counts = source.params[name][0], calib.counts[_layer(name)]
        rows = []
        for c in clusters[_layer(name)]:
            if len(c) == 1:
                rows.append(info.part(c[0], e))
            else:
                weights = usage_weights(counts, c)
                rows.append(lambda c=c, w=weights: _as(info.dtype, weighted_average(
                    [source.array(name)[i] for i in c], w)))
        return rows

    hf = {key: value for key, value in source.hf.items() if key != "dynamic_skip_betas"}
    hf["num_local_experts"] = keep
    record = {"method": "merge", "source": source.folder, "keep": keep, "clusters": clusters,
              "usage": calib.counts.tolist(), "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, _moe_items(source, experts, gate_rows), hf, record, HF_METADATA, overwrite,
                  shard_size, progress)


def densify(source: SourceModel, calib_path: str, dst: str, overwrite: bool = False,
            shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """One SwiGLU MLP per layer, the usage-weighted average of its experts, as a MistralForCausalLM folder."""
    _check_float_moe(source, "densify")
    calib = load_calibration(calib_path, source)
    e = source.config.num_local_experts
    hf = {key: value for key, value in source.hf.items() if key not in _MOE_KEYS}
    hf.update(architectures=["MistralForCausalLM"], model_type="mistral")
    items = []
    for name, spec in parameter_specs(hf_dims(hf)).items():
        if not spec.sources:  # the router: a dense model has none
            continue
        infos = source.params[name]
        if spec.stacked:
            weights = usage_weights(calib.counts[_layer(name)], range(e))
            items.append((spec.sources[0], infos[0].dtype, spec.shape[1:],
                          _averaged(source, name, list(range(e)), weights, infos[0].dtype)))
        else:
            items.append((name, infos[0].dtype, infos[0].shape, infos[0]))
    record = {"method": "densify", "source": source.folder, "usage": calib.counts.tolist(),
              "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, items, hf, record, HF_METADATA, overwrite, shard_size, progress)


def quantize(source: SourceModel, dst: str, bits: int = 8, group_size: Optional[int] = None,
             overwrite: bool = False, shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Weight-only int8 experts (mixtral_ms/model/moe.py, Int8Experts), everything else copied as it is."""
    if source.config.expert_quantization is not None:
        raise CompressionError(f"{source.folder} is already quantised ({source.config.expert_quantization})")
    _check_float_moe(source, "quantize")
    if bits != 8:
        raise CompressionError(f"--bits {bits} is not supported; int8 (--bits 8) is")
    h, f = source.config.hidden_size, source.config.intermediate_size
    if group_size is not None and (group_size <= 0 or h % group_size or f % group_size):
        raise CompressionError(f"--group_size {group_size} must divide hidden_size ({h}) and intermediate_size ({f})")
    hf = dict(source.hf, expert_quantization={"bits": 8, "group_size": group_size})
    items = []
    for name, spec in parameter_specs(hf_dims(hf)).items():
        weight = name[:-len("_scale")] if name.endswith("_scale") else name
        infos = source.params[weight]
        experts = range(len(infos))
        if name.endswith("_scale"):
            items.append((name, "F32", spec.shape, [_quantized(source, weight, i, group_size, 1) for i in experts]))
        elif spec.stacked:
            items.append((name, "I8", spec.shape, [_quantized(source, weight, i, group_size, 0) for i in experts]))
        else:
            items.append((name, infos[0].dtype, spec.shape, infos[0]))
    record = {"method": "quantize", "source": source.folder, "bits": 8, "group_size": group_size,
              "scheme": "round to nearest, symmetric (-127..127), per output channel" +
                        (f", groups of {group_size} inputs" if group_size else "")}
    return _write(source, dst, items, hf, record, MS_METADATA, overwrite, shard_size, progress)


def skip(source: SourceModel, calib_path: str, dst: str, overwrite: bool = False,
         shard_size: int = DEFAULT_SHARD, progress=None) -> dict:
    """Dynamic skipping (Lu et al. 2024): beta per layer = the median w_2 / w_1 on the calibration data."""
    source.check_learned_router("skip")
    k = source.config.num_experts_per_tok
    if k < 2:
        raise CompressionError(f"dynamic skipping drops the second expert; {source.folder} routes top-{k}")
    calib = load_calibration(calib_path, source)
    betas = [float(b) for b in calib.skip_ratio_median]
    saved = [skipped_fraction(calib.sample_logits[layer], k, beta) for layer, beta in enumerate(betas)]
    items = []
    for name, spec in source.specs.items():
        infos = source.params[name]
        if source.ms_layout:
            items.append((name, infos[0].dtype, spec.shape, infos))
        else:
            items.extend((hf_name, info.dtype, info.shape, info) for hf_name, info in zip(spec.sources, infos))
    hf = dict(source.hf, dynamic_skip_betas=betas)
    record = {"method": "skip", "source": source.folder, "betas": betas,
              "expert_flops_saved_on_sample": saved, "calibration": _calibration_record(calib, calib_path)}
    return _write(source, dst, items, hf, record, MS_METADATA if source.ms_layout else HF_METADATA, overwrite,
                  shard_size, progress)
