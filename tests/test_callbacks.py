"""The training callbacks (mixtral_ms/run/callbacks.py) as a module, in PyNative: the side channel is read once
per step (step_stats) and that one read is shared by MixtralProgressMonitor and RouterStatsMonitor; the read
empties the channel, so the next step reports its own passes; the progress line and router_stats.jsonl from
known channel values, extra terms by name; a resumed run's file keeps the records up to its starting step."""
import contextlib
import io
import json

import numpy as np
import pytest

from mindspore import Tensor, nn
from mindspore.train.callback import RunContext, _InternalCallbackParam

from mixtral_ms import MixtralConfig, MixtralForCausalLM
from mixtral_ms.run.callbacks import MixtralProgressMonitor, RouterStatsMonitor, step_stats

CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64, router_z_loss_coef=0.01)
LOAD = np.array([[3, 1, 0, 4], [2, 2, 2, 2]], np.float32)
DROPPED = np.array([[1, 0, 0, 0], [0, 0, 0, 2]], np.float32)
PASSES = ((2.0, 1.0, 0.5, 0.25), (4.0, 3.0, 1.5, 0.75))  # ce, aux, z, kd of two forward passes


def _params(network, step: int, outputs=(3.1, False, 1.0, 1e-3, 0.5), total: int = 4) -> _InternalCallbackParam:
    """What MindSpore hands the callbacks after step `step` of a one-epoch run of `total` steps."""
    cb = _InternalCallbackParam()
    cb.train_network, cb.cur_step_num, cb.batch_num, cb.epoch_num = network, step, total, 1
    cb.net_outputs = tuple(Tensor(np.float32(x)) for x in outputs)
    return cb


def _model(extra_terms=()):
    model = MixtralForCausalLM(MixtralConfig(**CONFIG), extra_terms)
    model.set_train(True)
    return model


def test_one_read_per_step_shared_and_the_next_step_counts_its_own_passes():
    """Two training forwards, then step_stats twice in step 1: one read (the same values, the means of the
    two passes' terms; a forward after the read does not change them); step 2 reports the one pass made
    after step 1's read."""
    model = _model()
    ids = np.random.default_rng(0).integers(0, 64, (3, 3, 9)).astype(np.int32)
    losses = [float(model(Tensor(b))) for b in ids[:2]]
    cb = _params(model, 1)
    values = step_stats(cb)
    assert values["passes"] == 2.0
    assert values["expert_load"].sum(-1).tolist() == [2 * 2 * 3 * 8] * 2  # passes x top-k x rows x positions
    terms = values["terms"]
    assert sum(losses) / 2 == pytest.approx(terms["ce_loss"] + model.aux_coef * terms["aux_loss"]
                                            + model.z_coef * terms["z_loss"], rel=1e-6)
    model(Tensor(ids[2]))
    assert step_stats(cb) is values and values["passes"] == 2.0
    later = step_stats(_params(model, 2))
    assert later["passes"] == 1.0 and later["expert_load"].sum() == 2 * 3 * 8 * 2
    assert step_stats(_params(nn.Dense(2, 2), 3)) is None  # no MixtralForCausalLM: no channel


def test_monitors_share_the_read_and_write_the_known_values(tmp_path):
    """Known channel values (two passes, a kd term): the progress line prints the means, kd by name, and
    router_stats.jsonl (read after the progress monitor in the same step) gets the same read."""
    model = _model(("kd_loss",))
    for terms in PASSES:
        model.training_stats(tuple(Tensor(np.float32(t)) for t in terms), Tensor(LOAD), Tensor(DROPPED))
    progress = MixtralProgressMonitor(log_interval=10, initial_step=0)
    router = RouterStatsMonitor(str(tmp_path), log_interval=10, verbose=False, initial_step=0)
    cb = _params(model, 1)
    context = RunContext(cb)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for monitor in (progress, router):
            monitor.on_train_begin(context)
        for monitor in (progress, router):
            monitor.on_train_step_end(context)
    assert out.getvalue().startswith("step 1/4 | loss 3.1000 | ce 3.0000 | aux 2.0000 | z 1.000 | kd 0.5000 | "
                                     "lr 1.00e-03 | grad_norm 0.500 | first step ")
    with open(tmp_path / "router_stats.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records == [{
        "step": 1, "tokens_per_expert": [[6, 2, 0, 8], [4, 4, 4, 4]],
        "dropped_per_expert": [[2, 0, 0, 0], [0, 0, 0, 4]],
        "dropped_fraction": [0.125, 0.25], "aux_loss": 2.0, "z_loss": 1.0, "loss": pytest.approx(3.1),
        "ce_loss": 3.0, "overflow": False, "loss_scale": 1.0, "kd_loss": 0.5}]
    assert list(records[0]) == ["step", "tokens_per_expert", "dropped_per_expert", "dropped_fraction", "aux_loss",
                                "z_loss", "loss", "ce_loss", "overflow", "loss_scale", "kd_loss"]  # users' plots
    assert all(not p.asnumpy().any() for p in model.training_stats.get_parameters())  # read and emptied
    assert progress.history[0]["kd_loss"] == 0.5


def test_a_resumed_run_keeps_the_records_up_to_its_step(tmp_path):
    path = tmp_path / "router_stats.jsonl"
    path.write_text("".join(json.dumps({"step": s, "aux_loss": s / 10}) + "\n" for s in range(1, 6)))
    router = RouterStatsMonitor(str(tmp_path), log_interval=1, verbose=False, initial_step=3)
    router.on_train_begin(RunContext(_params(_model(), 1)))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    RouterStatsMonitor(str(tmp_path), initial_step=0).on_train_begin(RunContext(_params(_model(), 1)))
    assert path.read_text() == ""  # a fresh run starts the file anew


def test_router_stats_name_the_model_layer_of_each_row_under_a_layer_pattern(tmp_path):
    """moe_layer_freq 2 on 4 layers: the channel's rows are layers 1 and 3, and the record (and the verbose
    lines, and plot_router's labels) say so; the default every-layer model writes no `layers` key."""
    from mixtral_ms.commands.plot_router import read_stats
    model = MixtralForCausalLM(MixtralConfig(**dict(CONFIG, num_hidden_layers=4, moe_layer_freq=2)))
    model.set_train(True)
    model.training_stats(tuple(Tensor(np.float32(t)) for t in PASSES[0][:3]), Tensor(LOAD), Tensor(DROPPED))
    router = RouterStatsMonitor(str(tmp_path), log_interval=10, verbose=True, initial_step=0)
    context = RunContext(_params(model, 1))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        router.on_train_begin(context)
        router.on_train_step_end(context)
    record = read_stats(str(tmp_path / "router_stats.jsonl"))[0]
    assert record["layers"] == [1, 3] and record["tokens_per_expert"] == LOAD.astype(int).tolist()
    assert "    layer 1: tokens/expert [3 1 0 4]" in out.getvalue() and "    layer 3: tokens/expert" in out.getvalue()
    default = RouterStatsMonitor(str(tmp_path / "default"), log_interval=10, verbose=False, initial_step=0)
    plain = _model()
    plain.training_stats(tuple(Tensor(np.float32(t)) for t in PASSES[0][:3]), Tensor(LOAD), Tensor(DROPPED))
    context = RunContext(_params(plain, 1))
    default.on_train_begin(context)
    default.on_train_step_end(context)
    assert "layers" not in read_stats(str(tmp_path / "default" / "router_stats.jsonl"))[0]
