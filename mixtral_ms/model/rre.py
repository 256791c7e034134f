"""Pangu-Sigma expert groups: which experts of a `router_type: rre` model serve one domain.

A domain's sub-model (expert surgery's extract, mixtral_ms/tools/surgery.py) is every shared weight plus its
group's experts and gate rows, with `rre_groups: 1` and the same `rre_seed`: the random router maps each
token id to the same local expert in every group (router.random_expert_map), so the sub-model routes that
domain's tokens exactly as the full model did.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List

from mixtral_ms.model.schema import ConfigError, ModelDims

if TYPE_CHECKING:  # group_experts takes ModelDims too, so expert surgery (numpy only) shares it
    from mixtral_ms.model.configuration import MixtralConfig


def group_experts(config: MixtralConfig | ModelDims, group: int) -> List[int]:
    """The experts of domain group `group` (the same in every layer)."""
    if config.router_type != "rre":
        raise ConfigError(f"expert groups need router_type rre, the model has {config.router_type!r}")
    if not isinstance(group, int) or not 0 <= group < config.rre_groups:
        raise ConfigError(f"group {group!r} out of range: the model has rre_groups {config.rre_groups}")
    size = config.num_local_experts // config.rre_groups
    return list(range(group * size, (group + 1) * size))
