"""`MixtralForCausalLM.generate`: Hugging Face's generate arguments, as callers and MindFormers'
text-generation pipeline (`Trainer.predict`) pass them, turned into one call of
mixtral_ms.inference.generation.generate (left-padded ids and mask).

One set of rules for every call: the rows are realigned to left padding when the mask is not
(right padding, as the pipeline's `padding=True`); without a mask, trailing `pad_token_id`s are
right padding; `max_length` (prompt + new) gives `max_new_tokens` when that is not set; with
`return_dict_in_generate` the result is `{"sequences": [prompt + continuation up to EOS]}` (what the
pipeline decodes), else the [B, W + new] ids. Keywords the pipeline forwards that say nothing about
decoding are ignored; beam search and repetition penalty raise.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from mixtral_ms.inference.generation import generate
from mixtral_ms.inference.prompts import continuation, left_pad

# Keywords the pipeline or Trainer.predict forward that say nothing about decoding.
_IGNORED = ("audio_processor", "image_processor", "is_full_config", "streamer", "use_past", "output_scores",
            "output_logits", "return_dict", "save_file")
_DECODING = ("do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "seed")


def text_generate(model, input_ids, attention_mask=None, max_new_tokens: Optional[int] = None,
                  max_length: Optional[int] = None, return_dict_in_generate: bool = False, **kwargs: Any):
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

    ids = np.asarray(input_ids.asnumpy() if hasattr(input_ids, "asnumpy") else input_ids)
    ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
    pad = model.config.pad_token_id if decoding.get("pad_token_id") is None else decoding["pad_token_id"]
    if attention_mask is None:
        mask = np.ones(ids.shape, np.float32)
        for row, tokens in zip(mask, ids):
            end = len(tokens)
            while end > 1 and tokens[end - 1] == pad:  # trailing padding (the pipeline's right padding)
                end -= 1
            row[end:] = 0
    else:
        mask = np.asarray(attention_mask.asnumpy() if hasattr(attention_mask, "asnumpy") else attention_mask,
                          np.float32)
        mask = mask.reshape(1, -1) if mask.ndim == 1 else mask
    prompts = [[int(t) for t, m in zip(tokens, row) if m] for tokens, row in zip(ids, mask)]
    left_aligned = all(row[len(row) - len(p):].all() for row, p in zip(mask, prompts))
    if not left_aligned:
        ids, mask = left_pad(prompts, pad)
    width = ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = max(1, max_length - width) if max_length else 32
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, **decoding)
    if not return_dict_in_generate:
        return out
    eos = decoding.get("eos_token_id", model.config.eos_token_id)
    return {"sequences": [prompt + continuation(row, width, eos, keep_eos=True) for prompt, row in zip(prompts, out)]}
