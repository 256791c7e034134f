"""Held-out evaluation: per-token cross-entropy and perplexity of a checkpoint on a MindRecord.

Forward passes only (the model in eval mode, no gradients, no optimizer), so the MoE is dropless unless
the config sets `inference_capacity_factor`; the JSON reports the dropped assignments to show it. Each
batch's CE is the model's own loss (`model(ids, labels=...)`, the training loss' CE term: next-token,
-100 labels ignored), weighted by the batch's predicted tokens, so the result is the mean over every
predicted token of the file whatever the batch size: `ppl = exp(ce)`.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional

import numpy as np

from mixtral_ms.outputs import file_target, write_json
from mixtral_ms.run.data import DOMAIN_COLUMN, IGNORE, DataError, check_dataset, mindrecord_files, mindrecord_info
from mixtral_ms.checkpoint.safetensors_io import CheckpointError


def evaluate(model, dataset: str, batch_size: int, max_samples: Optional[int] = None) -> Dict[str, object]:
    """CE and perplexity of `model` on the MindRecord `dataset` (columns input_ids, optional labels and
    domain_ids), reading its first `max_samples` samples (all by default) in order, `batch_size` at a time."""
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore import Tensor
    info = mindrecord_info(dataset)
    if info["seq_length"] > model.config.max_position_embeddings:
        raise DataError(f"{dataset} holds samples of {info['seq_length']} tokens, more than the model's "
                        f"max_position_embeddings ({model.config.max_position_embeddings})")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--eval_samples must be at least 1, got {max_samples}")
    data = ds.MindDataset(mindrecord_files(dataset), shuffle=False, num_samples=max_samples)
    model.set_train(False)
    nll = tokens = samples = dropped = 0.0
    has_labels, has_domains = "labels" in info["columns"], DOMAIN_COLUMN in info["columns"]
    for batch in data.batch(batch_size).create_dict_iterator(num_epochs=1, output_numpy=True):
        ids = batch["input_ids"].astype(np.int32)
        labels = batch["labels"].astype(np.int32) if has_labels else ids
        domains = Tensor(batch[DOMAIN_COLUMN].astype(np.int32)) if has_domains else None  # router_type rre
        count = int((labels[:, 1:] != IGNORE).sum())
        _, ce, _, _, _, drop = model(Tensor(ids), labels=Tensor(labels), domain_ids=domains)
        nll += float(ce.asnumpy().astype(np.float64)) * count
        tokens, samples, dropped = tokens + count, samples + len(ids), dropped + float(drop.asnumpy().sum())
    if tokens == 0:
        raise DataError(f"{dataset}: no token to predict (every label is {IGNORE})")
    ce = nll / tokens
    return {"dataset": os.path.abspath(dataset), "samples": int(samples), "tokens": int(tokens), "ce": ce,
            "ppl": math.exp(ce), "dropped_assignments": int(dropped), "batch_size": batch_size,
            "mode": "pynative" if ms.get_context("mode") == ms.PYNATIVE_MODE else "graph"}


def run_eval(config, build_model, dataset: Optional[str], output: Optional[str],
             max_samples: Optional[int] = None) -> Dict[str, object]:
    """run_mixtral.py --run_mode eval: the checkpoint (`config.load_checkpoint`) built by
    `build_model(checkpoint)`, evaluated on `dataset`; prints one line and writes the JSON to `output`
    (default `<output_dir>/eval.json`)."""
    if not dataset:
        raise DataError("eval needs --eval_dataset (a MindRecord file, e.g. a preprocess_data.py held-out split)")
    if not config.load_checkpoint:
        raise CheckpointError("eval needs --load_checkpoint (or load_checkpoint in the YAML)")
    output = output or os.path.join(config.output_dir, "eval.json")
    file_target(output, "eval output")  # a folder or an unwritable place: refused before the forward passes
    model_config = config.model.model_config  # the data is checked before the model is built
    check_dataset(dataset, int(model_config.seq_length), domain_groups=int(model_config.get("rre_groups") or 1))
    model = build_model(config.load_checkpoint)
    record = {"checkpoint": os.path.abspath(config.load_checkpoint),
              **evaluate(model, dataset, int(config.runner_config.batch_size), max_samples)}
    write_json(output, record, "eval output")
    print(f"eval: ce {record['ce']:.4f} ppl {record['ppl']:.2f} over {record['tokens']} tokens "
          f"({record['samples']} samples, {record['dropped_assignments']} dropped) -> {output}", flush=True)
    return record
