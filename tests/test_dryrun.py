"""The dry run (mixtral_ms/tools/dryrun.py, scripts/dryrun.py): the tiny layout matrix compiled by
MindSpore's own parallel compiler on this CPU host (DryRun level 0, the stand-in CANN), its reports
checked against the plan and the estimator; the report's parts on hand-made inputs; bad input.

The matrix (one `scripts/dryrun.py --matrix` subprocess, several minutes) starts with this module and runs
beside the rest of the suite; the tests that read its results run last (conftest)."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from mixtral_ms.tools import cann_stub
from mixtral_ms.parallel.layout import validate
from mixtral_ms.checkpoint.distributed import ParamLayout, box_shape, layout_box
from mixtral_ms.tools.dryrun import TINY_MATRIX, IRNode, RankResult, last_ir, comm_ops, expert_exchanges, parse_ir
from mixtral_ms.parallel.plan import expert_axes

DRYRUN = os.path.join(ROOT, "scripts", "dryrun.py")
TINY = dict(vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, seq_length=64)


# The suite's rows (its 10-minute budget): the training rows but the plain dp4-mp2-ep2, whose mp, ep and dp
# splits each recur in a row that adds more; not predict-mp8 (forward only: its plan is checked against the
# model in tests/test_parallel.py). `python bench/bench_dryrun.py --matrix` compiles every row.
SUITE_ROWS = [row for row in TINY_MATRIX if row not in ("dp4-mp2-ep2", "predict-mp8")]


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """Starts `scripts/dryrun.py --matrix --rows SUITE_ROWS --json` in the background; yields (process, json
    path, output folder)."""
    out = tmp_path_factory.mktemp("dryrun")
    proc = subprocess.Popen([sys.executable, DRYRUN, "--matrix", "--rows", ",".join(SUITE_ROWS), "--output",
                             str(out / "graphs"), "--json", str(out / "matrix.json")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    yield proc, out / "matrix.json", out
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def matrix_results(matrix):
    proc, path, _ = matrix
    output, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, output[-3000:]
    results = json.loads(path.read_text())
    return {(r["row"], r["rank"]): r for r in results}, output


@pytest.fixture(autouse=True)
def _start_matrix(matrix):
    """Every test of this module starts the matrix first, so it overlaps the rest of the suite."""


# ---------------------------------------------------------------------------------------------------------------
# The parts of the report


def test_a_slice_counts_device_axes_from_the_right():
    def shape(full, dev_matrix, tensor_map, rank=0):
        return box_shape(layout_box(ParamLayout(dev_matrix, tensor_map, 0, 0, (0,)), full, rank))
    assert shape((8, 256, 128), (2, 2, 2), (2, 0, -1)) == (4, 128, 128)
    assert shape((2000, 128), (4, 2), (-1, -1)) == (2000, 128)
    assert shape((128, 128), (4, 2), (0, -1)) == (64, 128)


@pytest.mark.parametrize("dp,mp,ep", [(4, 2, 2), (8, 1, 8), (4, 2, 4), (2, 4, 4), (4, 2, 8), (8, 1, 4), (2, 2, 2)])
def test_expert_axes_split_the_stage_as_the_layout_does(dp, mp, ep):
    """The named device matrix of the expert exchange: experts over g*e2 = ep, tokens over t, FFN over f, as
    the plan's tuple strategies split them; the whole stage, and data parallelism = g*t outermost."""
    layout = validate({"data_parallel": dp, "model_parallel": mp, "expert_parallel": ep},
                      {"parallel_mode": 1}, TINY)
    names, sizes = expert_axes(layout)
    g, e2, t, f = sizes
    assert names == ("g", "e2", "t", "f")
    assert g * e2 == ep and t == layout.expert_token_split and f == layout.expert_ffn_split
    assert g * t == dp and e2 * f == mp  # the token side's dp x mp grid, when t or e2 is 1 (powers of two)


IR = """
subgraph @fwd(%para1_x) {
  %1(CNode_1) = PrimFunc_Reshape(%para1_x, (I64(2))) {instance name: redistribution_op_1}
  %2(CNode_2) = AlltoAll(%1) {instance name: redistribution_op_2} primitive_attrs: {group: "2-1"}
  %3(CNode_3) = PrimFunc_Transpose(%2, (I64(1), I64(0))) {instance name: to_experts}
  %4(CNode_4) = PrimFunc_BatchMatMul(%3, %3) {instance name: bmm_gate}
  %5(CNode_5) = PrimFunc_Transpose(%4, (I64(1), I64(0))) {instance name: from_experts}
  %6(CNode_6) = AllGather(%5) {instance name: redistribution_op_3}
  %7(CNode_7) = PrimFunc_Concat(%6) {instance name: concat}
}
subgraph @bwd(%para2_y) {
  %1(CNode_8) = PrimFunc_Transpose(%para2_y, (I64(1), I64(0))) {instance name: to_experts}
  %2(CNode_9) = AllReduce(%1) {instance name: forward_op_4}
  %3(CNode_10) = PrimFunc_Transpose(%2, (I64(1), I64(0))) {instance name: from_experts}
  %4(CNode_11) = AlltoAll(%3) {instance name: redistribution_op_5}
}
"""


def test_ir_is_read_per_subgraph_and_the_exchange_attributed():
    """Node ids repeat across subgraphs; an AllToAll belongs to to_experts when it feeds it through
    redistribution, to from_experts when it is fed by it."""
    nodes = parse_ir(IR)
    assert nodes["fwd:2"] == IRNode("AlltoAll", "redistribution_op_2", ["fwd:1"])
    assert nodes["bwd:1"].inputs == [] and nodes["bwd:1"].instance == "to_experts"
    assert comm_ops(nodes) == {"AllToAll": 2, "AllGather": 1, "AllReduce": 1}
    # forward: both ends have their AllToAll but from_experts feeds an AllGather; second graph: only from_experts
    assert expert_exchanges(nodes) == {"to_experts": [1, 2], "from_experts": [1, 2]}


def test_a_rank_fails_on_a_mismatch_a_missing_exchange_or_bytes_off_by_2_percent():
    ok = RankResult("c.yaml", 0, 0, True, bytes_strategy={"parameters": 100.0}, bytes_estimate={"parameters": 101.0},
                    exchanges={"to_experts": [2, 2], "from_experts": [2, 2]}, expect_alltoall=True)
    assert ok.problems() == []
    assert RankResult("c.yaml", 0, 0, True, bytes_strategy={"parameters": 100.0},
                      bytes_estimate={"parameters": 103.0}).problems()
    assert RankResult("c.yaml", 0, 0, True, exchanges={"to_experts": [1, 2], "from_experts": [2, 2]},
                      expect_alltoall=True).problems()
    assert RankResult("c.yaml", 0, 0, True, mismatches=["w: plan (2,), compiled (4,)"]).problems()
    assert RankResult("c.yaml", 3, 1, False, error="RuntimeError: x").lines() == \
        ["FAIL c.yaml rank 3 (stage 1): RuntimeError: x"]


def test_the_stand_in_defines_each_symbol_once_and_allocates_for_create():
    source = cann_stub.stub_source(["aclrtMalloc", "aclCreateTensor", "_ZN2ge5GraphC1Ev"])
    assert source.count("__asm__") == 3
    assert 'aclCreateTensor"' in source and "calloc" in source.split('aclCreateTensor"')[1].split("\n")[1]
    assert '"_ZN2ge5GraphC1Ev"' in source


def test_training_moe_with_model_parallel_needs_sequence_parallel():
    from mixtral_ms.parallel.layout import ParallelConfigError
    pc = {"data_parallel": 4, "model_parallel": 2, "expert_parallel": 2}
    with pytest.raises(ParallelConfigError, match="use_seq_parallel"):
        validate(pc, {"parallel_mode": 1}, TINY, training=True)
    validate({**pc, "use_seq_parallel": True}, {"parallel_mode": 1}, TINY, training=True)
    validate(pc, {"parallel_mode": 1}, TINY, training=False)  # predict: MindFormers asks nothing


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any compile


@pytest.mark.parametrize("args,message", [
    ([], "--config is required"),
    (["--config", "nope.yaml"], "no config file nope.yaml"),
    (["--matrix", "--rows", "dp3"], "no matrix row 'dp3'"),
    (["--matrix", "--set", "parallel_config"], "--set takes section.key=value"),
    (["--config", "configs/parallel/mixtral_8x7b_pretrain_8p.yaml", "--rank", "1", "--all-stages"],
     "not allowed with argument"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    res = subprocess.run([sys.executable, DRYRUN, *args, "--output", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/parallel/mixtral_8x7b_pretrain_8p.yaml", "--rank", "8"], "--rank 8 is outside"),
    (["--config", "configs/parallel/mixtral_8x7b_pretrain_32p.yaml", "--layers", "6"],
     "num_hidden_layers (6) is not divisible by pipeline_stage (4)"),
    (["--matrix", "--rows", "dp4-mp2-ep2", "--set",
      "runner_wrapper.distill={teacher: t, teacher_config: configs/compress/dense_tiny_cpu.yaml}"],
     "runner_wrapper.distill: the teacher does not fit the student's layout: model.layers.0.block_sparse_moe."
     "to_experts: dimension 1 of (4, 1, 128, 128) not divisible by 2"),
])
def test_bad_layouts_are_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    """The refusals that need the YAML read as a run reads it (MindFormers imported): the same command line
    (mixtral-ms-dryrun's main, under cli.run) in this process, where MindFormers is already imported."""
    from mixtral_ms.commands.dryrun import main
    monkeypatch.chdir(ROOT)
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# The matrix (results of the background launch; these tests run last)


def test_matrix_every_row_and_stage_compiles_and_agrees(matrix_results):
    results, output = matrix_results
    rows = {row for row, _ in results}
    assert rows == set(SUITE_ROWS), output[-2000:]
    for (row, rank), r in results.items():
        assert r["compiled"], (row, rank, r["error"])
        assert not r["mismatches"], (row, r["mismatches"])
        for key, value in r["bytes_strategy"].items():
            assert abs(value - r["bytes_estimate"][key]) <= 0.02 * max(value, 1.0), (row, key, r)
    assert "dry run: %d of %d rank(s) compiled and agree" % (len(results), len(results)) in output


def test_matrix_pipeline_rows_compile_every_stage_with_send_and_receive(matrix_results):
    results, _ = matrix_results
    for row in SUITE_ROWS:
        stages = TINY_MATRIX[row].get("parallel_config.pipeline_stage", 1)
        ranks = sorted(rank for r, rank in results if r == row)
        assert len(ranks) == stages, (row, ranks)
        for rank in ranks:
            comm = results[(row, rank)]["comm"]
            assert (comm.get("Send", 0) > 0 and comm.get("Receive", 0) > 0) == (stages > 1), (row, comm)


def test_matrix_pipeline_row_keeps_each_routers_bias_and_count_on_its_stage(matrix, matrix_results):
    """The router bias under pipeline parallel: each stage's compiled graph reads and writes the bias and the
    token count of its own layer's router only (one layer per stage), so the update needs no exchange between
    stages."""
    _, _, out = matrix
    results, _ = matrix_results
    row = "dp2-mp2-ep2-pp2-bias-globalaux"
    stages = []
    for (name, rank), result in results.items():
        if name != row:
            continue
        text = last_ir(str(out / "graphs" / row / f"rank_{rank}"))
        counts = {int(i) for i in re.findall(r"layers\.(\d+)\.block_sparse_moe\.gate\.tokens_per_expert", text)}
        biases = {int(i) for i in re.findall(r"layers\.(\d+)\.block_sparse_moe\.gate\.e_score_correction_bias", text)}
        assert counts == biases == {result["stage"]}, (rank, counts, biases)
        stages.append(result["stage"])
    assert sorted(stages) == [0, 1]


def test_matrix_expert_alltoall_where_the_plan_puts_it(matrix_results):
    """With enable_alltoall and ep > 1, every to_experts / from_experts transpose has its AllToAll; without
    AllToAll (the allgather row) the compiler inserts none."""
    results, _ = matrix_results
    for (row, rank), r in results.items():
        if r["expect_alltoall"]:
            for name, (found, total) in r["exchanges"].items():
                assert total > 0 and found == total, (row, name, found, total)
    assert results[("dp2-mp4-ep4-vocab-split-allgather-shared", 0)]["comm"].get("AllToAll", 0) == 0
    assert results[("dp2-mp4-ep4-vocab-split-allgather-shared", 0)]["comm"]["AllGather"] > 0


def test_matrix_strategy_files_are_written_where_runs_write_them(matrix_results):
    results, _ = matrix_results
    for (row, rank), r in results.items():
        assert os.path.isfile(r["strategy_file"]), (row, r["strategy_file"])
        assert r["strategy_file"].endswith(f"strategy/ckpt_strategy_rank_{rank}.ckpt")
