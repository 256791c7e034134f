"""Expert capacity, in plain Python so that the sharding plan can use it without MindSpore: slots per
expert for a group of tokens, and the capacity tiers of the dropless path."""
from __future__ import annotations

from fractions import Fraction

# Capacity tiers of the dropless path, in multiples of the mean load k*N/E: near-uniform routing fits
# the first, skewed routing a later one, and only a pathological batch needs C = N.
DROPLESS_TIERS = (1.125, 1.25, 1.5, 2.0)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert for a group of `num_tokens`: ceil(k*N*cf/E), at least 1, at most N; N when cf <= 0.

    Computed exactly for the factor as written (`Fraction(str(1.1))` is 11/10): in floating point
    2 * 90 * 1.1 / 6 is 33.000000000000004, one slot more than the rule."""
    if capacity_factor <= 0:
        return num_tokens
    factor = Fraction(str(capacity_factor))
    slots = -(-top_k * num_tokens * factor.numerator // (num_experts * factor.denominator))  # ceiling
    return max(1, min(num_tokens, slots))


def dropless_capacities(num_tokens: int, top_k: int, num_experts: int) -> tuple:
    """The distinct capacities below N that the dropless path tries, smallest first."""
    tiers = ()
    for factor in DROPLESS_TIERS:
        capacity = expert_capacity(num_tokens, top_k, num_experts, factor)
        if capacity < num_tokens and (not tiers or capacity > tiers[-1]):
            tiers = tiers + (capacity,)
    return tiers
