"""Smaller Mixtrals from a trained one (scripts/compress.py; docs/compression.md).

- calibration.py: run the model (eval mode, dropless) over calibration text and keep, per MoE layer, what
  the methods need; one .npz file tied to the model by a fingerprint.
- algorithms.py: the numpy decisions: which experts to keep (Lu et al. 2024), how to cluster them
  (HC-SMoE), usage-weighted averages, dynamic-skipping thresholds.
- methods.py: prune, merge, densify, quantize and skip, each writing a complete checkpoint folder.
"""


class CompressionError(ValueError):
    """An input the compression tools refuse: the one-line message says why."""
