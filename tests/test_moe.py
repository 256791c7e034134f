"""The MoE layer against an independent numpy implementation of routing, capacity and dropping."""
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mixtral_ms import MixtralConfig, MixtralForCausalLM
from mixtral_ms.model.capacity import dropless_capacities, expert_capacity
from mixtral_ms.model.dispatch import dispatch
from mixtral_ms.model.moe import MixtralSparseMoeBlock


def served_assignments(assignment_slot, g, n, k, e, capacity):
    """bool [G, N, k]: the (token, choice) pairs dispatch gave a slot (every other one has the trash slot)."""
    trash = np.arange(g).reshape(g, 1, 1) * (e * capacity + 1) + e * capacity
    return assignment_slot.asnumpy().reshape(g, n, k) != trash


def reference_dispatch(index, weight, mask, num_experts, capacity, policy):
    """Plain-Python capacity rule: returns kept [G, N, k] (bool) and dropped per expert [E]."""
    g, n, k = index.shape
    kept = np.zeros((g, n, k), bool)
    dropped = np.zeros(num_experts, int)
    for gi in range(g):
        assignments = [(t, j) for t in range(n) for j in range(k) if mask[gi, t]]
        if policy == "position":
            assignments.sort(key=lambda a: (a[1], a[0]))
        else:
            assignments.sort(key=lambda a: (-weight[gi, a[0], a[1]], a[0] * k + a[1]))
        used = np.zeros(num_experts, int)
        for t, j in assignments:
            e = index[gi, t, j]
            if used[e] < capacity:
                used[e] += 1
                kept[gi, t, j] = True
            else:
                dropped[e] += 1
    return kept, dropped


def random_routing(rng, g, n, e, k, skew=2.0):
    """Top-k of skewed random probabilities, renormalised: some experts overloaded, as in real routing."""
    logits = rng.normal(size=(g, n, e)) + skew * np.linspace(1, 0, e)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    index = np.argsort(-probs, axis=-1)[..., :k]
    weight = np.take_along_axis(probs, index, -1)
    return index.astype(np.int32), (weight / weight.sum(-1, keepdims=True)).astype(np.float32)


def test_capacity_formula():
    assert expert_capacity(32, 2, 4, 1.1) == 18  # MindFormers' calculate_expert_capacity_v2 example
    assert expert_capacity(4096, 2, 8, 1.1) == math.ceil(2 * 4096 * 1.1 / 8)
    assert expert_capacity(10, 2, 8, 0.0) == 10  # dropless
    assert expert_capacity(3, 2, 2, 100.0) == 3  # capped at the group size
    assert expert_capacity(90, 2, 6, 1.1) == 33  # exact: 2 * 90 * 11/10 / 6 = 33 (floating point: 34)
    assert expert_capacity(100, 1, 2, 1.1) == 55  # exact: 55 (floating point: 56)
    # dropless tiers: 1.125, 1.25, 1.5 and 2 times the mean load k*N/E, distinct and below N
    assert dropless_capacities(1024, 2, 8) == (288, 320, 384, 512)
    assert dropless_capacities(8, 2, 8) == (3, 4)
    assert dropless_capacities(1, 2, 8) == ()  # one decoded token: C = N = 1 directly


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_dropped_assignments_match_reference(policy):
    rng = np.random.default_rng(0)
    g, n, e, k = 2, 40, 8, 2
    index, weight = random_routing(rng, g, n, e, k)
    mask = np.ones((g, n), np.float32)
    mask[1, :5] = 0  # left padding in the second group takes no capacity
    capacity = expert_capacity(n, k, e, 1.1)
    slot_token, assignment_slot, load, dropped = dispatch(
        Tensor(index), Tensor(weight), Tensor(mask), e, capacity, policy)
    kept = served_assignments(assignment_slot, g, n, k, e, capacity)
    ref_kept, ref_dropped = reference_dispatch(index, weight, mask, e, capacity, policy)
    assert ref_dropped.sum() > 0, "the fixture must overload some expert"
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_array_equal(dropped.asnumpy().astype(int), ref_dropped)
    routed = np.bincount(index[mask > 0].reshape(-1), minlength=e)
    np.testing.assert_array_equal(load.asnumpy().astype(int), routed)
    # Each served assignment owns a distinct slot inside its expert's range, and that slot reads its token.
    slots = assignment_slot.asnumpy().reshape(g, n, k)
    table = slot_token.asnumpy()
    per_group = e * capacity + 1
    for gi in range(g):
        served = slots[gi][ref_kept[gi]]
        assert len(set(served.tolist())) == len(served)
        for t, j in zip(*np.nonzero(ref_kept[gi])):
            local = slots[gi, t, j] - gi * per_group
            assert local // capacity == index[gi, t, j]
            assert table[slots[gi, t, j]] == gi * (n + 1) + t
        assert (slots[gi][~ref_kept[gi]] == gi * per_group + e * capacity).all()


def test_policies_differ_as_specified():
    """`probs` keeps the heavier assignment; `position` keeps first choices before any second choice."""
    index = np.array([[[0, 1], [1, 0]]], np.int32)  # token 0 -> e0 (first), token 1 -> e0 (second)
    weight = np.array([[[0.55, 0.45], [0.1, 0.9]]], np.float32)
    mask = np.ones((1, 2), np.float32)
    kept_probs, kept_pos = (served_assignments(dispatch(Tensor(index), Tensor(weight), Tensor(mask), 2, 1, policy)[1],
                                               1, 2, 2, 2, 1) for policy in ("probs", "position"))
    # expert 0 has one slot: probs gives it to token 1 (0.9), position to token 0 (first choice)
    assert kept_probs.astype(int)[0, :, :].tolist() == [[0, 1], [0, 1]]
    assert kept_pos.astype(int)[0, :, :].tolist() == [[1, 0], [1, 0]]


def numpy_moe(block, x, mask, groups, training):
    """Reference MoE output computed expert by expert in numpy from the block's own weights."""
    w_gate = block.gate.weight.asnumpy()
    w1, w3, w2 = (p.asnumpy() for p in (block.experts.w1, block.experts.w3, block.experts.w2))
    b, s, h = x.shape
    tokens = x.reshape(b * s, h)
    logits = tokens @ w_gate.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = block.top_k
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weight = np.take_along_axis(probs, index, -1)
    weight /= weight.sum(-1, keepdims=True)
    n = b * s // groups
    e = w1.shape[0]
    cf = block.train_capacity_factor if training else block.eval_capacity_factor
    capacity = expert_capacity(n, k, e, cf)
    kept, dropped = reference_dispatch(index.reshape(groups, n, k), weight.reshape(groups, n, k),
                                       mask.reshape(groups, n), e, capacity, block.drop_policy)
    kept = kept.reshape(b * s, k)
    out = np.zeros_like(tokens)
    for t in range(b * s):
        for j in range(k):
            if kept[t, j]:
                ei = index[t, j]
                hid = tokens[t] @ w1[ei].T
                act = hid / (1 + np.exp(-hid)) * (tokens[t] @ w3[ei].T)
                out[t] += weight[t, j] * (act @ w2[ei].T)
    return out.reshape(b, s, h), dropped


def _block(groups, capacity_factor, policy="probs", experts=4):
    ms.set_seed(1)
    cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
                        capacity_factor=capacity_factor, drop_policy=policy, moe_token_groups=groups,
                        initializer_range=0.5, max_position_embeddings=64)
    return MixtralSparseMoeBlock(cfg, ms.float32, ms.float32)


@pytest.mark.parametrize("groups,policy", [(1, "probs"), (2, "position"), (4, "probs")])
def test_block_matches_numpy_reference(mode, groups, policy):
    block = _block(groups, 1.1, policy)
    block.set_train(True)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 16)).astype(np.float32)
    mask = np.ones((4, 6), np.float32)
    y, _, _, dropped, _, _ = block(Tensor(x), Tensor(mask))
    ref, ref_dropped = numpy_moe(block, x, mask, groups, training=True)
    np.testing.assert_allclose(y.asnumpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dropped.asnumpy().astype(int), ref_dropped)


def test_groups_equal_separate_runs():
    """G token groups on the whole batch == each group's tokens alone with G = 1 (per-dp-shard capacity)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, 16)).astype(np.float32)
    mask = np.ones((4, 6), np.float32)
    grouped = _block(2, 1.1)
    grouped.set_train(True)
    y, _, _, dropped, _, _ = grouped(Tensor(x), Tensor(mask))
    single = _block(1, 1.1)
    single.set_train(True)
    parts = [single(Tensor(x[i:i + 2]), Tensor(mask[i:i + 2])) for i in (0, 2)]
    # Same routing and drops (exact, below); the outputs agree to float32 rounding of the expert matmuls,
    # whose row counts differ ([E, 2C, H] against [E, C, H]): |y| reaches 13, an ulp there is 1e-6.
    np.testing.assert_allclose(y.asnumpy(), np.concatenate([p[0].asnumpy() for p in parts]), atol=1e-5)
    np.testing.assert_array_equal(dropped.asnumpy(), parts[0][3].asnumpy() + parts[1][3].asnumpy())


def test_all_dropped_token_passes_through_residual():
    """With one slot per expert, most tokens lose both assignments: the layer leaves them unchanged."""
    cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                        capacity_factor=0.01, max_position_embeddings=64, initializer_range=0.5)
    model = MixtralForCausalLM(cfg)
    model.set_train(True)
    layer = model.model.layers[0]
    x = Tensor(np.random.default_rng(0).normal(size=(1, 8, 16)).astype(np.float32))
    y = layer.block_sparse_moe(layer.post_attention_layernorm(x), Tensor(np.ones((1, 8), np.float32)))[0].asnumpy()
    zero_rows = np.abs(y[0]).sum(-1) == 0
    assert zero_rows.sum() == 6  # capacity 1 per expert, 2 experts: 2 of 8 tokens served


def test_gradients_reach_router_and_every_used_expert():
    ms.set_seed(2)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        capacity_factor=1.1, max_position_embeddings=64, initializer_range=0.3)
    model = MixtralForCausalLM(cfg)
    model.set_train(True)
    ids = Tensor(np.random.default_rng(1).integers(0, 64, (2, 9)).astype(np.int32))
    params = model.trainable_params()
    grad_fn = ms.value_and_grad(model, None, params)  # training mode: the loss alone
    (_, grads) = grad_fn(ids)
    grads = {p.name: g.asnumpy() for p, g in zip(params, grads)}
    pass_stats = model.training_stats.read_and_reset()  # the side channel of the forward pass above
    load, dropped = pass_stats["expert_load"], pass_stats["dropped"]
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        assert np.abs(grads[prefix + "gate.weight"]).sum() > 0
        for e in range(4):
            served = load[layer, e] - dropped[layer, e]
            got = np.abs(grads[prefix + "experts.w1"][e]).sum()
            assert (got > 0) == (served > 0), (layer, e, served, got)


def test_dropless_takes_the_smallest_tier_that_holds_the_busiest_expert(mode):
    """Moderate skew: the busiest expert fits a middle tier (not the first, not N); nothing dropped."""
    block = _block(1, 1.1, experts=8)
    block.set_train(False)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 16, 16)).astype(np.float32)
    tiers = dropless_capacities(32, 2, 8)
    for push in np.linspace(0.0, 3.0, 31):  # the weakest push towards expert 0 that overflows tier 1
        pushed = x + push * block.gate.weight.asnumpy()[0]
        busiest = np.bincount(np.argsort(-(pushed.reshape(32, 16) @ block.gate.weight.asnumpy().T), -1)[:, :2]
                              .ravel(), minlength=8).max()
        if tiers[0] < busiest <= tiers[-1]:
            break
    else:
        pytest.fail(f"no push puts the busiest expert between the tiers {tiers}")
    mask = np.ones((2, 16), np.float32)
    y, _, load, dropped, _, _ = block(Tensor(pushed), Tensor(mask))
    assert load.asnumpy().max() == busiest and dropped.asnumpy().sum() == 0
    ref, _ = numpy_moe(block, pushed, mask, 1, training=False)
    np.testing.assert_allclose(y.asnumpy(), ref, rtol=1e-5, atol=1e-5)


def _eval_path_equals_tiers_and_reference(block, x, mask):
    """The eval path the block picks for (x, mask) against the static capacity tiers (same output and
    load) and the numpy reference; returns its (y, load, dropped) as numpy arrays."""
    y, _, load, dropped, _, _ = block(Tensor(x), Tensor(mask))
    block.grouped_inference = False
    y_tiers, _, load_tiers, _, _, _ = block(Tensor(x), Tensor(mask))
    ref, _ = numpy_moe(block, x, mask, 1, training=False)
    np.testing.assert_allclose(y.asnumpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.asnumpy(), y_tiers.asnumpy(), rtol=1e-5, atol=1e-5)  # two summation orders of fp32 matmuls
    np.testing.assert_array_equal(load.asnumpy(), load_tiers.asnumpy())
    return y, load, dropped


@pytest.mark.parametrize("push", [0.0, 3.0])
def test_grouped_inference_equals_capacity_tiers_and_reference(mode, push):
    """Eval-mode dropless on enough tokens runs per-expert segments: same output and load as the
    static capacity path and the numpy reference, with left padding, under balanced and skewed routing."""
    from mixtral_ms.model.moe import GROUPED_MIN_ROWS
    block = _block(1, 1.1, experts=4)
    block.set_train(False)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 32, 16)).astype(np.float32) + push * block.gate.weight.asnumpy()[0]
    mask = np.ones((2, 32), np.float32)
    mask[1, :7] = 0
    assert 2 * 64 >= GROUPED_MIN_ROWS * 4, "fixture must take the grouped path"
    y, load, dropped = _eval_path_equals_tiers_and_reference(block, x, mask)
    assert load.asnumpy().sum() == 2 * mask.sum() and dropped.asnumpy().sum() == 0
    assert np.abs(y.asnumpy()[1, :7]).max() == 0  # padding gets nothing from the block
    if push:
        assert load.asnumpy().max() > max(dropless_capacities(64, 2, 4)), "skewed fixture must overflow every tier"


def test_dropless_is_exact_even_when_every_tier_overflows(mode):
    """Eval mode is dropless: skewed routing overflows every capacity tier below N, and nothing is dropped."""
    block = _block(1, 1.1, experts=8)
    block.set_train(False)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 16, 16)).astype(np.float32)
    x[:, :, :] += 3.0 * block.gate.weight.asnumpy()[0]  # push every token towards expert 0
    mask = np.ones((2, 16), np.float32)
    y, _, load, dropped, _, _ = block(Tensor(x), Tensor(mask))
    assert load.asnumpy().max() > max(dropless_capacities(32, 2, 8)), "fixture must overflow every tier"
    assert dropped.asnumpy().sum() == 0
    ref, ref_dropped = numpy_moe(block, x, mask, 1, training=False)
    assert ref_dropped.sum() == 0
    np.testing.assert_allclose(y.asnumpy(), ref, rtol=1e-5, atol=1e-5)


def test_gathered_decode_equals_capacity_path_and_reference(mode):
    """Eval mode on a few tokens (decoding) gathers the routed experts' weights: same output and load
    as the static capacity path and the numpy reference; a padding token gets zero."""
    from mixtral_ms.model.moe import GATHER_MAX_SHARE
    block = _block(1, 1.1, experts=16)
    block.set_train(False)
    x = np.random.default_rng(5).normal(size=(2, 1, 16)).astype(np.float32)
    mask = np.array([[1.0], [0.0]], np.float32)
    assert 2 * 2 <= GATHER_MAX_SHARE * 16, "fixture must take the gathered path"
    y, load, dropped = _eval_path_equals_tiers_and_reference(block, x, mask)
    assert load.asnumpy().sum() == 2 and dropped.asnumpy().sum() == 0
    assert np.abs(y.asnumpy()[1]).max() == 0
