"""Prompt batches in and continuations out: the check of a batch before any graph sees it, the left
padding `generate` expects and EOS trimming."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def check_batch(vocab_size: int, input_ids, attention_mask=None, labels=None, ignore_index: int = -100) -> None:
    """Raise ValueError (one line) unless `input_ids` is an integer [B, S] (or [S]) batch of ids in
    [0, vocab_size), `attention_mask` has its shape and holds 0/1, and `labels` has its shape and holds ids
    or `ignore_index`. An id past the vocabulary fails inside the graph's Gather with a multi-line error
    after which, in graph mode, every later call on the model fails; a negative one reads garbage."""
    ids = _numpy(input_ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids of shape [batch, seq], got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"input_ids hold token id {bad}, outside the vocabulary [0, {vocab_size})")
    for name, value in (("attention_mask", attention_mask), ("labels", labels)):
        if value is None:
            continue
        value = _numpy(value)
        if value.shape != ids.shape:
            raise ValueError(f"{name} shape {value.shape} does not match input_ids shape {ids.shape}")
        if name == "attention_mask" and not np.isin(value, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if name == "labels" and ((value != ignore_index) & ((value < 0) | (value >= vocab_size))).any():
            raise ValueError(f"labels hold ids outside the vocabulary [0, {vocab_size}) other than "
                             f"ignore_index {ignore_index}")


def _numpy(value) -> np.ndarray:
    return np.asarray(value.asnumpy() if hasattr(value, "asnumpy") else value)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, W], mask float32 [B, W]) with each prompt right-aligned, W the longest prompt."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.float32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def continuation(row: Sequence[int], prompt_width: int, eos_token_id: Optional[int],
                 keep_eos: bool = False) -> List[int]:
    """The tokens `generate` added after the padded prompt, cut at the first EOS (kept if `keep_eos`)."""
    new = [int(t) for t in row[prompt_width:]]
    if eos_token_id is not None and eos_token_id in new:
        new = new[:new.index(eos_token_id) + (1 if keep_eos else 0)]
    return new
