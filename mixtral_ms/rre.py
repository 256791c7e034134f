"""Pangu-Sigma sub-models: one domain's expert group of a `router_type: rre` model as a model of its own.

A domain's sub-model is every shared weight plus its group's experts and gate rows, with `rre_groups: 1`
and the same `rre_seed`: the random router maps each token id to the same local expert in every group
(router.random_expert_map), so the sub-model routes that domain's tokens exactly as the full model did.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Dict, List

import numpy as np

from .schema import ConfigError, ModelDims

if TYPE_CHECKING:  # group_experts takes ModelDims too, so expert surgery (numpy only) shares it
    from .configuration import MixtralConfig


def group_experts(config: MixtralConfig | ModelDims, group: int) -> List[int]:
    """The experts of domain group `group` (the same in every layer)."""
    if config.router_type != "rre":
        raise ConfigError(f"expert groups need router_type rre, the model has {config.router_type!r}")
    if not isinstance(group, int) or not 0 <= group < config.rre_groups:
        raise ConfigError(f"group {group!r} out of range: the model has rre_groups {config.rre_groups}")
    size = config.num_local_experts // config.rre_groups
    return list(range(group * size, (group + 1) * size))


def group_config(config: MixtralConfig, group: int) -> MixtralConfig:
    """The sub-model's config: the group's experts, one group, everything else unchanged."""
    sub = copy.deepcopy(config)
    sub.num_local_experts, sub.rre_groups = len(group_experts(config, group)), 1
    sub.validate()
    return sub


def group_state(state: Dict[str, np.ndarray], config: MixtralConfig, group: int) -> Dict[str, np.ndarray]:
    """Slice a mixtral-ms state dict (stacked experts `[E, ...]`, gate `[E, H]`) down to the group."""
    experts = group_experts(config, group)
    out = {}
    for name, value in state.items():
        if name.endswith(("block_sparse_moe.experts.w1", "block_sparse_moe.experts.w2",
                          "block_sparse_moe.experts.w3", "block_sparse_moe.gate.weight")):
            value = value[experts]
        out[name] = value
    return out
