"""Expert surgery through scripts/experts.py (subprocess): exact identities of grow, extract, upcycle and mix
on the committed fixtures, logits through our model, and every bad input (one line, exit 2, nothing written)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mindspore import Tensor

from conftest import FIXTURES, ROOT, USER_ENV
from mixtral_ms import MixtralForCausalLM
from mixtral_ms.checkpoint.convert import hf2ms
from mixtral_ms.checkpoint.name_map import is_training_state, parameter_specs
from mixtral_ms.checkpoint.safetensors_io import open_checkpoint, to_numpy, write_safetensors
from test_convert import leftovers, snapshot, tensors_bytes

TINY8 = os.path.join(FIXTURES, "tiny8")
MISTRAL = os.path.join(FIXTURES, "tinymistral")
SCRIPT = os.path.join(ROOT, "scripts", "experts.py")
E = 8  # tiny8's experts


def cli(*args, ok=True, cwd=None):
    run = subprocess.run([sys.executable, SCRIPT, *map(str, args), "--quiet"], capture_output=True, text=True,
                         timeout=120, cwd=cwd, env=USER_ENV if cwd else None)
    if ok:
        assert run.returncode == 0, run.stderr
    return run


def arrays(folder):
    """Every tensor as a mixtral-ms parameter (experts stacked), as numpy."""
    tensors = open_checkpoint(str(folder))
    config = json.load(open(os.path.join(folder, "config.json")))
    out = {}
    for name, spec in parameter_specs(config).items():
        if name in tensors:
            out[name] = to_numpy(tensors[name])
        else:
            out[name] = np.stack([to_numpy(tensors[s]) for s in spec.sources])
    return out


def logits(folder, ids):
    model = MixtralForCausalLM.from_pretrained(str(folder))
    model.set_train(False)
    return model(Tensor(ids.astype(np.int32)))[0].asnumpy()


def with_config(src, dst, **changes):
    """A copy of a fixture folder with config.json fields changed."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return dst


def perturbed(src, dst, scale=0.05, seed=1):
    """A copy of a fixture folder in which every tensor is moved by random noise (another 'branch')."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    rng = np.random.default_rng(seed)
    by_file = {}
    for name, info in open_checkpoint(str(src)).items():
        by_file.setdefault(os.path.basename(info.path), []).append(info)
    for file, infos in by_file.items():
        items = [(i.name, i.dtype, i.shape, (to_numpy(i) + scale * rng.standard_normal(i.shape)).astype(np.float32))
                 for i in infos]
        write_safetensors(os.path.join(dst, file), items, {"format": "pt"})
    return dst


GATE = "model.layers.{}.block_sparse_moe.gate.weight"
W = "model.layers.{}.block_sparse_moe.experts.{}"


# ------------------------------------------------------------------------------------------ extract

def test_extract_of_all_experts_is_bit_exact_in_both_layouts(tmp_path):
    cli("extract", "--src", TINY8, "--dst", tmp_path / "hf", "--experts", ",".join(map(str, range(E))))
    assert tensors_bytes(tmp_path / "hf") == tensors_bytes(TINY8)
    assert json.load(open(tmp_path / "hf" / "config.json")) == json.load(open(os.path.join(TINY8, "config.json")))
    hf2ms(TINY8, str(tmp_path / "ms"))  # a mixtral-ms source (stacked experts) written by the real converter
    cli("extract", "--src", tmp_path / "ms", "--dst", tmp_path / "ms_all", "--experts", ",".join(map(str, range(E))))
    assert tensors_bytes(tmp_path / "ms_all") == tensors_bytes(tmp_path / "ms")
    cli("extract", "--src", tmp_path / "ms", "--dst", tmp_path / "ms_to_hf", "--layout", "hf",
        "--experts", ",".join(map(str, range(E))))
    assert tensors_bytes(tmp_path / "ms_to_hf") == tensors_bytes(TINY8)


def test_extract_of_a_subset_equals_slicing(tmp_path):
    src = arrays(TINY8)
    hf2ms(TINY8, str(tmp_path / "ms"))
    cli("extract", "--src", tmp_path / "ms", "--dst", tmp_path / "sub", "--experts", "0,3,5")
    cli("extract", "--src", TINY8, "--dst", tmp_path / "per_layer", "--experts", "7,1,2;4,0,6")
    sub, per_layer = arrays(tmp_path / "sub"), arrays(tmp_path / "per_layer")
    for layer, keep in ((0, [7, 1, 2]), (1, [4, 0, 6])):
        for w in ("w1", "w2", "w3"):
            np.testing.assert_array_equal(sub[W.format(layer, w)], src[W.format(layer, w)][[0, 3, 5]])
            np.testing.assert_array_equal(per_layer[W.format(layer, w)], src[W.format(layer, w)][keep])
        np.testing.assert_array_equal(sub[GATE.format(layer)], src[GATE.format(layer)][[0, 3, 5]])
        np.testing.assert_array_equal(per_layer[GATE.format(layer)], src[GATE.format(layer)][keep])
    for name in src:
        if ".block_sparse_moe." not in name:
            np.testing.assert_array_equal(sub[name], src[name])
    config = json.load(open(tmp_path / "sub" / "config.json"))
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert json.load(open(tmp_path / "per_layer" / "surgery.json"))["experts"] == \
        [[[0, 7], [0, 1], [0, 2]], [[0, 4], [0, 0], [0, 6]]]
    ids = np.load(os.path.join(TINY8, "golden.npz"))["input_ids"]
    assert logits(tmp_path / "sub", ids).shape == (2, 12, 128)  # our model loads the smaller Mixtral


def test_rre_extract_of_a_domain_group_gives_the_full_models_logits_on_that_domain(tmp_path):
    """extract of an RRE model's group 1 (experts 4-7 of 2 groups), through the CLI: a model of rre_groups 1,
    same rre_seed, whose logits on domain-1 tokens equal the full model's bit for bit (eval mode, dropless;
    enough tokens that every expert runs on exactly its routed rows). The domain column a domain-1 dataset
    carries reaches the one-group model too (evaluate.py passes it) and changes nothing."""
    full = with_config(TINY8, tmp_path / "rre", router_type="rre", rre_groups=2, rre_seed=3)
    cli("extract", "--src", full, "--dst", tmp_path / "b", "--experts", "4,5,6,7")
    config = json.load(open(tmp_path / "b" / "config.json"))
    assert (config["num_local_experts"], config["rre_groups"], config["rre_seed"], config["router_type"]) == \
        (4, 1, 3, "rre")
    assert json.load(open(tmp_path / "b" / "surgery.json"))["rre_group"] == 1
    ids = Tensor(np.random.default_rng(5).integers(0, 128, (2, 64)).astype(np.int32))
    domain_b = Tensor(np.ones((2, 64), np.int32))
    big, small = MixtralForCausalLM.from_pretrained(str(full)), MixtralForCausalLM.from_pretrained(str(tmp_path / "b"))
    big.set_train(False)
    small.set_train(False)
    want = big(ids, domain_ids=domain_b)[0].asnumpy()
    np.testing.assert_array_equal(small(ids)[0].asnumpy(), want)
    np.testing.assert_array_equal(small(ids, domain_ids=domain_b)[0].asnumpy(), want)
    other = big(ids, domain_ids=Tensor(np.zeros((2, 64), np.int32)))[0].asnumpy()
    assert np.abs(other - want).max() > 1e-3  # the domain does pick the group: the identity is not trivial


@pytest.mark.parametrize("experts", ["0,1", "5,4,6,7", "0,1,2,3;4,5,6,7", "2,3,4,5"])
def test_rre_extract_refuses_anything_but_one_whole_group(tmp_path, experts):
    full = with_config(TINY8, tmp_path / "rre", router_type="rre", rre_groups=2)
    run = cli("extract", "--src", full, "--dst", tmp_path / "out", "--experts", experts, ok=False)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: router_type rre routes by domain group") and \
        "(0,1,2,3 or 4,5,6,7)" in lines[0] and lines[0].endswith(f"got {experts}"), run.stderr
    assert sorted(os.listdir(tmp_path)) == ["rre"]


# ------------------------------------------------------------------------------------------ grow

def test_grow_copy_keeps_old_experts_and_with_top1_the_function(tmp_path):
    src = arrays(TINY8)
    cli("grow", "--src", TINY8, "--dst", tmp_path / "g", "--add", 3, "--init", "copy")
    grown = arrays(tmp_path / "g")
    for layer in range(2):
        for w in ("w1", "w2", "w3"):
            stacked = src[W.format(layer, w)]
            np.testing.assert_array_equal(grown[W.format(layer, w)], np.concatenate([stacked, stacked[:3]]))
        np.testing.assert_array_equal(grown[GATE.format(layer)], np.concatenate([src[GATE.format(layer)],
                                                                                 src[GATE.format(layer)][:3]]))
    assert json.load(open(tmp_path / "g" / "config.json"))["num_local_experts"] == E + 3
    # Top-1: a token whose expert got a twin picks either, with weight exactly 1, so the logits are unchanged.
    top1 = with_config(TINY8, tmp_path / "top1", num_experts_per_tok=1)
    cli("grow", "--src", top1, "--dst", tmp_path / "g1", "--add", E, "--init", "copy")
    ids = np.load(os.path.join(TINY8, "golden.npz"))["input_ids"]
    np.testing.assert_array_equal(logits(tmp_path / "g1", ids), logits(top1, ids))


def test_grow_copy_noise_and_random_are_seeded_and_leave_old_experts(tmp_path):
    src = arrays(TINY8)
    cli("grow", "--src", TINY8, "--dst", tmp_path / "n", "--add", 2, "--init", "copy-noise", "--noise", 0.1)
    cli("grow", "--src", TINY8, "--dst", tmp_path / "n_again", "--add", 2, "--init", "copy-noise", "--noise", 0.1,
        "--layout", "ms")
    cli("grow", "--src", TINY8, "--dst", tmp_path / "n_seed", "--add", 2, "--init", "copy-noise", "--noise", 0.1,
        "--seed", 1)
    cli("grow", "--src", TINY8, "--dst", tmp_path / "r", "--add", 2, "--init", "random")
    noisy, again, seeded, rand = (arrays(tmp_path / d) for d in ("n", "n_again", "n_seed", "r"))
    for name in noisy:
        np.testing.assert_array_equal(noisy[name], again[name])  # same seed, other layout: same tensors
    for layer in range(2):
        for name in (W.format(layer, "w1"), W.format(layer, "w2"), GATE.format(layer)):
            np.testing.assert_array_equal(noisy[name][:E], src[name])
            np.testing.assert_array_equal(rand[name][:E], src[name])
            copied = src[name][:2]
            rms = np.sqrt((copied.astype(np.float64) ** 2).mean(axis=tuple(range(1, copied.ndim)), keepdims=True))
            rel = (noisy[name][E:] - copied) / rms
            assert 0.08 < rel.std() < 0.12, rel.std()  # N(0, (0.1 rms)^2) on each copied tensor
            assert not np.array_equal(seeded[name][E:], noisy[name][E:])
            assert 0.08 < rand[name][E:].std() < 0.12  # N(0, initializer_range = 0.1)
    assert json.load(open(tmp_path / "r" / "surgery.json"))["experts"][0][E:] == [None, None]


# ------------------------------------------------------------------------------------------ upcycle

def test_upcycle_logits_equal_the_dense_model(tmp_path):
    golden = np.load(os.path.join(MISTRAL, "golden.npz"))
    ids = golden["input_ids"]
    cli("upcycle", "--src", MISTRAL, "--dst", tmp_path / "dense", "--experts", 1, "--top-k", 1)
    cli("upcycle", "--src", MISTRAL, "--dst", tmp_path / "top1", "--experts", 4, "--top-k", 1, "--layout", "ms")
    cli("upcycle", "--src", MISTRAL, "--dst", tmp_path / "top2", "--experts", 4)
    dense = logits(tmp_path / "dense", ids)  # our own dense run: one expert, weight 1
    np.testing.assert_allclose(dense, golden["logits"], rtol=0, atol=1e-4)  # transformers' MistralForCausalLM
    # renormalised top-1 weight is exactly 1; the batched matmul over 4 experts and the one over 1 may pick
    # different CPU kernels (5e-7 apart on an AMD EPYC host, equal on an Intel Xeon one)
    np.testing.assert_allclose(logits(tmp_path / "top1", ids), dense, rtol=0, atol=2e-6)
    top2 = logits(tmp_path / "top2", ids)  # w1 y + w2 y with w1 + w2 = 1 up to rounding
    np.testing.assert_allclose(top2, golden["logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(top2, dense, rtol=0, atol=1e-5)
    up = arrays(tmp_path / "top2")
    src = {n: to_numpy(i) for n, i in open_checkpoint(MISTRAL).items()}
    for layer in range(2):
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            np.testing.assert_array_equal(up[W.format(layer, w)],
                                          np.stack([src[f"model.layers.{layer}.mlp.{proj}.weight"]] * 4))
    config = json.load(open(tmp_path / "top2" / "config.json"))
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 4, 2)
    # GShard's pattern: only every second layer upcycled, layer 0 keeps its MLP under Mistral's names
    cli("upcycle", "--src", MISTRAL, "--dst", tmp_path / "every2", "--experts", 4, "--moe-layer-freq", 2)
    half = arrays(tmp_path / "every2")
    np.testing.assert_array_equal(half["model.layers.0.mlp.up_proj.weight"], src["model.layers.0.mlp.up_proj.weight"])
    assert "model.layers.0.block_sparse_moe.gate.weight" not in half and W.format(1, "w1") in half
    np.testing.assert_allclose(logits(tmp_path / "every2", ids), dense, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ mix

def test_mix_of_identical_branches_gives_their_weights_back(tmp_path):
    src = arrays(TINY8)
    cli("mix", "--branches", TINY8, TINY8, TINY8, "--dst", tmp_path / "m", "--weights", "0.3,0.5,0.2",
        "--router", "concat")
    mixed = arrays(tmp_path / "m")
    for name, value in src.items():
        if ".experts." in name or ".gate." in name:
            np.testing.assert_array_equal(mixed[name], np.concatenate([value] * 3))
        else:
            np.testing.assert_array_equal(mixed[name], value)  # averaged in float64: exact
    config = json.load(open(tmp_path / "m" / "config.json"))
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (3 * E, 2)
    # N identical dense branches with a new router are the upcycled model, byte for byte (same seed).
    cli("mix", "--branches", MISTRAL, MISTRAL, "--dst", tmp_path / "md", "--seed", 5)
    cli("upcycle", "--src", MISTRAL, "--dst", tmp_path / "up", "--experts", 2, "--seed", 5)
    assert tensors_bytes(tmp_path / "md") == tensors_bytes(tmp_path / "up")


def test_mix_of_different_branches_averages_with_the_weights(tmp_path):
    other = perturbed(TINY8, tmp_path / "branch_b")
    a, b = arrays(TINY8), arrays(other)
    cli("mix", "--branches", TINY8, other, "--dst", tmp_path / "avg", "--weights", "3,1", "--router", "average",
        "--layout", "ms")
    cli("mix", "--branches", TINY8, other, "--dst", tmp_path / "new", "--top-k", 1)
    avg, new = arrays(tmp_path / "avg"), arrays(tmp_path / "new")
    for name in a:
        mean = ((3 * a[name].astype(np.float64) + b[name]) / 4).astype(np.float32)  # weights 3:1
        if ".experts." in name:
            np.testing.assert_array_equal(avg[name], np.concatenate([a[name], b[name]]))
        elif ".gate." in name:
            np.testing.assert_array_equal(avg[name], np.concatenate([mean, mean]))
            assert new[name].shape == (2 * E, 64) and 0.08 < new[name].std() < 0.12  # N(0, 0.1)
        else:
            np.testing.assert_array_equal(avg[name], mean)
    assert json.load(open(tmp_path / "new" / "config.json"))["num_experts_per_tok"] == 1


# ------------------------------------------------------------------------------------------ bad input

def _bad_cases():
    other_shape = os.path.join(FIXTURES, "tiny4sw")
    return {
        "add 0": (["grow", "--src", TINY8, "--add", 0], "--add must be at least 1"),
        "id out of range": (["extract", "--src", TINY8, "--experts", "0,8"], "expert id 8 out of range"),
        "id repeated": (["extract", "--src", TINY8, "--experts", "1,2,1"], "expert id 1 repeated"),
        "per-layer count": (["extract", "--src", TINY8, "--experts", "0,1;2,3;4,5"], "3 per-layer expert lists"),
        "ragged lists": (["extract", "--src", TINY8, "--experts", "0,1;2,3,4"], "same number of experts"),
        "not ids": (["extract", "--src", TINY8, "--experts", "a,b"], "comma-separated ids"),
        "fewer than top-k": (["extract", "--src", TINY8, "--experts", "3"], "fewer than num_experts_per_tok (2)"),
        "upcycle top-k": (["upcycle", "--src", MISTRAL, "--experts", 1], "fewer than num_experts_per_tok (2)"),
        "upcycle a mixtral": (["upcycle", "--src", TINY8, "--experts", 4], "already a Mixtral"),
        "upcycle no layer": (["upcycle", "--src", MISTRAL, "--experts", 4, "--moe-layer-freq", 5],
                             "no MoE layer: moe_layer_freq 5, first_k_dense 0"),
        "grow a dense model": (["grow", "--src", MISTRAL, "--add", 1], "dense Mistral"),
        "missing source": (["extract", "--src", os.path.join(FIXTURES, "nowhere"), "--experts", "0,1"],
                           "no such folder"),
        "branch shapes": (["mix", "--branches", TINY8, other_shape], "branches of different shapes: vocab_size"),
        "branch kinds": (["mix", "--branches", TINY8, MISTRAL], "branches of different kinds"),
        "one branch": (["mix", "--branches", TINY8], "at least 2 branches"),
        "weights count": (["mix", "--branches", TINY8, TINY8, "--weights", "1,2,3"], "3 weight(s) for 2 branches"),
        "negative weight": (["mix", "--branches", TINY8, TINY8, "--weights", "1,-1"], "non-negative"),
        "dense average": (["mix", "--branches", MISTRAL, MISTRAL, "--router", "average"], "no router rows"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    args, message = _bad_cases()[case]
    run = cli(*args, "--dst", tmp_path / "out", ok=False)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_destination_rules(tmp_path):
    cli("extract", "--src", TINY8, "--dst", tmp_path / "out", "--experts", "0,1")
    before = snapshot(tmp_path / "out")
    run = cli("extract", "--src", TINY8, "--dst", tmp_path / "out", "--experts", "2,3", ok=False)
    assert run.returncode == 2 and "already holds a checkpoint" in run.stderr
    assert snapshot(tmp_path / "out") == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    run = cli("extract", "--src", TINY8, "--dst", tmp_path / "notes", "--experts", "2,3", ok=False)
    assert run.returncode == 2 and "non-empty folder but not a checkpoint" in run.stderr
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    run = cli("extract", "--src", tmp_path / "out", "--dst", tmp_path / "out", "--experts", "0,1", "--overwrite",
              ok=False)
    assert run.returncode == 2 and "is (or contains) the source" in run.stderr
    cli("extract", "--src", TINY8, "--dst", tmp_path / "out", "--experts", "2,3", "--overwrite")
    assert json.load(open(tmp_path / "out" / "surgery.json"))["experts"][0] == [[0, 2], [0, 3]]
    assert leftovers(tmp_path) == []


def test_sigterm_while_writing_removes_the_temp_folder(tmp_path):
    """The real CLI, killed by SIGTERM between two shards: exit 143, one line, no output, no temp folder."""
    code = ("import os, signal, sys; sys.argv[0] = %r\n"
            "import mixtral_ms.checkpoint.convert as c\n"
            "real = c.write_safetensors\n"
            "def slow(*a, **k):\n"
            "    real(*a, **k); os.kill(os.getpid(), signal.SIGTERM)\n"
            "c.write_safetensors = slow\n"
            "import runpy; runpy.run_path(%r, run_name='__main__')\n") % (SCRIPT, SCRIPT)
    run = subprocess.run([sys.executable, "-c", code, "grow", "--src", TINY8, "--dst", str(tmp_path / "out"),
                          "--add", "1", "--shard-size", "64KB", "--quiet"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr
    assert run.stderr.strip() == "error: interrupted (SIGTERM); no output written"
    assert os.listdir(tmp_path) == []


def test_training_checkpoint_file_with_the_run_yaml(tmp_path):
    """A MindSpore .ckpt as training writes it (weights + optimizer state), named with --config run.yaml."""
    import mindspore as ms
    from mixtral_ms.run import runner
    from test_training import write_yaml
    cfg = write_yaml(str(tmp_path), tmp_path / "unused.mindrecord")
    model = runner.build_model(runner.load_run(cfg), None)
    params = {p.name: p.asnumpy() for p in model.get_parameters() if not is_training_state(p.name)}
    state = [{"name": n, "data": ms.Tensor(v)} for n, v in params.items()]
    state += [{"name": p.name, "data": p.value()} for p in model.get_parameters() if p.name not in params]
    state += [{"name": "adam_m." + n, "data": ms.Tensor(np.ones_like(v))} for n, v in params.items()]
    state.append({"name": "global_step", "data": ms.Tensor(np.array([7], np.int32))})
    ms.save_checkpoint(state, str(tmp_path / "step.ckpt"))
    before = sorted(os.listdir(tmp_path))
    run = cli("grow", "--src", tmp_path / "step.ckpt", "--dst", tmp_path / "g", "--add", 1, ok=False)
    refused(run, "name its model with --config", tmp_path, before)
    # The .ckpt is read through MindSpore alone: no MindFormers warnings on stderr, no ./output/log in the cwd.
    (tmp_path / "cwd").mkdir()
    run = cli("grow", "--src", tmp_path / "step.ckpt", "--config", cfg, "--dst", tmp_path / "g", "--add", 0,
              ok=False, cwd=tmp_path / "cwd")
    refused(run, "--add must be at least 1", tmp_path, before + ["cwd"])
    cli("grow", "--src", tmp_path / "step.ckpt", "--config", cfg, "--dst", tmp_path / "g", "--add", 1,
        cwd=tmp_path / "cwd")
    assert os.listdir(tmp_path / "cwd") == []
    grown = arrays(tmp_path / "g")
    experts = params["model.layers.0.block_sparse_moe.experts.w1"]
    np.testing.assert_array_equal(grown["model.layers.0.block_sparse_moe.experts.w1"],
                                  np.concatenate([experts, experts[:1]]))
    for name, value in params.items():
        if ".block_sparse_moe." not in name:
            np.testing.assert_array_equal(grown[name], value)
    assert sorted(open_checkpoint(str(tmp_path / "g"))) == sorted(params)  # stacked names, no optimizer state
    assert json.load(open(tmp_path / "g" / "config.json"))["num_local_experts"] == 9
    assert logits(tmp_path / "g", np.arange(3, 15).reshape(1, 12)).shape == (1, 12, 2000)


def refused(run, message, tmp_path, left):
    """One `error:` line holding `message`, exit 2, nothing written beside the inputs `left`."""
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(left)


@pytest.mark.parametrize("other,message", [
    ({"router_type": "switch", "num_experts_per_tok": 1}, "router_type is 'mixtral' in "),
    ({"router_type": "rre", "rre_groups": 2}, "router_type is 'mixtral' in "),
    ({"num_experts_per_tok": 1}, "num_experts_per_tok is 2 in "),
])
def test_mix_refuses_branches_that_route_differently(tmp_path, other, message):
    b = with_config(TINY8, tmp_path / "b", **other)
    run = cli("mix", "--branches", TINY8, b, "--dst", tmp_path / "out", ok=False)
    refused(run, message, tmp_path, ["b"])
    value = other.get("router_type", other.get("num_experts_per_tok"))
    assert run.stderr.strip().endswith(f"but {value!r} in {b}" + ("" if "router_type" in other else "; pass --top-k"))


def test_mix_with_top_k_reconciles_branches_of_different_top_k(tmp_path):
    b = with_config(TINY8, tmp_path / "b", num_experts_per_tok=1)
    cli("mix", "--branches", TINY8, b, "--dst", tmp_path / "out", "--top-k", 1)
    assert json.load(open(tmp_path / "out" / "config.json"))["num_experts_per_tok"] == 1


@pytest.mark.parametrize("command", ["grow", "mix"])
def test_grow_and_mix_refuse_an_rre_model(tmp_path, command):
    """Both change the expert count, so the equal domain groups would change size: refused in one line."""
    full = with_config(TINY8, tmp_path / "rre", router_type="rre", rre_groups=2)
    args = ["--src", full, "--add", 2] if command == "grow" else ["--branches", full, full]
    run = cli(command, *args, "--dst", tmp_path / "out", ok=False)
    refused(run, f"{command} of a router_type rre model would change its domain groups (2 groups of 4 experts)",
            tmp_path, ["rre"])
