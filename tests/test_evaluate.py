"""run_mixtral.py --run_mode eval: the CE and perplexity it prints and writes equal an independent
computation from the model's logits; SFT labels are masked; bad runs fail with one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindspore import Tensor

from conftest import FIXTURES, ROOT
from mixtral_ms import MixtralForCausalLM
from mixtral_ms.run.data import write_mindrecord
from mixtral_ms.tools.evaluate import evaluate
from test_training import error_line, write_yaml

TINY8 = os.path.join(FIXTURES, "tiny8")
SEQ = 16
TINY8_SHAPES = {"model.model_config.vocab_size": 128, "model.model_config.hidden_size": 64,
                "model.model_config.intermediate_size": 96, "model.model_config.num_attention_heads": 8,
                "model.model_config.num_key_value_heads": 2, "model.model_config.max_position_embeddings": 128,
                "model.model_config.rope_theta": 1e6, "model.model_config.rms_norm_eps": 1e-5,
                "runner_config.batch_size": 4, "context.mode": 1}  # PyNative: graph compilation costs a minute here


pytestmark = pytest.mark.usefixtures("trainer_context")  # PyNative and no parallel context after


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 pre-training samples (ids < tiny8's vocab of 128) and 5 SFT samples with -100 prompt labels."""
    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, (6, SEQ + 1)).astype(np.int32)
    write_mindrecord(str(tmp / "pt.mindrecord"), {"input_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": row} for row in ids))
    labels = ids[:5].copy()
    labels[:, :6] = -100
    labels[2, 10:] = -100
    write_mindrecord(str(tmp / "domain.mindrecord"), {"input_ids": {"type": "int32", "shape": [-1]},
                                                      "domain_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": row, "domain_ids": np.ones_like(row)} for row in ids[:3]))
    write_mindrecord(str(tmp / "sft.mindrecord"), {"input_ids": {"type": "int32", "shape": [-1]},
                                                   "labels": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": i, "labels": l} for i, l in zip(ids[:5], labels)))
    return tmp, ids, labels


@pytest.fixture(scope="module")
def model():
    return MixtralForCausalLM.from_pretrained(TINY8)


def reference_ce(model, ids, labels):
    """Mean next-token NLL over non-ignored labels from the model's logits, in float64 numpy."""
    model.set_train(False)
    logits = model(Tensor(ids))[0].asnumpy().astype(np.float64)[:, :-1]
    target = labels[:, 1:]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    valid = target != -100
    nll = -np.take_along_axis(logp, np.where(valid, target, 0)[..., None], -1)[..., 0]
    return nll[valid].mean(), int(valid.sum())


def test_eval_cli_writes_ce_and_perplexity_of_the_checkpoint(data, model, tmp_path):
    folder, ids, _ = data
    cfg = write_yaml(str(tmp_path), folder / "pt.mindrecord", **TINY8_SHAPES)
    out = tmp_path / "scores" / "eval.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_mixtral.py"), "--config", cfg,
                          "--run_mode", "eval", "--load_checkpoint", TINY8, "--eval_dataset",
                          str(folder / "pt.mindrecord"), "--eval_output", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    ce, count = reference_ce(model, ids, ids)
    assert (record["samples"], record["tokens"], record["dropped_assignments"]) == (6, 6 * SEQ, 0)
    assert record["mode"] == "pynative"  # the YAML's context
    np.testing.assert_allclose(record["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(record["ppl"], np.exp(ce), rtol=1e-5)
    assert f"eval: ce {record['ce']:.4f} ppl {record['ppl']:.2f} over {count} tokens" in run.stdout
    assert sorted(os.listdir(tmp_path / "scores")) == ["eval.json"]


def test_eval_masks_labels_and_does_not_depend_on_the_batch_size(data, model):
    folder, ids, labels = data
    ce, count = reference_ce(model, ids[:5], labels)
    for batch in (2, 5):  # uneven last batches: the mean is per token, not per batch
        record = evaluate(model, str(folder / "sft.mindrecord"), batch)
        assert (record["samples"], record["tokens"]) == (5, count)
        np.testing.assert_allclose(record["ce"], ce, rtol=1e-5)
    first = evaluate(model, str(folder / "pt.mindrecord"), 4, max_samples=3)
    np.testing.assert_allclose(first["ce"], reference_ce(model, ids[:3], ids[:3])[0], rtol=1e-5)
    assert first["samples"] == 3
    tagged = evaluate(model, str(folder / "domain.mindrecord"), 4)  # a domain_ids column reaches the model
    assert tagged["ce"] == first["ce"]  # (top-k routing ignores it)


def test_bad_eval_runs_fail_with_one_line(data, tmp_path):
    folder, _, _ = data
    cfg = write_yaml(str(tmp_path), folder / "pt.mindrecord", **TINY8_SHAPES)
    base = ["--config", cfg, "--run_mode", "eval"]
    assert "eval needs --eval_dataset" in error_line(*base, "--load_checkpoint", TINY8)
    assert "eval needs --load_checkpoint" in error_line(*base, "--eval_dataset", folder / "pt.mindrecord")
    assert "no dataset at" in error_line(*base, "--load_checkpoint", TINY8, "--eval_dataset", tmp_path / "none")
    wrong = write_yaml(str(tmp_path), folder / "pt.mindrecord", name="seq8.yaml",
                       **{**TINY8_SHAPES, "model.model_config.seq_length": 8})
    assert "seq_length 8 needs 9" in error_line("--config", wrong, "--run_mode", "eval", "--load_checkpoint", TINY8,
                                                "--eval_dataset", folder / "pt.mindrecord")
    assert "has shape" in error_line("--config", write_yaml(str(tmp_path), folder / "pt.mindrecord", name="s.yaml"),
                                     "--run_mode", "eval", "--load_checkpoint", TINY8,
                                     "--eval_dataset", folder / "pt.mindrecord")
    assert not os.path.exists(tmp_path / "eval.json")
