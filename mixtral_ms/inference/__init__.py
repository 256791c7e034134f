"""Inference: KV-cache decoding (generation.py) and the adapter for MindFormers' text-generation
pipeline (text_generation.py). Imports only the model's public surface; the model imports nothing here
at module level."""
