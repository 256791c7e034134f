"""scripts/compress.py: exact identities of each method, int8 error bound, dynamic skipping, bad input.

Calibration runs in-process (one per model, a few hundred tokens); every method runs as the CLI users run.
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
from mixtral_ms.tools.compress.calibration import calibrate
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


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Calibration data, tiny8's calibration, and a copy of tiny8 whose experts are all expert 0's."""
    root = tmp_path_factory.mktemp("compress")
    rng = np.random.default_rng(0)
    data = str(root / "calib.mindrecord")
    write_mindrecord(data, {"input_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": rng.integers(3, 128, 33).astype(np.int32)} for _ in range(12)))
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
