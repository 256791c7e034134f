"""scripts/compress.py: exact identities of each method, int8 error bound, dynamic skipping, bad input; each
method on a model with the MoE options (router bias, shared experts, every other layer dense).

Calibration runs in-process (one per model, a few hundred tokens); the tiny8 methods run as the CLI users
run, those on the options model in-process (the CLI is the same call) but for its refusal.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mindspore import Tensor

from conftest import FIXTURES, ROOT
from mixtral_ms import MixtralForCausalLM
from mixtral_ms.checkpoint.name_map import Kind, hf_shapes, parse
from mixtral_ms.model.schema import ModelDims, hf_config
from mixtral_ms.tools.compress import methods
from mixtral_ms.tools.compress.algorithms import route
from mixtral_ms.tools.compress.calibration import calibrate
from mixtral_ms.tools.compress.source import SourceModel
from mixtral_ms.model.int8 import dequantize_int8
from mixtral_ms.run.data import write_mindrecord
from mixtral_ms.checkpoint.safetensors_io import open_checkpoint, to_numpy, write_safetensors
from test_convert import snapshot
from test_reliability import _leftovers, _paused

CLI = [sys.executable, os.path.join(ROOT, "scripts", "compress.py")]
TINY8 = os.path.join(FIXTURES, "tiny8")  # 2 layers, 8 experts, top-2, vocab 128
IDS = np.random.default_rng(5).integers(3, 128, (2, 12)).astype(np.int32)


def compress(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT)


def ok(*args):
    result = compress(*args)
    assert result.returncode == 0, result.stderr
    return result


def logits(folder, **overrides):
    model = MixtralForCausalLM.from_pretrained(str(folder), **overrides)
    model.set_train(False)
    out = model(Tensor(IDS))
    return out[0].asnumpy(), out[1].asnumpy()


def calibration_data(path):
    """12 samples of 33 token ids in [3, 128): the calibration text of every model here."""
    rng = np.random.default_rng(0)
    write_mindrecord(str(path), {"input_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": rng.integers(3, 128, 33).astype(np.int32)} for _ in range(12)))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Calibration data, tiny8's calibration, and a copy of tiny8 whose experts are all expert 0's."""
    root = tmp_path_factory.mktemp("compress")
    data = calibration_data(root / "calib.mindrecord")
    calibrate(TINY8, data, str(root / "tiny8.npz"), max_tokens=396, sample_tokens=128)

    same = root / "same"
    same.mkdir()
    shutil.copy(os.path.join(TINY8, "config.json"), same / "config.json")
    tensors = open_checkpoint(TINY8)
    items = []
    for name, info in sorted(tensors.items()):
        source = name.replace(".experts." + name.split(".")[5] + ".", ".experts.0.") if ".experts." in name else name
        items.append((name, info.dtype, info.shape, tensors[source]))
    write_safetensors(str(same / "model.safetensors"), items, {"format": "pt"})
    calibrate(str(same), data, str(root / "same.npz"), max_tokens=396, sample_tokens=128)
    return root


def test_prune_and_merge_keeping_all_experts_are_bit_exact(work):
    base, base_router = logits(TINY8)
    for method in ("prune", "merge"):
        out = work / f"{method}8"
        ok(method, "--model", TINY8, "--calibration", work / "tiny8.npz", "--keep", 8, "--out", out)
        got, router = logits(out)
        np.testing.assert_array_equal(got, base)
        np.testing.assert_array_equal(router, base_router)


def test_prune_slices_experts_and_router_rows(work):
    out = work / "prune6"
    ok("prune", "--model", TINY8, "--calibration", work / "tiny8.npz", "--keep", 6, "--out", out)
    record = json.load(open(out / "compression.json"))
    assert json.load(open(out / "config.json"))["num_local_experts"] == 6
    kept = record["kept_experts"]
    assert [len(k) for k in kept] == [6, 6] and all(k == sorted(set(k)) for k in kept)
    _, base_router = logits(TINY8)
    _, router = logits(out)
    # layer 0's router sees the same input: its logits are the kept columns of the original's, exactly
    np.testing.assert_array_equal(router[0], base_router[0][:, kept[0]])
    # the kept experts are the stored copies, byte for byte
    src, dst = open_checkpoint(TINY8), open_checkpoint(str(out))
    for j, e in enumerate(kept[1]):
        name = "model.layers.1.block_sparse_moe.experts.{}.w2.weight"
        assert dst[name.format(j)].read() == src[name.format(e)].read()


def test_merging_or_densifying_identical_experts_leaves_the_logits_unchanged(work):
    base, _ = logits(work / "same")
    ok("merge", "--model", work / "same", "--calibration", work / "same.npz", "--keep", 3, "--out", work / "same3")
    assert json.load(open(work / "same3" / "config.json"))["num_local_experts"] == 3
    np.testing.assert_allclose(logits(work / "same3")[0], base, rtol=0, atol=1e-5)

    ok("densify", "--model", work / "same", "--calibration", work / "same.npz", "--out", work / "dense")
    config = json.load(open(work / "dense" / "config.json"))
    assert config["model_type"] == "mistral" and "num_local_experts" not in config
    assert all(".mlp." in n or ".experts." not in n for n in open_checkpoint(str(work / "dense")))
    np.testing.assert_allclose(logits(work / "dense")[0], base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("group", [None, 32])
def test_int8_round_trip_error_is_at_most_half_a_scale(work, group):
    out = work / f"int8_{group}"
    ok("quantize", "--model", TINY8, "--bits", 8, "--out", out, *(["--group_size", group] if group else []))
    src, q = open_checkpoint(TINY8), open_checkpoint(str(out))
    for layer in range(2):
        for w in ("w1", "w2", "w3"):
            name = f"model.layers.{layer}.block_sparse_moe.experts.{w}"
            weight, scale = to_numpy(q[name]), to_numpy(q[name + "_scale"])
            assert weight.dtype == np.int8 and scale.shape[-1] == (weight.shape[-1] // group if group else 1)
            for e in range(8):
                original = to_numpy(src[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"])
                each = np.repeat(scale[e].astype(np.float64), original.shape[-1] // scale.shape[-1], axis=-1)
                assert (np.abs(original - weight[e] * each) <= each / 2).all()  # every weight's own scale


def test_int8_model_computes_on_the_dequantised_weights(work):
    out = work / "int8_None"
    out.exists() or ok("quantize", "--model", TINY8, "--bits", 8, "--out", out)
    q = open_checkpoint(str(out))
    model = MixtralForCausalLM.from_pretrained(TINY8)
    model.set_train(False)
    for layer, block in enumerate(model.model.layers):
        for w in ("w1", "w2", "w3"):
            name = f"model.layers.{layer}.block_sparse_moe.experts.{w}"
            getattr(block.block_sparse_moe.experts, w).set_data(
                Tensor(dequantize_int8(to_numpy(q[name]), to_numpy(q[name + "_scale"]))))
    quantised = logits(out)[0]
    np.testing.assert_allclose(quantised, model(Tensor(IDS))[0].asnumpy(), rtol=0, atol=1e-6)
    assert np.abs(quantised - logits(TINY8)[0]).max() < 0.05


def test_dynamic_skipping(work):
    base, _ = logits(TINY8)
    np.testing.assert_array_equal(logits(TINY8, dynamic_skip_betas=[0.0, 0.0])[0], base)
    # beta > 1 drops every second choice: the top-1 model
    top1 = logits(TINY8, num_experts_per_tok=1)[0]
    np.testing.assert_allclose(logits(TINY8, dynamic_skip_betas=[1.5, 1.5])[0], top1, rtol=0, atol=1e-6)

    result = ok("skip", "--model", TINY8, "--calibration", work / "tiny8.npz", "--out", work / "skip")
    betas = json.load(open(work / "skip" / "config.json"))["dynamic_skip_betas"]
    with np.load(work / "tiny8.npz") as f:
        np.testing.assert_allclose(betas, f["skip_ratio_median"])
    saved = json.load(open(work / "skip" / "compression.json"))["expert_flops_saved_on_sample"]
    assert all(0.2 < s < 0.3 for s in saved)  # beta = the median: about half of the second choices
    assert "expert FLOPs saved" in result.stdout
    skipped = logits(work / "skip")[0]
    assert not np.array_equal(skipped, base) and np.isfinite(skipped).all()


def test_bad_input_one_line_exit_2_nothing_written(work, tmp_path):
    calib = work / "tiny8.npz"
    (work / "int8_None").exists() or ok("quantize", "--model", TINY8, "--bits", 8, "--out", work / "int8_None")
    cases = [
        (["prune", "--model", TINY8, "--calibration", calib, "--keep", 9], "out of range"),
        (["merge", "--model", TINY8, "--calibration", calib, "--keep", 1], "between top-k (2)"),
        (["prune", "--model", work / "same", "--calibration", calib, "--keep", 4], "from another model"),
        (["merge", "--model", TINY8, "--calibration", tmp_path / "none.npz", "--keep", 4], "no calibration file"),
        (["densify", "--model", TINY8], "no calibration file"),
        (["quantize", "--model", work / "int8_None", "--bits", 8], "already quantised"),
        (["quantize", "--model", TINY8, "--bits", 4], "--bits 4"),
        (["quantize", "--model", TINY8, "--bits", 8, "--group_size", 7], "--group_size 7"),
        (["prune", "--model", work / "int8_None", "--calibration", calib, "--keep", 4], "int8 experts"),
    ]
    rre = work / "rre"  # tiny8 routed by Pangu-Sigma's RRE: nothing reads its router
    if not rre.exists():
        rre.mkdir()
        for name in os.listdir(TINY8):
            if ".safetensors" in name:
                os.symlink(os.path.join(TINY8, name), rre / name)
        json.dump({**json.load(open(os.path.join(TINY8, "config.json"))), "router_type": "rre"},
                  open(rre / "config.json", "w"))
    refused = "routes with router_type rre"
    cases += [(["calibrate", "--model", rre, "--data", work / "calib.mindrecord"], refused),
              (["prune", "--model", rre, "--calibration", calib, "--keep", 4], refused),
              (["merge", "--model", rre, "--calibration", calib, "--keep", 4], refused),
              (["densify", "--model", rre, "--calibration", calib], refused),
              (["skip", "--model", rre, "--calibration", calib], refused)]
    for args, message in cases:
        result = compress(*args, "--out", tmp_path / "out")
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
        assert sorted(os.listdir(tmp_path)) == [], args
    # a destination that holds a checkpoint is left as it was
    (work / "prune6").exists() or ok("prune", "--model", TINY8, "--calibration", calib, "--keep", 6, "--out",
                                     work / "prune6")
    before = {f: os.path.getmtime(work / "prune6" / f) for f in os.listdir(work / "prune6")}
    result = compress("prune", "--model", TINY8, "--calibration", calib, "--keep", 4, "--out", work / "prune6")
    assert result.returncode == 2 and "already holds a checkpoint" in result.stderr
    assert {f: os.path.getmtime(work / "prune6" / f) for f in os.listdir(work / "prune6")} == before
    # calibration: a missing data file, an existing output
    missing = tmp_path / "none.mindrecord"
    result = compress("calibrate", "--model", TINY8, "--data", missing, "--out", tmp_path / "c.npz")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: no dataset at {tmp_path / 'none.mindrecord'}"]
    result = compress("calibrate", "--model", TINY8, "--data", tmp_path / "x.mindrecord", "--out", calib)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert os.listdir(tmp_path) == []


def test_sigterm_mid_write_keeps_the_old_output_and_leaves_no_temp(work, tmp_path):
    """compress.py quantize --overwrite over an earlier output, stopped by SIGTERM after its first shard:
    exit 143, one line, the earlier output byte for byte, no temp folder (convert.write_checkpoint's temp +
    rename, as the converter's own SIGTERM test in test_reliability)."""
    dst = work / "int8_None"
    dst.exists() or ok("quantize", "--model", TINY8, "--bits", 8, "--out", dst)
    before = snapshot(dst)
    proc = _paused(tmp_path / "ready", "mixtral_ms.checkpoint.convert", "write_safetensors", CLI[1],
                   ["quantize", "--model", TINY8, "--bits", 8, "--group_size", 32, "--out", dst, "--overwrite",
                    "--shard-size", "20KB"])
    assert _leftovers(work) == [f"int8_None.tmp-{proc.pid}"]  # a shard is written, the run waits
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines() == ["error: interrupted (SIGTERM); nothing written"]
    assert snapshot(dst) == before and _leftovers(work) == []


# ------------------------------------------------------------------------ the MoE options (issue 24)

# 4 layers, MoE at 1 and 3 (moe_layer_freq 2: 0 and 2 are dense SwiGLU), 4 experts top-2, a router bias,
# one ungated shared expert of width 8.
OPTIONS = dict(vocab_size=128, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64, router_bias_update_rate=0.01,
               num_shared_experts=1, shared_expert_intermediate_size=8, moe_layer_freq=2)
MOE, DENSE = (1, 3), (0, 2)


def options_model(folder, **changes):
    """A Hugging Face layout folder of OPTIONS (+ `changes`): random weights of std 0.3 (routing far from
    uniform), norms near 1, bias entries of std 0.1 (they change some tokens' experts)."""
    dims = ModelDims(**{**OPTIONS, **changes})
    folder.mkdir()
    with open(folder / "config.json", "w") as f:
        json.dump(hf_config(dims), f)
    rng = np.random.default_rng(0)
    items = []
    for name, shape in hf_shapes(dims).items():
        kind = parse(name).kind
        value = (1 + 0.1 * rng.normal(size=shape) if kind in (Kind.NORM, Kind.FINAL_NORM) else
                 0.1 * rng.normal(size=shape) if kind is Kind.ROUTER_BIAS else 0.3 * rng.normal(size=shape))
        items.append((name, "F32", shape, value.astype(np.float32)))
    write_safetensors(str(folder / "model.safetensors"), items, {"format": "pt"})
    return folder


def tensor_bytes(folder):
    return {name: info.read() for name, info in open_checkpoint(str(folder)).items()}


def moe_block(layer):
    return f"model.layers.{layer}.block_sparse_moe."


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """The options model, its calibration, its SourceModel and outputs (logits, router logits, load)."""
    root = tmp_path_factory.mktemp("options")
    model = options_model(root / "model")
    data = calibration_data(root / "calib.mindrecord")
    calibrate(str(model), data, str(root / "calib.npz"), max_tokens=396, sample_tokens=128)
    net = MixtralForCausalLM.from_pretrained(str(model))
    net.set_train(False)
    out = [t.asnumpy() for t in net(Tensor(IDS))[:3]]
    return {"root": root, "model": model, "data": data, "calib": str(root / "calib.npz"),
            "source": SourceModel(str(model)), "out": out, "bytes": tensor_bytes(model)}


def test_calibration_rows_are_the_moe_layers_and_the_search_routes_as_the_model(opt):
    """Row l of the calibration is MoE layer meta["moe_layers"][l]: its sample logits are that layer's router
    logits on the first calibration tokens. route() with the layer's bias reproduces the model's load."""
    with np.load(opt["calib"]) as f:
        meta, sample_logits, counts = json.loads(str(f["meta"])), f["sample_logits"], f["counts"]
    assert meta["moe_layers"] == list(MOE) and sample_logits.shape == (2, 128, 4)
    assert counts.sum(axis=1).tolist() == [396 * 2] * 2
    net = MixtralForCausalLM.from_pretrained(str(opt["model"]))
    net.set_train(False)
    import mindspore.dataset as ds
    batch = np.stack([r for (r,) in ds.MindDataset(opt["data"], columns_list=["input_ids"], shuffle=False)
                      .create_tuple_iterator(num_epochs=1, output_numpy=True)][:4])
    router_logits = net(Tensor(batch))[1].asnumpy()  # [MoE layers, tokens, E]
    np.testing.assert_array_equal(sample_logits, router_logits[:, :128])
    _, router_logits, load = opt["out"]
    for row, layer in enumerate(MOE):
        scoring = opt["source"].scoring(layer)
        index, _ = route(router_logits[row], 2, scoring=scoring)
        assert np.bincount(index.ravel(), minlength=4).tolist() == load[row].tolist()
        assert (index != route(router_logits[row], 2)[0]).any()  # the bias changes some tokens' experts


def test_the_search_routes_sigmoid_scores_with_the_bias_as_the_model(tmp_path):
    """DeepSeek-V3's sigmoid scores (top k of score + bias, the scores renormalised): route() gives the
    model's load."""
    model = options_model(tmp_path / "sigmoid", router_score_function="sigmoid")
    net = MixtralForCausalLM.from_pretrained(str(model))
    net.set_train(False)
    _, router_logits, load, _ = (t.asnumpy() for t in net(Tensor(IDS)))
    source = SourceModel(str(model))
    for row, layer in enumerate(MOE):
        index, _ = route(router_logits[row], 2, scoring=source.scoring(layer))
        assert np.bincount(index.ravel(), minlength=4).tolist() == load[row].tolist()


def _copied_unchanged(opt, out, kinds=(Kind.MLP, Kind.SHARED_EXPERT, Kind.ATTENTION, Kind.EMBEDDING)):
    """Every tensor of `kinds` in `out` is the source's, byte for byte (the dense layers' MLPs among them)."""
    got = tensor_bytes(out)
    names = [n for n in opt["bytes"] if parse(n).kind in kinds]
    assert any(parse(n).kind is Kind.MLP for n in names) and all(got[n] == opt["bytes"][n] for n in names)
    return got


def test_prune_with_the_options(opt):
    """Keeping every expert is the identity (logits and bytes); keeping 2 keeps their bias entries and copies
    shared experts and dense layers, and the pruned model routes as the search evaluated it."""
    source, (base, base_router, _) = opt["source"], opt["out"]
    all4 = opt["root"] / "prune4"
    methods.prune(source, opt["calib"], 4, str(all4))
    assert tensor_bytes(all4) == opt["bytes"]
    np.testing.assert_array_equal(logits(all4)[0], base)

    out = opt["root"] / "prune2"
    kept = methods.prune(source, opt["calib"], 2, str(out))["record"]["kept_experts"]
    assert kept[0] is None and kept[2] is None and all(len(kept[layer]) == 2 for layer in MOE)
    config = json.load(open(out / "config.json"))
    assert config["num_local_experts"] == 2 and config["moe_layer_freq"] == 2 and config["num_shared_experts"] == 1
    got = _copied_unchanged(opt, out)
    for layer in MOE:
        bias = moe_block(layer) + "gate.e_score_correction_bias"
        np.testing.assert_array_equal(np.frombuffer(got[bias], np.float32),
                                      np.frombuffer(opt["bytes"][bias], np.float32)[kept[layer]])
    net = MixtralForCausalLM.from_pretrained(str(out))
    net.set_train(False)
    pruned, router, load = (t.asnumpy() for t in net(Tensor(IDS))[:3])
    assert np.isfinite(pruned).all()
    # layer 1, the first MoE layer, sees the source's input (layer 0 is copied): its router's logits are the
    # kept columns, and its load is what the search's routing (bias, softmax over the kept) gives
    np.testing.assert_array_equal(router[0], base_router[0][:, kept[1]])
    allowed = np.isin(np.arange(4), kept[1])
    index, _ = route(base_router[0], 2, allowed, source.scoring(1))
    assert np.bincount(index.ravel(), minlength=4)[kept[1]].tolist() == load[0].tolist()


def test_merge_with_the_options(opt):
    """Merging into 4 clusters is the identity; into 2, a merged expert's bias entry is its members'
    usage-weighted mean (a singleton's, byte for byte); shared experts and dense layers are copied."""
    source, base = opt["source"], opt["out"][0]
    out4 = opt["root"] / "merge4"
    methods.merge(source, opt["calib"], 4, str(out4))
    np.testing.assert_array_equal(logits(out4)[0], base)

    out = opt["root"] / "merge2"
    record = methods.merge(source, opt["calib"], 2, str(out))["record"]
    clusters, usage = record["clusters"], record["usage"]
    assert clusters[0] is None and usage[2] is None and json.load(open(out / "config.json"))["num_local_experts"] == 2
    got = _copied_unchanged(opt, out)
    for layer in MOE:
        name = moe_block(layer) + "gate.e_score_correction_bias"
        bias, merged = np.frombuffer(opt["bytes"][name], np.float32), np.frombuffer(got[name], np.float32)
        for j, members in enumerate(clusters[layer]):
            weights = np.array(usage[layer])[members] / np.sum(np.array(usage[layer])[members])
            if len(members) == 1:
                assert merged[j] == bias[members[0]]
            else:
                assert merged[j] == pytest.approx(float(weights @ bias[members]), rel=1e-6)
    assert any(len(c) > 1 for layer in MOE for c in clusters[layer])
    assert np.isfinite(logits(out)[0]).all()


def test_densify_folds_the_shared_experts_exactly(opt):
    """The dense MLP of a MoE layer is its experts' usage-weighted average with the shared expert's units
    beside them: the densified model computes exactly the source whose experts were all that average. The
    dense layers keep their MLP, with zero units up to the new width."""
    out = opt["root"] / "dense"
    methods.densify(opt["source"], opt["calib"], str(out))
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == "mistral" and config["intermediate_size"] == 24 + 8
    assert not {"num_local_experts", "router_bias_update_rate", "num_shared_experts", "moe_layer_freq"} & set(config)
    got, source = open_checkpoint(str(out)), opt["source"]
    for layer in DENSE:
        for proj, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            head, tail = np.split(to_numpy(got[name]), [24], axis=axis)
            np.testing.assert_array_equal(head, source.array(name))
            assert not tail.any()
    net = MixtralForCausalLM.from_pretrained(str(opt["model"]))
    net.set_train(False)
    with np.load(opt["calib"]) as f:
        counts = f["counts"]
    for row, layer in enumerate(MOE):
        experts = net.model.layers[layer].block_sparse_moe.experts
        for w in ("w1", "w2", "w3"):
            stack = source.array(moe_block(layer) + f"experts.{w}").astype(np.float64)
            average = np.tensordot(counts[row] / counts[row].sum(), stack, axes=1).astype(np.float32)
            getattr(experts, w).set_data(Tensor(np.stack([average] * 4)))
    np.testing.assert_allclose(logits(out)[0], net(Tensor(IDS))[0].asnumpy(), rtol=0, atol=1e-5)


def test_quantize_with_the_options_keeps_shared_experts_dense_layers_and_bias(opt):
    out = opt["root"] / "int8"
    methods.quantize(opt["source"], str(out))
    got = _copied_unchanged(opt, out, (Kind.MLP, Kind.SHARED_EXPERT, Kind.ROUTER_BIAS, Kind.ROUTER, Kind.ATTENTION))
    assert sorted(n for n in got if n.endswith("_scale")) == sorted(
        moe_block(layer) + f"experts.{w}_scale" for layer in MOE for w in ("w1", "w2", "w3"))
    quantised = logits(out)[0]
    assert np.isfinite(quantised).all() and np.abs(quantised - opt["out"][0]).max() < 0.05


def test_skip_with_the_options_sets_a_beta_per_moe_layer(opt):
    out = opt["root"] / "skip"
    record = methods.skip(opt["source"], opt["calib"], str(out))["record"]
    with np.load(opt["calib"]) as f:
        medians = f["skip_ratio_median"]
    betas = json.load(open(out / "config.json"))["dynamic_skip_betas"]
    assert betas[0] == betas[2] == 0.0 and [betas[layer] for layer in MOE] == medians.tolist()
    saved = record["expert_flops_saved_on_sample"]
    assert saved[0] is None and saved[2] is None and all(0 < saved[layer] < 0.5 for layer in MOE)
    assert tensor_bytes(out) == opt["bytes"]
    skipped = logits(out)[0]
    assert np.isfinite(skipped).all() and not np.array_equal(skipped, opt["out"][0])


def test_densify_refuses_gated_shared_experts_in_one_line(tmp_path):
    """sigmoid(x W_g) * shared(x) is no SwiGLU: the CLI exits 2 with one line and writes nothing (the
    refusal comes before the calibration file is read)."""
    model = options_model(tmp_path / "gated", shared_expert_gate=True)
    result = compress("densify", "--model", model, "--calibration", tmp_path / "none.npz", "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {model} gates its shared experts (shared_expert_gate: sigmoid(x W_g) * shared(x)), which no dense "
        "Mistral MLP computes: densify cannot fold them; prune, merge or quantize instead"]
    assert sorted(os.listdir(tmp_path)) == ["gated"]
