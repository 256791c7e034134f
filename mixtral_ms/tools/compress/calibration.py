"""Calibration: run the model as it is (eval mode, dropless, PyNative; its router bias, sigmoid scores and
shared experts included) over calibration text and keep, per MoE layer, what the compression methods need.
One .npz file; its JSON metadata holds the model's fingerprint, so a file from another model is refused.

Row l of every array is the l-th MoE layer, model layer `meta["moe_layers"][l]` (the layer pattern's dense
layers have no router and no row). Per row (T calibration tokens, E experts, N sample tokens, H hidden):
  counts [L, E]            assignments (top-k choices, bias included) per expert: usage for merge/densify
  weight_sum [L, E]        sum of the renormalised routing weights per expert (mean weight = / counts)
  prob_sum [L, E]          sum of the router's probabilities per expert (softmax, or sigmoid scores / their sum)
  mean_output [L, E, H]    each expert's mean output over all T tokens, routed or not (HC-SMoE's features)
  skip_ratio_median [L]    median of w_2 / w_1 (second over first routing weight): dynamic skipping's beta
  sample_logits [L, N, E]  router logits of the first N tokens (fp32)
  sample_outputs [L, E, N, H]  every routed expert's output on those tokens: prune's search evaluates each
                           subset of experts from these (size L*E*N*H*4 bytes: 4.3 GB for 8x7B at N = 1024);
                           the shared experts add the same to every subset's output, so they are not kept
The MoE inputs come from a forward pre-hook on each `block_sparse_moe`: the model's forward is untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from mixtral_ms.outputs import file_target, replacing
from mixtral_ms.tools.compress import CompressionError
from mixtral_ms.tools.compress.source import SourceModel

FORMAT = "mixtral-ms calibration"
VERSION = 1
_ARRAYS = ("counts", "weight_sum", "prob_sum", "mean_output", "skip_ratio_median", "sample_logits", "sample_outputs")
_CHUNK_FLOATS = 1 << 24  # expert outputs computed for at most this many floats at a time (64 MB)


@dataclass
class Calibration:
    meta: dict
    counts: np.ndarray
    weight_sum: np.ndarray
    prob_sum: np.ndarray
    mean_output: np.ndarray
    skip_ratio_median: np.ndarray
    sample_logits: np.ndarray
    sample_outputs: np.ndarray


class _LayerStats:
    """Running sums for one MoE layer."""

    def __init__(self, num_experts: int, hidden: int, sample_tokens: int) -> None:
        e = num_experts
        self.counts, self.weight_sum, self.prob_sum = np.zeros(e), np.zeros(e), np.zeros(e)
        self.out_sum = np.zeros((e, hidden))
        self.tokens = 0
        self.ratios = []
        self.sample_left = sample_tokens
        self.logits, self.outputs = [], []

    def add(self, block, x) -> None:
        """x: the MoE block's input [B, S, H] (every token valid: pre-training samples have no padding)."""
        from mindspore import ops
        e = block.num_experts
        flat = x.reshape(-1, x.shape[-1])
        logits, probs, weights, index, _ = (t.asnumpy() for t in block.gate(flat))
        index = index.reshape(-1)
        self.counts += np.bincount(index, minlength=e)
        self.weight_sum += np.bincount(index, weights=weights.reshape(-1).astype(np.float64), minlength=e)
        self.prob_sum += probs.sum(axis=0)
        if weights.shape[1] > 1:
            self.ratios.append(weights[:, 1] / weights[:, 0])
        rows = max(1, _CHUNK_FLOATS // (e * flat.shape[1]))
        for start in range(0, flat.shape[0], rows):
            part = flat[start:start + rows]
            out = block.experts(ops.broadcast_to(part.expand_dims(0), (e,) + part.shape)).asnumpy()  # [E, n, H]
            self.out_sum += out.sum(axis=1, dtype=np.float64)
            if self.sample_left > 0:
                take = min(self.sample_left, out.shape[1])
                self.logits.append(logits[start:start + take])
                self.outputs.append(out[:, :take])
                self.sample_left -= take
        self.tokens += flat.shape[0]

    def arrays(self) -> Dict[str, np.ndarray]:
        ratio = np.median(np.concatenate(self.ratios)) if self.ratios else np.nan
        return {"counts": self.counts, "weight_sum": self.weight_sum, "prob_sum": self.prob_sum,
                "mean_output": (self.out_sum / self.tokens).astype(np.float32),
                "skip_ratio_median": np.float64(ratio),
                "sample_logits": np.concatenate(self.logits).astype(np.float32),
                "sample_outputs": np.concatenate(self.outputs, axis=1).astype(np.float32)}


def _batches(data: str, batch_size: int, max_tokens: int):
    """input_ids batches from a MindRecord file until `max_tokens` tokens."""
    from mixtral_ms.run.data import DataError, mindrecord_info
    import mindspore.dataset as ds
    try:
        info = mindrecord_info(data)
    except DataError as err:
        raise CompressionError(str(err)) from None
    per_sample = info["seq_length"]
    left = max_tokens
    dataset = ds.MindDataset(data, columns_list=["input_ids"], shuffle=False)
    batch = []
    for (ids,) in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        batch.append(ids.astype(np.int32))
        left -= per_sample
        if len(batch) == batch_size or left <= 0:
            yield np.stack(batch)
            batch = []
        if left <= 0:
            return
    if batch:
        yield np.stack(batch)


def calibrate(model_dir: str, data: str, out: str, max_tokens: int = 32768, sample_tokens: int = 1024,
              batch_size: int = 4, overwrite: bool = False,
              progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write the calibration file `out` (via a temp file + rename); returns its metadata."""
    if max_tokens <= 0 or sample_tokens <= 0 or batch_size <= 0:
        raise CompressionError("--max_tokens, --sample_tokens and --batch_size must be positive")
    source = SourceModel(model_dir)
    source.check_learned_router("calibrate")
    if os.path.isdir(out):
        raise CompressionError(f"calibration output {out} is a folder; give a file name (X.npz)")
    if os.path.exists(out) and not overwrite:
        raise CompressionError(f"{out} exists; pass --overwrite to replace it")
    if not out.endswith(".npz"):
        raise CompressionError(f"calibration output {out} must end in .npz")
    file_target(out, "calibration output")  # writable: checked before the forward passes, not after
    batches = _batches(data, batch_size, max_tokens)
    first = next(batches, None)
    if first is None:
        raise CompressionError(f"{data} holds no samples")

    import mindspore as ms
    from mindspore import Tensor
    from mixtral_ms.model.modeling import MixtralForCausalLM
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = MixtralForCausalLM.from_pretrained(model_dir, inference_capacity_factor=0.0, dynamic_skip_betas=None)
    model.set_train(False)
    config = model.config
    blocks = [model.model.layers[layer].block_sparse_moe for layer in source.moe_layers]
    stats = [_LayerStats(config.num_local_experts, config.hidden_size, sample_tokens) for _ in blocks]
    inputs = {}
    handles = [block.register_forward_pre_hook(lambda cell, args, row=row: inputs.__setitem__(row, args[0]))
               for row, block in enumerate(blocks)]
    try:
        batch = first
        while batch is not None:
            if batch.min() < 0 or batch.max() >= config.vocab_size:  # data tokenized for another model
                bad = int(batch.min()) if batch.min() < 0 else int(batch.max())
                raise CompressionError(f"{data} holds token id {bad}, outside the model's vocabulary "
                                       f"[0, {config.vocab_size}); calibrate on data of its tokenizer")
            model(Tensor(batch))
            for row, block in enumerate(blocks):
                stats[row].add(block, inputs.pop(row))
            if progress:
                progress(f"calibrated on {stats[0].tokens} tokens")
            batch = next(batches, None)
    finally:
        for handle in handles:
            handle.remove()

    per_layer = [s.arrays() for s in stats]
    arrays = {name: np.stack([layer[name] for layer in per_layer]) for name in _ARRAYS}
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": source.fingerprint(), "model": model_dir,
            "data": data, "tokens": stats[0].tokens, "sample_tokens": int(arrays["sample_logits"].shape[1]),
            "num_hidden_layers": config.num_hidden_layers, "moe_layers": list(source.moe_layers),
            "num_local_experts": config.num_local_experts,
            "num_experts_per_tok": config.num_experts_per_tok, "hidden_size": config.hidden_size}
    _save(out, {"meta": np.array(json.dumps(meta)), **arrays})
    return meta


def _save(out: str, arrays: Dict[str, np.ndarray]) -> None:
    """np.savez's format (a zip of .npy files), written whole or not at all (outputs.replacing). The free
    space is checked first; a write error still raises once and leaves the old file: np.savez leaves its
    zip open on an error, and the zip's finaliser then fails again ("Exception ignored ...")."""
    need = sum(a.nbytes for a in arrays.values()) + (1 << 20)
    with replacing(out, "calibration output") as tmp:
        folder = os.path.dirname(tmp)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise CompressionError(f"disk full: the calibration file {out} needs {need / 2**20:.1f} MiB, "
                                   f"{free / 2**20:.1f} MiB free in {folder}")
        try:
            archive = zipfile.ZipFile(tmp, "w", allowZip64=True)
            written = False
            try:
                for name, array in arrays.items():
                    with archive.open(name + ".npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
                written = True
            finally:
                try:
                    archive.close()  # closes the file even when writing the zip's directory fails
                except OSError:
                    if written:
                        raise
        except OSError as err:  # a disk that filled up meanwhile, a file size limit
            raise CompressionError(f"writing the calibration file {out} failed: {err.strerror or err} "
                                   f"({shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder})") from None


def load_calibration(path: Optional[str], source: SourceModel) -> Calibration:
    """The calibration file for `source`, refused if missing, malformed or from another model."""
    if not path or not os.path.isfile(path):
        raise CompressionError(f"no calibration file {path}; run `scripts/compress.py calibrate --model "
                               f"{source.folder} --data X.mindrecord --out {path or 'FILE'}` first")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {name: f[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # empty, truncated, other
        raise CompressionError(f"{path} is not a calibration file ({' '.join(str(err).split())})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CompressionError(f"{path} is not a {FORMAT} file of version {VERSION}")
    if meta.get("fingerprint") != source.fingerprint():
        raise CompressionError(f"calibration file {path} is from another model ({meta.get('model')}); "
                               f"calibrate {source.folder} itself")
    return Calibration(meta=meta, **arrays)
