"""Inference: KV-cache decoding (generation.py), `MixtralForCausalLM.generate`'s arguments as users and
MindFormers' text-generation pipeline pass them (text_generation.py), and prompt padding and EOS
trimming (prompts.py). A model is passed in; nothing here imports a model module."""
