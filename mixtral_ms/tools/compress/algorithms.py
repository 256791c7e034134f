"""The numpy decisions behind each method, on one layer's calibration statistics."""
from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

EXHAUSTIVE_MAX_EXPERTS = 8  # C(8, 4) = 70 subsets at most; beyond, greedy removal


class Scoring(NamedTuple):
    """A layer's router beyond Hugging Face's softmax (model/router.py, TopKRouter): DeepSeek-V3's sigmoid
    scores and the aux-loss-free bias [E], added to the scores to choose the top k, never to the weights.
    The search must route as the compressed model will, and both change which experts a token gets."""
    sigmoid: bool = False
    bias: Optional[np.ndarray] = None


def route(logits: np.ndarray, top_k: int, allowed: np.ndarray = None,
          scoring: Scoring = Scoring()) -> Tuple[np.ndarray, np.ndarray]:
    """The router's top-k and renormalised weights ([N, k] each) on [N, E] logits, restricted to the
    `allowed` experts as if the others were removed (Lu et al. drop an expert). Softmax without a bias:
    the renormalised weights of the top k depend only on their own logits. With a bias, the softmax scores
    it is added to are those over the allowed experts only, as the pruned model's router computes them."""
    scores = logits.astype(np.float64)
    if allowed is not None:
        scores = np.where(allowed[None, :], scores, -np.inf)
    choose = probs = scores
    if scoring.sigmoid or scoring.bias is not None:
        if scoring.sigmoid:
            probs = 1.0 / (1.0 + np.exp(-scores))
        else:
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
        bias = 0.0 if scoring.bias is None else np.asarray(scoring.bias, np.float64)[None, :]
        choose = np.where(np.isfinite(scores), probs + bias, -np.inf)
    index = np.argsort(-choose, axis=1, kind="stable")[:, :top_k]
    if scoring.sigmoid:
        top = np.take_along_axis(probs, index, axis=1)
        return index, top / top.sum(axis=1, keepdims=True)
    top = np.take_along_axis(scores, index, axis=1)
    weights = np.exp(top - top.max(axis=1, keepdims=True))
    return index, weights / weights.sum(axis=1, keepdims=True)


def moe_output(outputs: np.ndarray, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The layer output [N, H] from every expert's output [E, N, H] and a routing ([N, k] each)."""
    tokens = np.arange(index.shape[0])
    return sum(weights[:, j:j + 1] * outputs[index[:, j], tokens].astype(np.float64) for j in range(index.shape[1]))


def removal_loss(outputs: np.ndarray, logits: np.ndarray, top_k: int, keep: Sequence[int],
                 reference: np.ndarray, scoring: Scoring = Scoring()) -> float:
    """||Z - Z'||_F over the sample tokens: Z the full layer's routed output, Z' with only `keep` routable
    (shared experts add the same to both, so they cancel)."""
    allowed = np.zeros(logits.shape[1], bool)
    allowed[list(keep)] = True
    return float(np.linalg.norm(reference - moe_output(outputs, *route(logits, top_k, allowed, scoring))))


def experts_to_keep(outputs: np.ndarray, logits: np.ndarray, top_k: int, keep: int,
                    scoring: Scoring = Scoring()) -> Tuple[List[int], float]:
    """The `keep` experts (ascending) whose layer output on the sample is closest to the full layer's
    (Lu et al., ACL 2024): every subset for E <= 8, else greedy removal of the least missed expert."""
    e = logits.shape[1]
    reference = moe_output(outputs, *route(logits, top_k, scoring=scoring))
    if e <= EXHAUSTIVE_MAX_EXPERTS:
        losses = {subset: removal_loss(outputs, logits, top_k, subset, reference, scoring)
                  for subset in itertools.combinations(range(e), keep)}
        best = min(losses, key=losses.get)  # first subset in lexicographic order among equals
        return list(best), losses[best]
    kept, loss = list(range(e)), 0.0
    while len(kept) > keep:
        trials = [(removal_loss(outputs, logits, top_k, [x for x in kept if x != drop], reference, scoring), drop)
                  for drop in kept]
        loss, drop = min(trials)
        kept.remove(drop)
    return kept, loss


def average_linkage(points: np.ndarray, clusters: int) -> List[List[int]]:
    """Agglomerative clustering of the rows of `points` (Euclidean, average linkage) into `clusters`
    groups, each sorted, ordered by their first member (so R = E gives the identity)."""
    distance = np.linalg.norm(points[:, None, :].astype(np.float64) - points[None, :, :], axis=-1)
    groups = [[i] for i in range(points.shape[0])]
    while len(groups) > clusters:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = distance[np.ix_(groups[a], groups[b])].mean()
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


def usage_weights(counts: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """Each member's share of the group's usage; uniform when none was used on the calibration data."""
    usage = np.asarray(counts, np.float64)[list(members)]
    return usage / usage.sum() if usage.sum() > 0 else np.full(len(members), 1.0 / len(members))


def weighted_average(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """sum_i weights_i * arrays_i in float64, returned as float32; one array is returned as it is."""
    if len(arrays) == 1:
        return np.asarray(arrays[0], np.float32)
    return sum(w * np.asarray(a, np.float64) for w, a in zip(weights, arrays)).astype(np.float32)


def skipped_fraction(logits: np.ndarray, top_k: int, beta: float, scoring: Scoring = Scoring()) -> float:
    """Share of the k expert computations per token that dynamic skipping with `beta` drops (the router's
    choices in its order: with a bias the first choice need not have the largest weight)."""
    _, weights = route(logits, top_k, scoring=scoring)
    return float((weights[:, 1:] < beta * weights[:, :1]).sum() / weights.size)
