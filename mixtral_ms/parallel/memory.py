"""Per-device memory of a Mixtral run under a parallel layout: parameters, gradients, AdamW states,
with and without host offload of the optimizer states, plus a rough activation estimate.

    mixtral-ms-memory --config configs/parallel/mixtral_8x7b_pretrain_32p.yaml
    mixtral-ms-memory --config X.yaml --header         # the YAML header block
    mixtral-ms-memory --config X.yaml --write_header   # refresh it in place

Rules (the sharding plan's, mixtral_ms/parallel/plan.py, parameter by parameter):
- a parameter's slice is its shape divided by its strategy: experts by ep (and f, the expert FFN
  split), attention and the vocabulary by mp, layers by pipeline stage; the worst stage is reported;
- gradients: one per parameter slice, in the parameter dtype;
- AdamW (MindFormers' and OffloadAdamW): two fp32 moments per parameter; neither keeps an fp32 master
  copy (they update bf16 parameters in place through fp32 math), so the master copy is shown only as
  a separate what-if line for bf16/fp16 parameters (`--master_weights` adds it to the totals);
- optimizer sharding (`enable_parallel_optimizer`, MindSpore's parallel optimizer): a parameter
  replicated on r devices of its stage has its optimizer states and (level1+) its weights split r
  ways, gradients too with `optimizer_level: level2/level3`; parameters whose whole size is below
  `parallel_optimizer_threshold` (64 KB) or whose first slice dimension r does not divide stay whole
  (MindSpore's rules); `optimizer_weight_shard_size` caps r;
- offload (OffloadAdamW, or MindFormers AdamW `swap: True`): the optimizer states go to host DRAM.
GiB = 2^30 bytes.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from mixtral_ms.outputs import stale, temp_path
from mixtral_ms.model.schema import ModelDims, model_dims, moe_layers
from mixtral_ms.parallel.layout import ParallelConfigError, ParallelLayout, from_run_config
from mixtral_ms.parallel.plan import STATS_PREFIX, pass_capacity, plan_spec, replication

GIB = float(1 << 30)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OFFLOAD_OPTIMIZERS = ("OffloadAdamW",)


@dataclass
class StageMemory:
    """Bytes per device of one pipeline stage."""
    stage: int
    params: float = 0.0           # parameter count held per device (after sharding)
    param_bytes: float = 0.0
    grad_bytes: float = 0.0
    moment_bytes: float = 0.0     # AdamW m and v, fp32
    master_bytes: float = 0.0     # fp32 master copy (what-if, bf16/fp16 parameters)
    activation_bytes: float = 0.0

    def optimizer_bytes(self, master: bool) -> float:
        return self.moment_bytes + (self.master_bytes if master else 0.0)

    def device_total(self, offload: bool, master: bool, activations: bool = False) -> float:
        total = self.param_bytes + self.grad_bytes + (0.0 if offload else self.optimizer_bytes(master))
        return total + (self.activation_bytes if activations else 0.0)


@dataclass
class MemoryEstimate:
    layout: ParallelLayout
    dims: ModelDims
    run_mode: str
    offload: bool                 # what the config asks for
    master: bool
    optimizer: str
    stages: List[StageMemory] = field(default_factory=list)
    total_params: float = 0.0

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: (s.device_total(False, self.master, True), -s.stage))

    @property
    def training(self) -> bool:
        return self.run_mode in ("train", "finetune")


def _opt_shard(entry, layout: ParallelLayout, bytes_per: int) -> int:
    """MindSpore parallel optimizer group size for this parameter (1 = not sharded)."""
    if not layout.optimizer_shard:
        return 1
    r = replication(entry, layout)
    cfg = layout.parallel_optimizer_config
    cap = cfg.get("optimizer_weight_shard_size", -1)
    if cap and cap > 0 and r % cap == 0:
        r = cap
    threshold_kb = cfg.get("parallel_optimizer_threshold", 64)
    size = math.prod(entry.shapes[0]) * bytes_per  # the whole parameter's bytes, as MindSpore compares them
    if r <= 1 or size < threshold_kb * 1024 or entry.slice_shape(0)[0] % r:
        return 1
    return r


def _activations(d: ModelDims, layout: ParallelLayout, run_mode: str, stage: int, recompute: bool) -> float:
    """Rough bytes of activations kept per device on `stage` (compute dtype, fp32 attention probabilities).

    Per layer and micro-batch, with T tokens per data-parallel rank, S tokens per row, b rows:
    hidden-sized tensors ~ 10 * T * H (norms, residuals, attention in/out, MoE in/out), q/k/v/context
    4 * T * nH * D / mp, scores and fp32 probabilities 3 * b * nH/mp * S^2 (x2 bytes for fp32), MoE
    dispatch k*cf*T*f/mp slots of (2 H + 3 F/f) per device on MoE layers, a dense layer's MLP 3 * T * F / mp
    instead, shared experts 3 * T * N*F_s / mp. 1F1B keeps pp - stage micro-batches in flight; recompute keeps only each layer's input plus one layer's full set (being recomputed). Predict: the KV cache
    for max_position_embeddings is counted instead (2 * L * b * nKV/mp * P * D).
    """
    c = DTYPE_BYTES[d.compute_dtype] if d.compute_dtype in DTYPE_BYTES else 2
    mp, f = layout.model_parallel, layout.expert_ffn_split
    b = layout.batch_size
    s = d.seq_length
    t = b * s
    if run_mode not in ("train", "finetune"):
        return 0.0
    common = c * (10 * t * d.hidden_size + 4 * t * d.num_attention_heads * d.head_dim / mp)
    common += (c + 4 + 4) * b * (d.num_attention_heads / mp) * s * s
    # after the AllToAll a device holds E/ep experts x G/t groups x C slots = k*cf*t * f/mp slots
    slots = d.num_experts_per_tok * max(d.capacity_factor, 1.0) * t * f / mp
    moe = common + c * slots * (2 * d.hidden_size + 3 * d.intermediate_size / f)
    moe += c * 3 * t * d.num_shared_experts * d.shared_expert_intermediate_size / mp  # gate, up, product
    dense = common + c * 3 * t * d.intermediate_size / mp
    layers = layout.layers_per_stage
    sparse = sum(1 for i in moe_layers(d) if layout.stage_of_layer(i) == stage)
    in_flight = layout.pipeline_stage - stage if layout.pipeline_stage > 1 else 1
    copies = in_flight * layout.micro_batch_interleave_num
    if recompute:  # layer inputs of every micro-batch in flight, one layer's full set while it is recomputed
        return copies * layers * c * t * d.hidden_size + (moe if sparse else dense)
    return copies * (sparse * moe + (layers - sparse) * dense)


def kv_cache_bytes(d: ModelDims, layout: ParallelLayout, rows: int, positions: int) -> float:
    """Static KV cache of mixtral_ms.inference.generation per device: 2 * L/pp * rows/dp * nKV/mp * P * D * bytes."""
    c = DTYPE_BYTES.get(d.compute_dtype, 2)
    return (2 * layout.layers_per_stage * max(rows // layout.data_parallel, 1) *
            (d.num_key_value_heads / layout.model_parallel) * positions * d.head_dim * c)


def estimate(model: Any, layout: ParallelLayout, run_mode: str = "train", optimizer: str = "AdamW",
             offload: Optional[bool] = None, master_weights: bool = False) -> MemoryEstimate:
    d = model_dims(model)
    training = run_mode in ("train", "finetune")
    if offload is None:
        offload = optimizer in OFFLOAD_OPTIMIZERS
    pbytes = DTYPE_BYTES[d.param_init_type]
    master = bool(master_weights and pbytes < 4)
    table = plan_spec(d, layout, run_mode)
    level = layout.parallel_optimizer_config.get("optimizer_level", "level1")
    est = MemoryEstimate(layout, d, run_mode, offload, master, optimizer,
                         [StageMemory(s) for s in range(layout.pipeline_stage)])
    for name, entry in table.items():
        if entry.kind != "param" or name.startswith(STATS_PREFIX):  # a few hundred bytes, no optimizer state
            continue
        full = math.prod(entry.shapes[0])
        est.total_params += full
        local = full / math.prod(entry.strategy[0])
        r = _opt_shard(entry, layout, pbytes) if training else 1
        st = est.stages[entry.stage]
        st.params += local
        st.param_bytes += local * pbytes / r
        if training:
            st.grad_bytes += local * pbytes / (r if level in ("level2", "level3") else 1)
            st.moment_bytes += local * 8 / r
            if pbytes < 4:
                st.master_bytes += local * 4 / r
    for st in est.stages:
        st.activation_bytes = _activations(d, layout, run_mode, st.stage, layout.recompute)
    return est


def _g(x: float) -> str:
    return f"{x / GIB:.1f}"


def header_lines(est: MemoryEstimate, config_path: str) -> List[str]:
    """The comment block the shipped YAMLs carry (see --write_header)."""
    lay, w = est.layout, est.worst
    lines = [f"# Per-device memory ({lay.describe()}; mixtral-ms-memory --config {config_path}):"]
    if not est.training:
        lines.append(f"#   parameters {_g(w.param_bytes)} GiB ({w.params / 1e9:.2f} B of "
                     f"{est.total_params / 1e9:.1f} B "
                     f"{est.dims.param_init_type}); no gradients or optimizer states in predict; KV cache "
                     f"{_g(kv_cache_bytes(est.dims, lay, lay.micro_batch_rows(), est.dims.seq_length))} GiB "
                     f"for {lay.micro_batch_rows()} x {est.dims.seq_length} positions")
        return lines
    shard = "on" if lay.optimizer_shard else "off"
    lines += [
        f"#   worst stage {w.stage}: {w.params / 1e9:.2f} B parameters ({est.dims.param_init_type}) of "
        f"{est.total_params / 1e9:.1f} B; optimizer sharding {shard}",
        f"#   parameters {_g(w.param_bytes)} GiB | gradients {_g(w.grad_bytes)} GiB | AdamW moments (fp32) "
        f"{_g(w.moment_bytes)} GiB" + (f" | fp32 master (if kept) {_g(w.master_bytes)} GiB" if w.master_bytes else ""),
        f"#   total without offload {_g(w.device_total(False, est.master))} GiB on device",
        f"#   total with optimizer offload (OffloadAdamW) {_g(w.device_total(True, est.master))} GiB on device "
        f"+ {_g(w.optimizer_bytes(est.master))} GiB host DRAM per device "
        f"({_g(8 * w.optimizer_bytes(est.master))} GiB per 8-device node)",
        f"#   activations (rough, batch_size {lay.batch_size}, recompute {'on' if lay.recompute else 'off'}): "
        f"{_g(w.activation_bytes)} GiB",
        f"#   {capacity_line(est)}",
    ]
    return lines


def capacity_line(est: MemoryEstimate) -> str:
    """The expert capacity of one forward pass (plan.pass_capacity), what the dispatch buffers hold."""
    lay, d = est.layout, est.dims
    n, c = pass_capacity(d, lay)
    return (f"expert capacity per forward pass (one micro-batch of one interleaved copy, per data-parallel "
            f"shard): {n} tokens -> {c} slots per expert (capacity_factor {d.capacity_factor}); "
            f"{lay.passes_per_step} passes per step")


def report(est: MemoryEstimate, config_path: str = "") -> str:
    lay = est.layout
    out = [f"{config_path or 'model'}: {lay.describe()}, run_mode {est.run_mode}, parameters "
           f"{est.dims.param_init_type}, {est.total_params / 1e9:.2f} B in all; optimizer {est.optimizer}"
           f"{' (offload)' if est.offload else ''}, optimizer sharding {'on' if lay.optimizer_shard else 'off'}",
           "",
           "| stage | params/device (B) | parameters GiB | gradients GiB | AdamW moments GiB "
           "| fp32 master GiB (if kept) "
           "| total GiB, no offload | total GiB, offload (device + host) | activations GiB (rough) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for st in est.stages:
        out.append(f"| {st.stage} | {st.params / 1e9:.3f} | {_g(st.param_bytes)} | {_g(st.grad_bytes)} | "
                   f"{_g(st.moment_bytes)} | {_g(st.master_bytes) if st.master_bytes else '-'} | "
                   f"{_g(st.device_total(False, est.master))} | {_g(st.device_total(True, est.master))} + "
                   f"{_g(st.optimizer_bytes(est.master))} | {_g(st.activation_bytes)} |")
    w = est.worst
    if est.training:
        out += ["", capacity_line(est)]
    out += ["", f"worst stage {w.stage}: {_g(w.device_total(est.offload, est.master))} GiB on device as configured "
                f"({'offload' if est.offload else 'no offload'}), "
                f"{_g(w.device_total(est.offload, est.master, True))} GiB with the rough activations"]
    if not est.training:
        out.append(f"KV cache (predict, {lay.micro_batch_rows()} rows x {est.dims.seq_length} positions): "
                   f"{_g(kv_cache_bytes(est.dims, lay, lay.micro_batch_rows(), est.dims.seq_length))} GiB per device")
    return "\n".join(out)


HEADER_START = "# --- memory estimate (generated: mixtral-ms-memory --config <this file> --write_header) ---"
HEADER_END = "# --- end memory estimate ---"


def from_run_config_estimate(cfg: Mapping[str, Any], devices: Optional[int] = None,
                             master_weights: bool = False) -> MemoryEstimate:
    """The estimate of a whole run YAML (as run_yaml.read_run_yaml reads it)."""
    layout = from_run_config(cfg, devices)
    optimizer = (cfg.get("optimizer") or {})
    offload = optimizer.get("type") in OFFLOAD_OPTIMIZERS and optimizer.get("offload", True) or \
        bool(optimizer.get("swap", False))
    return estimate((cfg.get("model") or {}).get("model_config") or {}, layout, cfg.get("run_mode", "train"),
                    optimizer.get("type", "AdamW"), offload, master_weights)


def header_block(path: str, est: MemoryEstimate) -> str:
    return "\n".join([HEADER_START] + header_lines(est, path) + [HEADER_END])


def write_header(path: str, est: MemoryEstimate) -> None:
    """Refresh the header block in place via a temp file + rename (the YAML is whole or untouched); a
    read-only YAML is refused, not replaced."""
    if not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222:  # no write bit: read-only, even for root
        raise ParallelConfigError(f"{path} is read-only; not writing the header (use --header to print it)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    block = header_block(path, est)
    pattern = re.compile(re.escape(HEADER_START) + r".*?" + re.escape(HEADER_END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else block + "\n" + text
    for old in stale(path, "tmp", hidden=True):  # a killed run's half-written copy
        os.remove(old)
    tmp = temp_path(path, hidden=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
