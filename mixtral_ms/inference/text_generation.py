"""`MixtralForCausalLM.generate` as MindFormers' text-generation pipeline calls it (`Trainer.predict`).

The pipeline tokenizes with `padding=True` (right padding, no attention mask passed on) and calls
`network.generate(input_ids, max_length=..., top_k=..., return_dict_in_generate=True, **extras)`, then
decodes `result["sequences"]` (prompt + continuation). This adapter turns that call into
mixtral_ms.inference.generation.generate: trailing padding becomes left padding with a mask, `max_length`
becomes `max_new_tokens`, and the sequences come back without padding or what follows EOS.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .generation import generate
from .prompts import continuation, left_pad

# Keywords the pipeline or Trainer.predict forward that say nothing about decoding.
_IGNORED = ("audio_processor", "image_processor", "is_full_config", "streamer", "use_past", "output_scores",
            "output_logits", "return_dict", "save_file")
_DECODING = ("do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "seed")


def pipeline_generate(model, input_ids, attention_mask=None, max_new_tokens: Optional[int] = None,
                      max_length: Optional[int] = None, return_dict_in_generate: bool = False,
                      **kwargs: Any):
    """See the module docstring. Unsupported decoding requests (beam search, repetition penalty) raise."""
    for key in _IGNORED:
        kwargs.pop(key, None)
    if kwargs.pop("num_beams", 1) not in (None, 1):
        raise ValueError("mixtral-ms generate supports greedy decoding and sampling, not beam search")
    if kwargs.pop("repetition_penalty", 1.0) not in (None, 1.0):
        raise ValueError("mixtral-ms generate does not implement repetition_penalty")
    unknown = sorted(k for k in kwargs if k not in _DECODING)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
    decoding = {k: v for k, v in kwargs.items() if v is not None}
    if not decoding.get("do_sample"):
        decoding.pop("top_k", None)  # the pipeline always sends top_k (1 by default); greedy ignores it

    rows = input_ids.asnumpy().tolist() if hasattr(input_ids, "asnumpy") else np.asarray(input_ids).tolist()
    if rows and not isinstance(rows[0], list):
        rows = [rows]
    pad = model.config.pad_token_id if decoding.get("pad_token_id") is None else decoding["pad_token_id"]
    masks = None if attention_mask is None else np.asarray(attention_mask).reshape(len(rows), -1)
    prompts = []
    for i, row in enumerate(rows):
        if masks is not None:
            prompts.append([t for t, m in zip(row, masks[i]) if m])
        else:
            end = len(row)
            while end > 1 and row[end - 1] == pad:  # the pipeline's right padding
                end -= 1
            prompts.append(row[:end])
    ids, mask = left_pad(prompts, pad)
    width = ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = max(1, max_length - width) if max_length else 32
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, **decoding)
    if not return_dict_in_generate:
        return out
    eos = decoding.get("eos_token_id", model.config.eos_token_id)
    return {"sequences": [list(prompt) + continuation(row, width, eos, keep_eos=True)
                          for prompt, row in zip(prompts, out)]}
