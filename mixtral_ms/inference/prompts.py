"""Prompt batches in and continuations out: the left padding `generate` expects and EOS trimming."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


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
