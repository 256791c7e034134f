"""Bad input and faults in training and inference runs (scripts/run_mixtral.py): one line `error: ...` and
exit status 2 for every bad input, refused before MindSpore is imported where a plain read of the YAML
suffices; diverging training stops instead of finishing with exit 0 or saving exploded weights;
checkpoint names follow the global step after a resume and keep_checkpoint_max holds; a SIGKILL or
SIGTERM during a save leaves no partial file behind a clean re-run; bad token ids never reach the graph."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

import mindspore as ms
from mindspore import Tensor

from conftest import ROOT, USER_ENV
from mixtral_ms import MixtralConfig, MixtralForCausalLM
from mixtral_ms.run.data import write_mindrecord
from test_training import error_line, run, write_yaml

SCRIPT = os.path.join(ROOT, "scripts", "run_mixtral.py")
SEQ, BATCH, SAMPLES = 16, 4, 12  # 3 steps an epoch


pytestmark = pytest.mark.usefixtures("trainer_context")  # PyNative and no parallel context after


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cycle.mindrecord"
    rng = np.random.default_rng(0)
    samples = ({"input_ids": rng.integers(3, 2000, SEQ + 1).astype(np.int32)} for _ in range(SAMPLES))
    write_mindrecord(str(path), {"input_ids": {"type": "int32", "shape": [-1]}}, samples)
    return path


def checkpoint_yaml(folder, data, name="run.yaml", every=2, keep=3, layers=1, **changes):
    """One layer by default: these runs test saving, naming, resuming and stopping; the graph compile (which
    grows with the layers) is most of their time."""
    callbacks = [{"type": "CheckpointMonitor", "prefix": "t", "save_checkpoint_steps": every,
                  "keep_checkpoint_max": keep, "integrated_save": False, "async_save": False}]
    return write_yaml(folder, data, name=name, **{"callbacks": callbacks,
                                                  "model.model_config.num_hidden_layers": layers, **changes})


def subprocess_run(args, cwd, env=None):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode,
                                                                                         proc.stderr[-2000:])
    return lines[0]


def saved(folder):
    """{file name: step_num} of the checkpoints in <folder>/checkpoint/rank_0, and the other files there."""
    folder = os.path.join(folder, "checkpoint", "rank_0")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    steps = {n: int(ms.load_checkpoint(os.path.join(folder, n), choice_func=lambda k: k == "step_num")["step_num"])
             for n in names if n.endswith(".ckpt")}
    return steps, [n for n in names if not n.endswith(".ckpt") and n != "meta.json"]


def test_cheap_refusals_are_one_line_before_mindspore(tmp_path, data):
    """Bad values, arguments and output folders: one line, exit 2, MindSpore never imported (a real
    subprocess takes about a second), nothing written in the current directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(open(write_yaml(tmp_path, data), "rb").read() + "# caf\xe9\n".encode("latin-1"))
    cases = [
        ([], {"lr_schedule.learning_rate": "3e-3"}, "lr_schedule.learning_rate must be a finite number in [0, inf], "
                                                    "got the string '3e-3'; write it with a dot"),
        (["--epochs", "0"], {}, "error: argument --epochs: must be a positive integer, got 0"),
        (["--run_mode", "predict", "--max_new_tokens", "100000"], {},
         "max_new_tokens 100000 leaves no room for a prompt within max_position_embeddings 512"),
    ]
    for i, (argv, changes, message) in enumerate(cases):
        cfg = write_yaml(tmp_path, data, name=f"cheap{i}.yaml", **changes)
        start = time.time()
        proc = subprocess_run(["--config", cfg, *argv], cwd)
        assert message in one_error_line(proc), proc.stderr
        assert time.time() - start < 60  # loose: a MindFormers import alone takes 5-20 s on a busy machine
    assert "not UTF-8 text" in one_error_line(subprocess_run(["--config", not_utf8], cwd))
    assert os.listdir(cwd) == []


# The wiring from the command line and the YAML to run/checks.py; each value rule: tests/test_checks.py.
@pytest.mark.parametrize("changes, argv, message", [
    ({"model.model_config.hidden_size": "64"}, [], "hidden_size must be a positive integer, got '64'"),
    ({"lr_schedule.learning_rate": -1.0e-3}, [], "lr_schedule.learning_rate must be a finite number in [0, inf]"),
    ({}, ["--epochs", "-1"], "argument --epochs: must be a positive integer, got -1"),
    ({}, ["--max_new_tokens", "-5"], "max_new_tokens must be a positive integer, got -5"),
    ({}, ["--top_p", "2.5"], "top_p must be a finite number in (0, 1], got 2.5"),
    ({"generation": {"top_k": "many"}}, [], "generation.top_k must be a int, got 'many'"),
    ({"use_parallel": True}, [], "use_parallel: True needs a distributed launch"),
], ids=lambda v: str(v)[:40])
def test_bad_values_are_refused_before_mindformers(tmp_path, data, changes, argv, message, monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    monkeypatch.delenv("RANK_SIZE", raising=False)
    cfg = write_yaml(tmp_path, data, **changes)
    assert message in error_line("--config", cfg, *argv)
    assert not os.path.exists(tmp_path / "checkpoint")


def test_output_dir_that_cannot_be_written(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = write_yaml(tmp_path, data)
    line = error_line("--config", cfg, "--output_dir", blocker / "out")
    assert f"output_dir {blocker / 'out'} is not writable" in line
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "is not writable (Permission denied)" in error_line("--config", cfg, "--output_dir", locked)


def test_refusals_that_need_the_data_or_the_tokenizer(tmp_path, data):
    small = tmp_path / "small.mindrecord"
    write_mindrecord(str(small), {"input_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": np.arange(3, SEQ + 4, dtype=np.int32)} for _ in range(3)))
    cfg = write_yaml(tmp_path, small, name="small.yaml")
    assert "holds 3 samples, fewer than one batch (4): no step would run" in error_line("--config", cfg)
    long_prompt = " ".join(["beginning"] * 600)
    cfg = write_yaml(tmp_path, data, name="predict.yaml")
    line = error_line("--config", cfg, "--run_mode", "predict", "--load_checkpoint", tmp_path / "unused",
                      "--predict_data", long_prompt, "--max_new_tokens", "5")
    assert "+ max_new_tokens 5 exceeds max_position_embeddings 512" in line, line
    # A predict YAML run with --run_mode train: the command line wins (as in MindFormers' run_mindformer.py);
    # a YAML without training data then says what is missing.
    with open(cfg) as f:
        predict_yaml = yaml.safe_load(f)
    predict_yaml["run_mode"] = "predict"
    for key in ("train_dataset", "train_dataset_task"):
        predict_yaml.pop(key)
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(yaml.safe_dump(predict_yaml))
    assert error_line("--config", no_data, "--run_mode", "train") == \
        "error: run_mode train needs train_dataset.data_loader.dataset_dir (or --train_dataset)"


def test_diverging_training_stops(tmp_path, data):
    """lr 1e6: the first update explodes the weights, every later gradient is non-finite. The run stops
    after max_skipped_steps skipped steps, and never saves the exploded weights. PyNative: 1 to 4 steps
    cost less than a compile (the graph-mode skip branch runs in test_training's trained fixture)."""
    out = tmp_path / "skips"
    out.mkdir()
    cfg = checkpoint_yaml(out, data, every=100, **{"lr_schedule.learning_rate": 1.0e6, "lr_schedule.lr_end": 1.0e5,
                                                   "runner_wrapper.max_skipped_steps": 3, "runner_config.epochs": 3,
                                                   "context.mode": 1})
    line = error_line("--config", cfg)
    assert line.startswith("error: training diverged: 3 steps in a row skipped for a non-finite gradient"), line
    assert saved(out) == ({}, [])

    out = tmp_path / "explode"
    out.mkdir()
    cfg = checkpoint_yaml(out, data, every=1, layers=2,  # the line names the largest weight: layer 0's w3 of 2
                          **{"lr_schedule.learning_rate": 1.0e6, "lr_schedule.lr_end": 1.0e5, "context.mode": 1})
    line = error_line("--config", cfg)
    assert line == ("error: not saving the step 1 checkpoint: |model.layers.0.block_sparse_moe.experts.w3| reaches "
                    "1e+06 > max_weight_abs 10000; training diverged (lower the learning rate); last saved: none"), line
    assert saved(out) == ({}, [])


def test_resume_names_by_step_and_keeps_keep_checkpoint_max(tmp_path, data):
    """2 epochs of 3 steps saving every 2, then a resume from step 4 into the same folder for 4 epochs:
    every name says its step_num ((epoch - 1) * 3 + step in epoch), and at most 3 files remain."""
    cfg = checkpoint_yaml(tmp_path, data, **{"runner_config.epochs": 2})
    assert run("--config", cfg)[0] == 0
    assert saved(tmp_path) == ({"t_rank_0-1_2.ckpt": 2, "t_rank_0-2_1.ckpt": 4, "t_rank_0-2_3.ckpt": 6}, [])
    status, stdout, err = run("--config", cfg, "--load_checkpoint", tmp_path / "checkpoint/rank_0/t_rank_0-2_1.ckpt",
                              "--resume_training", "--epochs", "4")
    assert status == 0 and "resuming from step 4" in stdout, err[-3000:]
    assert saved(tmp_path) == ({"t_rank_0-3_2.ckpt": 8, "t_rank_0-4_1.ckpt": 10, "t_rank_0-4_3.ckpt": 12}, [])
    # Resuming from the last step of the run is refused: nothing is left to train.
    line = error_line("--config", cfg, "--load_checkpoint", tmp_path / "checkpoint/rank_0/t_rank_0-4_3.ckpt",
                      "--resume_training", "--epochs", "4")
    assert "the checkpoint is at step 12, the end of this run (4 epoch(s) of 3 steps); raise --epochs" in line


SLOW_SAVE = """
import runpy, sys, time
import mindspore.train.serialization as serialization
def slowed(write):
    def slow(*args, **kwargs):
        time.sleep(0.03)
        return write(*args, **kwargs)
    return slow
for name in ("_write_parameter_data", "_write_parameter_bytes_data"):  # numpy values / tensors (async_save False)
    setattr(serialization, name, slowed(getattr(serialization, name)))
sys.argv = [sys.argv[0]] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def _start_slow(args, cwd, stderr_path):
    """run_mixtral.py with a slow checkpoint write (30 ms a tensor), stderr to `stderr_path`."""
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", SLOW_SAVE.format(script=SCRIPT), *map(str, args)], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=stderr, env=USER_ENV)


def _signal_during_save(runs, deadline=300):
    """runs: [(process, checkpoint folder, signal, file that must exist first or None)]. Each process gets
    its signal once a `.tmp` is being written in its folder (after the named file exists)."""
    pending = list(runs)
    end = time.time() + deadline
    while pending and time.time() < end:
        for item in list(pending):
            proc, folder, signum, after = item
            names = os.listdir(folder) if os.path.isdir(folder) else []
            if proc.poll() is not None:
                pending.remove(item)
            elif (after is None or after in names) and any(n.endswith(".tmp") for n in names):
                proc.send_signal(signum)
                pending.remove(item)
        time.sleep(0.02)
    for proc, *_ in runs:
        proc.wait(timeout=120)


def test_kill_during_save_then_clean_rerun(tmp_path, data):
    """SIGKILL mid-save leaves MindSpore's `<name>.tmp`; SIGTERM mid-save stops with one line and exit 143,
    removing its own `.tmp` (both runs at once, in two folders). A resume into the killed run's folder
    removes the stale `.tmp` and continues from the SIGTERM run's last finished checkpoint. MindFormers'
    logs go to <output_dir>/log, not to the current directory."""
    killed_dir, termed_dir, cwd = tmp_path / "killed", tmp_path / "termed", tmp_path / "cwd"
    for folder in (killed_dir, termed_dir, cwd):
        folder.mkdir()
    killed_ckpt, termed_ckpt = killed_dir / "checkpoint" / "rank_0", termed_dir / "checkpoint" / "rank_0"
    kill_cfg = checkpoint_yaml(killed_dir, data, every=2, **{"runner_config.epochs": 4})
    term_cfg = checkpoint_yaml(termed_dir, data, every=3, **{"runner_config.epochs": 4})
    killed = _start_slow(["--config", kill_cfg], cwd, tmp_path / "killed.err")
    termed = _start_slow(["--config", term_cfg], cwd, tmp_path / "termed.err")
    _signal_during_save([(killed, killed_ckpt, signal.SIGKILL, None),
                         (termed, termed_ckpt, signal.SIGTERM, "t_rank_0-1_3.ckpt")])
    assert killed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(killed_ckpt)) == ["t_rank_0-1_2.tmp"]  # the fault: a partial file, nothing else
    assert os.listdir(cwd) == [] and os.path.isdir(killed_dir / "log") and os.path.isdir(termed_dir / "log")
    err = (tmp_path / "termed.err").read_text()
    assert termed.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert [line for line in err.splitlines() if line.startswith("error:")] == ["error: interrupted by SIGTERM"]
    assert sorted(os.listdir(termed_ckpt)) == ["meta.json", "t_rank_0-1_3.ckpt"]  # no partial step-6 file

    status, stdout, err = run("--config", term_cfg, "--load_checkpoint", termed_ckpt / "t_rank_0-1_3.ckpt",
                              "--resume_training", "--output_dir", killed_dir)
    assert status == 0 and "resuming from step 3" in stdout, err[-3000:]
    assert saved(killed_dir) == ({"t_rank_0-2_3.ckpt": 6, "t_rank_0-3_3.ckpt": 9, "t_rank_0-4_3.ckpt": 12}, [])


def test_bad_token_ids_never_reach_the_graph():
    """Ids outside [0, vocab) and masks of the wrong shape are refused in Python (one line) by the model's
    call and by generate; in graph mode the same model keeps working afterwards."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             max_position_embeddings=32))
    model.set_train(False)
    ids = np.array([[1, 5, 9, 63]], np.int32)
    reference = model(Tensor(ids))[0].asnumpy()
    for bad, message in ((np.array([[1, 5, 9, 64]], np.int32), "token id 64, outside the vocabulary [0, 64)"),
                         (np.array([[1, -1, 9, 3]], np.int32), "token id -1, outside the vocabulary [0, 64)")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            model(Tensor(bad))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\) does not match input_ids shape \(1, 4\)"):
        model(Tensor(ids), attention_mask=Tensor(np.ones((1, 3), np.float32)))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.generate(ids, np.ones((1, 3), np.float32), max_new_tokens=2)
    with pytest.raises(ValueError, match="labels hold ids outside the vocabulary"):
        model(Tensor(ids), Tensor(np.array([[1, 2, 3, 99]], np.int32)))
    np.testing.assert_array_equal(model(Tensor(ids))[0].asnumpy(), reference)
    assert model.generate(ids, max_new_tokens=2).shape == (1, 6)
