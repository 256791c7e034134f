#!/usr/bin/env python
"""Where each row of bench/bench_vs_hf.py spends its time, on both sides: the profile behind the table.

    source scripts/env.sh
    python bench/profile_vs_hf.py [--hf-python ~/.cache/mixtral-ms/devref/bin/python] [--calls 3]

Per row (training step, prefill forward, one decode token at batch 1 and 8: generate of DECODE_STEPS + 1
new tokens minus generate of 1, over DECODE_STEPS; mixtral-ms only, the MoE layer at capacity 1.1 and
dropless against the dense FFN), the same calls as the bench (bench_vs_hf.OurRows):
  mixtral-ms  `mindspore.Profiler` (kernel time per op type and kernel launches), and, in a second
              process, oneDNN's own timing of every matmul (ONEDNN_VERBOSE: MatMul and BatchMatMul are
              oneDNN primitives on CPU) with the FLOPs of its problem shape: the matmuls' real rate;
  HF          `torch.profiler` (self CPU time per op; matmuls are aten::mm / bmm / addmm / linear's).
"host" is wall time minus the time inside ops: graph launch and per-kernel dispatch (MindSpore), the
Python of the model and generate loop (HF). Writes bench/results/profile_vs_hf.{json,md}.
Run it on an idle machine, like the bench.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from bench_vs_hf import DECODE_STEPS, HF_ROWS, ROOT, THREADS, machine, run_hf

UNITS = ("train", "prefill", "gen_b1_long", "gen_b1_short", "gen_b8_long", "gen_b8_short", "moe_train", "moe_eval",
         "dense_ffn")
LAYER_UNITS = UNITS[6:]  # mixtral-ms only: the MoE-layer rows against the dense FFN
MATMUL_OPS = {"MatMul", "BatchMatMul"}
TORCH_MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm"}
MARK = "==== profiled calls start ===="
ONEDNN_MATMUL = re.compile(r"onednn_verbose,.*primitive,exec,cpu,matmul,.*,([\dx]+):([\dx]+),([\d.]+)\s*$")


def _call(rows, unit: str):
    if unit == "train":
        return rows.train
    if unit == "prefill":
        return rows.prefill
    if unit in LAYER_UNITS:
        return rows.dense_ffn if unit == "dense_ffn" else lambda: rows.moe_layer(unit == "moe_train")
    _, batch, length = unit.split("_")
    return lambda: rows.generate(int(batch[1:]), DECODE_STEPS + 1 if length == "long" else 1)


def worker(unit: str, kind: str, calls: int) -> None:
    """One unit in this process: `profile` prints kernel time per op type, `onednn` the matmuls (the
    parent sets ONEDNN_VERBOSE=1 and reads them after MARK)."""
    import mindspore as ms
    from bench_vs_hf import OurRows
    rows = OurRows()
    call = _call(rows, unit)
    for _ in range(3):  # compile, warm up
        call()
    if kind == "onednn":
        print(MARK, flush=True)
        for _ in range(calls):
            call()
        return
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        profiler = ms.Profiler(output_path=tmp)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall = (time.perf_counter() - start) / calls
        profiler.analyse()
        path = glob.glob(os.path.join(tmp, "**", "cpu_op_type_info_0.csv"), recursive=True)[0]
        with open(path, encoding="utf-8") as f:
            ops = {r["op_type"]: {"ms": float(r["total_compute_time"]) / calls,
                                  "count": int(r["type_occurrences"]) / calls} for r in csv.DictReader(f)}
    print(json.dumps({"wall_ms": 1e3 * wall, "ops": ops}))


def onednn_matmuls(stdout: str, calls: int) -> dict:
    """FLOPs and oneDNN exec time of the matmuls after MARK, per call, in all and for the five shapes
    that take the most time ("MxK:KxN", batch dims in front)."""
    shapes = {}
    for line in stdout.split(MARK, 1)[1].splitlines():
        match = ONEDNN_MATMUL.match(line)
        if not match:
            continue
        a = [int(v) for v in match.group(1).split("x")]
        b = [int(v) for v in match.group(2).split("x")]
        batch = 1
        for x, y in zip(a[:-2], b[:-2]):
            batch *= max(x, y)
        shape = shapes.setdefault(f"{match.group(1)}:{match.group(2)}", {"gflop": 0.0, "ms": 0.0, "count": 0.0})
        shape["gflop"] += 2.0 * batch * a[-2] * a[-1] * b[-1] / 1e9 / calls
        shape["ms"] += float(match.group(3)) / calls
        shape["count"] += 1.0 / calls
    top = dict(sorted(shapes.items(), key=lambda kv: -kv[1]["ms"])[:5])
    return {key: sum(s[key] for s in shapes.values()) for key in ("gflop", "ms", "count")} | {"top_shapes": top}


def profile_ours(calls: int) -> dict:
    out = {}
    for unit in UNITS:
        for kind in ("profile", "onednn"):
            env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
            if kind == "onednn":
                env["ONEDNN_VERBOSE"] = "1"
            with tempfile.TemporaryDirectory(prefix="profile-cwd-") as cwd:  # MindSpore's rank_0/ dumps land here
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", unit, kind,
                                       "--calls", str(calls)], capture_output=True, text=True, env=env, cwd=cwd)
            if proc.returncode != 0:
                raise SystemExit(f"profile worker {unit} {kind} failed: {proc.stderr.strip().splitlines()[-1:]}")
            if kind == "profile":
                out[unit] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                out[unit]["onednn"] = onednn_matmuls(proc.stdout, calls)
        print(f"mixtral-ms {unit}: {out[unit]['wall_ms']:.1f} ms per call", flush=True)
    return out


HF_WORKER = HF_ROWS + r'''
from torch.profiler import profile, ProfilerActivity
calls, = extra
units = {"train": train, "prefill": prefill, "gen_b1_long": lambda: gen(1, steps + 1),
         "gen_b1_short": lambda: gen(1, 1), "gen_b8_long": lambda: gen(8, steps + 1), "gen_b8_short": lambda: gen(8, 1)}
out = {}
for name, fn in units.items():
    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - start) / calls
    ops = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            ops[e.key] = {"ms": e.self_cpu_time_total / 1e3 / calls, "count": e.count / calls}
    out[name] = {"wall_ms": 1e3 * wall, "ops": ops}
out["torch"] = torch.__version__
print(json.dumps(out))
'''


def summarize(units: dict, matmul_ops: set) -> dict:
    """Per row: wall, op time, matmul time, host time (ms) and the top other ops; decode rows per token."""
    def one(unit):
        u = units[unit]
        op_ms = sum(o["ms"] for o in u["ops"].values())
        matmul = sum(o["ms"] for name, o in u["ops"].items() if name in matmul_ops)
        row = {"wall_ms": u["wall_ms"], "op_ms": op_ms, "matmul_ms": matmul, "other_ops_ms": op_ms - matmul,
               "host_ms": u["wall_ms"] - op_ms, "launches": sum(o["count"] for o in u["ops"].values()),
               "other_ops": {n: o["ms"] for n, o in u["ops"].items() if n not in matmul_ops}}
        if "onednn" in u:
            row["matmul_gflop"], row["onednn_matmul_ms"] = u["onednn"]["gflop"], u["onednn"]["ms"]
        return row

    def diff(long, short):
        a, b = one(long), one(short)
        row = {k: (a[k] - b[k]) / DECODE_STEPS for k in a if k != "other_ops"}
        row["other_ops"] = {n: (a["other_ops"][n] - b["other_ops"].get(n, 0.0)) / DECODE_STEPS
                            for n in a["other_ops"]}
        return row

    rows = {"train": one("train"), "prefill": one("prefill"), "decode_b1": diff("gen_b1_long", "gen_b1_short"),
            "decode_b8": diff("gen_b8_long", "gen_b8_short")}
    rows.update({unit: one(unit) for unit in LAYER_UNITS if unit in units})
    for row in rows.values():
        top = sorted(row["other_ops"].items(), key=lambda kv: -kv[1])[:6]
        row["other_ops"] = dict(top)
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads; MindSpore {m['mindspore']}"
             + (f", torch {results['torch']}" if results.get("torch") else ""), "",
             "ms per training step / prefill of 4 x 256 / decode token (generate of 17 minus generate of 1, over 16) / "
             "MoE layer forward (capacity 1.1 in training, dropless in eval) / dense SwiGLU FFN forward",
             "", "| row | side | wall | in ops | matmul ops | other ops | host | launches | host per launch, us | matmul rate "
             "| top other ops |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in ("train", "prefill", "decode_b1", "decode_b8") + LAYER_UNITS:
        for side in ("mixtral_ms", "hf"):
            if not results.get(side) or row not in results[side]:
                continue
            r = results[side][row]
            rate = (f"{1e3 * r['matmul_gflop'] / r['onednn_matmul_ms']:.0f} GFLOP/s ({r['matmul_gflop']:.1f} GFLOP, "
                    f"oneDNN's time {r['onednn_matmul_ms']:.1f} ms)" if r.get("onednn_matmul_ms") else "")
            top = ", ".join(f"{n.replace('aten::', '')} {v:.1f}" for n, v in r["other_ops"].items())
            lines.append(f"| {row} | {'mixtral-ms' if side == 'mixtral_ms' else 'HF'} | {r['wall_ms']:.1f} | "
                         f"{r['op_ms']:.1f} | {r['matmul_ms']:.1f} | {r['other_ops_ms']:.1f} | {r['host_ms']:.1f} | "
                         f"{r['launches']:.0f} | {1e3 * r['host_ms'] / r['launches']:.0f} | {rate} | {top} |")
    lines += ["", "mixtral-ms, the matmul shapes that take the most time (oneDNN's own timing; decode rows: the "
              "whole generate of 17 tokens)", "", "| row | shape | ms | GFLOP/s |", "|---|---|---:|---:|"]
    for row, unit in (("train", "train"), ("prefill", "prefill"), ("decode_b1", "gen_b1_long"),
                      ("decode_b8", "gen_b8_long")) + tuple((u, u) for u in LAYER_UNITS):
        shapes = results.get("onednn_shapes", {}).get(unit, {})
        for shape, v in list(shapes.items())[:3]:
            lines.append(f"| {row} | {shape} | {v['ms']:.1f} | {1e3 * v['gflop'] / v['ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-python", default=os.path.expanduser("~/.cache/mixtral-ms/devref/bin/python"))
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("UNIT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.calls)
        return
    results = {"machine": machine(), "calls": args.calls, "load_average_before": os.getloadavg()[0]}
    hf = run_hf(args.hf_python, HF_WORKER, [args.calls], "profile")
    ours = profile_ours(args.calls)
    results["onednn_shapes"] = {unit: ours[unit]["onednn"]["top_shapes"] for unit in UNITS}
    results["mixtral_ms"] = summarize(ours, MATMUL_OPS)
    if hf:
        results["torch"] = hf.pop("torch")
        results["hf"] = summarize(hf, TORCH_MATMUL_OPS)
    results["load_average_after"] = os.getloadavg()[0]
    base = os.path.join(ROOT, "bench", "results", "profile_vs_hf")
    for suffix, text in ((".json", json.dumps(results, indent=2)), (".md", markdown(results))):
        with open(base + suffix + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(base + suffix + ".tmp", base + suffix)
    print(markdown(results))


if __name__ == "__main__":
    main()
