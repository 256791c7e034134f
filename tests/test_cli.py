"""The tools' shared command-line rules (mixtral_ms/cli.py, mixtral_ms/outputs.py; docs/reliability.md), tested
on the paths users run: each bad input is one `error:` line and exit status 2, SIGINT / SIGTERM exit 130 / 143
(also while MindSpore is still importing), old outputs survive byte for byte, nothing is left behind.

Most refusals happen before MindSpore is imported, so they run as real subprocesses, all at once; the cases
that need MindSpore anyway (JSONL read while writing, datasets, the Python API) run in this process, where it
is already imported."""
import gc
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import FIXTURES, ROOT, USER_ENV
from test_reliability import ENV, _error_line

SCRIPTS = os.path.join(ROOT, "scripts")
TINY8, TINYMISTRAL = os.path.join(FIXTURES, "tiny8"), os.path.join(FIXTURES, "tinymistral")
TINY_YAML = os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml")


def _cmd(script, *args):
    path = os.path.join(SCRIPTS, script)
    return (["bash", path] if script.endswith(".sh") else [sys.executable, path]) + [str(a) for a in args]


def _all(commands, env=ENV, cwd=ROOT):
    """Run the commands at once (each starts a Python: a fraction of a second of imports, no MindSpore)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                              start_new_session=True) for c in commands]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # a tool that started working instead of refusing: stop it all
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _yaml(path, **changes):
    """configs/mixtral_tiny_cpu.yaml with top-level (dotted) changes; a key set to None is removed."""
    config = yaml.safe_load(open(TINY_YAML))
    for dotted, value in changes.items():
        node, keys = config, dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    path.write_text(yaml.safe_dump(config))
    return path


def _files(folder):
    return sorted(os.listdir(folder))


def test_bad_input_is_one_line_before_any_work(tmp_path):
    """Every tool, every class of the issue that is refused before MindSpore: one line, exit 2, nothing
    written (no temp file, no ./output), the inputs untouched."""
    model = tmp_path / "model"
    shutil.copytree(TINY8, model)
    shard = next(str(model / f) for f in sorted(os.listdir(model)) if f.endswith(".safetensors"))
    (tmp_path / "bad.yaml").write_text("model: [a\n b: c")
    (tmp_path / "list.yaml").write_text("- model\n- layers\n")
    stats = tmp_path / "stats.jsonl"
    stats.write_text(json.dumps({"step": 1, "tokens_per_expert": [[1, 2]], "dropped_fraction": [0.0],
                                 "aux_loss": 1.0, "z_loss": 0.1}) + "\n" + json.dumps({"step": 2}) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "file").write_text("a file")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "whole.npz", meta=np.array("{}"), x=np.zeros(1000))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:300])
    os.symlink(tmp_path / "file", tmp_path / "link.mindrecord")
    layout16 = tmp_path / "layout16.yaml"
    layout16.write_text(yaml.safe_dump({"use_parallel": True, "parallel_config": {
        "data_parallel": 8, "model_parallel": 1, "pipeline_stage": 2}}))
    out = tmp_path / "out"
    run_yaml = dict(output_dir=str(out))
    cases = [
        (_cmd("experts.py", "upcycle", "--src", TINYMISTRAL, "--dst", out, "--experts", 2, "--top-k", 0),
         "error: num_experts_per_tok must be at least 1, got 0"),
        (_cmd("experts.py", "mix", "--branches", TINY8, TINY8, "--dst", out, "--top-k", 0),
         "error: num_experts_per_tok must be at least 1, got 0"),
        (_cmd("experts.py", "extract", "--src", shard, "--config", tmp_path / "bad.yaml", "--dst", out, "--experts",
              "0,1"), f"error: {tmp_path / 'bad.yaml'}: malformed YAML at line 2"),
        (_cmd("experts.py", "extract", "--src", shard, "--config", tmp_path / "list.yaml", "--dst", out, "--experts",
              "0,1"), f"error: {tmp_path / 'list.yaml'}: the YAML must be a mapping of sections"),
        (_cmd("experts.py", "grow", "--src", model, "--dst", model / "grown", "--add", 1),
         f"error: destination {model / 'grown'} is inside the source {model}; choose a folder outside it"),
        (_cmd("compress.py", "prune", "--model", model, "--keep", 2, "--out", model / "pruned"),
         f"error: destination {model / 'pruned'} is inside the source {model}; choose a folder outside it"),
        (_cmd("compress.py", "prune", "--model", model, "--keep", 2, "--out", out, "--calibration",
              tmp_path / "empty.npz"), f"error: {tmp_path / 'empty.npz'} is not a calibration file"),
        (_cmd("compress.py", "prune", "--model", model, "--keep", 2, "--out", out, "--calibration",
              tmp_path / "truncated.npz"), f"error: {tmp_path / 'truncated.npz'} is not a calibration file"),
        (_cmd("plot_router.py", "--stats", stats, "--output", tmp_path / "p.png"),
         f"error: {stats}:2: not a router-stats record (missing key(s) tokens_per_expert, dropped_fraction, "
         "aux_loss, z_loss)"),
        (_cmd("plot_router.py", "--stats", stats, "--output", folder),
         f"error: --output {folder} is a folder; name a file"),
        (_cmd("plot_router.py", "--stats", stats, "--output", tmp_path / "file" / "p.png"),
         f"error: --output {tmp_path / 'file' / 'p.png'}: {tmp_path / 'file'} is not a folder"),
        (_cmd("train_tokenizer.py", "--output", folder), f"error: --output {folder} is a folder; name a file"),
        (_cmd("preprocess_data.py", "--input", os.path.join(ROOT, "data", "corpus"), "--seq_length", 64, "--output",
              out / "x.mindrecord", "--domain_id", 2 ** 32),
         "error: domain id must be an integer in 0..2147483647 (an int32 column), got 4294967296"),
        (_cmd("preprocess_data.py", "--input", os.path.join(ROOT, "data", "corpus"), "--seq_length", 64, "--output",
              tmp_path / "link.mindrecord", "--overwrite"),
         f"error: {tmp_path / 'link.mindrecord'} is a symbolic link; name the MindRecord file itself"),
        (_cmd("run_mixtral.py", "--config", _yaml(tmp_path / "pp2.yaml", **run_yaml,
                                                   **{"parallel_config.pipeline_stage": 2})),
         "error: parallel_config.pipeline_stage 2 needs use_parallel: True"),
        (_cmd("run_mixtral.py", "--config", _yaml(tmp_path / "predict.yaml", run_mode="predict", train_dataset=None,
                                                   train_dataset_task=None, **run_yaml),
              "--run_mode", "train", "--train_dataset", tmp_path / "x.mindrecord"),
         f"error: --train_dataset needs a train_dataset.data_loader section in {tmp_path / 'predict.yaml'}"),
        (_cmd("run_mixtral.py", "--config", _yaml(tmp_path / "eval.yaml", **run_yaml), "--run_mode", "eval",
              "--eval_output", folder), f"error: eval output {folder} is a folder; name a file"),
        (_cmd("msrun_launcher.sh", "--config", layout16, "--worker_num", 8, "--log_dir", out, "--dry_run"),
         f"error: msrun_launcher: --worker_num 8 does not match {layout16}: data_parallel 8 x model_parallel 1 x "
         "pipeline_stage 2 = 16 processes"),
        (_cmd("msrun_launcher.sh", "--config", TINY_YAML, "--worker_num", 2, "--log_dir", out, "--dry_run"),
         f"error: msrun_launcher: {TINY_YAML} does not set use_parallel: True, so each of the 2 workers"),
        (_cmd("device_check.sh", "--device", "cpu", "--devices", 3, "--out", out, "--venv", out / "venv"),
         "error: --devices 3 exceeds the 2 CPU device(s) of this machine"),
        (_cmd("device_check.sh", "--device", "cpu", "--out", tmp_path / "file", "--venv", out / "venv"),
         f"error: --out {tmp_path / 'file'} exists and is not a folder"),
    ]
    before = {p: open(os.path.join(model, p), "rb").read() for p in os.listdir(model)}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for (command, message), res in zip(cases, _all([c for c, _ in cases], env=USER_ENV, cwd=cwd)):
        assert _error_line(res).startswith(message), (command, res.stderr)
    assert not out.exists() and _files(folder) == [] and _files(cwd) == []
    assert {p: open(os.path.join(model, p), "rb").read() for p in os.listdir(model)} == before
    assert (tmp_path / "file").read_text() == "a file" and os.path.islink(tmp_path / "link.mindrecord")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# ------------------------------------------------------------------------------------------ signals

SIGNAL_DURING_IMPORT = """
import os, runpy, sys
class SignalOnImport:  # the signal lands while MindSpore is half imported (its C++ module loaded)
    def find_spec(self, name, path=None, target=None):
        if name == "mindspore.common":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {signum})
        return None
sys.meta_path.insert(0, SignalOnImport())
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_signal_while_mindspore_imports_exits_130_or_143(tmp_path):
    """SIGTERM / SIGINT while MindSpore is importing (the first seconds of preprocessing, a run, calibrate,
    experts.py on a .ckpt): the one line and 143 / 130, not MindSpore's C++ abort (status 134)."""
    out = tmp_path / "train.mindrecord"
    runs = [(signal.SIGTERM, os.path.join(SCRIPTS, "preprocess_data.py"),
             ["--input", os.path.join(ROOT, "data", "corpus"), "--seq_length", "64", "--output", str(out)],
             "error: interrupted (SIGTERM); no output written"),
            (signal.SIGINT, os.path.join(SCRIPTS, "run_mixtral.py"),
             ["--config", str(_yaml(tmp_path / "run.yaml", output_dir=str(tmp_path / "run")))],
             "error: interrupted by SIGINT")]
    results = _all([[sys.executable, "-c", SIGNAL_DURING_IMPORT.format(signum=int(sig), script=script, argv=argv)]
                    for sig, script, argv, _ in runs])
    for (sig, _, _, line), res in zip(runs, results):
        assert res.returncode == 128 + sig and res.stderr.strip().splitlines() == [line], res.stderr[-2000:]
    assert _files(tmp_path) == ["run", "run.yaml"]  # the run's output_dir (made before the import) and no data


# ------------------------------------------------------------------------------------------ outputs

FAIL_SECOND_RENAME = """
import errno, os, runpy, sys
real = os.replace
def replace(src, dst, **kwargs):
    if os.path.basename(str(dst)) == "train_heldout.mindrecord" and ".tmp-" in str(src):  # another filesystem
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(dst))
    return real(src, dst, **kwargs)
os.replace = replace
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_two_file_output_is_all_or_nothing(tmp_path):
    """preprocess_data.py --heldout_fraction writes two MindRecord pairs; when a rename of the second fails,
    the first (already renamed) is put back: all four old files byte for byte, no temp file left."""
    old = {}
    for name in ("train.mindrecord", "train_heldout.mindrecord"):
        old[name] = f"old {name}".encode()
        old[name + ".db"] = b"SQLite format 3\x00" + f"old {name} index".encode()  # what the tool recognises
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    argv = ["--input", os.path.join(ROOT, "data", "corpus"), "--seq_length", "64", "--output",
            str(tmp_path / "train.mindrecord"), "--heldout_fraction", "0.2", "--overwrite"]
    script = os.path.join(SCRIPTS, "preprocess_data.py")
    res = _all([[sys.executable, "-c", FAIL_SECOND_RENAME.format(script=script, argv=argv)]])[0]
    assert _error_line(res) == f"error: Invalid cross-device link: {tmp_path / 'train_heldout.mindrecord'}"
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == old


def test_symlinked_output_is_written_through_and_a_second_surgery_keeps_its_record(tmp_path):
    """plot_router.py writes through a symlink (the link stays, no temp file); a grow of an extract records
    "grow" with the extract's record as its history (the source's surgery.json is not copied over it)."""
    stats = tmp_path / "stats.jsonl"
    stats.write_text(json.dumps({"step": 1, "tokens_per_expert": [[3, 1]], "dropped_fraction": [0.0],
                                 "aux_loss": 1.0, "z_loss": 0.1}) + "\n")
    (tmp_path / "old.png").write_bytes(b"old")
    os.symlink(tmp_path / "old.png", tmp_path / "link.png")
    plot = _cmd("plot_router.py", "--stats", stats, "--output", tmp_path / "link.png")
    extract = _cmd("experts.py", "extract", "--src", TINY8, "--dst", tmp_path / "two", "--experts", "0,1", "--quiet")
    res_plot, res_extract = _all([plot, extract])
    assert res_plot.returncode == 0 and res_extract.returncode == 0, res_plot.stderr + res_extract.stderr
    assert os.path.islink(tmp_path / "link.png") and (tmp_path / "old.png").read_bytes()[:4] == b"\x89PNG"
    grow = _all([_cmd("experts.py", "grow", "--src", tmp_path / "two", "--dst", tmp_path / "three", "--add", 1,
                      "--quiet")])[0]
    assert grow.returncode == 0, grow.stderr
    record = json.load(open(tmp_path / "three" / "surgery.json"))
    assert record["operation"] == "grow" and record["experts"][0] == [[0, 0], [0, 1], [0, 0]]
    assert record["previous"] == {str(tmp_path / "two"): json.load(open(tmp_path / "two" / "surgery.json"))}
    assert record["previous"][str(tmp_path / "two")]["operation"] == "extract"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p or ".old-" in p]


def test_inherited_yaml_gives_experts_py_its_base_dimensions(tmp_path):
    """experts.py --config configs/compress/dense_tiny_cpu.yaml (base_config: ../mixtral_tiny_cpu.yaml) reads the
    inherited sizes (hidden 128, vocab 2000), not the 8x7B defaults; MindFormers' reader writes no ./output."""
    from safetensors.numpy import save_file
    from mixtral_ms.model.schema import ModelDims
    from mixtral_ms.checkpoint.name_map import parameter_specs
    dims = ModelDims(vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=1, num_experts_per_tok=1)
    tensors = {}
    for name, spec in parameter_specs(dims).items():
        if ".gate." in name:
            continue
        if ".experts." in name:  # a dense checkpoint: mlp.{gate,up,down}_proj
            layer, kind = name.split(".")[2], name.rsplit(".", 1)[1]
            tensors[f"model.layers.{layer}.mlp.{dict(w1='gate', w3='up', w2='down')[kind]}_proj.weight"] = \
                np.zeros(spec.shape[1:], np.float32)
        else:
            tensors[name] = np.zeros(spec.shape, np.float32)
    save_file(tensors, str(tmp_path / "dense.safetensors"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = _all([_cmd("experts.py", "upcycle", "--src", tmp_path / "dense.safetensors", "--config",
                     os.path.join(ROOT, "configs", "compress", "dense_tiny_cpu.yaml"), "--dst", tmp_path / "moe",
                     "--experts", 2, "--quiet")], env=USER_ENV, cwd=cwd)[0]
    assert res.returncode == 0, res.stderr[-2000:]
    config = json.load(open(tmp_path / "moe" / "config.json"))
    assert (config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]) == (128, 2000, 2)
    assert config["num_local_experts"] == 2 and _files(cwd) == []


# ------------------------------------------------------------------------------------------ in this process

def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jsonl_nesting_and_lone_surrogates_name_the_line(tmp_path, capsys):
    preprocess = _script("preprocess_data")
    for i, (line, message) in enumerate([("[" * 100000 + "]" * 100000, "JSON nested too deeply to read"),
                                         ('{"text": "a \\ud800 b"}', "a lone UTF-16 surrogate escape")]):
        path = tmp_path / f"in{i}.jsonl"
        path.write_text('{"text": "fine"}\n' + line + "\n")
        status = preprocess.main(["--input", str(path), "--format", "jsonl", "--seq_length", "8", "--output",
                                  str(tmp_path / f"out{i}.mindrecord")])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {path}:2: {message}"), err
    assert _files(tmp_path) == ["in0.jsonl", "in1.jsonl"]


def test_dataset_folder_of_mixed_files_is_refused_up_front(tmp_path):
    from mixtral_ms.run.data import DataError, check_dataset, write_mindrecord
    column = {"type": "int32", "shape": [-1]}
    for name, tokens, columns in (("a.mindrecord", 17, ("input_ids",)), ("b.mindrecord", 9, ("input_ids",)),
                                  ("c.mindrecord", 17, ("input_ids", "labels"))):
        folder = tmp_path / name[0]
        write_mindrecord(str(folder / name), {c: column for c in columns},
                         [{c: np.arange(tokens, dtype=np.int32) for c in columns}] * 4)
    for pair, what in ((("a", "b"), "sample lengths"), (("a", "c"), "columns")):
        mixed = tmp_path / "".join(pair)
        for part in pair:
            shutil.copytree(tmp_path / part, mixed / part)
        with pytest.raises(DataError, match=f"its MindRecord files differ in {what}"):
            check_dataset(str(mixed), 16)


def test_python_api_refuses_inputs_the_graph_cannot_take(tmp_path):
    """Empty ids, 1-D ids for a call, more positions than max_position_embeddings: a ValueError naming
    input_ids (not a C++ error); a config.json dimension of 2^70: a ConfigError naming the field."""
    from mindspore import Tensor
    from mixtral_ms import ConfigError, MixtralConfig, MixtralForCausalLM
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             max_position_embeddings=8))
    model.set_train(False)
    for ids, message in ((np.zeros((1, 0), np.int32), r"input_ids is empty \(shape \(1, 0\)\)"),
                         (np.zeros((4,), np.int32), r"input_ids must be integer token ids of shape \[batch, seq\]"),
                         (np.zeros((1, 9), np.int32), r"input_ids hold 9 positions, more than max_position_embeddings")):
        with pytest.raises(ValueError, match=message):
            model(Tensor(ids))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(np.zeros((1, 0), np.int32), max_new_tokens=1)
    shutil.copytree(TINY8, tmp_path / "huge")
    config = json.load(open(tmp_path / "huge" / "config.json"))
    config["hidden_size"] = 2 ** 70
    json.dump(config, open(tmp_path / "huge" / "config.json", "w"))
    with pytest.raises(ConfigError, match=f"hidden_size {2 ** 70} is beyond any model this code can build"):
        MixtralForCausalLM.from_pretrained(str(tmp_path / "huge"))


def test_calibration_write_error_is_one_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """A disk that fills up while the calibration file is written: one CompressionError (the CLI's one line),
    the old file byte for byte, no temp file, and no "Exception ignored" from the zip's finaliser."""
    import errno
    from mixtral_ms.tools.compress import CompressionError
    from mixtral_ms.tools.compress import calibration
    out = tmp_path / "m.calibration.npz"
    out.write_bytes(b"old calibration")
    real, writes = np.lib.format.write_array, []

    def full_disk(f, array, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, array, **kwargs)
    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(CompressionError, match=f"writing the calibration file {out} failed: No space left on device"):
        calibration._save(str(out), {"meta": np.array("{}"), "a": np.zeros(10), "b": np.zeros(10)})
    gc.collect()
    assert unraisable == [] and out.read_bytes() == b"old calibration" and _files(tmp_path) == [out.name]
