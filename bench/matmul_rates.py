#!/usr/bin/env python
"""MindSpore's float32 MatMul on this machine: what bounds the bench's compute-bound rows.

    source scripts/env.sh
    python bench/matmul_rates.py [--threads 2] [--repeats 5] [--hf-python ~/.cache/mixtral-ms/devref/bin/python]

For each of the bench's matmul shapes (bench_vs_hf.matmul_shapes) and 2048^3, graph mode, x W^T:
  one-per-call  one MatMul per graph call (a graph launch per matmul: how the bench measured its limit before);
  in-graph      16 MatMuls on distinct weights in one graph call (launch amortized, as in the model);
both as GFLOP per wall second and per CPU second of the process (the second is what a loaded machine
still lets one compare), with `--threads` as `runtime_num_threads`. With `--hf-python`, torch's
`F.linear` on the same shapes, per wall and CPU second, with 1 and `--threads` threads.
ONEDNN_VERBOSE=1 shows the kernel MindSpore picks (here oneDNN brg_matmul:avx512_core, nthr = threads).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from bench_vs_hf import BATCH, CONFIG, SEQ, matmul_shapes, matmuls

IN_GRAPH = 16
TORCH = r'''
import sys, time, torch
threads, repeats, shapes = int(sys.argv[1]), int(sys.argv[2]), eval(sys.argv[3])
torch.set_num_threads(threads)
for m, k, n in shapes:
    a, w = torch.rand(m, k), torch.rand(n, k)
    torch.nn.functional.linear(a, w).sum().item()
    reps = max(3, int(repeats * 4e9 / (2 * m * k * n)))
    t, p = time.perf_counter(), time.process_time()
    for _ in range(reps):
        torch.nn.functional.linear(a, w).sum().item()
    t, p = time.perf_counter() - t, time.process_time() - p
    f = 2 * m * k * n * reps / 1e9
    print(f"torch {threads} thread(s) {m}x{k}x{n}: {f / t:.0f} GFLOP/s wall, {f / p:.0f} GFLOP per CPU-s")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hf-python", default="")
    args = parser.parse_args()
    import mindspore as ms
    from mindspore import Tensor

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU", runtime_num_threads=args.threads)
    rng = np.random.default_rng(0)
    shapes = [(2048, 2048, 2048)] + sorted({(m, k, n) for m, k, n, _ in matmul_shapes(CONFIG, BATCH * SEQ)})
    for m, k, n in shapes:
        a = Tensor(rng.random((m, k), dtype=np.float32))
        weights = [rng.random((n, k), dtype=np.float32) for _ in range(IN_GRAPH)]
        for name, cell, per_call in (("one-per-call", matmuls(weights[:1]), 1), ("in-graph", matmuls(weights), IN_GRAPH)):
            cell(a).asnumpy()
            reps = max(3, int(args.repeats * 4e9 / (2 * m * k * n * per_call)))
            t, p = time.perf_counter(), time.process_time()
            for _ in range(reps):
                cell(a).asnumpy()
            t, p = time.perf_counter() - t, time.process_time() - p
            f = 2 * m * k * n * per_call * reps / 1e9
            print(f"MindSpore {name} {m}x{k}x{n}: {f / t:.0f} GFLOP/s wall, {f / p:.0f} GFLOP per CPU-s", flush=True)
    if args.hf_python:
        for threads in sorted({1, args.threads}):
            subprocess.run([args.hf_python, "-c", TORCH, str(threads), str(args.repeats), repr(shapes)], check=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
