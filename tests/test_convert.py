"""Checkpoint conversion: safetensors reader/writer, bf16 rounding, bit-exact round trips, the loaders
that accept the output (MindSpore, MindFormers), the plan, and every bad input (clear error, nothing left)."""
import hashlib
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
from mixtral_ms.checkpoint import convert
from mixtral_ms.cli import BadInput
from mixtral_ms.checkpoint.convert import hf2ms, ms2hf, plan
from mixtral_ms.checkpoint.name_map import count_parameters, hf_to_ms, is_training_state, ms_to_hf, parameter_specs
from mixtral_ms.checkpoint.safetensors_io import (CheckpointError, TensorInfo, bf16_to_f32, f32_to_bf16, open_checkpoint,
                                       read_header, to_numpy, write_safetensors)
from test_config import HF_8X7B

TINY8 = os.path.join(FIXTURES, "tiny8")
SCRIPT = os.path.join(ROOT, "scripts", "convert_weight.py")
CFG = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 40, "hidden_size": 16,
       "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64, "rope_theta": 1e6,
       "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}


# ------------------------------------------------------------------------------------------ helpers

def make_hf(folder, dtype="F32", shards=3, seed=0, cfg=None):
    """A random Hugging Face Mixtral checkpoint: config.json, `shards` shards + index, side files."""
    cfg = dict(CFG if cfg is None else cfg, torch_dtype={"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype])
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(folder, side), "w") as f:
            json.dump({"file": side}, f)
    rng = np.random.default_rng(seed)
    items = []
    for spec in parameter_specs(cfg).values():
        for src in spec.sources:
            shape = spec.shape[1:] if len(spec.sources) > 1 else spec.shape
            values = rng.standard_normal(shape).astype(np.float32)
            data = {"F32": values, "BF16": f32_to_bf16(values), "F16": values.astype(np.float16)}[dtype].tobytes()
            items.append((src, dtype, shape, data))
    per = -(-len(items) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(folder, name), items[i * per:(i + 1) * per], {"format": "pt"})
        weight_map.update({item[0]: name for item in items[i * per:(i + 1) * per]})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(len(it[3]) for it in items)}, "weight_map": weight_map}, f)
    return {name: data for name, _, _, data in items}


def tensors_bytes(folder):
    return {name: (info.dtype, info.shape, info.read()) for name, info in open_checkpoint(str(folder)).items()}


def snapshot(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


def leftovers(parent):
    return [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p or p.endswith(".tmp")]


def ms_load_folder(folder):
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    params = {}
    for shard in sorted(set(index["weight_map"].values())):
        params.update(ms.load_checkpoint(os.path.join(folder, shard), format="safetensors"))
    return params


# ------------------------------------------------------------------------------------------ name map, counts

def test_parameter_counts_of_mixtral_8x7b():
    total, active = count_parameters(HF_8X7B)  # the config.json dict itself
    assert total == 46_702_792_704
    assert active == 12_879_925_248 and round(active / 1e9, 1) == 12.9
    specs = parameter_specs(HF_8X7B)
    assert specs["model.layers.31.block_sparse_moe.experts.w2"].shape == (8, 4096, 14336)
    assert specs["model.layers.0.self_attn.k_proj.weight"].shape == (1024, 4096)
    assert len(specs) == 2 + 32 * 10 + 1


def test_name_map_both_ways():
    assert hf_to_ms("model.layers.7.block_sparse_moe.experts.5.w2.weight") == ("model.layers.7.block_sparse_moe.experts.w2", 5)
    assert hf_to_ms("model.layers.7.self_attn.q_proj.weight") == ("model.layers.7.self_attn.q_proj.weight", None)
    assert ms_to_hf("model.layers.1.block_sparse_moe.experts.w3", 2) == [
        "model.layers.1.block_sparse_moe.experts.0.w3.weight", "model.layers.1.block_sparse_moe.experts.1.w3.weight"]
    tied = parameter_specs(dict(CFG, tie_word_embeddings=True, head_dim=8))
    assert "lm_head.weight" not in tied and tied["model.layers.0.self_attn.q_proj.weight"].shape == (32, 16)


# --------------------------------------------- safetensors I/O (its own rules: tests/test_safetensors_io.py)

def test_reader_and_writer_interoperate_with_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file, save_file
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(5, dtype=np.int64),
              "c": np.ones((2, 2), np.float16)}
    save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    ours = open_checkpoint(str(tmp_path / "theirs.safetensors"))
    for k, v in arrays.items():
        np.testing.assert_array_equal(to_numpy(ours[k]), v)
    bf = f32_to_bf16(np.array([1.5, -2.0], np.float32))
    size = write_safetensors(str(tmp_path / "ours.safetensors"),
                             [("x", "F32", (2, 3), arrays["a"].tobytes()), ("e", "BF16", (2,), lambda: [bf[:1], bf[1:]]),
                              ("y", "I64", (5,), ours["b"])])  # bytes, a function giving chunks, a file byte range
    assert size == os.path.getsize(tmp_path / "ours.safetensors")
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    np.testing.assert_array_equal(theirs["x"], arrays["a"])
    np.testing.assert_array_equal(theirs["y"], arrays["b"])
    assert read_header(str(tmp_path / "ours.safetensors"))[0]["e"].read() == bf.tobytes()


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    src, ms_dir, back = tmp_path / "hf", tmp_path / "ms", tmp_path / "back"
    original = make_hf(str(src), dtype)
    result = hf2ms(str(src), str(ms_dir), shard_size=20_000)
    assert result["tensors"] == len(parameter_specs(CFG))
    ms_tensors = open_checkpoint(str(ms_dir))
    w1 = ms_tensors["model.layers.1.block_sparse_moe.experts.w1"]
    assert (w1.dtype, w1.shape) == (dtype, (4, 24, 16))
    assert w1.read() == b"".join(original[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4))
    assert open(ms_dir / "config.json", "rb").read() == open(src / "config.json", "rb").read()  # verbatim
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(ms_dir))
    assert len([f for f in os.listdir(ms_dir) if f.endswith(".safetensors")]) > 1  # sharded
    ms2hf(str(ms_dir), str(back), shard_size=10_000)
    assert tensors_bytes(back) == tensors_bytes(src)
    index = json.load(open(back / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(len(b) for b in original.values())
    assert set(index["weight_map"]) == set(original)
    n = len(set(index["weight_map"].values()))
    assert n > 1 and all(f"-of-{n:05d}.safetensors" in v for v in index["weight_map"].values())
    assert leftovers(tmp_path) == []


def test_dtype_conversion_rounds_to_nearest_even(tmp_path):
    original = make_hf(str(tmp_path / "hf"), "F32")
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "ms16"), dtype="bf16")
    assert json.load(open(tmp_path / "ms16" / "config.json"))["torch_dtype"] == "bfloat16"
    name = "model.layers.0.block_sparse_moe.experts.w2"
    got = open_checkpoint(str(tmp_path / "ms16"))[name]
    want = np.stack([np.frombuffer(original[s], np.float32).reshape(16, 24) for s in ms_to_hf(name, 4)])
    assert got.dtype == "BF16" and got.read() == f32_to_bf16(want).tobytes()
    ms2hf(str(tmp_path / "ms16"), str(tmp_path / "hf32"), dtype="fp32")
    back = open_checkpoint(str(tmp_path / "hf32"))["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    np.testing.assert_array_equal(to_numpy(back), bf16_to_f32(f32_to_bf16(want[3])))
    assert json.load(open(tmp_path / "hf32" / "config.json"))["torch_dtype"] == "float32"


def test_single_file_source_and_training_file_with_optimizer_state(tmp_path):
    from safetensors.numpy import save_file
    make_hf(str(tmp_path / "sharded"))
    src = tmp_path / "single"
    os.makedirs(src)
    shutil.copy(tmp_path / "sharded" / "config.json", src)
    save_file({k: to_numpy(v) for k, v in open_checkpoint(str(tmp_path / "sharded")).items()},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    hf2ms(str(src), str(tmp_path / "ms"))
    # a MindSpore training checkpoint: one file, weights plus optimizer moments, config given separately
    train = tmp_path / "train" / "step_10.safetensors"
    os.makedirs(train.parent)
    ms_tensors = open_checkpoint(str(tmp_path / "ms"))
    write_safetensors(str(train), [(k, v.dtype, v.shape, v) for k, v in ms_tensors.items()] +
                      [("adam_m.model.norm.weight", "F32", (16,), bytes(64)), ("global_step", "I32", (1,), bytes(4))])
    ms2hf(str(train), str(tmp_path / "hf"), config_path=str(src / "config.json"))
    assert tensors_bytes(tmp_path / "hf") == tensors_bytes(src)


# ------------------------------------------------------------------------------------------ loaders

@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_mindspore_load_checkpoint_accepts_the_output(tmp_path, dtype):
    make_hf(str(tmp_path / "hf"))
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "ms"), dtype=dtype, shard_size=20_000)
    params = ms_load_folder(str(tmp_path / "ms"))
    specs = parameter_specs(CFG)
    assert set(params) == set(specs)
    want_dtype = ms.bfloat16 if dtype else ms.float32
    ours = open_checkpoint(str(tmp_path / "ms"))
    for name, spec in specs.items():
        assert tuple(params[name].shape) == spec.shape and params[name].dtype == want_dtype, name
        np.testing.assert_array_equal(params[name].astype(ms.float32).asnumpy(), to_numpy(ours[name]))


def test_converted_fixture_matches_hf_logits_through_mindspore_and_mindformers_loaders(tmp_path):
    from mixtral_ms import MixtralConfig, MixtralForCausalLM
    from mindformers.tools.register import MindFormerConfig
    from mindformers.utils.load_checkpoint_utils import load_checkpoint_with_safetensors
    dst = str(tmp_path / "ms")
    hf2ms(TINY8, dst, shard_size=300_000)
    golden = np.load(os.path.join(TINY8, "golden.npz"))
    ids = Tensor(golden["input_ids"].astype(np.int32))
    model = MixtralForCausalLM(MixtralConfig.from_hf_dir(dst))
    model.set_train(False)
    loaded = ms_load_folder(dst)  # 1) mindspore.load_checkpoint per shard + load_param_into_net
    weights = {p.name for p in model.get_parameters() if not is_training_state(p.name)}
    assert set(loaded) == weights  # the training side channel is not a weight
    assert tuple(loaded["model.layers.1.block_sparse_moe.experts.w2"].shape) == (8, 64, 96)
    not_loaded, _ = ms.load_param_into_net(model, loaded, strict_load=True)
    assert all(is_training_state(name) for name in not_loaded)
    np.testing.assert_allclose(model(ids)[0].asnumpy(), golden["logits"], atol=1e-4, rtol=0)
    # 2) MindFormers: `load_checkpoint: <folder>` with `load_ckpt_format: safetensors`
    fresh = MixtralForCausalLM(MixtralConfig.from_hf_dir(dst))
    fresh.set_train(False)
    cfg = MindFormerConfig(load_checkpoint=dst, load_ckpt_format="safetensors", use_parallel=False,
                           auto_trans_ckpt=False, load_ckpt_async=False, resume_training=False,
                           remove_redundancy=False, output_dir=str(tmp_path / "mf_out"),
                           model={"model_config": {}}, parallel={"parallel_mode": 0}, checkpoint={"load_path": dst})
    load_checkpoint_with_safetensors(cfg, None, fresh, None, do_predict=True)
    np.testing.assert_allclose(fresh(ids)[0].asnumpy(), golden["logits"], atol=1e-4, rtol=0)


def test_fixture_round_trip_is_bit_exact(tmp_path):
    hf2ms(TINY8, str(tmp_path / "ms"), shard_size=300_000)
    ms2hf(str(tmp_path / "ms"), str(tmp_path / "hf"), shard_size=200_000)
    assert tensors_bytes(tmp_path / "hf") == tensors_bytes(TINY8)


# ------------------------------------------------------------------------------------------ plan

def test_plan_reads_headers_only(tmp_path, monkeypatch):
    def no_data(*_):
        raise AssertionError("plan read tensor data")
    make_hf(str(tmp_path / "hf"), "BF16")
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "ms"))
    monkeypatch.setattr(TensorInfo, "read", no_data)
    monkeypatch.setattr(TensorInfo, "iter_chunks", no_data)
    text = plan(str(tmp_path / "hf"))
    total, active = count_parameters(CFG)
    assert f"{total:,} total" in text and f"{active:,} active per token" in text
    assert "model.layers.1.block_sparse_moe.experts.w3" in text and "[4, 24, 16]" in text
    assert "model.layers.1.block_sparse_moe.experts.{0..3}.w3.weight" in text
    nbytes = 2 * total
    assert f"({nbytes:,} bytes) of BF16" in text and "conversion memory" in text and "largest output tensor" in text
    assert "hf2ms" in text and "ms2hf" in plan(str(tmp_path / "ms"))
    fixture = plan(TINY8)
    assert "333,120 total" in fixture


# ------------------------------------------------------------------------------------------ bad input

def _shard_with(folder, tensor):
    return folder / json.load(open(folder / "model.safetensors.index.json"))["weight_map"][tensor]


def _rewrite_shard(path, mutate):
    items = {k: (v.dtype, v.shape, v.read()) for k, v in open_checkpoint(str(path)).items()}
    mutate(items)
    write_safetensors(str(path), [(k, d, s, b) for k, (d, s, b) in items.items()])


def _edit_index(folder, mutate):
    index = json.load(open(folder / "model.safetensors.index.json"))
    mutate(index["weight_map"])
    json.dump(index, open(folder / "model.safetensors.index.json", "w"))


def _edit_config(folder, **changes):
    cfg = json.load(open(folder / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(folder / "config.json", "w"))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)


def _corrupt_header(path):
    data = bytearray(open(path, "rb").read())
    data[8:20] = b"not json!!!!"
    open(path, "wb").write(bytes(data))


NORM, W2 = "model.norm.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight"
BAD_HF = {
    "missing shard": (lambda d: os.remove(_shard_with(d, "lm_head.weight")), "which is missing"),
    "index names absent file": (lambda d: _edit_index(d, lambda m: m.__setitem__("lm_head.weight", "model-00099.safetensors")),
                                "names shard model-00099.safetensors, which is missing"),
    "index names absent tensor": (lambda d: _edit_index(d, lambda m: m.__setitem__("model.extra", m[NORM])),
                                  "puts tensor 'model.extra' in"),
    "truncated": (lambda d: _truncate(_shard_with(d, NORM)), "truncated"),
    "corrupt header": (lambda d: _corrupt_header(_shard_with(d, NORM)), "corrupt header (not JSON)"),
    "missing tensor": (lambda d: (_rewrite_shard(_shard_with(d, W2), lambda it: it.pop(W2)),
                                  _edit_index(d, lambda m: m.pop(W2))), f"missing tensor '{W2}'"),
    "unexpected tensor": (lambda d: (_rewrite_shard(_shard_with(d, NORM), lambda it: it.__setitem__("model.extra.bias", it[NORM])),
                                     _edit_index(d, lambda m: m.__setitem__("model.extra.bias", m[NORM]))),
                          "unexpected tensor 'model.extra.bias'"),
    "shape mismatch": (lambda d: _edit_config(d, intermediate_size=20),
                       "'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape [24, 16], config.json implies [20, 16]"),
    "mixed expert dtypes": (lambda d: _rewrite_shard(_shard_with(d, W2), lambda it: it.__setitem__(
        W2, ("F16", it[W2][1], np.frombuffer(it[W2][2], np.float32).astype(np.float16).tobytes()))), "mixed dtypes"),
    "not a mixtral config": (lambda d: _edit_config(d, model_type="llama"), "not a Mixtral config"),
    # ambiguous: two readers could pick different copies
    "duplicate index key": (lambda d: _duplicate_index_key(d, NORM), f"ambiguous index: '{NORM}' appears twice"),
    "tensor in two shards": (lambda d: _rewrite_shard(_other_shard(d, NORM), lambda it: it.__setitem__(
        NORM, ("F32", (16,), bytes(64)))), f"tensor '{NORM}' is in both"),
    "tensor the index does not list": (lambda d: _rewrite_shard(_shard_with(d, NORM), lambda it: it.__setitem__(
        "model.extra", it[NORM])), "holds tensor 'model.extra', which model.safetensors.index.json does not list"),
    "model.safetensors beside an index": (lambda d: shutil.copy(_shard_with(d, NORM), d / "model.safetensors"),
                                          "holds both model.safetensors and model.safetensors.index.json"),
    # values and dtypes the model cannot take
    "nan weight": (lambda d: _rewrite_shard(_shard_with(d, W2), lambda it: it.__setitem__(
        W2, (it[W2][0], it[W2][1], _with_value(it[W2][2], 7, np.nan)))), f"tensor '{W2}' holds NaN or inf values"),
    "int8 tensor": (lambda d: _rewrite_shard(_shard_with(d, NORM), lambda it: it.__setitem__(NORM, ("I8", (16,), bytes(16)))),
                    f"tensor '{NORM}' has dtype I8; expected one of"),
    "float64 tensor": (lambda d: _rewrite_shard(_shard_with(d, NORM), lambda it: it.__setitem__(
        NORM, ("F64", (16,), np.ones(16).tobytes()))), f"tensor '{NORM}' has dtype F64; expected one of"),
}


def _other_shard(folder, tensor):
    index = json.load(open(folder / "model.safetensors.index.json"))["weight_map"]
    return folder / next(s for s in sorted(set(index.values())) if s != index[tensor])


def _duplicate_index_key(folder, tensor):
    path = folder / "model.safetensors.index.json"
    text = path.read_text().replace('"weight_map": {', f'"weight_map": {{"{tensor}": "{_other_shard(folder, tensor).name}", ', 1)
    path.write_text(text)


def _with_value(data, position, value):
    values = np.frombuffer(data, np.float32).copy()
    values[position] = value
    return values.tobytes()


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_input_fails_cleanly_and_keeps_existing_output(tmp_path, case):
    breaker, message = BAD_HF[case]
    src = tmp_path / "src"
    make_hf(str(src))
    hf2ms(str(src), str(tmp_path / "kept"))
    before = snapshot(tmp_path / "kept")
    breaker(src)
    with pytest.raises((CheckpointError, ValueError)) as err:
        hf2ms(str(src), str(tmp_path / "new"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "new").exists()
    with pytest.raises((CheckpointError, ValueError)):
        hf2ms(str(src), str(tmp_path / "kept"), overwrite=True)
    assert snapshot(tmp_path / "kept") == before
    assert leftovers(tmp_path) == []


BAD_MS = {
    "missing tensor": (lambda d: (_rewrite_shard(_shard_with(d, NORM), lambda it: it.pop(NORM)),
                                  _edit_index(d, lambda m: m.pop(NORM))), "missing tensor 'model.norm.weight'"),
    "shape mismatch": (lambda d: _edit_config(d, num_local_experts=3, num_experts_per_tok=2),
                       "has shape [4, 16], config.json implies [3, 16]"),
    "per-expert layout": (lambda d: (shutil.rmtree(d), shutil.copytree(TINY8, d)), "use hf2ms"),
}


@pytest.mark.parametrize("case", list(BAD_MS))
def test_bad_ms_input_fails_cleanly(tmp_path, case):
    breaker, message = BAD_MS[case]
    make_hf(str(tmp_path / "hf"))
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "ms"))
    breaker(tmp_path / "ms")
    with pytest.raises(CheckpointError) as err:
        ms2hf(str(tmp_path / "ms"), str(tmp_path / "out"))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_destination_rules(tmp_path):
    make_hf(str(tmp_path / "hf"))
    dst = tmp_path / "out"
    hf2ms(str(tmp_path / "hf"), str(dst))
    before = snapshot(dst)
    with pytest.raises(CheckpointError, match="already holds a checkpoint; pass --overwrite"):
        hf2ms(str(tmp_path / "hf"), str(dst))
    assert snapshot(dst) == before
    hf2ms(str(tmp_path / "hf"), str(dst), overwrite=True, dtype="bf16")
    assert snapshot(dst) != before and leftovers(tmp_path) == []
    with pytest.raises(BadInput, match="is .or contains. the source"):
        hf2ms(str(tmp_path / "hf"), str(tmp_path / "hf"), overwrite=True)
    with pytest.raises(BadInput, match="is inside the source"):
        hf2ms(str(tmp_path / "hf"), str(tmp_path / "hf" / "inner"))
    assert not os.path.exists(tmp_path / "hf" / "inner")
    os.makedirs(tmp_path / "notes")
    open(tmp_path / "notes" / "todo.txt", "w").write("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint this converter wrote .'todo.txt' is not a file"):
        hf2ms(str(tmp_path / "hf"), str(tmp_path / "notes"), overwrite=True)
    os.makedirs(tmp_path / "empty")
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "empty"))  # an empty folder is fine
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "new" / "sub" / "dir"))  # missing parents are made
    assert os.path.isfile(tmp_path / "new" / "sub" / "dir" / "config.json")
    _truncate(_shard_with(tmp_path / "hf", NORM))
    with pytest.raises(CheckpointError):
        hf2ms(str(tmp_path / "hf"), str(tmp_path / "made" / "for" / "nothing"))
    assert not (tmp_path / "made").exists()  # ... and removed again when the conversion fails


def test_failure_while_writing_removes_the_temp_folder(tmp_path, monkeypatch):
    make_hf(str(tmp_path / "hf"))
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "out"))
    before = snapshot(tmp_path / "out")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return write_safetensors(*args, **kwargs)
    monkeypatch.setattr(convert, "write_safetensors", failing)
    with pytest.raises(OSError):
        hf2ms(str(tmp_path / "hf"), str(tmp_path / "out"), overwrite=True, shard_size=20_000)
    assert snapshot(tmp_path / "out") == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ CLI

def _cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, GLOG_v="3"))


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    make_hf(str(tmp_path / "hf"))
    ok = _cli("hf2ms", "--src", tmp_path / "hf", "--dst", tmp_path / "ms", "--shard-size", "20KB", "--quiet")
    assert ok.returncode == 0 and f"{len(parameter_specs(CFG))} tensors" in ok.stdout, ok.stderr
    again = _cli("hf2ms", "--src", tmp_path / "hf", "--dst", tmp_path / "ms")
    assert again.returncode == 2
    assert again.stderr.splitlines() == [f"error: destination {tmp_path / 'ms'} already holds a checkpoint; "
                                         "pass --overwrite to replace it"]
    _truncate(_shard_with(tmp_path / "hf", NORM))
    bad = _cli("hf2ms", "--src", tmp_path / "hf", "--dst", tmp_path / "new", "--dtype", "bf16")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("error: ") and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("ms2hf", "--src", tmp_path / "nope", "--dst", tmp_path / "x")
    assert missing.returncode == 2 and missing.stderr.splitlines() == [f"error: no such file or folder {tmp_path / 'nope'}"]
    size = _cli("ms2hf", "--src", tmp_path / "ms", "--dst", tmp_path / "x", "--shard-size", "lots")
    assert size.returncode == 2 and size.stderr.splitlines() == ["error: not a size: 'lots' (use e.g. 2GB, 500MB or a byte count)"]
    planned = _cli("plan", "--src", tmp_path / "ms")
    assert planned.returncode == 0 and "active per token" in planned.stdout
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ loader: the same checks

@pytest.mark.parametrize("case", ["mixed expert dtypes", "int8 tensor", "float64 tensor", "nan weight",
                                  "tensor in two shards", "duplicate index key"])
def test_loader_refuses_what_the_converter_refuses(tmp_path, case):
    from mixtral_ms import MixtralConfig, MixtralForCausalLM
    from mixtral_ms.checkpoint.load import load_weights
    breaker, message = BAD_HF[case]
    src = tmp_path / "src"
    make_hf(str(src))
    breaker(src)
    model = MixtralForCausalLM(MixtralConfig.from_hf_dir(str(src)))
    with pytest.raises(CheckpointError) as converter_err:
        hf2ms(str(src), str(tmp_path / "out"))
    with pytest.raises(CheckpointError) as loader_err:
        load_weights(model, str(src))
    assert message in str(converter_err.value) and message.split(" holds NaN")[0] in str(loader_err.value)
    if case == "nan weight":
        load_weights(model, str(src), allow_nonfinite=True)
        assert np.isnan(dict((p.name, p) for p in model.get_parameters())[
            "model.layers.1.block_sparse_moe.experts.w2"].asnumpy()).sum() == 1


def _save_ckpt(path, folder, dtype=None, extra=()):
    """A MindSpore training .ckpt of a mixtral-ms folder's weights plus optimizer and step state."""
    entries = [{"name": k, "data": Tensor(to_numpy(v).astype(np.float32), dtype=dtype or ms.float32)}
               for k, v in open_checkpoint(str(folder)).items()]
    entries += [{"name": "adam_m.model.norm.weight", "data": Tensor(np.ones(16, np.float32))},
                {"name": "global_step", "data": Tensor(np.array([10], np.int32))}, *extra]
    ms.save_checkpoint(entries, str(path))


def test_ms2hf_of_a_training_ckpt_is_bit_exact(tmp_path):
    make_hf(str(tmp_path / "hf"))
    hf2ms(str(tmp_path / "hf"), str(tmp_path / "ms"))
    _save_ckpt(tmp_path / "step_10.ckpt", tmp_path / "ms")
    ms2hf(str(tmp_path / "step_10.ckpt"), str(tmp_path / "back"), config_path=str(tmp_path / "hf" / "config.json"))
    assert tensors_bytes(tmp_path / "back") == tensors_bytes(tmp_path / "hf")
    # bf16 training weights through the CLI, as users run it after training
    make_hf(str(tmp_path / "hf16"), "BF16")
    hf2ms(str(tmp_path / "hf16"), str(tmp_path / "ms16"))
    _save_ckpt(tmp_path / "bf16.ckpt", tmp_path / "ms16", ms.bfloat16)
    res = _cli("ms2hf", "--src", tmp_path / "bf16.ckpt", "--config", tmp_path / "hf16", "--dst", tmp_path / "back16")
    assert res.returncode == 0, res.stderr
    assert tensors_bytes(tmp_path / "back16") == tensors_bytes(tmp_path / "hf16")
    # what the converter refuses in a .ckpt, the loader refuses too
    _save_ckpt(tmp_path / "int8.ckpt", tmp_path / "ms", extra=[])
    state = ms.load_checkpoint(str(tmp_path / "int8.ckpt"))
    state[NORM] = ms.Parameter(Tensor(np.ones(16, np.int8)), name=NORM)
    ms.save_checkpoint([{"name": k, "data": v} for k, v in state.items()], str(tmp_path / "int8.ckpt"))
    with pytest.raises(CheckpointError, match=f"tensor '{NORM}' has dtype I8"):
        ms2hf(str(tmp_path / "int8.ckpt"), str(tmp_path / "x"), config_path=str(tmp_path / "hf"))
    from mixtral_ms import MixtralConfig, MixtralForCausalLM
    from mixtral_ms.checkpoint.load import load_weights
    with pytest.raises(CheckpointError, match=f"tensor '{NORM}' has dtype I8"):
        load_weights(MixtralForCausalLM(MixtralConfig.from_hf_dir(str(tmp_path / "hf"))), str(tmp_path / "int8.ckpt"))
    open(tmp_path / "junk.ckpt", "wb").write(b"\x00not a checkpoint" * 10)
    junk = _cli("ms2hf", "--src", tmp_path / "junk.ckpt", "--config", tmp_path / "hf", "--dst", tmp_path / "x")
    assert junk.returncode == 2 and len(junk.stderr.strip().splitlines()) == 1
    assert junk.stderr.startswith(f"error: {tmp_path / 'junk.ckpt'}: not a readable MindSpore checkpoint")
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []
