"""docs/reliability.md, tested on the paths users run: every CLI as a subprocess (exit status, its one
stderr line, the files left on disk), killed with SIGKILL and SIGTERM at known points, then run again."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_convert import NORM, _shard_with, make_hf, snapshot, tensors_bytes

CONVERT = os.path.join(ROOT, "scripts", "convert_weight.py")
PREPROCESS = os.path.join(ROOT, "scripts", "preprocess_data.py")
LAUNCHER = os.path.join(ROOT, "scripts", "msrun_launcher.sh")
ENV = dict(os.environ, GLOG_v="3", PYTHONPATH=ROOT)


def _run(*cmd, **kwargs):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, cwd=ROOT, **kwargs)


def _convert(*args, **kwargs):
    return _run(sys.executable, CONVERT, *args, **kwargs)


def _error_line(res):
    """The single stderr line of a refused run (exit 2, no traceback)."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.returncode, res.stderr)
    return lines[0]


def _leftovers(parent):
    return sorted(p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p)


# A CLI run that stops at a known point: Python run before the script patches one function to make a
# file appear and then wait to be killed (PAUSE_AFTER), or makes the run kill itself (KILL_BETWEEN_RENAMES).
PAUSE_AFTER = """
import os, runpy, sys, time
import {module} as target
real = target.{name}
def paused(*args, **kwargs):
    out = real(*args, **kwargs)
    open({ready!r}, "w").close()
    time.sleep(120)
    return out
target.{name} = paused
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""

KILL_BETWEEN_RENAMES = """
import os, runpy, signal, sys
real = os.replace
def replace(src, dst, **kwargs):
    real(src, dst, **kwargs)
    if ".old-" in str(dst):  # the old destination is set aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def _paused(ready, module, name, script, argv, wait=True):
    """`script argv` started with `module.name` patched to create the file `ready` (not where the outputs
    go) after it returns, then wait to be killed."""
    code = PAUSE_AFTER.format(module=module, name=name, ready=str(ready), script=script, argv=[str(a) for a in argv])
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT)
    if wait:
        _wait_ready(proc, ready)
    return proc


def _wait_ready(proc, ready):
    deadline = time.time() + 180
    while not os.path.exists(ready):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never reached the pause point"
        time.sleep(0.05)


@pytest.fixture
def checkpoints(tmp_path):
    """A Hugging Face checkpoint, its conversion at `ms`, and the expected bytes of a bf16 conversion."""
    make_hf(str(tmp_path / "hf"))
    assert _convert("hf2ms", "--src", tmp_path / "hf", "--dst", tmp_path / "ms", "--quiet").returncode == 0
    assert _convert("hf2ms", "--src", tmp_path / "hf", "--dst", tmp_path / "want16", "--dtype", "bf16",
                    "--quiet").returncode == 0
    return tmp_path


# ------------------------------------------------------------------------------------------ converter: ownership

def test_overwrite_refuses_a_folder_the_converter_did_not_write(checkpoints):
    repo = checkpoints / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "train.py").write_text("print('mine')\n")
    shutil.copy(checkpoints / "hf" / "config.json", repo)
    before = {p: open(os.path.join(repo, p), "rb").read() for p in ("config.json", "train.py", ".git/HEAD")}
    res = _convert("hf2ms", "--src", checkpoints / "hf", "--dst", repo, "--overwrite")
    assert _error_line(res) == (f"error: destination {repo} is a non-empty folder but not a checkpoint this "
                                "converter wrote ('.git' is not a file the converter writes); refusing to replace "
                                "it; choose another folder")
    assert {p: open(os.path.join(repo, p), "rb").read() for p in before} == before
    assert sorted(os.listdir(repo)) == [".git", "config.json", "train.py"] and _leftovers(checkpoints) == []
    # one foreign file among a converted checkpoint is refused too; the converted checkpoint is replaceable
    (checkpoints / "ms" / "NOTES.md").write_text("mine")
    res = _convert("hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "ms", "--overwrite")
    assert "'NOTES.md' is not a file the converter writes" in _error_line(res)
    os.remove(checkpoints / "ms" / "NOTES.md")
    assert _convert("hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "ms", "--overwrite", "--dtype",
                    "bf16", "--quiet").returncode == 0
    assert tensors_bytes(checkpoints / "ms") == tensors_bytes(checkpoints / "want16")


def test_symlinked_destination_is_written_through(checkpoints):
    link = checkpoints / "link"
    os.symlink(checkpoints / "ms", link)
    res = _convert("hf2ms", "--src", checkpoints / "hf", "--dst", link, "--overwrite", "--dtype", "bf16", "--quiet")
    assert res.returncode == 0, res.stderr
    assert os.path.islink(link) and os.readlink(link) == str(checkpoints / "ms")
    assert tensors_bytes(checkpoints / "ms") == tensors_bytes(checkpoints / "want16")
    assert _leftovers(checkpoints) == []
    dangling = checkpoints / "dangling"
    os.symlink(checkpoints / "later", dangling)  # a link to a folder not made yet: made at the link's target
    assert _convert("hf2ms", "--src", checkpoints / "hf", "--dst", dangling, "--quiet").returncode == 0
    assert os.path.islink(dangling) and os.path.isfile(checkpoints / "later" / "config.json")


# ------------------------------------------------------------------------------------------ converter: kills

def test_sigterm_mid_conversion_removes_its_temp_folder_and_keeps_the_old_output(checkpoints):
    before = snapshot(checkpoints / "ms")
    proc = _paused(checkpoints / "ready", "mixtral_ms.checkpoint.convert", "write_safetensors", CONVERT,
                   ["hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "ms", "--overwrite",
                    "--dtype", "bf16", "--shard-size", "20KB", "--quiet"])
    assert os.path.isdir(checkpoints / f"ms.tmp-{proc.pid}")  # a shard is written, the run waits
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines() == ["error: interrupted (SIGTERM); no output written"]
    assert snapshot(checkpoints / "ms") == before and _leftovers(checkpoints) == []


def test_sigkill_mid_conversion_then_a_clean_rerun(checkpoints):
    proc = _paused(checkpoints / "ready", "mixtral_ms.checkpoint.convert", "write_safetensors", CONVERT,
                   ["hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "new", "--dtype", "bf16",
                    "--shard-size", "20KB", "--quiet"])
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _leftovers(checkpoints) == [f"new.tmp-{proc.pid}"] and not (checkpoints / "new").exists()
    res = _convert("hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "new", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    assert f"removed {checkpoints / f'new.tmp-{proc.pid}'}, left by a conversion that was killed" in res.stderr
    assert _leftovers(checkpoints) == [] and tensors_bytes(checkpoints / "new") == tensors_bytes(checkpoints / "want16")


def test_live_runs_temp_folder_and_foreign_names_are_left_alone(checkpoints):
    proc = _paused(checkpoints / "ready", "mixtral_ms.checkpoint.convert", "write_safetensors", CONVERT,
                   ["hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "out", "--shard-size", "20KB",
                    "--quiet"])
    try:
        os.makedirs(checkpoints / "out.tmp-1x")  # not a name the converter makes
        os.makedirs(checkpoints / "out.tmp-999999999")  # a dead run's name, but holding a file it does not write
        (checkpoints / "out.tmp-999999999" / "mine.txt").write_text("mine")
        assert _convert("hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "out", "--quiet").returncode == 0
        # the paused (live) run's temp folder is still there, and so is everything not wholly the converter's
        assert _leftovers(checkpoints) == sorted(["out.tmp-1x", "out.tmp-999999999", f"out.tmp-{proc.pid}"])
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_overwrite_killed_between_its_renames_is_restored_by_the_next_run(checkpoints):
    before = snapshot(checkpoints / "ms")
    argv = ["hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "ms", "--overwrite", "--dtype", "bf16",
            "--quiet"]
    code = KILL_BETWEEN_RENAMES.format(script=CONVERT, argv=[str(a) for a in argv])
    killed = _run(sys.executable, "-c", code)
    assert killed.returncode == -signal.SIGKILL
    left = _leftovers(checkpoints)
    assert not (checkpoints / "ms").exists() and len(left) == 2 and left[0].startswith("ms.old-")
    # the next run puts the old checkpoint back (it is not lost), then refuses as it would have
    again = _convert("hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "ms")
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"hf2ms: restored {checkpoints / 'ms'} from {checkpoints / left[0]}, left by an --overwrite that was killed",
        f"hf2ms: removed {checkpoints / left[1]}, left by a conversion that was killed",
        f"error: destination {checkpoints / 'ms'} already holds a checkpoint; pass --overwrite to replace it"]
    assert snapshot(checkpoints / "ms") == before and _leftovers(checkpoints) == []
    assert _convert(*argv).returncode == 0
    assert tensors_bytes(checkpoints / "ms") == tensors_bytes(checkpoints / "want16") and _leftovers(checkpoints) == []


def test_backup_of_a_finished_swap_is_removed(checkpoints):
    # killed after the new checkpoint was in place but before the old one was deleted
    shutil.copytree(checkpoints / "want16", checkpoints / "ms.old-999999999")
    res = _convert("hf2ms", "--src", checkpoints / "hf", "--dst", checkpoints / "ms", "--overwrite", "--quiet")
    assert res.returncode == 0 and _leftovers(checkpoints) == []


# ------------------------------------------------------------------------------------------ converter: bad data

def test_worst_bad_data_through_the_cli(checkpoints):
    import numpy as np
    from safetensors.numpy import load_file, save_file
    hf = checkpoints / "hf"
    index_path = hf / "model.safetensors.index.json"
    index = json.load(open(index_path))
    shard = index["weight_map"][NORM]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    text = open(index_path).read().replace('"weight_map": {', f'"weight_map": {{"{NORM}": "{other}", ', 1)
    open(index_path, "w").write(text)  # the same name twice: json.load would keep the last silently
    res = _convert("hf2ms", "--src", hf, "--dst", checkpoints / "a")
    assert _error_line(res) == f"error: {index_path}: ambiguous index: '{NORM}' appears twice"
    json.dump(index, open(index_path, "w"))
    tensors = load_file(str(hf / other))
    tensors[NORM] = np.ones(16, np.float32)  # a second copy in another shard
    save_file(tensors, str(hf / other), metadata={"format": "pt"})
    res = _convert("hf2ms", "--src", hf, "--dst", checkpoints / "a")
    assert _error_line(res) == (f"error: tensor '{NORM}' is in both {other} and {shard} "
                                f"(model.safetensors.index.json names {shard})")
    del tensors[NORM]
    save_file(tensors, str(hf / other), metadata={"format": "pt"})
    weights = load_file(str(_shard_with(hf, NORM)))
    weights[NORM][3] = np.nan
    save_file(weights, str(_shard_with(hf, NORM)), metadata={"format": "pt"})
    res = _convert("hf2ms", "--src", hf, "--dst", checkpoints / "a")
    assert _error_line(res) == (f"error: tensor '{NORM}' holds NaN or inf values; pass --allow-nonfinite to "
                                "convert it anyway")
    assert _convert("hf2ms", "--src", hf, "--dst", checkpoints / "a", "--allow-nonfinite", "--quiet").returncode == 0
    weights[NORM][3] = 1e5  # finite, beyond float16's 65504
    save_file(weights, str(_shard_with(hf, NORM)), metadata={"format": "pt"})
    res = _convert("hf2ms", "--src", hf, "--dst", checkpoints / "b", "--dtype", "fp16")
    assert _error_line(res) == (f"error: tensor '{NORM}' has values beyond the range of float16, which would "
                                "become inf; convert to bf16 or fp32 instead")
    assert not (checkpoints / "b").exists() and _leftovers(checkpoints) == []


# ------------------------------------------------------------------------------------------ preprocessing

def _preprocess(*args, **kwargs):
    return _run(sys.executable, PREPROCESS, "--seq_length", "64", *args, **kwargs)


def test_preprocess_never_replaces_its_input_or_a_foreign_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning God created the heaven and the earth.\n" * 50)
    data = corpus.read_bytes()
    res = _preprocess("--input", corpus, "--output", corpus, "--overwrite")
    assert _error_line(res) == f"error: --output {corpus} is (or is inside) the input {corpus}; write it elsewhere"
    res = _preprocess("--input", tmp_path, "--output", tmp_path / "train.mindrecord")
    assert "is (or is inside) the input" in _error_line(res)
    notes = tmp_path / "notes.mindrecord"
    notes.write_text("mine")
    res = _preprocess("--input", corpus, "--output", notes, "--overwrite")
    assert _error_line(res) == (f"error: {notes} exists and is not a MindRecord file this tool wrote; refusing to "
                                "replace it")
    assert corpus.read_bytes() == data and notes.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "notes.mindrecord"]


SMALL_DISK = """
import runpy, shutil, sys
real = shutil.disk_usage
shutil.disk_usage = lambda path: real(path)._replace(free=1 << 20)  # a disk with 1 MiB left
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_preprocess_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "train.mindrecord"
    argv = ["--input", os.path.join(ROOT, "data", "corpus"), "--seq_length", "64", "--output", str(out)]
    res = _run(sys.executable, "-c", SMALL_DISK.format(script=PREPROCESS, argv=argv))
    line = _error_line(res)
    assert line.startswith(f"error: disk full: writing {out} needs about ") and line.endswith(
        f" MiB more, 1.0 MiB free in {tmp_path}")
    assert os.listdir(tmp_path) == []


def test_preprocess_sigterm_and_sigkill_mid_write_then_rerun(tmp_path):
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):  # both at once: each start imports MindSpore
        out_dir = tmp_path / sig.name
        out_dir.mkdir()
        argv = ["--input", os.path.join(ROOT, "data", "corpus"), "--seq_length", "64", "--output",
                out_dir / "train.mindrecord"]
        runs[sig] = (out_dir, argv, _paused(tmp_path / f"{sig.name}.ready", "mindspore.mindrecord",
                                            "FileWriter.commit", PREPROCESS, argv, wait=False))
    for sig, (out_dir, argv, proc) in runs.items():
        _wait_ready(proc, tmp_path / f"{sig.name}.ready")
        assert os.listdir(out_dir) == [f".train.mindrecord.tmp-{proc.pid}"]  # written, not yet renamed
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and err.strip().splitlines() == [
                "error: interrupted (SIGTERM); no output written"]
            assert os.listdir(out_dir) == []
        else:
            assert proc.returncode == -signal.SIGKILL and os.listdir(out_dir) == [f".train.mindrecord.tmp-{proc.pid}"]
    out_dir, argv, _ = runs[signal.SIGKILL]
    res = _run(sys.executable, PREPROCESS, *argv)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out_dir)) == ["train.mindrecord", "train.mindrecord.db"]


# ------------------------------------------------------------------------------------------ estimator, launcher

def _estimate(*args):
    return _run(sys.executable, "-m", "mixtral_ms.commands.memory", *args)


def test_memory_estimator_bad_input_is_one_line(tmp_path):
    cases = {"model: [a\n b: c": "malformed YAML at line 2",
             "model:\n  model_config: {num_attention_heads: 0}\n":
                 "num_attention_heads must be a positive integer, got 0",
             "model:\n  model_config: {num_hidden_layers: -2}\n":
                 "num_hidden_layers must be a positive integer, got -2",
             "model:\n  model_config: {param_init_type: int8}\n": "param_init_type must be one of"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        assert message in _error_line(_estimate("--config", path)), text
    (tmp_path / "latin1.yaml").write_bytes(b"model: caf\xe9\n")
    assert "not UTF-8 text" in _error_line(_estimate("--config", tmp_path / "latin1.yaml"))
    shipped = tmp_path / "ro.yaml"
    shutil.copy(os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_8p.yaml"), shipped)
    shutil.copytree(os.path.join(ROOT, "configs", "parallel", "base"), tmp_path / "base")  # its base_config
    os.chmod(shipped, stat.S_IRUSR | stat.S_IRGRP)
    before = shipped.read_bytes()
    assert _error_line(_estimate("--config", shipped, "--write_header")) == (
        f"error: {shipped} is read-only; not writing the header (use --header to print it)")
    assert shipped.read_bytes() == before and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    os.chmod(shipped, stat.S_IRUSR | stat.S_IWUSR)
    (tmp_path / ".ro.yaml.tmp-999999999").write_text("half")  # left by a killed --write_header
    assert _estimate("--config", shipped, "--write_header").returncode == 0
    assert b"# --- memory estimate" in shipped.read_bytes() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.parametrize("args, message", [
    (("--master_port", "99999"), "--master_port must be in 1..65535, got 99999"),
    (("--master_port", "0"), "--master_port must be in 1..65535, got 0"),
    (("--join", "maybe"), "--join must be True or False, got maybe"),
    (("--cluster_time_out", "-5"), "--cluster_time_out must be a positive number of seconds, got -5"),
    (("--cluster_time_out", "0"), "--cluster_time_out must be a positive number of seconds, got 0"),
])
def test_launcher_refuses_impossible_values(tmp_path, args, message):
    res = _run("bash", LAUNCHER, "--config", "configs/parallel/mixtral_8x7b_pretrain_8p.yaml", *args,
               "--log_dir", tmp_path / "logs", "--dry_run")
    assert _error_line(res) == f"error: msrun_launcher: {message}" and res.stdout == ""
    assert not (tmp_path / "logs").exists()
