"""Training through MindFormers' Trainer on CPU: loss falls, resume is exact, aux loss trains the router,
fp16 overflow skips the step, and bad runs fail with one clear line."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

import mindspore as ms
from mindspore import Tensor

from conftest import ROOT
from mixtral_ms import MixtralConfig, MixtralForCausalLM

RUN = os.path.join(ROOT, "scripts", "run_mixtral.py")
STEP = re.compile(r"^step (\d+)/\d+ \| loss ([0-9.]+)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "train.mindrecord"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "preprocess_data.py"), "--input",
                    os.path.join(ROOT, "data", "corpus"), "--format", "text", "--seq_length", "32", "--output",
                    str(out)], check=True, capture_output=True)
    return str(out)


def tiny_yaml(tmp_path, dataset, name="run.yaml", **changes):
    """configs/mixtral_tiny_cpu.yaml shrunk for a test: 32-token samples, 60 steps, log every step."""
    with open(os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["model_config"].update(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                        num_key_value_heads=2, seq_length=32, num_hidden_layers=2)
    cfg["train_dataset"]["data_loader"].update(dataset_dir=dataset, shuffle=False)
    cfg["train_dataset"]["batch_size"] = cfg["runner_config"]["batch_size"] = 4
    cfg["train_dataset_task"]["dataset_config"] = cfg["train_dataset"]
    cfg["runner_config"]["epochs"] = 1
    cfg["lr_schedule"].update(learning_rate=1e-2, lr_end=1e-3)
    cfg["callbacks"] = [{"type": "MixtralProgressMonitor", "log_interval": 1},
                        {"type": "RouterStatsMonitor", "output_dir": str(tmp_path), "log_interval": 5},
                        {"type": "CheckpointMonitor", "prefix": "t", "save_checkpoint_steps": 30,
                         "keep_checkpoint_max": 5, "integrated_save": False, "async_save": False}]
    cfg["output_dir"] = str(tmp_path)
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run(*args, check=True):
    env = dict(os.environ, GLOG_v="3")
    proc = subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    losses = {int(m.group(1)): float(m.group(2)) for m in map(STEP.match, proc.stdout.splitlines()) if m}
    return proc, losses


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, dataset):
    """One uninterrupted 60-step run (the dataset has ~250 samples of 33 tokens: 60 batches of 4)."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = tiny_yaml(tmp, dataset, **{"train_dataset.data_loader.num_samples": 240})
    _, losses = run("--config", cfg, "--run_mode", "train")
    return tmp, cfg, losses


def test_loss_falls_and_stats_are_written(full_run):
    tmp, _, losses = full_run
    steps = sorted(losses)
    assert steps[0] == 1 and len(steps) >= 50
    first = losses[1]
    last = np.mean([losses[s] for s in steps[-5:]])
    assert first > 7.0  # ~ln(2000) at initialisation
    assert last < 0.8 * first, (first, last)  # 7.65 -> ~5.8 in 60 steps of 132 tokens
    records = [json.loads(line) for line in open(tmp / "router_stats.jsonl")]
    assert len(records) >= 10
    for record in records:
        assert len(record["tokens_per_expert"]) == 2 and all(len(r) == 8 for r in record["tokens_per_expert"])
        assert all(0 <= d < 1 for d in record["dropped_fraction"])
        # every valid token makes k=2 assignments per layer: 4 samples x 33 tokens x 2
        assert all(sum(r) == 4 * 33 * 2 for r in record["tokens_per_expert"])


def test_resume_reproduces_the_next_losses(full_run, tmp_path):
    tmp, cfg, losses = full_run
    ckpt = os.path.join(tmp, "checkpoint", "rank_0", "t_rank_0-1_30.ckpt")
    assert os.path.isfile(ckpt), os.listdir(os.path.join(tmp, "checkpoint", "rank_0"))
    _, resumed = run("--config", cfg, "--run_mode", "train", "--load_checkpoint", ckpt, "--resume_training",
                     "--output_dir", str(tmp_path))
    assert min(resumed) == 31, sorted(resumed)[:3]
    for step in range(31, max(losses) + 1):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-6), step


def test_predict_from_trained_checkpoint(full_run):
    tmp, cfg, _ = full_run
    proc, _ = run("--config", cfg, "--run_mode", "predict", "--load_checkpoint", os.path.join(tmp, "checkpoint"),
                  "--predict_data", "In the beginning", "--max_new_tokens", "8")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("> ")]
    assert len(lines) == 1 and lines[0].startswith("> In the beginning") and len(lines[0]) > len("> In the beginning")


def _tiny_model(aux_coef=0.02, **kw):
    ms.set_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        max_position_embeddings=64, router_aux_loss_coef=aux_coef, **kw)
    model = MixtralForCausalLM(cfg)
    model.set_train(True)
    return model


def test_aux_loss_is_part_of_the_training_loss():
    ids = Tensor(np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32))
    grads = []
    for coef in (0.0, 0.5):
        model = _tiny_model(coef)
        gate = [p for p in model.trainable_params() if p.name.endswith("layers.0.block_sparse_moe.gate.weight")]
        loss, ce, aux, z, _, _ = model(ids)
        assert float(loss) == pytest.approx(float(ce) + coef * float(aux), rel=1e-6)
        grads.append(ms.grad(lambda i: model(i)[0], None, gate)(ids)[0].asnumpy())
    assert np.abs(grads[1] - grads[0]).max() > 1e-4  # the router is trained by the aux loss


def test_fp16_overflow_skips_the_update_and_lowers_the_scale():
    from mindformers.core.optim import AdamW
    from mixtral_ms.training import MixtralTrainOneStepCell
    model = _tiny_model()
    optimizer = AdamW(model.trainable_params(), learning_rate=1e-3)
    step = MixtralTrainOneStepCell(model, optimizer, scale_sense={"loss_scale_value": 3.0e38, "scale_factor": 2,
                                                                   "scale_window": 1000})
    before = {p.name: p.asnumpy().copy() for p in model.trainable_params()}
    ids = Tensor(np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32))
    loss, overflow, scale, _, _ = step(ids)
    assert bool(overflow) and np.isfinite(float(loss))
    assert float(step.scale_sense.asnumpy()) == pytest.approx(1.5e38, rel=1e-6)
    assert all(np.array_equal(before[p.name], p.asnumpy()) for p in model.trainable_params())
    step.scale_sense.set_data(Tensor(1024.0, ms.float32))
    _, overflow, _, _, norm = step(ids)
    assert not bool(overflow) and float(norm) > 0
    assert any(not np.array_equal(before[p.name], p.asnumpy()) for p in model.trainable_params())


def test_bad_runs_fail_with_one_line(tmp_path, dataset):
    cases = {
        "unknown top-level key": (tiny_yaml(tmp_path, dataset, "a.yaml", **{"trainer_typo": 1}),
                                  "unknown top-level key"),
        "unknown model key": (tiny_yaml(tmp_path, dataset, "b.yaml", **{"model.model_config.num_expert": 8}),
                              "unknown key(s) ['num_expert']"),
        "seq length mismatch": (tiny_yaml(tmp_path, dataset, "c.yaml", **{"model.model_config.seq_length": 64}),
                                "holds samples of 33 tokens"),
    }
    for name, (cfg, message) in cases.items():
        proc, _ = run("--config", cfg, "--run_mode", "train", check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (name, proc.stderr[-2000:])
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("model: [unclosed\n")
    proc, _ = run("--config", str(malformed), "--run_mode", "train", check=False)
    assert proc.returncode == 2 and "malformed YAML" in proc.stderr


def test_checkpoint_from_another_config_is_refused(full_run, tmp_path):
    tmp, _, _ = full_run
    other = tiny_yaml(tmp_path, "unused", **{"model.model_config.hidden_size": 48})
    proc, _ = run("--config", other, "--run_mode", "predict", "--load_checkpoint", os.path.join(tmp, "checkpoint"),
                  check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1
    assert "model.embed_tokens.weight" in errors[0] and "[2000, 32]" in errors[0] and "[2000, 48]" in errors[0]
