"""The shipped 8x7B layouts compiled by MindSpore's parallel compiler on this CPU host (scripts/dryrun.py,
every pipeline stage, full width, fewer layers), and the tiny matrix: compile time, communication and
per-rank bytes, as the table docs/parallel.md ("Dry run") shows.

  python bench/bench_dryrun.py                      # shipped layouts -> bench/results/dryrun_shipped.json + table
  python bench/bench_dryrun.py --matrix             # the tiny matrix -> bench/results/dryrun_matrix.json + table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# layers: the fewest that keep every pipeline stage (full width; compile time and memory grow with them)
SHIPPED = (("configs/parallel/mixtral_8x7b_pretrain_32p.yaml", 4),
           ("configs/parallel/mixtral_8x7b_finetune_16p.yaml", 2),
           ("configs/parallel/mixtral_8x7b_pretrain_8p.yaml", 2),
           ("configs/parallel/mixtral_8x7b_predict_mp8.yaml", 2))
KINDS = ("AllToAll", "AllGather", "AllReduce", "ReduceScatter", "Send", "Receive")


def _dryrun(args, work: str) -> list:
    out = os.path.join(work, "result.json")
    cmd = [sys.executable, "scripts/dryrun.py", *args, "--output", os.path.join(work, "graphs"), "--json", out]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def _row(name: str, layers: int, r: dict) -> str:
    if not r["compiled"]:
        return f"| {name} | {r['rank']} ({r['stage']}) | {layers} | FAIL: {r['error'][:80]} | | | |"
    comm = ", ".join(f"{k} {r['comm'].get(k, 0)}" for k in KINDS if r["comm"].get(k))
    scale, fmt = (2**30, "{:.2f}") if r["bytes_strategy"].get("parameters", 0) > 2**30 else (2**20, "{:.2f} Mi")
    mib = lambda d: " / ".join(fmt.format(d.get(k, 0) / scale) for k in ("parameters", "gradients", "moments")  # noqa
                               if k in d)
    return (f"| {name} | {r['rank']} ({r['stage']}) | {layers} | {r['compile_s']:.0f} | {comm} | "
            f"{mib(r['bytes_strategy'])} | {mib(r['bytes_estimate'])} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", action="store_true", help="the tiny matrix instead of the shipped layouts")
    args = parser.parse_args(argv)
    out = os.path.join(ROOT, "bench", "results", f"dryrun_{'matrix' if args.matrix else 'shipped'}.json")
    lines = ["| config | rank (stage) | layers | compile s | communication inserted | GiB params / grads / "
             "moments, strategy file | GiB, estimator |", "|---|---|---|---|---|---|---|"]
    record = []
    with tempfile.TemporaryDirectory() as work:
        if args.matrix:
            for r in _dryrun(["--matrix"], work):
                record.append(r)
                lines.append(_row(f"tiny {r['row']}", r["layers"], r))
        for config, layers in () if args.matrix else SHIPPED:
            for r in _dryrun(["--config", config, "--all-stages", "--layers", str(layers)], work):
                record.append(r)
                lines.append(_row(os.path.basename(config), r["layers"], r))
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
