"""Router options (mixtral_ms/model/router.py): Switch top-1, GShard's sampled second expert and Pangu-Sigma's
random routed experts, against numpy references; RRE's domain group extracted by expert surgery
computes the full model's logits on that domain; the domain_ids column written at preprocessing."""
import json
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from conftest import ROOT
from mixtral_ms import ConfigError, MixtralConfig, MixtralForCausalLM
from mixtral_ms.run import data as D
from mixtral_ms.model.moe import MixtralSparseMoeBlock
from mixtral_ms.model.router import random_expert_map
from mixtral_ms.model.rre import group_experts
from mixtral_ms.tools.surgery import Model, plan_extract, write


def _config(**kw):
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64, initializer_range=0.5,
                capacity_factor=0.0)
    return MixtralConfig(**{**base, **kw})


def _experts_out(block, tokens):
    """Every expert's output on every token, numpy [E, T, H]."""
    w1, w3, w2 = (p.asnumpy() for p in (block.experts.w1, block.experts.w3, block.experts.w2))
    gate = np.einsum("th,efh->etf", tokens, w1)
    return np.einsum("etf,ehf->eth", gate / (1 + np.exp(-gate)) * np.einsum("th,efh->etf", tokens, w3), w2)


def _probs(block, tokens):
    logits = tokens @ block.gate.weight.asnumpy().T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_switch_weights_are_the_unrenormalised_top1_probability():
    ms.set_seed(0)
    block = MixtralSparseMoeBlock(_config(num_experts_per_tok=1, router_type="switch"), ms.float32, ms.float32)
    block.set_train(True)
    x = np.random.default_rng(0).normal(size=(2, 8, 16)).astype(np.float32)
    y = block(Tensor(x), Tensor(np.ones((2, 8), np.float32)))[0].asnumpy().reshape(16, 16)
    tokens = x.reshape(16, 16)
    probs, outs = _probs(block, tokens), _experts_out(block, tokens)
    top = probs.argmax(-1)
    ref = probs[np.arange(16), top, None] * outs[top, np.arange(16)]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert probs.max(-1).max() < 0.99  # the weight is not 1, as renormalised top-1 would give


def test_gshard_samples_the_second_expert_in_training_only(mode):
    """Training: each token gets w1*E1 + kept*w2*E2 (w renormalised top-2), with kept drawn with
    probability 2*w2; the load counts served choices only. Eval: Mixtral's deterministic top-2.
    Both modes: the draw is a graph op."""
    ms.set_seed(0)
    block = MixtralSparseMoeBlock(_config(router_type="gshard"), ms.float32, ms.float32)
    x = np.random.default_rng(1).normal(size=(8, 64, 16)).astype(np.float32)
    mask = Tensor(np.ones((8, 64), np.float32))
    tokens = x.reshape(-1, 16)
    t = tokens.shape[0]
    probs, outs = _probs(block, tokens), _experts_out(block, tokens)
    index = np.argsort(-probs, -1, kind="stable")[:, :2]
    w = np.take_along_axis(probs, index, -1)
    w /= w.sum(-1, keepdims=True)
    first = w[:, :1] * outs[index[:, 0], np.arange(t)]
    second = w[:, 1:] * outs[index[:, 1], np.arange(t)]

    block.set_train(False)
    np.testing.assert_allclose(block(Tensor(x), mask)[0].asnumpy().reshape(t, 16), first + second, rtol=1e-5, atol=1e-4)

    block.set_train(True)
    y, _, load, _, _, _ = block(Tensor(x), mask)
    y = y.asnumpy().reshape(t, 16)
    with_second = np.abs(y - (first + second)).max(-1) < 1e-3
    without = np.abs(y - first).max(-1) < 1e-3
    assert (with_second | without).all()  # every token: its second expert served fully or not at all
    kept = with_second & ~without
    assert load.asnumpy().sum() == t + kept.sum()  # skipped choices are not routed load
    expected = np.minimum(2 * w[:, 1], 1).mean()
    assert 0.2 < expected < 0.95
    assert abs(kept.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / t), (kept.mean(), expected)


def test_rre_routes_token_ids_inside_their_domain_group():
    """Identical token ids go to identical experts (per layer, whatever the context), always inside
    the group of the token's domain; the map is fixed by (rre_seed, layer), not learned."""
    config = _config(num_local_experts=6, num_experts_per_tok=1, router_type="rre", rre_groups=3, rre_seed=7)
    ms.set_seed(0)
    model = MixtralForCausalLM(config)
    model.set_train(True)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 64, (3, 12)).astype(np.int32)
    ids[1, :6] = ids[0, :6]  # the same ids in another sequence and another domain
    domains = np.array([[0] * 12, [2] * 12, [1] * 12], np.int32)
    for layer, block in enumerate(model.model.layers):
        assert not block.block_sparse_moe.gate.weight.requires_grad
        h = Tensor(rng.normal(size=(3, 12, 16)).astype(np.float32))
        _, probs, _, _, _ = block.block_sparse_moe.gate(Tensor(ids.reshape(-1)), Tensor(domains.reshape(-1)))
        expert = probs.asnumpy().argmax(-1).reshape(3, 12)
        local = random_expert_map(64, 2, 1, 7, layer)[ids, 0]
        np.testing.assert_array_equal(expert, domains * 2 + local)
        load = block.block_sparse_moe(h, Tensor(np.ones((3, 12), np.float32)), Tensor(ids), Tensor(domains))[2]
        np.testing.assert_array_equal(load.asnumpy(), np.bincount(expert.ravel(), minlength=6))
    assert not np.array_equal(random_expert_map(64, 2, 1, 7, 0), random_expert_map(64, 2, 1, 7, 1))
    np.testing.assert_array_equal(random_expert_map(64, 2, 1, 7, 1), random_expert_map(64, 2, 1, 7, 1))
    with pytest.raises(ValueError, match="needs domain_ids"):
        model(Tensor(ids))


def test_rre_group_extracted_alone_gives_the_full_models_logits(tmp_path):
    """expert surgery's extract of domain 1's group (shared weights + group 1's experts, rre_groups 1), from
    the .ckpt a run saves, computes the full model's logits on domain-1 text: bit-exact in eval mode (each
    expert runs on exactly its routed rows), within float rounding in dropless training (capacity tiers, so
    matmul shapes, differ with E)."""
    config = _config(num_local_experts=4, num_experts_per_tok=1, router_type="rre", rre_groups=2, rre_seed=3,
                     router_aux_loss_coef=0.0)  # the training loss is then the CE alone (E differs)
    ms.set_seed(0)
    full = MixtralForCausalLM(config)
    assert group_experts(config, 1) == [2, 3]
    ms.save_checkpoint([{"name": p.name, "data": p.value()} for p in full.get_parameters()], str(tmp_path / "f.ckpt"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config.to_hf_config(), f)
    plan = plan_extract(Model(str(tmp_path / "f.ckpt"), str(tmp_path / "config.json")), [group_experts(config, 1)])
    write(plan, str(tmp_path / "sub"), "ms")
    sub = MixtralForCausalLM.from_pretrained(str(tmp_path / "sub"), capacity_factor=0.0)
    assert (sub.config.num_local_experts, sub.config.rre_groups, sub.config.rre_seed) == (2, 1, 3)
    ids = Tensor(np.random.default_rng(4).integers(0, 64, (2, 40)).astype(np.int32))
    domain = Tensor(np.ones((2, 40), np.int32))
    full.set_train(False)
    sub.set_train(False)
    np.testing.assert_array_equal(sub(ids)[0].asnumpy(), full(ids, domain_ids=domain)[0].asnumpy())
    other = full(ids, domain_ids=Tensor(np.zeros((2, 40), np.int32)))[0].asnumpy()
    assert np.abs(other - sub(ids)[0].asnumpy()).max() > 1e-3  # the domain id does pick the group
    full.set_train(True)
    sub.set_train(True)
    np.testing.assert_allclose(float(sub(ids)), float(full(ids, domain_ids=domain)), rtol=1e-6)  # the loss
    with pytest.raises(ConfigError, match="out of range"):
        group_experts(config, 2)


@pytest.mark.parametrize("change,message", [
    ({"router_type": "expert_choice"}, "router_type must be one of"),
    ({"router_type": "switch"}, "num_experts_per_tok must be 1, got 2"),
    ({"router_type": "gshard", "num_experts_per_tok": 1}, "num_experts_per_tok must be 2, got 1"),
    ({"router_type": "rre", "rre_groups": 3}, "divisible by rre_groups (3)"),
    ({"router_type": "rre", "rre_groups": 4}, "num_experts_per_tok (2) <= experts per group"),
    ({"rre_groups": 2}, "rre_groups 2 needs router_type rre"),
    ({"router_type": "rre", "rre_seed": -1}, "rre_seed must be a non-negative integer"),
    ({"router_type": "rre", "rre_groups": 0}, "rre_groups must be a positive integer"),
])
def test_bad_router_configs(change, message):
    with pytest.raises(ConfigError) as err:
        _config(**change)
    assert message in str(err.value)


def test_router_fields_round_trip_through_config_json():
    config = _config(num_experts_per_tok=1, router_type="rre", rre_groups=2, rre_seed=5)
    again = MixtralConfig.from_hf_config(config.to_hf_config())
    assert (again.router_type, again.rre_groups, again.rre_seed) == ("rre", 2, 5)
    assert "router_type" not in _config().to_hf_config()  # a Mixtral stays a plain Hugging Face config


def test_preprocess_writes_a_domain_column(tmp_path):
    import mindspore.dataset as ds
    text = tmp_path / "b.txt"
    text.write_text("And he said unto them, Go ye into all the world.\n" * 40)
    out = tmp_path / "b.mindrecord"
    tokenizer = os.path.join(ROOT, "data", "tokenizer", "tokenizer.model")
    count = D.preprocess([str(text)], "text", tokenizer, 16, str(out), domain=1)
    rows = list(ds.MindDataset(str(out), shuffle=False).create_dict_iterator(num_epochs=1, output_numpy=True))
    assert len(rows) == count > 0
    assert all(r["domain_ids"].tolist() == [1] * 17 and len(r["input_ids"]) == 17 for r in rows)
    assert D.check_dataset(str(out), 16, ["input_ids", "domain_ids"])["columns"] == ["domain_ids", "input_ids"] \
        or set(D.mindrecord_info(str(out))["columns"]) == {"input_ids", "domain_ids"}
    with pytest.raises(D.DataError, match=r"domain id must be an integer in 0\.\.2147483647"):
        D.preprocess([str(text)], "text", tokenizer, 16, str(tmp_path / "c.mindrecord"), domain=-1)
    assert not (tmp_path / "c.mindrecord").exists()


def test_a_folder_of_domain_mindrecords_is_one_dataset(tmp_path):
    """dataset_dir may name a folder (MindFormers reads every *.mindrecord under it): one file per domain,
    as the RRE run of bench/bench_experts.py trains on; an empty folder is refused in one line."""
    tokenizer = os.path.join(ROOT, "data", "tokenizer", "tokenizer.model")
    text = tmp_path / "t.txt"
    text.write_text("And he said unto them, Go ye into all the world.\n" * 40)
    counts = [D.preprocess([str(text)], "text", tokenizer, 16, str(tmp_path / "ab" / d / f"{d}.mindrecord"), domain=i)
              for i, d in enumerate("ab")]
    info = D.check_dataset(str(tmp_path / "ab"), 16, ["input_ids", "domain_ids"])
    assert info["num_samples"] == sum(counts) and info["seq_length"] == 17
    assert D.mindrecord_files(str(tmp_path / "ab")) == [str(tmp_path / "ab" / d / f"{d}.mindrecord") for d in "ab"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no MindRecord file"):
        D.mindrecord_info(str(tmp_path / "empty"))


def test_domain_ids_outside_the_rre_groups_are_refused_before_the_run(tmp_path):
    """The graph does not bound-check a domain id: with rre_groups 2 a dataset holding domain id 2 (or no
    domain_ids column) is refused in one line by run_mixtral.py before any model is built, train and eval."""
    from test_training import error_line, write_yaml
    ids = np.random.default_rng(0).integers(3, 100, (8, 17)).astype(np.int32)
    columns = {"input_ids": {"type": "int32", "shape": [-1]}, "domain_ids": {"type": "int32", "shape": [-1]}}
    D.write_mindrecord(str(tmp_path / "d" / "a.mindrecord"), columns,
                       ({"input_ids": r, "domain_ids": np.zeros_like(r)} for r in ids))
    D.write_mindrecord(str(tmp_path / "d" / "c.mindrecord"), columns,  # one sample of domain 2 among domain 1
                       ({"input_ids": r, "domain_ids": np.full_like(r, 2 if i == 3 else 1)} for i, r in enumerate(ids)))
    D.write_mindrecord(str(tmp_path / "plain.mindrecord"), {"input_ids": columns["input_ids"]},
                       ({"input_ids": r} for r in ids))
    rre = {"model.model_config.router_type": "rre", "model.model_config.rre_groups": 2,
           "train_dataset.input_columns": ["input_ids", "domain_ids"]}
    cfg = write_yaml(str(tmp_path), tmp_path / "d", **rre)
    want = f"error: {tmp_path / 'd'} holds domain id 2, but router_type rre has rre_groups 2 (domain ids 0..1)"
    assert error_line("--config", cfg, "--run_mode", "train").startswith(want)
    assert error_line("--config", cfg, "--run_mode", "eval", "--load_checkpoint", tmp_path / "none",
                      "--eval_dataset", tmp_path / "d").startswith(want)
    assert "has no domain_ids column, which router_type rre with 2 expert groups routes by" in \
        error_line("--config", cfg, "--run_mode", "eval", "--load_checkpoint", tmp_path / "none",
                   "--eval_dataset", tmp_path / "plain.mindrecord")
    del rre["train_dataset.input_columns"]  # in-range data, but MindFormers would not feed the column
    (tmp_path / "d" / "c.mindrecord").rename(tmp_path / "c.mindrecord")
    (tmp_path / "d" / "c.mindrecord.db").rename(tmp_path / "c.mindrecord.db")
    assert error_line("--config", write_yaml(str(tmp_path), tmp_path / "d", **rre), "--run_mode", "train") == \
        ("error: router_type rre with 2 expert groups routes by domain_ids, but train_dataset.input_columns "
         "(input_ids) leaves it out; add domain_ids")
    # nothing written but MindFormers' log (in the YAML's output_dir, or an earlier in-process run's)
    assert sorted(set(os.listdir(tmp_path)) - {"log"}) == ["c.mindrecord", "c.mindrecord.db", "d", "plain.mindrecord",
                                                        "plain.mindrecord.db", "run.yaml"]
    assert sorted(os.listdir(tmp_path / "d")) == ["a.mindrecord", "a.mindrecord.db"]
    D.check_dataset(str(tmp_path / "d" / "a.mindrecord"), 16, domain_groups=2)  # ids in range pass
    D.check_dataset(str(tmp_path / "d"), 16, domain_groups=3)
