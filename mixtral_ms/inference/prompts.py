"""Prompt batches in and continuations out: the check of a batch before any graph sees it, the left
padding `generate` expects and EOS trimming."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def check_batch(vocab_size: int, input_ids, attention_mask=None, labels=None, ignore_index: int = -100,
                max_positions: Optional[int] = None, batch_only: bool = False) -> None:
    """Raise ValueError (one line) unless `input_ids` is a non-empty integer [B, S] (or [S], unless
    `batch_only`) batch of ids in [0, vocab_size) and at most `max_positions` long, `attention_mask` has
    its shape and holds 0/1, and `labels` has its shape and holds ids or `ignore_index`. An id past the
    vocabulary fails inside the graph's Gather with a multi-line error after which, in graph mode, every
    later call on the model fails; a negative one reads garbage; empty, 1-D or too long inputs fail in C++."""
    ids = _numpy(input_ids)
    shapes = "[batch, seq]" if batch_only else "[batch, seq] (or [seq])"
    if ids.ndim not in ((2,) if batch_only else (1, 2)) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids of shape {shapes}, got {ids.dtype} {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"input_ids is empty (shape {ids.shape}); give at least one token")
    if max_positions is not None and ids.shape[-1] > max_positions:
        raise ValueError(f"input_ids hold {ids.shape[-1]} positions, more than max_position_embeddings "
                         f"({max_positions})")
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
