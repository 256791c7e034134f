"""Incremental decoding with a static KV cache (rolling when the model has a sliding window).

The cache holds, per layer, keys and values in `slots` sequence slots; a token in column t of the
(left-padded) batch is written to slot t % slots, and each slot remembers its column so the
attention mask can apply causality and the sliding window. Without a sliding window the cache
has a slot per column, so nothing is overwritten. Prefill and each decode step are one call of
the same Cell, so graph mode compiles two graphs per prompt length, and no prefix is recomputed.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from mixtral_ms.inference.prompts import check_batch


class CachedStep(nn.Cell):
    """One forward over new tokens against the cache; returns the last token's logits (or, greedy, its
    argmax: only the token ids cross to the host) and the updated cache."""

    def __init__(self, model: nn.Cell, greedy: bool) -> None:
        super().__init__(auto_prefix=False)
        self.lm = model
        self.greedy = greedy

    def construct(self, input_ids, attention_mask, position_ids, cols, past_keys, past_values, past_cols,
                  past_valid):
        hidden, keys, values, _, _, _, _, _, _ = self.lm.model(input_ids, attention_mask, position_ids, cols,
                                                               past_keys, past_values, past_cols, past_valid)
        logits = ops.cast(self.lm.lm_logits(hidden[:, -1:]), ms.float32)[:, 0]
        if self.greedy:
            logits = ops.argmax(logits, dim=-1).astype(ms.int32)
        slots = past_keys.shape[3]
        s = input_ids.shape[1]
        if s > slots:  # a prompt longer than a rolling cache: only its last `slots` tokens are kept
            keys, values = keys[:, :, :, s - slots:], values[:, :, :, s - slots:]
            cols, attention_mask = cols[s - slots:], attention_mask[:, s - slots:]
        slot = cols % slots
        index = ops.broadcast_to(slot.reshape(1, 1, 1, -1, 1), keys.shape)
        past_keys = ops.tensor_scatter_elements(past_keys, index, keys, axis=3)
        past_values = ops.tensor_scatter_elements(past_values, index, values, axis=3)
        past_cols = ops.tensor_scatter_elements(past_cols, slot, cols, axis=0)
        valid_index = ops.broadcast_to(slot.reshape(1, -1), attention_mask.shape)
        past_valid = ops.tensor_scatter_elements(past_valid, valid_index, ops.cast(attention_mask, ms.float32),
                                                 axis=1)
        return logits, past_keys, past_values, past_cols, past_valid


# One CachedStep per model and mode (greedy or sampling), so graph mode compiles prefill and decode once,
# not on every generate call. Weak keys: holding the model in a Cell attribute would make a Cell cycle
# and re-prefix its parameters.
_STEPS: "weakref.WeakKeyDictionary[nn.Cell, dict]" = weakref.WeakKeyDictionary()


def _filter_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Hugging Face's warpers in their order: temperature, then top-k, then top-p (nucleus). Not MindFormers'
    logits processors: their TopPLogitsWarper drops the token that reaches top_p (HF keeps it) and both
    filter to -50000, not -inf."""
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        remove = np.cumsum(probs, axis=-1) - probs > top_p  # keep the smallest prefix reaching top_p
        remove[:, 0] = False
        mask = np.zeros_like(remove)
        np.put_along_axis(mask, order, remove, axis=-1)
        logits = np.where(mask, -np.inf, logits)
    return logits


def generate(model, input_ids: Union[np.ndarray, Sequence[Sequence[int]], Tensor],
             attention_mask: Optional[np.ndarray] = None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
             pad_token_id: Optional[int] = None, seed: Optional[int] = None) -> np.ndarray:
    """Generate up to `max_new_tokens` after left-padded prompts; returns [B, P + new] token ids.

    Rows that emit `eos_token_id` are padded with `pad_token_id` afterwards; decoding stops when
    every row has finished. Position ids follow Hugging Face: cumsum(attention_mask) - 1.
    """
    config = model.config
    check_batch(config.vocab_size, input_ids, attention_mask)
    ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids, dtype=np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    b, p = ids.shape
    mask = np.ones((b, p), np.float32) if attention_mask is None else np.asarray(attention_mask, np.float32)
    mask = mask.reshape(ids.shape)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    total = p + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
                         f"({config.max_position_embeddings})")
    slots = min(total, config.sliding_window) if config.sliding_window else total
    layers, kv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    dtype = model.model.compute_dtype
    past_keys = ops.zeros((layers, b, kv, slots, d), dtype)
    past_values = ops.zeros((layers, b, kv, slots, d), dtype)
    past_cols = Tensor(np.full((slots,), -1, np.int32))
    past_valid = Tensor(np.zeros((b, slots), np.float32))
    steps = _STEPS.setdefault(model, {})
    greedy = not do_sample
    step = steps.get(greedy)
    if step is None:
        step = steps[greedy] = CachedStep(model, greedy)
    was_training = model.training
    model.set_train(False)
    rng = np.random.default_rng(seed)

    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)
    new_ids, new_mask, new_pos = ids, mask, positions
    cols = np.arange(p, dtype=np.int32)
    out = [ids]
    finished = np.zeros(b, bool)
    for _ in range(max_new_tokens):
        head, past_keys, past_values, past_cols, past_valid = step(
            Tensor(new_ids), Tensor(new_mask), Tensor(new_pos), Tensor(cols), past_keys, past_values, past_cols,
            past_valid)
        if greedy:
            token = head.asnumpy()  # the argmax, taken in the step
        else:
            scores = _filter_logits(head.asnumpy(), temperature, top_k, top_p)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            token = np.array([rng.choice(probs.shape[-1], p=row) for row in probs], np.int32)
        token = np.where(finished, pad, token).astype(np.int32)
        out.append(token[:, None])
        if eos is not None:
            finished |= token == eos
            if finished.all():
                break
        new_pos = new_pos[:, -1:] + 1
        new_ids, new_mask = token[:, None], np.ones((b, 1), np.float32)
        cols = cols[-1:] + 1
    model.set_train(was_training)
    return np.concatenate(out, axis=1)
