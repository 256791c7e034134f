"""Parallel layouts: validation errors, the sharding plan of every shipped config against its shapes, the
context, the memory estimator, the host-offload AdamW, MoE token groups as on a cluster, the launcher,
and a 2-process msrun DATA_PARALLEL run equal to one process on the global batch."""
import glob
import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

import mindspore as ms
from mindspore import Tensor

from conftest import ROOT
from mixtral_ms import MixtralConfig, MixtralForCausalLM
from mixtral_ms.parallel.layout import ParallelConfigError, from_run_config, validate
from mixtral_ms.parallel.plan import STATS_PREFIX, apply_plan, check_table, context_kwargs, plan_spec
from mixtral_ms.run.run_yaml import read_run_yaml
from mixtral_ms.parallel import layout as pconfig
from mixtral_ms.parallel import memory
from mixtral_ms.parallel.plan import _primitives

VENV_BIN = os.path.dirname(sys.executable)
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "parallel", "*.yaml")))
EP8 = {"data_parallel": 8, "model_parallel": 1, "expert_parallel": 8, "pipeline_stage": 4, "micro_batch_num": 16}
SEMI = {"parallel_mode": 1, "enable_alltoall": True, "full_batch": True}


# ----------------------------------------------------------------------------------------------------------------
# The 2-process launch starts with the module (autouse fixture) so that it overlaps the other tests; the
# tests that read its results (test_msrun_*) run last in the session (conftest.py moves them).

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, capacity_factor=1.1,
            router_aux_loss_coef=0.0, router_z_loss_coef=0.001, max_position_embeddings=64, seq_length=16,
            initializer_range=0.3)
OPTIM = {"learning_rate": 1e-3, "betas": [0.9, 0.95], "eps": 1e-5, "weight_decay": 0.1}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def dp_launch(tmp_path_factory):
    """Writes the run YAML, starts msrun; yields (workdir, process)."""
    work = tmp_path_factory.mktemp("dp")
    _write_run_yaml(work)
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--join=True", f"--log_dir={work / 'logs'}",
           os.path.join(ROOT, "tests", "dist", "dp_train_check.py"), "--workdir", str(work)]
    proc = subprocess.Popen(cmd, cwd=str(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the workers go with it
    yield work, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _write_run_yaml(work):
    """The shipped 32-device pre-training YAML scaled to the 2 msrun workers: its pipeline (pp 2, micro-batches
    2), the tiny model, a 16-token MindRecord, one dataset worker (the machine's 2 cores)."""
    from mixtral_ms.run.data import write_mindrecord
    cfg = read_run_yaml(os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_32p.yaml"))
    cfg["parallel_config"].update(data_parallel=1, expert_parallel=1, pipeline_stage=2, micro_batch_num=2)
    cfg["model"]["model_config"].update({k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                              "num_attention_heads", "num_key_value_heads",
                                                              "max_position_embeddings", "seq_length")},
                                        num_hidden_layers=2)
    rng = np.random.default_rng(3)
    write_mindrecord(str(work / "run.mindrecord"), {"input_ids": {"type": "int32", "shape": [-1]}},
                     ({"input_ids": rng.integers(0, 64, 17).astype(np.int32)} for _ in range(8)))
    cfg["train_dataset"]["data_loader"]["dataset_dir"] = str(work / "run.mindrecord")
    cfg["train_dataset"]["num_parallel_workers"] = 1
    cfg["train_dataset_task"]["dataset_config"] = cfg["train_dataset"]
    cfg["output_dir"] = str(work / "run_out")
    cfg["callbacks"] = [c for c in cfg["callbacks"] if c["type"] != "RouterStatsMonitor"]
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))


class TrainStep(ms.nn.Cell):
    """loss, grads = value_and_grad(model); optimizer(grads)."""

    def __init__(self, model, optimizer):
        super().__init__(auto_prefix=False)
        self.net, self.optimizer = model, optimizer
        self.grad_fn = ms.value_and_grad(self.net, None, optimizer.parameters)

    def construct(self, ids):
        loss, grads = self.grad_fn(ids)
        self.optimizer(grads)
        return loss


def _train_graph(optimizer_cls, init, batches):
    """Graph mode, the tiny model from `init` on `batches`: final parameters, moments, optimizer."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        model = MixtralForCausalLM(MixtralConfig(**TINY))
        ms.load_param_into_net(model, {k: ms.Parameter(Tensor(v), name=k) for k, v in init.items()},
                               strict_load=True)
        model.set_train(True)
        opt = optimizer_cls(model.trainable_params(), **OPTIM)
        step = TrainStep(model, opt)
        for batch in batches:
            step(Tensor(batch))
        return ({p.name: p.asnumpy() for p in model.trainable_params()},
                {p.name: p.asnumpy() for p in list(opt.exp_avg) + list(opt.exp_avg_sq)}, opt)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


# ----------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("parallel_config,parallel,model,devices,message", [
    ({"data_parallel": 4, "pipeline_stage": 2}, {}, {}, 16, r"data_parallel \(4\) \* model_parallel \(1\) \* "
                                                            r"pipeline_stage \(2\) = 8, but there are 16 devices"),
    ({"data_parallel": 2, "model_parallel": 2, "expert_parallel": 8}, SEMI, {}, 4,
     r"expert_parallel \(8\) must divide data_parallel \* model_parallel \(4\)"),
    ({"data_parallel": 6, "expert_parallel": 3}, SEMI, {}, 6,
     r"expert_parallel \(3\) must divide the number of experts"),
    ({"data_parallel": 1, "pipeline_stage": 3, "micro_batch_num": 3}, SEMI, {}, 3,
     r"num_hidden_layers \(32\) is not divisible by pipeline_stage \(3\)"),
    ({"model_parallel": 16}, SEMI, {}, 16, r"num_key_value_heads \(8\) is not divisible by model_parallel \(16\)"),
    ({"model_parallel": 8}, SEMI, {"num_key_value_heads": 12, "num_attention_heads": 36}, 8,
     r"num_attention_heads \(36\) is not divisible by model_parallel \(8\)"),
    ({"pipeline_stage": 4, "micro_batch_num": 2}, SEMI, {}, 4,
     r"micro_batch_num \(2\) must be at least pipeline_stage \(4\)"),
    ({"data_paralel": 2}, {}, {}, 2, r"parallel_config: unknown key\(s\) \['data_paralel'\]"),
    ({}, {"enable_all2all": True}, {}, 1, r"parallel: unknown key\(s\) \['enable_all2all'\]"),
    ({"model_parallel": 2}, {"parallel_mode": 0}, {}, 2, r"need parallel_mode 1"),
    ({"context_parallel": 2}, SEMI, {}, 2, r"context_parallel = 2 is not supported"),
    ({"data_parallel": 2}, {"parallel_mode": 1, "enable_parallel_optimizer": True},
     {}, 2, None),
    ({"data_parallel": 2, "optimizer_shard": False}, {"parallel_mode": 1, "enable_parallel_optimizer": True}, {}, 2,
     r"optimizer_shard \(False\) contradicts parallel.enable_parallel_optimizer \(True\)"),
])
def test_validation_errors_are_one_line(parallel_config, parallel, model, devices, message):
    if message is None:
        assert validate(parallel_config, parallel, model, devices).optimizer_shard
        return
    with pytest.raises(ParallelConfigError, match=message) as err:
        validate(parallel_config, parallel, model, devices)
    assert "\n" not in str(err.value)


def test_moe_config_knobs():
    with pytest.raises(ParallelConfigError, match="comp_comm_parallel: true is implemented only inside MindFormers"):
        validate(EP8, SEMI, {}, 32, moe_config={"comp_comm_parallel": True})
    with pytest.raises(ParallelConfigError, match=r"moe_config.expert_num \(4\) disagrees"):
        validate(EP8, SEMI, {}, 32, moe_config={"expert_num": 4})
    with pytest.raises(ParallelConfigError, match=r"moe_config: unknown key"):
        validate(EP8, SEMI, {}, 32, moe_config={"group_wise_all2all": True})
    layout = validate({"data_parallel": 4, "model_parallel": 2, "expert_parallel": 4}, SEMI, {}, 8,
                      moe_config={"group_wise_a2a": True}, batch_size=4)  # capacity 4506: even
    table = plan_spec({}, layout)
    assert table["model.layers.0.block_sparse_moe.to_experts"].strategy == ((1, 4, 2, 1),)  # capacity over mp
    assert table["model.layers.0.block_sparse_moe.experts.w1"].strategy == ((4, 2, 1),)
    assert check_table(table, layout) == []


def test_keys_are_the_frameworks():
    """Every key accepted here exists in MindSpore 2.9 / MindFormers 1.9, with MindFormers' defaults."""
    from mindspore.parallel._auto_parallel_context import _set_auto_parallel_context_func_map
    from mindformers.modules.transformer.moe import MoEConfig
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    assert pconfig.PARALLEL_CONTEXT_KEYS <= set(_set_auto_parallel_context_func_map)
    op_params = inspect.signature(TransformerOpParallelConfig.__init__).parameters
    assert set(pconfig.PARALLEL_CONFIG_DEFAULTS) == set(op_params) - {"self"}
    for key, default in pconfig.PARALLEL_CONFIG_DEFAULTS.items():
        if key not in ("recompute", "swap"):
            assert op_params[key].default == default, key
    from mindformers.tools.register.template import MoEConfig as MoETemplate
    template = {k: getattr(MoETemplate, k) for k in dir(MoETemplate) if not k.startswith("_") and
                not callable(getattr(MoETemplate, k))}
    template.pop("name")  # the template's section name (Config.name), not a key
    assert pconfig.MOE_TEMPLATE_DEFAULTS == template  # what MindFormerConfig fills moe_config with
    moe_params = set(inspect.signature(MoEConfig.__init__).parameters)
    assert set(pconfig.MOE_COMM_KEYS) | set(pconfig._MOE_MODEL_KEYS) | pconfig._MOE_IGNORED_KEYS <= moe_params


# ----------------------------------------------------------------------------------------------------------------
# The shipped configs


def test_four_configs_shipped():
    names = [os.path.basename(p) for p in CONFIGS]
    assert names == ["mixtral_8x7b_finetune_16p.yaml", "mixtral_8x7b_predict_mp8.yaml",
                     "mixtral_8x7b_pretrain_32p.yaml", "mixtral_8x7b_pretrain_8p.yaml"]
    layouts = {n: from_run_config(read_run_yaml(p)) for n, p in zip(names, CONFIGS)}
    assert layouts["mixtral_8x7b_pretrain_32p.yaml"].describe() == "dp8 mp1 ep8 pp4 (32 devices)"
    assert layouts["mixtral_8x7b_pretrain_8p.yaml"].describe() == "dp8 mp1 ep8 pp1 (8 devices)"
    assert layouts["mixtral_8x7b_finetune_16p.yaml"].describe() == "dp8 mp1 ep8 pp2 (16 devices)"
    assert layouts["mixtral_8x7b_predict_mp8.yaml"].describe() == "dp1 mp8 ep1 pp1 (8 devices)"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_plan_is_consistent_with_the_real_shapes(path):
    cfg = read_run_yaml(path)
    layout = from_run_config(cfg)
    fields = {k: v for k, v in cfg["model"]["model_config"].items() if k != "type"}
    model_config = MixtralConfig(**fields)  # the YAML builds a valid model config
    table = plan_spec(model_config, layout, cfg["run_mode"])
    assert check_table(table, layout) == []
    params = {k: e for k, e in table.items() if e.kind == "param"}
    weights = {k: e for k, e in params.items() if not k.startswith(STATS_PREFIX)}  # not the side channel
    assert sum(math.prod(e.shapes[0]) for e in weights.values()) == 46_702_792_704  # Mixtral-8x7B
    assert {e.stage for k, e in params.items() if k.startswith(STATS_PREFIX)} == {layout.pipeline_stage - 1}
    # each pipeline stage gets L/pp layers; the embedding the first stage, norm and head the last
    stages = {e.stage for k, e in params.items() if k.startswith("model.layers.")}
    assert stages == set(range(layout.pipeline_stage))
    assert params["model.embed_tokens.weight"].stage == 0
    assert params["lm_head.weight"].stage == layout.pipeline_stage - 1
    dp, mp, ep = layout.data_parallel, layout.model_parallel, layout.expert_parallel
    w1 = params["model.layers.0.block_sparse_moe.experts.w1"]
    assert w1.strategy[0][0] == ep and w1.slice_shape()[0] == 8 // ep
    assert params["model.layers.0.self_attn.q_proj.weight"].slice_shape() == (4096 // mp, 4096)
    assert table["model.layers.0.self_attn.bmm_qk"].strategy[0] == (dp, mp, 1, 1)
    assert table["model.embed_tokens.gather"].strategy[1] == (dp, 1)
    # scripts/run_mixtral.py's check passes: top-level keys, registered types (OffloadAdamW once
    # mixtral_ms.run.optim is imported), their arguments, the model config
    import mixtral_ms.run.optim  # noqa: F401
    from mixtral_ms.run.yaml_check import check_config
    check_config(cfg)
    # the memory header in the YAML is what the estimator prints now
    rel = os.path.relpath(path, ROOT)
    text = open(path, encoding="utf-8").read()
    assert memory.header_block(rel, memory.from_run_config_estimate(read_run_yaml(path))) in text, \
        f"stale header: mixtral-ms-memory --config {rel} --write_header"


def _scaled(path, **extra):
    """The shipped layout on a scaled-down model with the same divisibility (8 heads, 8 KV heads, 8 experts)."""
    cfg = read_run_yaml(path)
    pp = cfg["parallel_config"].get("pipeline_stage", 1)
    model = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2 * pp,
                 num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=64, seq_length=16, **extra)
    cfg["model"]["model_config"] = {"type": "MixtralConfig", **model}
    return cfg, model


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_plan_applied_to_every_primitive_and_parameter(path):
    cfg, fields = _scaled(path)
    layout = from_run_config(cfg)
    model = MixtralForCausalLM(MixtralConfig(**fields, **layout.model_fields()))
    table = apply_plan(model, layout, cfg["run_mode"])
    prims = _primitives(model)
    assert set(prims) == {k for k, e in table.items() if e.kind == "op"}
    for name, prim in prims.items():
        entry = table[name]
        if entry.layout is None:
            assert prim.attrs["in_strategy"] == entry.strategy, name
            continue
        # named device axes (the expert exchange): each dimension split as the tuple strategy says
        for named, strategy in zip(prim.attrs["in_layout"], entry.strategy):
            sizes = named["device_matrix"]
            axis = lambda m: sizes[len(sizes) - 1 - m] if m >= 0 else 1  # noqa: E731
            split = tuple(math.prod(axis(a) for a in m) if isinstance(m, tuple) else axis(m)
                          for m in named["tensor_map"])
            assert split == strategy, (name, named, strategy)
    assert {p.name for p in model.get_parameters()} == {k for k, e in table.items() if e.kind == "param"}
    for p in model.get_parameters():
        assert table[p.name].shapes[0] == tuple(p.shape), p.name
    assert check_table(table, layout) == []
    for i, layer in enumerate(model.model.layers):
        assert layer.block_sparse_moe.groups == layout.data_parallel
        if layout.pipeline_stage > 1:
            assert layer.pipeline_stage == i // (len(model.model.layers) // layout.pipeline_stage)
    if layout.pipeline_stage > 1:
        assert model.lm_head.pipeline_stage == layout.pipeline_stage - 1
        assert model.training_stats.pipeline_stage == layout.pipeline_stage - 1  # the side channel, with the loss
        assert model.model.embed_tokens.pipeline_stage == 0
    assert model.config.moe_token_groups == layout.data_parallel


def test_plan_refuses_a_model_it_does_not_cover():
    small = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, num_local_experts=4, max_position_embeddings=32, seq_length=8)
    layout = validate({"data_parallel": 2}, SEMI, small, 2)
    with pytest.raises(ParallelConfigError, match=r"the model was built with \{'moe_token_groups': 1, "
                                                  r"'static_dispatch': False\}"):
        apply_plan(MixtralForCausalLM(MixtralConfig(**small)), layout)
    model = MixtralForCausalLM(MixtralConfig(**small, **layout.model_fields()))
    model.model.layers[0].extra = ms.ops.MatMul()
    with pytest.raises(ParallelConfigError, match=r"no sharding strategy for primitive\(s\) "
                                                  r"\['model.layers.0.extra'\]"):
        apply_plan(model, layout)
    # group-wise AllToAll splits the capacity over mp: 2 rows x 9 tokens / 2 groups -> capacity 5, odd
    layout = validate({"data_parallel": 2, "model_parallel": 2, "expert_parallel": 2}, SEMI, small, 4,
                      moe_config={"group_wise_a2a": True})
    with pytest.raises(ParallelConfigError, match=r"group_wise_a2a splits the expert capacity over 2 model-parallel "
                                                  r"ranks, but the capacity is 5"):
        apply_plan(MixtralForCausalLM(MixtralConfig(**small, **layout.model_fields())), layout)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_yaml_as_run_mixtral_loads_it(path, tmp_path):
    """scripts/run_mixtral.py's reading (MindFormers' reader and template: moe_config gets MindFormers' ~46
    default keys, parallel its defaults) then prepare_parallel on the YAML's device count: the layout
    validates and the semi-auto context is set (compiling it needs Ascend/GPU: test_msrun_* below)."""
    from mixtral_ms.parallel.plan import prepare_parallel
    from mixtral_ms.run.runner import load_run
    run = load_run(path, {"output_dir": str(tmp_path)})
    assert len(run.config.moe_config) > 40  # the template's keys, not the YAML's 5
    expected = from_run_config(read_run_yaml(path))
    assert run.layout == expected  # validated once, from the YAML as written
    try:
        prepare_parallel(run.config, run.layout, devices=expected.devices, rank=0)
        assert ms.get_auto_parallel_context("parallel_mode") == "semi_auto_parallel"
        assert ms.get_auto_parallel_context("pipeline_stages") == expected.pipeline_stage
    finally:
        ms.reset_auto_parallel_context()
    assert (tmp_path / "strategy").is_dir()


def test_moe_config_from_mindformerconfig_still_refuses_what_it_cannot_honour():
    from mindformers import MindFormerConfig
    path = os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_8p.yaml")
    config = MindFormerConfig(path)
    config.moe_config.use_gmm = True  # a MindFormers-MoE knob set away from its default
    with pytest.raises(ParallelConfigError, match=r"moe_config: unknown key\(s\) \['use_gmm'\]"):
        from_run_config(config)
    config.moe_config.use_gmm = False
    config.moe_config.expert_num = 4
    with pytest.raises(ParallelConfigError, match=r"moe_config.expert_num \(4\) disagrees"):
        from_run_config(config)


def test_pipeline_network_for_the_32_device_config():
    """The 32-device layout (dp8 ep8 pp4, micro_batch_num 16) on its 32 layers, narrowed: MindSpore's
    PipelineCell (what MindFormers wraps the model in) builds around the loss-only model, and every
    parameter and primitive sits on the stage the plan gives it (through the cell that owns it)."""
    from mindspore.nn import PipelineCell
    cfg = read_run_yaml(os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_32p.yaml"))
    layout = from_run_config(cfg)
    fields = {k: v for k, v in cfg["model"]["model_config"].items() if k != "type"}
    fields.update(vocab_size=256, hidden_size=64, intermediate_size=64, seq_length=16, max_position_embeddings=64,
                  **layout.model_fields())
    model = MixtralForCausalLM(MixtralConfig(**fields))
    table = apply_plan(model, layout, "train")
    network = PipelineCell(model, micro_size=layout.micro_batch_num)
    assert network.micro_size == 16 and network.network is model
    cells = dict(model.cells_and_names())

    def stage(owner: str) -> int:
        """The stage of the innermost cell on the path to `owner` that has one (children inherit)."""
        parts, found = owner.split("."), -1
        for i in range(1, len(parts) + 1):
            cell = cells.get(".".join(parts[:i]))
            if cell is not None and getattr(cell, "_pipeline_stage", -1) >= 0:  # unset: no attribute
                found = cell.pipeline_stage
        return found

    params = {p.name for p in model.get_parameters()}
    assert params == {k for k, e in table.items() if e.kind == "param"}
    for name in params:
        assert stage(name.rsplit(".", 1)[0]) == table[name].stage, name
    unstaged = set()
    for name in _primitives(model):
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if stage(owner) < 0:
            unstaged.add(name)
        else:
            assert stage(owner) == table[name].stage, name
    # the tied-head matmul belongs to the top cell (it runs where its input, the last stage's hidden, is)
    assert unstaged == {"head_matmul"}
    per_stage = [sum(1 for k, e in table.items() if e.kind == "param" and e.stage == s) for s in range(4)]
    assert per_stage == [1 + 8 * 10, 8 * 10, 8 * 10, 8 * 10 + 2 + 6]  # embedding; 10 per layer; norm, head, stats


def test_context_kwargs_for_32_devices(tmp_path):
    layout = from_run_config(read_run_yaml(os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_32p.yaml")))
    strategy_file = str(tmp_path / "strategy" / "ckpt_strategy_rank_0.ckpt")  # MindSpore makes its folder
    kwargs = context_kwargs(layout, strategy_file)
    assert kwargs["parallel_mode"] == "semi_auto_parallel" and kwargs["device_num"] == 32
    assert kwargs["enable_alltoall"] and kwargs["full_batch"] and kwargs["pipeline_stages"] == 4
    assert kwargs["enable_parallel_optimizer"] and kwargs["gradients_mean"] is False
    assert kwargs["parallel_optimizer_config"] == {"optimizer_level": "level1", "parallel_optimizer_threshold": 64}
    assert kwargs["strategy_ckpt_save_file"] == strategy_file
    try:  # MindSpore accepts every argument (compiling would need Ascend/GPU)
        ms.set_auto_parallel_context(**kwargs)
        assert ms.get_auto_parallel_context("pipeline_stages") == 4
        assert ms.get_auto_parallel_context("enable_alltoall") is True
    finally:
        ms.reset_auto_parallel_context()


# ----------------------------------------------------------------------------------------------------------------
# Memory


def test_memory_estimate_32_devices_by_hand():
    est = memory.from_run_config_estimate(read_run_yaml(os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_32p.yaml")))
    stage0 = est.stages[0]
    h, f, e, v = 4096, 14336, 8, 32000
    experts = 8 * 3 * e * f * h // 8                      # 8 layers, w1/w3/w2, split over ep 8
    attention = 8 * (h * h * 2 + 2 * 1024 * h)             # q, o + k, v per layer
    small = 8 * (2 * h + e * h)                            # norms and router
    assert stage0.params == experts + attention + small + v * h
    # optimizer shard over dp 8 for everything replicated 8 ways and >= 64 KB; experts are not replicated
    sharded = attention + 8 * e * h + v * h
    whole = experts + 8 * 2 * h
    assert stage0.param_bytes == pytest.approx(4 * (whole + sharded / 8))
    assert stage0.grad_bytes == pytest.approx(4 * stage0.params)
    assert stage0.moment_bytes == pytest.approx(8 * (whole + sharded / 8))
    assert stage0.device_total(True, False) == stage0.param_bytes + stage0.grad_bytes



def test_memory_estimate_counts_dispatch_buffers_on_moe_layers_only():
    """moe_layer_freq 2 on the 8p layout without recompute: each dense layer keeps a dense MLP's activations
    (3 * T * F / mp) instead of the MoE layer's dispatch slots (k * cf * T * f / mp of 2 H + 3 F / f)."""
    cfg = read_run_yaml(os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_8p.yaml"))
    cfg.setdefault("recompute_config", {})["recompute"] = False
    every = memory.from_run_config_estimate(cfg).stages[0].activation_bytes
    cfg["model"]["model_config"]["moe_layer_freq"] = 2
    est = memory.from_run_config_estimate(cfg)
    d, layout = est.dims, est.layout
    t, mp, f = layout.batch_size * d.seq_length, layout.model_parallel, layout.expert_ffn_split
    slots = d.num_experts_per_tok * d.capacity_factor * t * f / mp
    c = memory.DTYPE_BYTES[d.compute_dtype]
    difference = c * (slots * (2 * d.hidden_size + 3 * d.intermediate_size / f) - 3 * t * d.intermediate_size / mp)
    assert d.num_hidden_layers == 32 and every - est.stages[0].activation_bytes == pytest.approx(16 * difference)

def test_memory_cli(tmp_path):
    path = os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_32p.yaml")
    out = subprocess.run([sys.executable, "-m", "mixtral_ms.commands.memory", "--config", path], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "dp8 mp1 ep8 pp4 (32 devices)" in out and "| 0 | 1.876 |" in out
    copy = tmp_path / "x.yaml"  # the shipped run with one key changed, through MindFormers' base_config
    copy.write_text(f"base_config: {path}\nparallel_config:\n  expert_parallel: 3\n")
    bad = subprocess.run([sys.executable, "-m", "mixtral_ms.commands.memory", "--config", str(copy)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "expert_parallel (3)" in bad.stderr


# ----------------------------------------------------------------------------------------------------------------
# MoE token groups as on a cluster


def _tiny_model(groups, **extra):
    ms.set_seed(3)
    return MixtralForCausalLM(MixtralConfig(**{**TINY, "inference_capacity_factor": 1.1, "moe_token_groups": groups,
                                               **extra}))


def test_token_groups_equal_each_shard_alone():
    """G = dp groups on the global batch == every dp shard's rows run alone with G = 1 (the model end to end)."""
    ids = np.random.default_rng(1).integers(0, 64, (4, 12)).astype(np.int32)
    grouped, single = _tiny_model(2), _tiny_model(1)
    grouped.set_train(False)
    single.set_train(False)
    logits, _, _, dropped = grouped(Tensor(ids))
    parts = [single(Tensor(ids[i:i + 2])) for i in (0, 2)]
    np.testing.assert_allclose(logits.asnumpy(), np.concatenate([p[0].asnumpy() for p in parts]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dropped.asnumpy(), parts[0][3].asnumpy() + parts[1][3].asnumpy())
    assert dropped.asnumpy().sum() > 0
    whole = single(Tensor(ids))[0].asnumpy()  # one group over everything: different capacity, different result
    assert np.abs(whole - logits.asnumpy()).max() > 1e-4


def test_expert_parallel_exchange_matches_grouped_block():
    """Emulate dp = ep = 2: each rank routes and dispatches its own tokens (capacity per rank) into [E, C, H],
    an AllToAll gives rank j experts j*E/2.. of both ranks, rank j runs them with only its weight slice,
    the reverse AllToAll and a per-rank combine follow. Equals the block with moe_token_groups = 2."""
    from mixtral_ms.model.capacity import expert_capacity
    from mixtral_ms.model.dispatch import dispatch
    model = _tiny_model(2)
    model.set_train(True)
    block = model.model.layers[0].block_sparse_moe
    dp = ep = 2
    e, k, h = block.num_experts, block.top_k, TINY["hidden_size"]
    x = np.random.default_rng(4).normal(size=(4, 10, h)).astype(np.float32)
    mask = np.ones((4, 10), np.float32)
    y = block(Tensor(x), Tensor(mask))[0].asnumpy()

    rows = x.shape[0] // dp
    n = rows * x.shape[1]
    cap = expert_capacity(n, k, e, block.train_capacity_factor)
    sent, routes = [], []
    for r in range(dp):  # each data-parallel rank: router and dispatch on its own tokens
        flat = x[r * rows:(r + 1) * rows].reshape(n, h)
        _, _, weights, index, _ = block.gate(Tensor(flat))  # the router also returns which choices it kept
        slot_token, assignment_slot, _, _ = dispatch(index.reshape(1, n, k), weights.reshape(1, n, k),
                                                     Tensor(np.ones((1, n), np.float32)), e, cap, "probs")
        padded = np.concatenate([flat, np.zeros((1, h), np.float32)])
        sent.append(padded[slot_token.asnumpy()][:e * cap].reshape(e, cap, h))
        routes.append((assignment_slot.asnumpy(), weights.asnumpy()))
    w1, w3, w2 = (p.asnumpy() for p in (block.experts.w1, block.experts.w3, block.experts.w2))
    per = e // ep
    received = []
    for j in range(ep):  # AllToAll: rank j gets its experts' slots from every rank, runs only its weights
        xin = np.stack([sent[r][j * per:(j + 1) * per] for r in range(dp)], axis=1)  # [E/ep, dp, C, H]
        xin = xin.reshape(per, dp * cap, h)
        gate = np.einsum("emh,efh->emf", xin, w1[j * per:(j + 1) * per])
        up = np.einsum("emh,efh->emf", xin, w3[j * per:(j + 1) * per])
        out = np.einsum("emf,ehf->emh", gate / (1 + np.exp(-gate)) * up, w2[j * per:(j + 1) * per])
        received.append(out.reshape(per, dp, cap, h))
    outputs = []
    for r in range(dp):  # reverse AllToAll and combine on each rank
        expert_out = np.concatenate([received[j][:, r] for j in range(ep)]).reshape(e * cap, h)
        expert_out = np.concatenate([expert_out, np.zeros((1, h), np.float32)])
        slots, weights = routes[r]
        outputs.append((expert_out[slots].reshape(n, k, h) * weights.reshape(n, k, 1)).sum(1))
    np.testing.assert_allclose(np.concatenate(outputs).reshape(y.shape), y, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Launcher


def _launcher(*args):
    env = dict(os.environ, MIXTRAL_MS_VENV=os.path.dirname(VENV_BIN))
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_launcher_prints_the_msrun_command():
    cfg = "configs/parallel/mixtral_8x7b_pretrain_32p.yaml"
    res = _launcher("--device", "gpu", "--worker_num", "32", "--local_worker_num", "8", "--node_rank", "3",
                    "--master_addr", "10.1.2.3", "--master_port", "9000", "--log_dir", "out/logs",
                    "--config", cfg, "--run_mode", "train", "--dry_run", "--", "--epochs", "1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("DEVICE_TARGET=GPU PATH=" + VENV_BIN)
    assert lines[1].split() == [
        "msrun", "--worker_num=32", "--local_worker_num=8", "--master_addr=10.1.2.3", "--master_port=9000",
        "--log_dir=out/logs", "--join=True", "--cluster_time_out=600", "--node_rank=3",
        os.path.join(ROOT, "scripts", "run_mixtral.py"), "--config", cfg, "--run_mode", "train", "--epochs", "1"]
    single = _launcher("--config", "configs/parallel/mixtral_8x7b_pretrain_8p.yaml", "--dry_run")
    assert single.returncode == 0 and "--worker_num=8 --local_worker_num=8" in single.stdout
    assert "switch_inline:False" in single.stdout  # OffloadAdamW config
    for args, message in [(("--config", cfg, "--worker_num", "32", "--local_worker_num", "8"), "give --node_rank"),
                          (("--config", cfg, "--device", "tpu"), "--device must be ascend, gpu or cpu"),
                          (("--config", "nope.yaml"), "no config file nope.yaml"),
                          (("--config", cfg, "--bogus"), "unknown option --bogus")]:
        bad = _launcher(*args, "--dry_run")
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_offload_adamw_equals_mindformers_adamw():
    """OffloadAdamW == MindFormers AdamW, bitwise, over 3 graph-mode steps (same lr, betas, eps, weight decay)."""
    from mindformers.core.optim import AdamW
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mixtral_ms.run import optim
    from mixtral_ms.run.optim import OffloadAdamW
    assert MindFormerRegister.get_cls(MindFormerModuleType.OPTIMIZER, "OffloadAdamW") is OffloadAdamW
    ms.set_seed(11)
    init = {p.name: p.asnumpy() for p in MixtralForCausalLM(MixtralConfig(**TINY)).get_parameters()}
    batches = np.random.default_rng(7).integers(0, TINY["vocab_size"], (3, 4, TINY["seq_length"] + 1), np.int32)
    (pa, ma, _), (pb, mb, offload) = (_train_graph(cls, init, batches) for cls in (AdamW, OffloadAdamW))
    assert set(pa) == set(pb) and set(ma) == set(mb)  # same state names: checkpoints interchange
    assert max(np.abs(pa[k] - pb[k]).max() for k in pa) == 0.0
    assert max(np.abs(ma[k] - mb[k]).max() for k in ma) == 0.0
    assert max(np.abs(pa[k] - init[k]).max() for k in pa) > 1e-4  # it trained
    assert all(p._get_user_data("parameter_device") == "CPU" for p in offload.exp_avg)  # host placement requested
    host = (optim._h_mul, optim._h_addcmul, optim._h_assign)
    assert all(prim.attrs.get("primitive_target") == "CPU" for prim in host)


# ----------------------------------------------------------------------------------------------------------------
# Results of the msrun launch: last, to overlap with the above.


def _launch_results(dp_launch):
    """Wait for the msrun launch once; its outputs and worker logs."""
    work, proc = dp_launch
    if proc.returncode is None:
        try:
            proc.out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("msrun did not finish in 600 s")
    logs = "".join(open(p).read()[-3000:] for p in sorted(glob.glob(str(work / "logs" / "worker_*.log"))))
    assert proc.returncode == 0, proc.out[-3000:] + logs
    return work


def test_msrun_wrapper_data_parallel_equals_one_process(dp_launch):
    """MixtralTrainOneStepCell DATA_PARALLEL on 2 processes (graph mode) with MindFormers' AdamW and
    gradient_accumulation_steps 2 (the step without accumulation takes the same all-reduce path, once) ==
    one process (PyNative) whose micro-batch i holds both ranks' micro-batch i, with one MoE token group per
    rank's rows:
    - gradients all-reduced (mean) before the overflow check and clipping: both ranks see the one process's
      global norm, skip nothing, and end with its parameters;
    - expert capacity per rank's shard: the same assignments dropped (some are; one token group for the
      whole pass would drop others);
    - the side channel holds the global batch's statistics on every rank;
    - the aux loss over the global batch reads every rank's tokens so far in each pass, and the router bias
      moves by every rank's count: the same aux loss and biases."""
    accumulation = 2
    from dist.dp_train_check import WRAPPER_BATCH, train_wrapper, wrapper_setup
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, step, batches = wrapper_setup(accumulation, groups=2)
    steps, rows, tokens = batches.shape  # rank r's micro-batch i is row r * rows / 2 + i
    passes = batches.reshape(steps, 2, accumulation, rows // (2 * accumulation), tokens).swapaxes(1, 2)
    passes = passes.reshape(steps, rows, tokens)
    first = Tensor(passes[0, :rows // accumulation])  # the first pass: both ranks' first micro-batch
    dropped = {}
    for groups in (1, 2):  # the same initial weights
        probe = wrapper_setup(accumulation, groups)[0]
        probe(first)
        dropped[groups] = probe.training_stats.read_and_reset()["dropped"]
    assert dropped[2].sum() > 0, "the batches must overflow some expert"
    assert (dropped[1] != dropped[2]).any()  # so per-shard capacity is what the ranks must match
    ref = train_wrapper(step, model, passes, WRAPPER_BATCH, 0)
    reference = {p.name: p.asnumpy() for p in model.trainable_params()}
    work = _launch_results(dp_launch)
    name = "wrapper_accum_"
    ranks = [json.load(open(work / f"{name}rank{r}.json")) for r in range(2)]
    params = [np.load(work / f"{name}rank{r}.npz") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and not any(any(r["overflow"]) for r in ranks)
    assert min(ref["norms"]) > 0.5  # clipping was active
    for r in ranks:
        np.testing.assert_allclose(r["norms"], ref["norms"], rtol=1e-5)
        assert r["load"] == ref["load"] and r["dropped"] == ref["dropped"]  # global counts
        assert r["passes"] == [2.0 * accumulation] * len(batches)  # both ranks' passes
        np.testing.assert_allclose(r["ce"], ref["ce"], rtol=1e-5)
        np.testing.assert_allclose(r["aux"], ref["aux"], rtol=1e-5)
        assert r["bias"] == ref["bias"]  # moves of whole multiples of the rate, by the global counts
    assert np.abs(ref["bias"][-1]).max() > 0
    np.testing.assert_allclose(np.mean([r["losses"] for r in ranks], axis=0), ref["losses"], rtol=1e-5)
    for key, value in reference.items():
        np.testing.assert_array_equal(params[0][key], params[1][key])
        np.testing.assert_allclose(params[0][key], value, atol=2e-5, err_msg=key)


def test_msrun_run_mixtral_reaches_the_cpu_refusal(dp_launch):
    """scripts/run_mixtral.py's main under 2 msrun workers on the shipped 32-device YAML scaled to pp 2: the
    YAML loads through MindFormerConfig, the layout validates against the world size, the model is built
    and sharded, MindFormers wraps it in PipelineCell and swaps in MFPipelineWithLossScaleCell (loss-only
    output), and the first thing that fails is MindSpore's semi-auto compile, which the CPU backend refuses."""
    work = _launch_results(dp_launch)
    for rank in range(2):
        result = json.loads((work / f"run_mixtral_rank{rank}.json").read_text())
        assert result.get("error") == "RuntimeError: Invalid backend: CPU", result
        trace = result["traceback"]
        assert "_graph_executor.compile" in trace and "pipeline_split_utils.cc" in trace
        assert "grads_for_legacy" in trace  # MFPipelineWithLossScaleCell.construct: MindFormers' pipeline wrapper
        assert (work / "run_out" / "strategy").is_dir()
