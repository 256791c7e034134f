"""Checkpoint conversion: bit-exact round trips, loaders that accept the output, and every bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from conftest import FIXTURES, ROOT
from mixtral_ms import MixtralConfig, MixtralForCausalLM
from mixtral_ms.convert import hf2ms, ms2hf, plan
from mixtral_ms.name_map import count_parameters
from mixtral_ms.safetensors_io import CheckpointError, open_checkpoint, write_safetensors
from test_config import HF_8X7B

TINY8 = os.path.join(FIXTURES, "tiny8")


def same_tensors(a_dir, b_dir):
    a, b = open_checkpoint(a_dir), open_checkpoint(b_dir)
    assert set(a) == set(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert a[name].read() == b[name].read(), name


def test_parameter_counts_of_mixtral_8x7b():
    total, active = count_parameters(MixtralConfig.from_hf_config(HF_8X7B))
    assert total == 46_702_792_704
    assert round(active / 1e9, 1) == 12.9


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    src = TINY8
    if dtype:  # a bf16 Hugging Face checkpoint to start from
        hf2ms(TINY8, str(tmp_path / "ms32"))
        ms2hf(str(tmp_path / "ms32"), str(tmp_path / "hf16"), dtype=dtype)
        src = str(tmp_path / "hf16")
    hf2ms(src, str(tmp_path / "ms"), shard_size=300_000)
    ms2hf(str(tmp_path / "ms"), str(tmp_path / "hf"), shard_size=200_000)
    same_tensors(src, str(tmp_path / "hf"))
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in open_checkpoint(src).values())
    assert len({*index["weight_map"].values()}) > 1  # sharded
    assert os.path.isfile(tmp_path / "ms" / "generation_config.json")  # side files travel


def test_converted_checkpoint_loads_in_mindspore_and_matches_hf_logits(tmp_path):
    hf2ms(TINY8, str(tmp_path / "ms"), shard_size=300_000)
    index = json.load(open(tmp_path / "ms" / "model.safetensors.index.json"))
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(ms.load_checkpoint(str(tmp_path / "ms" / shard), format="safetensors"))
    model = MixtralForCausalLM(MixtralConfig.from_hf_dir(TINY8))
    assert set(loaded) == {p.name for p in model.get_parameters()}
    assert tuple(loaded["model.layers.1.block_sparse_moe.experts.w2"].shape) == (8, 64, 96)
    not_loaded, _ = ms.load_param_into_net(model, loaded, strict_load=True)
    assert not not_loaded
    model.set_train(False)
    golden = np.load(os.path.join(TINY8, "golden.npz"))
    logits = model(Tensor(golden["input_ids"].astype(np.int32)))[0].asnumpy()
    np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)


def test_bf16_conversion_loads_as_bf16(tmp_path):
    hf2ms(TINY8, str(tmp_path / "ms"), dtype="bf16")
    params = {}
    for f in os.listdir(tmp_path / "ms"):
        if f.endswith(".safetensors"):
            params.update(ms.load_checkpoint(str(tmp_path / "ms" / f), format="safetensors"))
    assert all(p.dtype == ms.bfloat16 for p in params.values())
    assert json.load(open(tmp_path / "ms" / "config.json"))["torch_dtype"] == "bfloat16"


def test_plan_reads_headers_only(tmp_path):
    text = plan(TINY8)
    assert "model.layers.0.block_sparse_moe.experts.w1" in text and "[8, 96, 64]" in text
    assert "333,120 total" in text and "active per token" in text and "conversion memory" in text


def _copy(tmp_path, name="src"):
    dst = tmp_path / name
    shutil.copytree(TINY8, dst)
    return dst


def _shard_with(folder, tensor):
    index = json.load(open(folder / "model.safetensors.index.json"))
    return folder / index["weight_map"][tensor]


def _rewrite_shard(path, mutate):
    """Rewrite one shard with `mutate(dict of name -> (dtype, shape, bytes))` applied."""
    items = {k: (v.dtype, v.shape, v.read()) for k, v in open_checkpoint(str(path)).items()}
    mutate(items)
    write_safetensors(str(path), [(k, d, s, b) for k, (d, s, b) in items.items()])


def _break_missing_shard(folder):
    os.remove(_shard_with(folder, "lm_head.weight"))


def _break_index(folder):
    index = json.load(open(folder / "model.safetensors.index.json"))
    index["weight_map"]["lm_head.weight"] = "model-00099-of-00099.safetensors"
    json.dump(index, open(folder / "model.safetensors.index.json", "w"))


def _break_truncate(folder):
    path = _shard_with(folder, "model.norm.weight")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _break_header(folder):
    path = _shard_with(folder, "model.norm.weight")
    data = bytearray(open(path, "rb").read())
    data[8:20] = b"not json!!!!"
    open(path, "wb").write(bytes(data))


def _break_missing_tensor(folder):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite_shard(_shard_with(folder, name), lambda items: items.pop(name))


def _break_unexpected(folder):
    name = "model.norm.weight"
    _rewrite_shard(_shard_with(folder, name), lambda items: items.__setitem__("model.extra.bias", items[name]))
    index = json.load(open(folder / "model.safetensors.index.json"))
    index["weight_map"]["model.extra.bias"] = index["weight_map"][name]
    json.dump(index, open(folder / "model.safetensors.index.json", "w"))


def _break_shape(folder):
    cfg = json.load(open(folder / "config.json"))
    cfg["intermediate_size"] = 80
    json.dump(cfg, open(folder / "config.json", "w"))


BAD = {
    "missing shard": (_break_missing_shard, "which is missing"),
    "index names absent file": (_break_index, "model-00099-of-00099.safetensors, which is missing"),
    "truncated": (_break_truncate, "truncated"),
    "corrupt header": (_break_header, "corrupt"),
    "missing tensor": (_break_missing_tensor, "experts.3.w2.weight"),
    "unexpected tensor": (_break_unexpected, "unexpected tensor 'model.extra.bias'"),
    "shape mismatch": (_break_shape, "config.json implies [80, 64]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_fail_cleanly(tmp_path, case):
    breaker, message = BAD[case]
    src = _copy(tmp_path)
    breaker(src)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        hf2ms(str(src), str(dst))
    assert message in str(err.value)
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no half-written output left behind


def test_existing_destination_is_refused_and_untouched(tmp_path):
    dst = tmp_path / "out"
    hf2ms(TINY8, str(dst))
    before = {f: os.path.getmtime(dst / f) for f in os.listdir(dst)}
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        hf2ms(TINY8, str(dst))
    _copy(tmp_path, "broken")
    _break_truncate(tmp_path / "broken")
    with pytest.raises(CheckpointError):
        hf2ms(str(tmp_path / "broken"), str(dst), overwrite=True)  # a failing overwrite keeps the old output
    assert {f: os.path.getmtime(dst / f) for f in os.listdir(dst)} == before
    hf2ms(TINY8, str(dst), overwrite=True)


def test_cli_reports_one_line_errors(tmp_path):
    script = os.path.join(ROOT, "scripts", "convert_weight.py")
    env = dict(os.environ, GLOG_v="3")
    bad = subprocess.run([sys.executable, script, "hf2ms", "--src", str(tmp_path / "nope"), "--dst",
                          str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no config.json in {tmp_path / 'nope'}"]
    assert "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, script, "hf2ms", "--src", TINY8, "--dst", str(tmp_path / "out")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "23 tensors" in ok.stdout
