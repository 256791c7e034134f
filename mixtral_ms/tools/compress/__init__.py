"""Smaller Mixtrals from a trained one (scripts/compress.py; docs/compression.md).

- source.py: the checkpoint to compress (either layout, read lazily) and its fingerprint.
- calibration.py: run the model (eval mode, dropless) over calibration text and keep, per MoE layer, what
  the methods need; one .npz file tied to the model by a fingerprint.
- algorithms.py: the numpy decisions: which experts to keep (Lu et al. 2024, routed as the model's router
  routes: sigmoid scores, the aux-loss-free bias), how to cluster them (HC-SMoE), usage-weighted averages,
  dynamic-skipping thresholds.
- the int8 weight format is mixtral_ms/model/int8.py (numpy); moe.Int8Experts computes with it.
- methods.py: prune, merge, densify, quantize and skip, each writing a complete checkpoint folder.
Everything but calibration is numpy only (no MindSpore import) and writes one expert at a time.
"""
from mixtral_ms.cli import BadInput


class CompressionError(BadInput, ValueError):
    """An input the compression tools refuse: the one-line message says why."""
