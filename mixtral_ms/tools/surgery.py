"""Expert surgery: grow, extract, upcycle and mix the experts of Mixtral checkpoints, streaming.

Every operation sees its sources as Mixtrals: a Mixtral folder (mixtral-ms stacked experts or Hugging Face
per-expert tensors) as it is, a Hugging Face `MistralForCausalLM` folder as a Mixtral with one expert per
layer (gate_proj -> w1, up_proj -> w3, down_proj -> w2) and no router. An output expert, or router row, is
then a byte range of a source (one expert of a stacked tensor is `TensorInfo.part`, one router row too)
or a tensor computed when it is written (new rows, noise, averages), so nothing but the tensor being
computed is ever in memory and unchanged weights are copied byte for byte.

- grow (Lifelong-MoE, Chen et al. 2023): N more experts and router rows per layer, top-k unchanged. New
  expert E + j starts from old expert j mod E: `copy` (its weights and router row, verbatim), `copy-noise`
  (plus Gaussian noise of std `noise * rms` of each copied tensor, router row included, which breaks the
  tie between the twins), `random` (N(0, initializer_range) for the weights and the row, as a fresh model).
  Identity: with top-1 routing a `copy`-grown model computes the source's function exactly (a token whose
  expert has a twin picks either, with weight 1); with top-k > 1 a twin takes the second slot, so the
  function changes and the old experts' outputs stay as they were.
- extract: keep a subset of experts (one list for every layer, or one per layer) with their router rows. Of a
  `router_type: rre` model only one whole domain group (rre.group_experts), which becomes a model of
  rre_groups 1 that routes that domain's tokens as the full model did; any other subset is refused.
  grow and mix of an rre model are refused: they would change the size of its domain groups.
- upcycle (Komatsuzaki et al. 2023): a dense Mistral into a Mixtral of E copies of each FFN and a new
  router, N(0, initializer_range); identical experts with renormalised top-k weights compute the dense FFN.
- mix (Branch-Train-MiX, Sukhbaatar et al. 2024): N branches of one seed into one Mixtral; per layer the
  branches' FFNs (dense branches) or all their experts (Mixtral branches) in branch order, every other
  weight the weighted average (in float64, so N identical branches give their weights back bit for bit),
  router rows new, each branch's own (`concat`), or the weighted average of the branches' rows (`average`).

New rows are drawn from `numpy.random.default_rng([seed, layer, kind, index])`: the same seed gives the
same tensors whatever the order they are written in (mix of N identical dense branches == upcycle).
Sources are read through checkpoint/view.CheckpointView; outputs (either layout) are written by
convert.write_checkpoint (temp folder + rename): shards, index, config.json, the source's tokenizer files
and `surgery.json` (the operation and, per layer, where each output expert came from).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mixtral_ms.checkpoint.convert import (DEFAULT_SHARD, HF_METADATA, MS_METADATA, folder_of, json_files, open_tensors,
                                           write_checkpoint)
from mixtral_ms.checkpoint.name_map import (Kind, ParamName, is_expert_stack, ms_to_hf, parameter_specs, parse,
                                            source_dtype)
from mixtral_ms.checkpoint.view import CheckpointView
from mixtral_ms.cli import BadInput
from mixtral_ms.outputs import refuse_overlap
from mixtral_ms.model.rre import group_experts
from mixtral_ms.model.schema import hf_config, hf_dims, model_dims, moe_layers, read_hf_config
from mixtral_ms.checkpoint.safetensors_io import CHUNK_BYTES, ArrayTensor, TensorInfo, convert_bytes, to_numpy

INITS = ("copy", "copy-noise", "random")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "tie_word_embeddings")
ROUTERS = ("new", "average", "concat")
LAYOUTS = ("ms", "hf")
_KIND = {"w1": 1, "w3": 3, "w2": 2, "gate": 0}  # rng stream per kind of tensor
Source = Union[TensorInfo, Callable[[], bytes]]  # copied byte range, or bytes computed when written


class SurgeryError(BadInput, ValueError):
    """Input that expert surgery refuses: bad ids or counts, mismatched branches, a wrong kind of model."""


# ----------------------------------------------------------------------------------------------- sources

def read_config(path: str) -> Dict:
    """A Hugging Face config dict from a config.json, its folder, or a run YAML (its model.model_config)."""
    if path.endswith((".yaml", ".yml")) and os.path.isfile(path):
        from mixtral_ms.run.run_yaml import read_run_yaml
        raw = read_run_yaml(path)  # base_config: files merged, as the run reads them
        section = (raw.get("model") if isinstance(raw.get("model"), dict) else {}).get("model_config")
        if not isinstance(section, dict):
            raise SurgeryError(f"{path} has no model.model_config section")
        return hf_config(model_dims(section))
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise SurgeryError(f"{path}: malformed JSON ({type(err).__name__}: {err})") from None
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no such config {path}")
    else:
        hf = read_hf_config(path)
    if not isinstance(hf, dict):
        raise SurgeryError(f"{path}: config.json must hold a JSON object, got {type(hf).__name__}")
    return hf


class Model(CheckpointView):
    """A checkpoint seen as a Mixtral (CheckpointView), with its config.json and where it came from.

    `path`: a folder with config.json (Hugging Face or mixtral-ms layout, or a dense Mistral), or one
    training checkpoint file (MindSpore .ckpt or .safetensors; optimizer state dropped) with `config`
    (config.json, its folder or the run YAML). A .ckpt is read whole through MindSpore (load.read_ckpt);
    everything else is read lazily.
    A dense Mistral reads as one expert per layer and no router (`gate()` is None); its MLP names
    (`mlp.gate_proj.weight`, ...) name that expert in `tensor()`, as the dense layers of an upcycled
    layer pattern ask for them."""

    def __init__(self, path: str, config: Optional[str] = None) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such folder or file {path}")
        if not os.path.isdir(path) and not config:
            raise SurgeryError(f"{path} is a file; name its model with --config (config.json or the run YAML)")
        self.path = path
        self.hf = read_config(config or path)
        self.dense = self.hf.get("model_type") == "mistral"
        if not self.dense and self.hf.get("model_type") != "mixtral":
            raise SurgeryError(f"{path}: model_type {self.hf.get('model_type')!r}; expected mixtral or mistral")
        super().__init__(open_tensors(path), self.hf)

    def tensor(self, name: str) -> TensorInfo:
        parsed = parse(name)
        if self.dense and parsed is not None and parsed.kind is Kind.MLP:
            return self.expert(parsed.stack().name, 0)
        return super().tensor(name)

    def gate(self, layer: int) -> Optional[TensorInfo]:
        return None if self.dense else self.tensor(ParamName(Kind.ROUTER, layer).name)

    def row(self, layer: int, e: int) -> TensorInfo:
        return self.gate(layer).part(e, self.num_experts)

    def router_bias(self, layer: int) -> np.ndarray:
        """float32 [E]: the aux-loss-free balancing bias of a layer's router (zeros if the model has none)."""
        infos = self.stored.get(ParamName(Kind.ROUTER_BIAS, layer).name)
        return to_numpy(infos[0]).astype(np.float32) if infos else np.zeros(self.num_experts, np.float32)


def mixtral_config(mistral: Dict, experts: int, top_k: int) -> Dict:
    """The Mixtral config.json of a Mistral's upcycling: every field kept, the MoE fields added."""
    out = {k: v for k, v in mistral.items() if k not in ("architectures", "model_type")}
    out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
               num_experts_per_tok=top_k, router_aux_loss_coef=0.02, router_jitter_noise=0.0,
               output_router_logits=False)
    return out


# ----------------------------------------------------------------------------------------------- computed tensors

def _rng(seed: int, layer: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, layer, _KIND[kind], index])


def _encode(values: np.ndarray, tag: str) -> bytes:
    return convert_bytes(np.ascontiguousarray(values, np.float32).tobytes(), "F32", tag)


def _random(info_like: TensorInfo, std: float, rng_args: Tuple) -> Callable[[], bytes]:
    """N(0, std) of `info_like`'s shape and dtype, drawn when written."""
    return lambda: _encode(_rng(*rng_args).normal(0.0, std, info_like.shape), info_like.dtype)


def _noisy(info: TensorInfo, noise: float, rng_args: Tuple) -> Callable[[], bytes]:
    """A copy of `info` plus N(0, (noise * rms(info))^2)."""
    def make() -> bytes:
        values = to_numpy(info).astype(np.float64)
        rms = float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0
        return _encode(values + _rng(*rng_args).normal(0.0, noise * rms, values.shape), info.dtype)
    return make


def _average(infos: Sequence[TensorInfo], weights: Sequence[float]) -> Callable:
    """sum_i w_i x_i / sum_i w_i in float64, narrowed to the dtype once, streamed chunk by chunk."""
    total, tag = float(sum(weights)), infos[0].dtype

    def chunks():
        for parts in zip(*(i.iter_chunks(CHUNK_BYTES) for i in infos)):  # CHUNK_BYTES: whole elements
            acc = sum(w * np.frombuffer(convert_bytes(p, tag, "F32"), np.float32).astype(np.float64)
                      for w, p in zip(weights, parts))
            yield _encode(acc / total, tag)
    return chunks


# ----------------------------------------------------------------------------------------------- plans

class Plan:
    """What an operation writes: per parameter (mixtral-ms names, checkpoint order) its dtype, shape and
    sources (one per expert / router row for stacked experts and the router), plus the config and record."""

    def __init__(self, hf: Dict, record: Dict) -> None:
        self.hf, self.record = hf, record
        self.params: List[Tuple[str, str, Tuple[int, ...], List[Source]]] = []

    def add(self, name: str, dtype: str, shape: Sequence[int], sources: List[Source]) -> None:
        # A .ckpt's tensors are in memory (ArrayTensor): written as their bytes; byte ranges are copied.
        sources = [s.read if isinstance(s, ArrayTensor) else s for s in sources]
        self.params.append((name, dtype, tuple(shape), sources))

    def items(self, layout: str) -> List[Tuple[str, str, Tuple[int, ...], object]]:
        """(name, dtype, shape, source) to write in `layout`: ms stacks each expert list, hf splits it."""
        out = []
        for name, dtype, shape, sources in self.params:
            if layout == "hf" and is_expert_stack(name):
                out += [(hf, dtype, shape[1:], src) for hf, src in zip(ms_to_hf(name, shape[0]), sources)]
            else:
                out.append((name, dtype, shape, sources))
        return out


def _check_top_k(top_k: int, experts: int, what: str) -> None:
    if top_k < 1:
        raise SurgeryError(f"num_experts_per_tok must be at least 1, got {top_k}")
    if experts < top_k:
        raise SurgeryError(f"{what} leaves {experts} expert(s) per layer, fewer than num_experts_per_tok ({top_k})")


def _build(models: Sequence[Model], hf: Dict, record: Dict, origin: Callable[[int], List[Tuple[int, int]]],
           expert_source: Callable, gate_rows: Callable, dense_source: Callable) -> Plan:
    """The plan of an output Mixtral whose layer i holds the experts `origin(i)` = [(branch, expert)] (as
    `expert_source(name, layer, j, branch, expert)` makes them), router rows `gate_rows(layer, dtype)`
    and every other parameter `dense_source(name)`."""
    plan = Plan(hf, record)
    for name, spec in parameter_specs(hf_dims(hf)).items():
        kind, layer = parse(name)[:2]
        if kind is Kind.EXPERTS:
            pairs = origin(layer)
            dtype = source_dtype([models[b].expert(name, e) for b, e in pairs])
            plan.add(name, dtype, spec.shape, [expert_source(name, layer, j, b, e) for j, (b, e) in enumerate(pairs)])
        elif kind is Kind.ROUTER:
            like = [m.tensor(ParamName(Kind.NORM, layer, "input_layernorm").name) if m.dense else m.gate(layer)
                    for m in models]
            plan.add(name, source_dtype(like), spec.shape, gate_rows(layer, source_dtype(like)))
        elif kind is Kind.ROUTER_BIAS:  # each expert keeps its source's bias; a random one (record: None) starts at 0
            fresh = [p is None for p in (record.get("experts") or [[]] * (layer + 1))[layer]]
            values = np.array([0.0 if j < len(fresh) and fresh[j] else models[b].router_bias(layer)[e]
                               for j, (b, e) in enumerate(origin(layer))], np.float32)
            plan.add(name, "F32", spec.shape, [values.tobytes])
        else:
            plan.add(name, source_dtype([m.tensor(name) for m in models]), spec.shape, [dense_source(name)])
    return plan


def _new_row(model: Model, layer: int, index: int, dtype: str, seed: int, std: float) -> Callable[[], bytes]:
    like = TensorInfo("gate_row", dtype, (model.dims.hidden_size,), "", 0, 0)
    return _random(like, std, (seed, layer, "gate", index))


def _init_std(hf: Dict) -> float:
    return float(hf.get("initializer_range") or 0.02)


def plan_extract(model: Model, keep: Sequence[Sequence[int]]) -> Plan:
    """`keep`: one list of expert ids for every layer, or one list per layer (equal lengths)."""
    if model.dense:
        raise SurgeryError(f"{model.path} is a dense Mistral; extract needs a Mixtral")
    lists = [list(k) for k in keep]
    if len(lists) == 1:
        lists *= model.num_layers
    if len(lists) != model.num_layers:
        raise SurgeryError(f"got {len(lists)} per-layer expert lists for a model of {model.num_layers} layers")
    for layer, ids in enumerate(lists):
        bad = [e for e in ids if not 0 <= e < model.num_experts]
        if bad:
            raise SurgeryError(f"layer {layer}: expert id {bad[0]} out of range (the model has "
                               f"{model.num_experts} experts, ids 0..{model.num_experts - 1})")
        if len(set(ids)) != len(ids):
            raise SurgeryError(f"layer {layer}: expert id {next(e for e in ids if ids.count(e) > 1)} repeated")
    if len({len(ids) for ids in lists}) != 1:
        raise SurgeryError(f"every layer must keep the same number of experts (stacked weights); got "
                           f"{[len(ids) for ids in lists]}")
    count = len(lists[0])
    _check_top_k(model.dims.num_experts_per_tok, count, "extract")
    hf = {**model.hf, "num_local_experts": count}
    record = {"operation": "extract", "sources": [model.path], "experts": [[[0, e] for e in ids] for ids in lists]}
    if model.dims.router_type == "rre":
        group = _rre_group(model, lists)
        hf["rre_groups"], record["rre_group"] = 1, group
    return _build([model], hf, record, lambda i: [(0, e) for e in lists[i]],
                  lambda name, layer, j, b, e: model.expert(name, e),
                  lambda layer, dtype: [model.row(layer, e) for e in lists[layer]],
                  model.tensor)


def _rre_group(model: Model, lists: Sequence[Sequence[int]]) -> int:
    """The domain group that `lists` keeps in every layer, in order: with rre_groups 1 and the same
    rre_seed the extract then routes that domain's tokens to the same experts (rre.py); else refused."""
    dims = model.dims
    groups = [group_experts(dims, g) for g in range(dims.rre_groups)]
    for g, ids in enumerate(groups):
        if all(list(kept) == ids for kept in lists):
            return g
    named = " or ".join(",".join(map(str, ids)) for ids in groups)
    got = lists[:1] if all(list(k) == list(lists[0]) for k in lists) else lists
    raise SurgeryError(f"router_type rre routes by domain group: --experts must be one whole group, in order, "
                       f"in every layer ({named}); got {';'.join(','.join(map(str, k)) for k in got)}")


def _refuse_rre(model: Model, operation: str) -> None:
    """grow and mix change the expert count, so rre's equal domain groups (rre.group_experts) would change
    size and mix the old experts across groups: refused rather than silently re-routing every domain."""
    if model.dims.router_type == "rre":
        raise SurgeryError(f"{operation} of a router_type rre model would change its domain groups "
                           f"({model.dims.rre_groups} groups of {model.num_experts // model.dims.rre_groups} "
                           f"experts) and re-route every domain; {operation} is for the other routers")


def plan_grow(model: Model, add: int, init: str, seed: int = 0, noise: float = 0.01) -> Plan:
    if model.dense:
        raise SurgeryError(f"{model.path} is a dense Mistral; grow needs a Mixtral (upcycle it first)")
    _refuse_rre(model, "grow")
    if add < 1:
        raise SurgeryError(f"--add must be at least 1, got {add}")
    if init not in INITS:
        raise SurgeryError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if not (noise >= 0 and np.isfinite(noise)):
        raise SurgeryError(f"--noise must be a non-negative number, got {noise}")
    old, std = model.num_experts, _init_std(model.hf)
    origin = [(0, e) for e in range(old)] + [(0, j % old) for j in range(add)]
    hf = {**model.hf, "num_local_experts": old + add}
    record = {"operation": "grow", "sources": [model.path], "init": init, "seed": seed,
              **({"noise": noise} if init == "copy-noise" else {}), "new_experts": list(range(old, old + add)),
              "experts": [[list(p) if j < old or init != "random" else None for j, p in enumerate(origin)]
                          for _ in range(model.num_layers)]}

    def expert(name, layer, j, b, e):
        info = model.expert(name, e)
        if j < old or init == "copy":
            return info
        kind = parse(name).proj
        if init == "copy-noise":
            return _noisy(info, noise, (seed, layer, kind, j))
        return _random(info, std, (seed, layer, kind, j))

    def rows(layer, dtype):
        out = [model.row(layer, e) for e in range(old)]
        for j in range(old, old + add):
            if init == "random":
                out.append(_new_row(model, layer, j, dtype, seed, std))
            elif init == "copy-noise":
                out.append(_noisy(model.row(layer, j % old), noise, (seed, layer, "gate", j)))
            else:
                out.append(model.row(layer, j % old))
        return out
    return _build([model], hf, record, lambda i: origin, expert, rows, model.tensor)


def plan_upcycle(model: Model, experts: int, top_k: int = 2, seed: int = 0, moe_layer_freq: int = 1,
                 first_k_dense: int = 0) -> Plan:
    """Every FFN copied into `experts` experts behind a new router; with `moe_layer_freq` k only every k-th
    layer (GShard, Switch), and none of the first `first_k_dense`: the others stay dense (schema.moe_layers)."""
    if not model.dense:
        raise SurgeryError(f"{model.path} is already a Mixtral; upcycle needs a dense MistralForCausalLM")
    if experts < 1:
        raise SurgeryError(f"--experts must be at least 1, got {experts}")
    _check_top_k(top_k, experts, "upcycle")
    hf = mixtral_config(model.hf, experts, top_k)
    if moe_layer_freq != 1 or first_k_dense:
        hf.update(moe_layer_freq=moe_layer_freq, first_k_dense=first_k_dense)
    sparse = moe_layers(hf_dims(hf))  # the pattern checked here: ConfigError (one line) if it leaves none
    record = {"operation": "upcycle", "sources": [model.path], "seed": seed,
              "experts": [[[0, 0]] * experts if i in sparse else [] for i in range(model.num_layers)]}
    std = _init_std(hf)
    return _build([model], hf, record, lambda i: [(0, 0)] * experts,
                  lambda name, layer, j, b, e: model.expert(name, 0),
                  lambda layer, dtype: [_new_row(model, layer, j, dtype, seed, std) for j in range(experts)],
                  model.tensor)


def plan_mix(models: Sequence[Model], weights: Optional[Sequence[float]] = None, router: str = "new",
             top_k: Optional[int] = None, seed: int = 0) -> Plan:
    if len(models) < 2:
        raise SurgeryError(f"mix needs at least 2 branches, got {len(models)}")
    first = models[0]
    for m in models[1:]:
        if m.dense != first.dense:
            raise SurgeryError(f"branches of different kinds: {first.path} is "
                               f"{'dense' if first.dense else 'a Mixtral'}, {m.path} is "
                               f"{'dense' if m.dense else 'a Mixtral'}")
        diff = [k for k in SHAPE_FIELDS if getattr(m.dims, k) != getattr(first.dims, k)]
        if diff:
            raise SurgeryError(f"branches of different shapes: {diff[0]} is {getattr(first.dims, diff[0])} in "
                               f"{first.path} but {getattr(m.dims, diff[0])} in {m.path}")
        routing = [k for k in ("router_type",) + (() if top_k is not None else ("num_experts_per_tok",))
                   if getattr(m.dims, k) != getattr(first.dims, k)]
        if routing:
            raise SurgeryError(f"branches route differently: {routing[0]} is {getattr(first.dims, routing[0])!r} "
                               f"in {first.path} but {getattr(m.dims, routing[0])!r} in {m.path}"
                               + ("; pass --top-k" if routing[0] == "num_experts_per_tok" else ""))
    _refuse_rre(first, "mix")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise SurgeryError(f"--weights gives {len(weights)} weight(s) for {len(models)} branches")
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise SurgeryError(f"--weights must be non-negative with a positive sum, got {weights}")
    if router not in ROUTERS:
        raise SurgeryError(f"--router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if first.dense and router != "new":
        raise SurgeryError(f"dense branches have no router rows to {router}; use --router new")
    per = first.num_experts
    total = per * len(models)
    if top_k is None:  # an explicit 0 is refused below, not taken for the default
        top_k = 2 if first.dense else first.dims.num_experts_per_tok
    _check_top_k(top_k, total, "mix")
    hf = mixtral_config(first.hf, total, top_k) if first.dense else \
        {**first.hf, "num_local_experts": total, "num_experts_per_tok": top_k}
    origin = [(b, e) for b in range(len(models)) for e in range(per)]
    record = {"operation": "mix", "sources": [m.path for m in models], "weights": weights, "router": router,
              "seed": seed, "experts": [[list(p) for p in origin] for _ in range(first.num_layers)]}
    std = _init_std(hf)

    def rows(layer, dtype):
        if router == "new":
            return [_new_row(first, layer, j, dtype, seed, std) for j in range(total)]
        if router == "concat":
            return [models[b].row(layer, e) for b, e in origin]
        return [_average([m.row(layer, e) for m in models], weights) for _, e in origin]

    def dense(name):
        infos = [m.tensor(name) for m in models]
        return _average(infos, weights)
    return _build(models, hf, record, lambda i: origin,
                  lambda name, layer, j, b, e: models[b].expert(name, e), rows, dense)


# ----------------------------------------------------------------------------------------------- writing

def write(plan: Plan, dst: str, layout: str, overwrite: bool = False, shard_size: int = DEFAULT_SHARD,
          progress=None) -> Dict[str, object]:
    """Write the plan as a complete checkpoint folder in `layout` (ms: stacked experts; hf: per expert)."""
    if layout not in LAYOUTS:
        raise SurgeryError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    sources = plan.record["sources"]
    refuse_overlap(sources, dst)
    record = {**plan.record, "sources": [os.path.abspath(s) for s in sources], "layout": layout}
    previous = _previous_records(sources)
    if previous:
        record["previous"] = previous

    def write_files(folder: str) -> None:
        json_files({"config.json": plan.hf})(folder)
        with open(os.path.join(folder, "surgery.json"), "w", encoding="utf-8") as f:  # one key per line
            f.write("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")
    items = plan.items(layout)
    result = write_checkpoint(sources[0], dst, items, write_files, folder_of(sources[0]), overwrite, shard_size,
                              MS_METADATA if layout == "ms" else HF_METADATA, progress)
    return {"tensors": result["tensors"], "bytes": result["bytes"], "files": result["files"],
            "experts": plan.hf["num_local_experts"], "top_k": plan.hf["num_experts_per_tok"]}


def _previous_records(sources: Sequence[str]) -> Dict[str, Dict]:
    """{source: its surgery.json} for the sources made by an earlier surgery: this surgery's record
    (written after the side files, so never the source's copy) keeps their history."""
    out = {}
    for src in sources:
        path = os.path.join(folder_of(src), "surgery.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    out[os.path.abspath(src)] = json.load(f)
            except (OSError, ValueError) as err:
                raise SurgeryError(f"{path}: unreadable surgery record ({err})") from None
    return out


def parse_expert_lists(text: str) -> List[List[int]]:
    """'0,3,5' (every layer) or '0,3;1,2' (one list per layer, ';' between layers)."""
    try:
        return [[int(e) for e in part.split(",")] for part in text.split(";")]
    except ValueError:
        raise SurgeryError(f"--experts must be comma-separated ids, ';' between per-layer lists; got {text!r}") \
            from None
