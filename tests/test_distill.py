"""Output distillation (mixtral_ms/run/distill.py) through MindFormers' Trainer from the shipped YAML
(configs/compress/distill_dense_tiny.yaml): a frozen MoE teacher with its own config (4 experts, top-1) in
the same graph as a dense student (one expert), the loss alpha*CE + (1-alpha)*T^2*KL(teacher || student),
ce and kd on the progress line and in router_stats.jsonl, the teacher untouched; the KL against numpy; the
student's side channel built once, with the KD term, before the plan; bad distill sections fail with one line."""
import os
import re

import numpy as np
import pytest
import yaml

import mindspore as ms
from mindspore import Tensor

from mixtral_ms import MixtralConfig, MixtralForCausalLM
from mixtral_ms.checkpoint.load import load_weights
from mixtral_ms.run.data import write_mindrecord
from mixtral_ms.model.losses import distillation_loss
from mixtral_ms.parallel.layout import validate
from mixtral_ms.parallel.plan import STATS_PREFIX, apply_plan
from mixtral_ms.run.distill import KD_TERM, Distillation, build_teacher, extra_terms
from mixtral_ms.run import runner
from conftest import ROOT
from test_training import BATCH, SEQ, error_line, run, stats, write_yaml

STEPS = 16


pytestmark = pytest.mark.usefixtures("trainer_context")  # PyNative and no parallel context after


def test_distillation_loss_is_the_softened_kl_over_counted_positions():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 7)).astype(np.float32), 3 * rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 5)).astype(np.int32)
    labels[1, 3] = -100

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    kl = (np.exp(log_softmax(t[:, :-1] / 2)) * (log_softmax(t[:, :-1] / 2) - log_softmax(s[:, :-1] / 2))).sum(-1)
    valid = labels[:, 1:] != -100
    got = float(distillation_loss(Tensor(s), Tensor(t), Tensor(labels), 2.0))
    assert got == pytest.approx(kl[valid].mean(), rel=1e-5)
    assert float(distillation_loss(Tensor(t), Tensor(t), Tensor(labels), 2.0)) == pytest.approx(0, abs=1e-6)
    # shifted labels (the training forward's): the same positions, the logits already cut to them
    shifted = distillation_loss(Tensor(s[:, :-1]), Tensor(t[:, :-1]), Tensor(labels[:, 1:]), 2.0, shifted=True)
    assert float(shifted) == pytest.approx(kl[valid].mean(), rel=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    data = tmp / "data.mindrecord"
    cycle = np.random.default_rng(1).permutation(np.arange(3, 2000))[:40].astype(np.int32)
    rng = np.random.default_rng(2)
    write_mindrecord(str(data), {"input_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": cycle[(rng.integers(0, 40) + np.arange(SEQ + 1)) % 40]} for _ in range(BATCH * STEPS)))
    teacher_yaml = write_yaml(tmp, data, name="teacher.yaml", **{
        "model.model_config.num_local_experts": 4, "model.model_config.num_experts_per_tok": 1,
        "model.model_config.initializer_range": 0.2})  # peaked next-token distributions to learn from
    with open(teacher_yaml) as f:
        teacher_config = MixtralConfig(**{k: v for k, v in yaml.safe_load(f)["model"]["model_config"].items()
                                          if k != "type"})
    ms.set_seed(5)
    teacher = MixtralForCausalLM(teacher_config)
    ms.save_checkpoint(teacher, str(tmp / "teacher.ckpt"))
    return tmp, data, teacher_yaml, teacher_config


def shipped_distill_yaml(folder, data, **distill):
    """configs/compress/distill_dense_tiny.yaml as users run it: MindFormers' reader merges this file over it
    (base_config), shrinking it to hidden 32, 16-token samples, batch 4, one epoch of STEPS, with the test's
    teacher and `distill` on top of the shipped distillation settings."""
    dataset = {"data_loader": {"dataset_dir": str(data), "shuffle": False}, "batch_size": BATCH}
    cfg = {"base_config": os.path.join(ROOT, "configs", "compress", "distill_dense_tiny.yaml"),
           "output_dir": str(folder), "load_checkpoint": str(folder / "start.ckpt"),
           "model": {"model_config": {"hidden_size": 32, "intermediate_size": 48, "seq_length": SEQ}},
           "train_dataset": dataset, "train_dataset_task": {"dataset_config": dataset},
           "runner_config": {"batch_size": BATCH, "epochs": 1}, "lr_schedule": {"learning_rate": 2e-2, "lr_end": 2e-3},
           "runner_wrapper": {"distill": distill},
           "callbacks": [{"type": "MixtralProgressMonitor", "log_interval": 4},
                         {"type": "RouterStatsMonitor", "log_interval": 1, "verbose": False},
                         {"type": "CheckpointMonitor", "prefix": "d", "save_checkpoint_steps": STEPS,
                          "integrated_save": False, "async_save": False}]}
    path = folder / "run.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def test_distillation_into_the_dense_student_through_the_trainer(setup):
    """The shipped YAML: a dense student (one expert) learns alpha * CE + (1 - alpha) * T^2 * KL from the
    frozen MoE teacher. Here alpha 0.1 (the teacher is random: with the shipped 0.75 the labels of the
    cycle data pull the student away from it) and T 2, so the T^2 factor shows."""
    tmp, data, teacher_yaml, teacher_config = setup
    out = tmp / "run"
    out.mkdir()
    start = out / "start.ckpt"
    cfg = shipped_distill_yaml(out, data, teacher=str(tmp / "teacher.ckpt"), teacher_config=teacher_yaml,
                               ce_coef=0.1, kd_coef=0.9, temperature=2.0)
    loaded = runner.load_run(cfg)
    config = loaded.model_config
    assert (config.num_local_experts, config.num_experts_per_tok, config.hf_model_type) == (1, 1, "mistral")
    shipped = loaded.config.runner_wrapper.distill
    alpha, temperature = shipped.ce_coef, shipped.temperature
    assert (alpha, shipped.kd_coef, temperature) == (0.1, 0.9, 2.0)
    ms.set_seed(6)
    student = MixtralForCausalLM(config)
    ms.save_checkpoint(student, str(start))
    status, stdout, stderr = run("--config", cfg, "--run_mode", "train")
    assert status == 0, stderr[-3000:]

    records = stats(out / "router_stats.jsonl")
    assert sorted(records) == list(range(1, STEPS + 1))
    for r in records.values():
        expected = alpha * r["ce_loss"] + (1 - alpha) * temperature ** 2 * r["kd_loss"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    kd = [records[s]["kd_loss"] for s in sorted(records)]
    assert np.mean(kd[-4:]) < 0.97 * np.mean(kd[:4]), kd  # the student moves towards the teacher (observed -6%)
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert lines and all("| ce " in line and "| aux " in line and "| kd " in line for line in lines)

    # Step 1's KD term is the KL between this teacher (its own config, eval mode) and the starting student.
    ms.set_context(mode=ms.PYNATIVE_MODE)
    teacher = MixtralForCausalLM(teacher_config)
    load_weights(teacher, str(tmp / "teacher.ckpt"))
    teacher.set_train(False)
    student.set_train(True)
    import mindspore.dataset as ds
    rows = ds.MindDataset(str(data), shuffle=False).create_dict_iterator(num_epochs=1, output_numpy=True)
    ids = Tensor(np.stack([next(rows)["input_ids"] for _ in range(BATCH)]))
    inputs, labels = ids[:, :-1], ids[:, 1:]  # seq_length positions, next-token labels, as the training forward
    kd = distillation_loss(student.forward_logits(inputs)[0], teacher(inputs)[0], labels, 2.0, shifted=True)
    assert records[1]["kd_loss"] == pytest.approx(float(kd), rel=1e-4)

    final = out / "checkpoint" / "rank_0" / f"d_rank_0-1_{STEPS}.ckpt"
    saved = ms.load_checkpoint(str(final))
    for p in teacher.get_parameters():  # the teacher travels in the checkpoint, untouched
        if p.name.startswith(STATS_PREFIX):  # the teacher's side channel: training state, never written
            continue
        assert np.array_equal(saved["teacher." + p.name].asnumpy(), p.asnumpy()), p.name
    trained = MixtralForCausalLM(config)
    load_weights(trained, str(final))  # the student loads alone from it
    assert not np.array_equal(trained.lm_head.weight.asnumpy(), student.lm_head.weight.asnumpy())


def test_lifelong_form_with_a_moe_student_adds_aux_and_z(setup):
    """Lifelong-MoE's CE + aux + z + lambda * T^2 * KL (ce_coef 1) for an MoE student (8 experts, top-2) of the
    4-expert teacher: one training forward of the Distillation cell, its loss against its logged terms and
    the KL recomputed from the two models' logits."""
    tmp, data, teacher_yaml, teacher_config = setup
    with open(write_yaml(tmp, data, name="moe_student.yaml")) as f:
        fields = yaml.safe_load(f)["model"]["model_config"]
    student = MixtralForCausalLM(MixtralConfig(**{k: v for k, v in fields.items() if k != "type"}), (KD_TERM,))
    teacher = build_teacher({"config": teacher_config, "teacher": str(tmp / "teacher.ckpt")})
    cell = Distillation(student, teacher, kd_coef=0.5, ce_coef=1.0, temperature=2.0)
    cell.set_train(True)
    ids = Tensor(np.random.default_rng(3).integers(3, 2000, (BATCH, SEQ + 1)).astype(np.int32))
    loss = float(cell(ids))
    terms = student.training_stats.read_and_reset()["terms"]
    assert loss == pytest.approx(terms["ce_loss"] + 0.02 * terms["aux_loss"] + 0.001 * terms["z_loss"]
                                 + 0.5 * 4.0 * terms["kd_loss"], rel=1e-5)
    assert terms["aux_loss"] > 1.0 and terms["z_loss"] > 0  # an MoE's terms, in the loss
    teacher.set_train(False)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    kd = distillation_loss(student.forward_logits(inputs)[0], teacher(inputs)[0], labels, 2.0, shifted=True)
    assert terms["kd_loss"] == pytest.approx(float(kd), rel=1e-5)


def test_the_student_side_channel_is_built_once_with_the_kd_term(setup, tmp_path):
    """The run YAML says the KD term exists (extra_terms), the student is built with it and the plan shards
    and stages it with the others; Distillation uses that channel as it is, and refuses a student built
    without the term."""
    tmp, data, teacher_yaml, teacher_config = setup
    distilled = runner.load_run(shipped_distill_yaml(tmp_path, data, teacher=str(tmp / "teacher.ckpt"),
                                                     teacher_config=teacher_yaml)).config
    plain = runner.load_run(write_yaml(tmp_path, data, name="plain.yaml")).config
    assert (extra_terms(distilled), extra_terms(plain)) == ((KD_TERM,), ())
    small = dict(vocab_size=2000, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, num_local_experts=4, max_position_embeddings=32, seq_length=8)
    layout = validate({"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2},
                      {"parallel_mode": 1, "enable_alltoall": True, "full_batch": True}, small, 4)
    student = MixtralForCausalLM(MixtralConfig(**small, **layout.model_fields()), extra_terms(distilled))
    table = apply_plan(student, layout)
    channel = student.training_stats
    assert channel.terms == ("ce_loss", "aux_loss", "z_loss", KD_TERM)
    assert table[STATS_PREFIX + KD_TERM].stage == 1 == channel.pipeline_stage  # staged with the loss
    assert STATS_PREFIX + KD_TERM in {p.name for p in student.get_parameters()}
    teacher = MixtralForCausalLM(teacher_config)
    Distillation(student, teacher, kd_coef=0.5, ce_coef=1.0, temperature=1.0)
    assert student.training_stats is channel
    with pytest.raises(ValueError, match=re.escape("build it with MixtralForCausalLM(config, extra_terms=(")):
        Distillation(MixtralForCausalLM(teacher_config), teacher, kd_coef=0.5, ce_coef=1.0, temperature=1.0)


def test_bad_distill_sections_fail_with_one_line(setup, tmp_path):
    tmp, data, teacher_yaml, _ = setup
    good = {"teacher": str(tmp / "teacher.ckpt"), "teacher_config": teacher_yaml}
    other_vocab = write_yaml(tmp_path, data, name="vocab.yaml", **{"model.model_config.vocab_size": 3000})
    cases = [
        ({**good, "lambda": 1.0}, "runner_wrapper.distill: unknown key(s) ['lambda']"),
        ({**good, "teacher": str(tmp / "nope.ckpt")}, "runner_wrapper.distill.teacher: no checkpoint at"),
        ({"teacher": str(tmp / "teacher.ckpt")}, "is neither a run YAML nor a folder with config.json"),
        ({**good, "temperature": 0}, "runner_wrapper.distill.temperature must be positive"),
        ({**good, "kd_coef": -1}, "runner_wrapper.distill.kd_coef must be a non-negative number"),
        ({**good, "teacher_config": other_vocab}, "the teacher's vocab_size 3000 differs from the student's 2000"),
    ]
    for i, (distill, message) in enumerate(cases):
        cfg = write_yaml(tmp_path, data, name=f"bad{i}.yaml", **{"runner_wrapper.distill": distill})
        assert message in error_line("--config", cfg, "--run_mode", "train"), distill
    assert not os.path.exists(tmp_path / "checkpoint")
