"""Token dispatch for the MoE layer: drop policy, gather into `[E, C, H]`, and combine.

Tokens are split into `G` groups (one per data-parallel shard on a cluster) and each group gets
`C = ceil(k * N * capacity_factor / E)` slots per expert (N tokens per group; capacity.py). Assignments are
ranked by the drop policy, each takes the next free slot of its expert, and those that find none are
dropped. Everything is a gather over flat indices: no `[T, E, C]` one-hot tensor, no loop over experts,
static shapes for graph mode. Slot `E * C` of each group is a trash slot: dropped and padding
assignments point there, it holds zeros, and its output is discarded.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from mixtral_ms.model.dtypes import arange


def priority_order(topk_index: Tensor, topk_weight: Tensor, policy: str) -> Tensor:
    """Per group, the flat assignment indices (t*k + j) from first served to last served.

    `position`: every token's first choice (in token order), then every second choice, ...
    `probs`: highest routing weight first, so the lowest-weight assignments are dropped first.
    """
    g, n, k = topk_index.shape
    if policy == "position":
        served = arange(n * k)
        return ops.broadcast_to((served % n) * k + served // n, (g, n * k))
    _, order = ops.sort(ops.cast(topk_weight, ms.float32).reshape(g, n * k), axis=-1, descending=True)
    return ops.cast(order, ms.int32)


def dispatch(topk_index: Tensor, topk_weight: Tensor, token_mask: Tensor, num_experts: int, capacity: int,
             policy: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Assign slots. `topk_index`/`topk_weight`: [G, N, k]; `token_mask`: float [G, N], 0 for padding,
    or [G, N, k], 0 also for choices the router skipped (they take no slot, as padding).

    Returns, with indices flat over groups:
      slot_token      int32 [G*(E*C+1)]: row of the padded token table feeding each slot;
      assignment_slot int32 [G*N*k]: slot serving each (token, choice), the trash slot (group * (E*C+1)
                      + E*C) if dropped;
      load            float32 [E]: assignments of valid tokens routed to each expert, before dropping;
      dropped         float32 [E]: assignments each expert dropped for lack of capacity.
    """
    g, n, k = topk_index.shape
    e, c = num_experts, capacity
    order = priority_order(topk_index, topk_weight, policy)                      # [G, kN]
    rank = ops.cast(ops.argsort(ops.cast(order, ms.float32), axis=-1), ms.int32)  # inverse permutation
    flat_expert = topk_index.reshape(g, n * k)
    valid = ops.broadcast_to(token_mask.reshape(g, n, -1), (g, n, k)).reshape(g, n * k)
    sorted_expert = ops.gather_elements(flat_expert, 1, order)
    sorted_valid = ops.gather_elements(valid, 1, order)
    one_hot = ops.one_hot(sorted_expert, e, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
    one_hot = one_hot * sorted_valid.reshape(g, n * k, 1)                          # [G, kN, E]
    position = (ops.cumsum(one_hot, axis=1) * one_hot).sum(axis=-1) - 1.0          # slot within expert; -1 pad
    sorted_kept = ops.logical_and(position < c, sorted_valid > 0)

    slots_per_group = e * c + 1
    group = arange(g).reshape(g, 1)
    local_slot = ops.where(sorted_kept, sorted_expert * c + ops.cast(position, ms.int32),
                           ops.full((g, n * k), e * c, dtype=ms.int32))
    flat_slot = local_slot + group * slots_per_group                                # [G, kN], sorted order
    token = ops.gather_elements(ops.broadcast_to(arange(n * k) // k, (g, n * k)), 1, order)
    flat_token = token + group * (n + 1)
    empty = ops.broadcast_to(group * (n + 1) + n, (g, slots_per_group)).reshape(-1)  # each group's zero row
    slot_token = ops.tensor_scatter_elements(empty, flat_slot.reshape(-1), flat_token.reshape(-1), axis=0)
    # Dropped assignments all land on the trash slot; whichever wins there, reset it to the zero row.
    trash = arange(g) * slots_per_group + e * c
    slot_token = ops.tensor_scatter_elements(slot_token, trash, group.reshape(-1) * (n + 1) + n, axis=0)
    assignment_slot = ops.gather_elements(flat_slot, 1, rank).reshape(-1)

    load = one_hot.sum(axis=(0, 1))
    served = (one_hot * ops.cast(sorted_kept, ms.float32).reshape(g, n * k, 1)).sum(axis=(0, 1))
    return slot_token, assignment_slot, load, load - served
