"""Dry run: compile one rank's training (or predict) graph for a layout YAML on a CPU-only host.

MindSpore's DryRun (`MS_SIMULATION_LEVEL=0`) runs the real host-side compiler, the semi-auto-parallel
passes included (strategy checks, redistribution, AllToAll/AllReduce insertion, pipeline split, parallel
optimizer, strategy file), with the device side mocked. It needs `device_target: Ascend`, which loads on a
CPU host against the stand-in CANN of cann_stub.py. One process compiles one rank, by the path users run
(mixtral_ms.run.runner: the YAML read once, the layout, the model, MindFormers' Trainer with the YAML's
wrapper and optimizer), stopped as soon as the graph is compiled: nothing runs, nothing is trained.

The worker reports, from the compiled graph and the strategy file MindSpore wrote:
  - the communication operators the compiler inserted, by kind (read from the final IR);
  - each parameter's slice on this rank (device matrix and tensor map), compared with the plan
    (plan.plan_spec): a parameter sliced otherwise than the plan says is a mismatch;
  - the rank's static bytes (parameters, gradients, optimizer moments) from those slices, beside the
    estimator's (memory.estimate) for the same stage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mixtral_ms import cli  # no MindSpore import here: bad input is refused before the seconds it costs
from mixtral_ms.cli import ArgumentParser as _Parser
from mixtral_ms.checkpoint.name_map import FREEZE_MASK_PREFIX
from mixtral_ms.run import RunError
from mixtral_ms import ROOT
from mixtral_ms.checkpoint.distributed import box_shape, layout_box, read_strategy

COMM_KINDS = ("AllToAll", "AllGather", "AllReduce", "ReduceScatter", "Send", "Receive", "Broadcast")
_COMM_OPS = {"AlltoAll": "AllToAll", "AllToAll": "AllToAll", "AlltoAllV": "AllToAll", "AllGather": "AllGather",
             "AllReduce": "AllReduce", "ReduceScatter": "ReduceScatter", "Send": "Send", "Receive": "Receive",
             "Broadcast": "Broadcast"}
# "%12(CNode_3) = PrimFunc_AllReduce(%11, ...) {instance name: ...}" in MindSpore's IR text
_IR_NODE = re.compile(r"^\s*%(\d+)\S*\s*=\s*(?:PrimFunc_)?([A-Za-z_]+)\((.*)$")
_INSTANCE = re.compile(r"\{instance name: ([^}]*)\}")
_INPUT = re.compile(r"%(\d+)\b")
BYTES_TOLERANCE = 0.02  # the estimator's static bytes against the strategy file's
TIMEOUT_S = 900


@dataclass
class RankResult:
    """What one rank's dry run found (the worker writes it as JSON)."""
    config: str
    rank: int
    stage: int
    compiled: bool
    error: str = ""
    compile_s: float = 0.0
    strategy_file: str = ""
    comm: Dict[str, int] = field(default_factory=dict)
    exchanges: Dict[str, List[int]] = field(default_factory=dict)
    expect_alltoall: bool = False
    row: str = ""  # the TINY_MATRIX row, with --matrix
    mismatches: List[str] = field(default_factory=list)
    bytes_strategy: Dict[str, float] = field(default_factory=dict)
    bytes_estimate: Dict[str, float] = field(default_factory=dict)
    layout: str = ""
    layers: int = 0  # num_hidden_layers compiled

    def problems(self) -> List[str]:
        """What makes this rank's dry run fail: no compile, a slice the plan did not declare, bytes off the
        estimator by more than BYTES_TOLERANCE, or an expert exchange without its AllToAll."""
        if not self.compiled:
            return [self.error]
        out = list(self.mismatches)
        for key, value in self.bytes_strategy.items():
            est = self.bytes_estimate.get(key, 0.0)
            if abs(value - est) > BYTES_TOLERANCE * max(value, est, 1.0):
                out.append(f"{key}: {value / 2**20:.2f} MiB from the strategy file, {est / 2**20:.2f} MiB estimated")
        if self.expect_alltoall:
            for name, (found, total) in self.exchanges.items():
                if total == 0 or found < total:
                    out.append(f"{name}: AllToAll at {found} of {total} (enable_alltoall with expert_parallel > 1)")
        return out

    def lines(self) -> List[str]:
        """The report, one line each."""
        where = f"{self.config} rank {self.rank} (stage {self.stage})"
        if not self.compiled:
            return [f"FAIL {where}: {self.error}"]
        out = [f"compiled {where}: {self.layout}, {self.compile_s:.1f} s"]
        out.append(f"  strategy file {self.strategy_file}")
        out.append("  communication inserted: " + ", ".join(f"{k} {self.comm.get(k, 0)}" for k in COMM_KINDS))
        if self.exchanges:
            out.append("  expert exchange: " + ", ".join(f"{k} AllToAll {f}/{t}" for k, (f, t) in self.exchanges.items()))
        s, e = self.bytes_strategy, self.bytes_estimate
        if s:
            out.append("  per-rank bytes, strategy file | estimator: " + ", ".join(
                f"{k} {s[k] / 2**20:.2f} | {e.get(k, 0.0) / 2**20:.2f} MiB" for k in s))
        problems = self.problems()
        out.append("  plan, estimator and exchange: " + ("agree" if not problems else
                                                         f"{len(problems)} problem(s): {problems[0]}"))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Reading what the compiler wrote


@dataclass
class IRNode:
    op: str
    instance: str
    inputs: List[str]


def parse_ir(ir_text: str) -> Dict[str, IRNode]:
    """"<graph>:<id>" -> node of every CNode in an IR text (operator, instance name, input ids); ids are
    numbered per subgraph."""
    nodes: Dict[str, IRNode] = {}
    graph = ""
    for line in ir_text.splitlines():
        if line.startswith("subgraph @"):
            graph = line[len("subgraph @"):].split("(", 1)[0]
            continue
        m = _IR_NODE.match(line)
        if m:
            inst = _INSTANCE.search(line)
            nodes[f"{graph}:{m.group(1)}"] = IRNode(m.group(2), inst.group(1) if inst else "",
                                                   [f"{graph}:{i}" for i in _INPUT.findall(m.group(3))])
    return nodes


def comm_ops(nodes: Dict[str, IRNode]) -> Dict[str, int]:
    """Communication operators by kind."""
    counts: Dict[str, int] = {}
    for node in nodes.values():
        kind = _COMM_OPS.get(node.op)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _redistribution(node: IRNode) -> bool:
    return node.instance.startswith("redistribution_op") or node.op in ("AlltoAll", "Reshape", "StridedSlice")


def expert_exchanges(nodes: Dict[str, IRNode]) -> Dict[str, List[int]]:
    """For the `to_experts` / `from_experts` transposes: [with an AllToAll, all]. An AllToAll belongs to
    to_experts when it is in the redistribution feeding it, to from_experts when in the one it feeds."""
    users: Dict[str, List[str]] = {}
    for nid, node in nodes.items():
        for i in node.inputs:
            users.setdefault(i, []).append(nid)

    def reaches_alltoall(start: str, step) -> bool:
        seen, todo = set(), list(step(start))
        while todo:
            nid = todo.pop()
            node = nodes.get(nid)
            if nid in seen or node is None or not _redistribution(node):
                continue
            if node.op == "AlltoAll":
                return True
            seen.add(nid)
            todo += step(nid)
        return False

    out = {"to_experts": [0, 0], "from_experts": [0, 0]}
    for nid, node in nodes.items():
        if node.op == "Transpose" and node.instance in out:
            step = (lambda n: nodes[n].inputs if n in nodes else []) if node.instance == "to_experts" \
                else (lambda n: users.get(n, []))
            out[node.instance][1] += 1
            out[node.instance][0] += reaches_alltoall(nid, step)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The worker (one process, one rank)


class _Compiled(Exception):
    """Raised right after the first graph of the run is compiled: nothing after compile is real here."""

    def __init__(self, seconds: float) -> None:
        super().__init__("compiled")
        self.seconds = seconds


def _compile_only() -> None:
    """The first graph-mode call of a Cell compiles it, then stops the run (Cell.compile_and_run)."""
    from mindspore import nn

    def compile_and_stop(cell, *args, **kwargs):
        start = time.time()
        cell.compile(*args, **kwargs)
        raise _Compiled(time.time() - start)

    nn.Cell.compile_and_run = compile_and_stop


def _no_weights() -> None:
    """Nothing runs, so no weights are read: the student's load_checkpoint is dropped, and a distillation
    teacher keeps its initial values (its checkpoint need not be on this host; its config must)."""
    from mixtral_ms.checkpoint import load
    load.resolve_checkpoint = lambda path: path
    load.load_weights = lambda model, path, allow_nonfinite=False: None


def synthetic_dataset(path: str, columns: Sequence[str], seq_length: int, vocab_size: int, rows: int) -> None:
    """A MindRecord of `rows` random samples of seq_length + 1 tokens (what the compile reads its shapes from)."""
    import numpy as np
    from mixtral_ms.run.data import PRETRAIN_COLUMNS, SFT_COLUMNS, write_mindrecord
    schema = SFT_COLUMNS if "labels" in columns else PRETRAIN_COLUMNS
    rng = np.random.default_rng(0)
    samples = ({name: rng.integers(1, vocab_size, seq_length + 1, dtype=np.int32) for name in schema}
               for _ in range(rows))
    write_mindrecord(path, dict(schema), samples, overwrite=True)


def last_ir(folder: str) -> str:
    """The text of the last IR file the compiler saved (the graph as it runs, communication inserted)."""
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.endswith(".ir")]
    if not files:
        return ""
    final = [f for f in files if re.search(r"(validate|optimize|graph_build)", os.path.basename(f))]
    pick = max(final or files, key=os.path.getmtime)
    with open(pick, errors="replace") as f:
        return f.read()


def worker(spec: Dict[str, Any]) -> RankResult:
    """Compile rank `spec["rank"]` of `spec["config"]` (environment set by `compile_rank`)."""
    from mixtral_ms.run import runner
    rank = int(spec["rank"])
    settings = dict(spec.get("settings") or {})
    if spec.get("layers"):
        settings["model.model_config.num_hidden_layers"] = int(spec["layers"])
    settings["context.device_target"] = "Ascend"  # a YAML's CPU would override DEVICE_TARGET
    settings["output_dir"] = spec["output_dir"]
    result = RankResult(spec["config"], rank, 0, False)
    try:
        _no_weights()
        run = runner.load_run(spec["config"], {"run_mode": spec.get("run_mode")}, settings)
        config = run.config
        mode = config.run_mode
        if mode in ("train", "finetune"):
            columns = list(config.train_dataset.get("input_columns") or ["input_ids"])
            layout = run.layout
            rows = 2 * layout.micro_batch_rows() * layout.passes_per_step  # two steps' global batches
            data = os.path.join(spec["output_dir"], "synthetic.mindrecord")
            synthetic_dataset(data, columns, run.model_config.seq_length, run.model_config.vocab_size, rows)
            config.train_dataset.data_loader.dataset_dir = data
            for section in (config.train_dataset, (config.get("train_dataset_task") or {}).get("dataset_config")):
                if section is not None:  # a synthetic set on this host's cores
                    section["num_parallel_workers"] = 1
            config.load_checkpoint = ""
            config.resume_training = False
            steps = runner.training_data(run)
        import mindspore as ms
        from mindformers.core.context import build_context
        build_context(config)
        ms.set_context(mode=0)
        from mixtral_ms.parallel.plan import prepare_parallel
        prepare_parallel(config, run.layout, rank=rank)
        layout = run.layout
        result.layout, result.layers = layout.describe(), run.model_config.num_hidden_layers
        result.stage = rank // layout.stage_devices
        _compile_only()
        try:
            if mode in ("train", "finetune"):
                runner.train(run, mode == "finetune", steps)
            else:
                _compile_predict(run)
            raise RunError("the run ended without compiling a graph")
        except _Compiled as done:
            result.compiled, result.compile_s = True, done.seconds
    except Exception as err:  # the report names the first error; the traceback goes to the log
        import traceback
        traceback.print_exc()
        result.error = f"{type(err).__name__}: {_first_line(err)}"
        return result
    result.strategy_file = ms.get_auto_parallel_context("strategy_ckpt_save_file")  # what the compiler wrote
    nodes = parse_ir(last_ir(spec["graphs_dir"]))
    result.comm, result.exchanges = comm_ops(nodes), expert_exchanges(nodes)
    result.expect_alltoall = bool(layout.enable_alltoall and layout.expert_parallel > 1)
    _compare(result, run)
    return result


def _compile_predict(run) -> None:
    """Prefill of a batch of runner_config.batch_size prompts of 8 tokens, as run_mixtral.py predict does."""
    import numpy as np
    from mixtral_ms.run import runner
    from mixtral_ms.inference.generation import generate
    model = runner.build_model(run, None)
    rows = int((run.config.get("runner_config") or {}).get("batch_size") or 1) * run.layout.data_parallel
    ids = np.ones((rows, 8), np.int32)
    generate(model, ids, np.ones_like(ids), max_new_tokens=1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines() or [""])[0][:400]


def _compare(result: RankResult, run) -> None:
    """The strategy file's slices against the plan's, and the bytes they give against the estimator's."""
    from mixtral_ms.parallel.memory import DTYPE_BYTES, estimate
    from mixtral_ms.parallel.plan import STATS_PREFIX, plan_spec
    if not os.path.isfile(result.strategy_file):
        result.mismatches.append(f"no strategy file at {result.strategy_file}")
        return
    layout, stage = run.layout, result.stage
    mode = run.config.run_mode
    layouts = read_strategy(result.strategy_file).layouts
    rank = result.rank % layout.stage_devices
    training = mode in ("train", "finetune")
    pbytes = DTYPE_BYTES[run.model_config.param_init_type]
    level = layout.parallel_optimizer_config.get("optimizer_level", "level1")
    totals = {"parameters": 0.0, "gradients": 0.0, "moments": 0.0} if training else {"parameters": 0.0}
    for name, entry in plan_spec(run.model_config, layout, mode).items():
        if entry.kind != "param" or entry.stage != stage or name.startswith(STATS_PREFIX):
            continue
        shape = tuple(entry.shapes[0])
        found = _find(layouts, name)
        planned = entry.slice_shape(0)
        got = shape if found is None else box_shape(layout_box(replace(found, opt_step=0, opt_size=0), shape, rank))
        if got != planned:
            result.mismatches.append(f"{name}: plan {planned}, compiled {got}"
                                     + (" (no strategy-file entry)" if found is None else ""))
        local = _elements(found, shape, rank)  # with the optimizer shard: what this rank keeps
        totals["parameters"] += local * pbytes
        if training:
            totals["gradients"] += (local if level in ("level2", "level3") else math.prod(got)) * pbytes
            for moment in ("adam_m.", "adam_v."):  # fp32, as the optimizer creates them
                if moment + name in layouts:
                    totals["moments"] += _elements(layouts[moment + name], shape, rank) * 4
    for key, found in layouts.items():  # a freeze mask is sliced exactly as the parameter it masks
        masked = layouts.get(key[len(FREEZE_MASK_PREFIX):]) if key.startswith(FREEZE_MASK_PREFIX) else found
        if found != masked:
            result.mismatches.append(f"{key}: {found}, its parameter {masked}")
    result.bytes_strategy = totals
    est = estimate(run.model_config, layout, mode).stages[stage]
    result.bytes_estimate = {"parameters": est.param_bytes, "gradients": est.grad_bytes,
                             "moments": est.moment_bytes} if training else {"parameters": est.param_bytes}


def _elements(found, shape: Tuple[int, ...], rank: int) -> int:
    """Elements of a tensor this rank holds under its strategy-file layout (whole if it has none)."""
    return math.prod(shape if found is None else box_shape(layout_box(found, shape, rank)))


def _find(layouts: Dict[str, Any], name: str) -> Optional[Any]:
    """A parameter's layout; MindSpore may prefix names with the wrapper's (`network.`)."""
    if name in layouts:
        return layouts[name]
    for key, value in layouts.items():
        if key.endswith("." + name):
            return value
    return None


# ---------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per rank


def compile_rank(config: str, rank: int, devices: int, output_dir: str, settings: Optional[Dict[str, Any]] = None,
                 layers: Optional[int] = None, run_mode: Optional[str] = None, log: Optional[str] = None) -> RankResult:
    """Compile one rank in a fresh process (DryRun level 0; against the CANN install named by
    ASCEND_HOME_PATH where there is one, else the stand-in); returns its result."""
    from mixtral_ms.tools.cann_stub import ensure_stub, environment
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    graphs = os.path.join(output_dir, f"graphs_rank_{rank}")
    env = dict(os.environ) if os.environ.get("ASCEND_HOME_PATH") else environment(ensure_stub())
    env.update(DEVICE_TARGET="Ascend", MS_SIMULATION_LEVEL="0", RANK_SIZE=str(devices), RANK_ID=str(rank),
               GLOG_v=env.get("GLOG_v", "3"), MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=graphs, MS_DEV_DUMP_IR_PASSES="validate",
               LOCAL_DEFAULT_PATH=os.path.join(output_dir, "log"))
    env.pop("MS_ROLE", None)
    env.pop("LOCAL_DEFAULT_PATH", None)  # MindFormers' logs of the compile stay with its graphs (cwd)
    from mixtral_ms import ROOT
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    spec = {"config": os.path.abspath(config), "rank": rank, "settings": settings or {}, "layers": layers, "run_mode": run_mode,
            "output_dir": output_dir, "graphs_dir": graphs}
    fd, result_path = tempfile.mkstemp(prefix=".dryrun-", suffix=".json", dir=output_dir)
    os.close(fd)
    log = log or os.path.join(output_dir, f"dryrun_rank_{rank}.log")
    try:
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, "-m", "mixtral_ms.tools.dryrun", "--worker", json.dumps(spec),
                                   "--result", result_path], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=TIMEOUT_S, cwd=output_dir)  # the compiler writes rank_<r>/ to cwd
        with open(result_path) as f:
            text = f.read()
        if not text:
            return RankResult(config, rank, 0, False, f"the compiler process died (exit {done.returncode}); see {log}")
        return RankResult(**json.loads(text))
    except subprocess.TimeoutExpired:
        return RankResult(config, rank, 0, False, f"no compile within {TIMEOUT_S} s; see {log}")
    finally:
        os.remove(result_path)


TINY_CONFIG = "configs/parallel/dryrun/mixtral_tiny_8p.yaml"
# The tiny matrix: overrides of TINY_CONFIG (dp4 mp2 ep2, sequence parallel, AllToAll, optimizer shard,
# recompute, bf16 parameters and compute), each row a layout plus features the cluster path must compile
# (combined, since every row is a compile of its own: times in docs/parallel.md, "Dry run"). Rows with
# pipeline stages compile every stage.
_ONE_LAYER = {"model.model_config.num_hidden_layers": 1}  # every row but the pipeline's: a shorter compile
TINY_MATRIX: Dict[str, Dict[str, Any]] = {
    "dp4-mp2-ep2": {**_ONE_LAYER},
    "dp8-ep8-offload-fp32-norecompute-freeze-distill": {
        **_ONE_LAYER, "parallel_config.data_parallel": 8, "parallel_config.model_parallel": 1,
        "parallel_config.expert_parallel": 8, "parallel_config.use_seq_parallel": False,
        "optimizer.type": "OffloadAdamW", "model.model_config.param_init_type": "float32",
        "recompute_config.recompute": False,
        "runner_wrapper.freeze": {"experts": [0, 1], "router_rows": [0, 1], "non_moe": True},
        # the teacher: the tiny model of two layers; a dry run reads its config, never its weights
        "runner_wrapper.distill": {"teacher": "teacher-not-read", "teacher_config": os.path.join(ROOT, TINY_CONFIG),
                                   "kd_coef": 0.5}},
    "dp4-mp2-ep4-groupwise-interleave2-accumulate2-seqaux-sigmoid": {
        **_ONE_LAYER, "parallel_config.expert_parallel": 4, "moe_config.group_wise_a2a": True,
        "micro_batch_interleave_num": 2, "runner_config.gradient_accumulation_steps": 2,
        "model.model_config.router_aux_loss_scope": "sequence", "model.model_config.router_score_function": "sigmoid"},
    "dp2-mp4-ep4-vocab-split-allgather-shared": {  # a gated shared expert: column / row parallel over mp 4
        **_ONE_LAYER, "parallel_config.data_parallel": 2, "parallel_config.model_parallel": 4,
        "parallel_config.expert_parallel": 4, "parallel_config.vocab_emb_dp": False, "parallel.enable_alltoall": False,
        "model.model_config.num_shared_experts": 1, "model.model_config.shared_expert_gate": True},
    # the router bias counts and moves on each router's own stage; the global-batch aux loss reads the side
    # channel on the last
    "dp2-mp2-ep2-pp2-bias-globalaux": {
        "parallel_config.data_parallel": 2, "parallel_config.pipeline_stage": 2, "parallel_config.micro_batch_num": 2,
        "model.model_config.router_bias_update_rate": 0.001, "model.model_config.router_aux_loss_scope": "global_batch"},
    "predict-mp8": {**_ONE_LAYER, "run_mode": "predict", "parallel_config.data_parallel": 1,
                    "parallel_config.model_parallel": 8, "parallel_config.expert_parallel": 1,
                    "parallel_config.use_seq_parallel": False, "parallel.enable_alltoall": False,
                    "parallel.enable_parallel_optimizer": False, "model.model_config.inference_capacity_factor": 0.0},
}


def stage_ranks(layout, all_stages: bool, rank: int) -> List[int]:
    """The ranks to compile: `rank`, or the first rank of every pipeline stage."""
    if all_stages:
        return [s * layout.stage_devices for s in range(layout.pipeline_stage)]
    return [rank]


def _parse_set(items: Sequence[str]) -> Dict[str, Any]:
    import yaml
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise RunError(f"--set takes section.key=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RunError(f"--set {key}: {value!r} is not a YAML value") from None
    return out


def dry_run(config: str, settings: Dict[str, Any], layers: Optional[int], all_stages: bool, rank: Optional[int],
            output_dir: str, emit=print) -> List[RankResult]:
    """Check the inputs (one line each), then compile the ranks asked for, one process each."""
    from mixtral_ms.run import runner
    if layers is not None:
        settings = {**settings, "model.model_config.num_hidden_layers": layers}
    run = runner.load_run(config, None, settings)  # the YAML read as a run reads it; bad input stops here
    if run.layout is None:
        raise RunError(f"{config}: use_parallel is not set; a dry run compiles a parallel layout")
    layout = run.layout
    if rank is not None and not 0 <= rank < layout.devices:
        raise RunError(f"--rank {rank} is outside the layout's {layout.devices} devices ({layout.describe()})")
    results = []
    for r in stage_ranks(layout, all_stages, rank or 0):
        result = compile_rank(config, r, layout.devices, os.path.join(output_dir, f"rank_{r}"), settings)
        for line in result.lines():
            emit(line)
        results.append(result)
    return results


def main(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> int:
    """scripts/dryrun.py: 0 when every rank compiled and agrees with the plan and the estimator, 1 when one
    did not (the report says why), 2 on bad input, 130 / 143 on SIGINT / SIGTERM (cli.run)."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"the layout YAML (default with --matrix: {TINY_CONFIG})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--rank", type=int, help="compile this rank (default 0)")
    where.add_argument("--all-stages", action="store_true", help="compile the first rank of every pipeline stage")
    parser.add_argument("--layers", type=int, help="num_hidden_layers (fewer layers compile faster)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. parallel_config.data_parallel=4 (repeatable)")
    parser.add_argument("--matrix", action="store_true", help="compile the tiny matrix (TINY_MATRIX), every stage")
    parser.add_argument("--rows", help="with --matrix: only these rows (comma-separated names)")
    parser.add_argument("--output", default="output/dryrun", help="folder for strategy files, graphs and logs")
    parser.add_argument("--json", help="write every rank's result to this JSON file")
    return cli.run(_main, parser.parse_args(argv), interrupted="interrupted by {signal}")


def _main(args: argparse.Namespace) -> int:
    if args.layers is not None and args.layers < 1:
        raise RunError(f"--layers must be a positive integer, got {args.layers}")
    settings = _parse_set(args.set)
    emit = lambda line: print(line, flush=True)  # noqa: E731
    if args.matrix:
        rows = list(TINY_MATRIX)
        if args.rows:
            rows = [r.strip() for r in args.rows.split(",")]
            unknown = [r for r in rows if r not in TINY_MATRIX]
            if unknown:
                raise RunError(f"--rows: no matrix row {unknown[0]!r} (rows: {', '.join(TINY_MATRIX)})")
        config = args.config or os.path.join(ROOT, TINY_CONFIG)
        results = []
        for row in rows:
            print(f"== {row}", flush=True)
            for result in dry_run(config, {**TINY_MATRIX[row], **settings}, args.layers, True, None,
                                  os.path.join(args.output, row), emit=emit):
                result.row = row
                results.append(result)
    else:
        if not args.config:
            raise RunError("--config is required (or --matrix)")
        results = dry_run(args.config, settings, args.layers, args.all_stages, args.rank, args.output, emit=emit)
    if args.json:
        from mixtral_ms.outputs import write_json
        write_json(args.json, [asdict(r) for r in results])
    failed = [r for r in results if r.problems()]
    print(f"dry run: {len(results) - len(failed)} of {len(results)} rank(s) compiled and agree"
          + (f"; failed: {', '.join(f'{os.path.basename(r.config)} rank {r.rank}' for r in failed)}" if failed else ""))
    return 1 if failed else 0


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    result = worker(json.loads(args.worker))
    with open(args.result, "w") as f:
        json.dump(asdict(result), f)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
