#!/usr/bin/env python
"""What bounds decoding at batch 1 here: MindSpore's runtime knobs against the per-kernel launch cost,
and the ways to copy the routed experts' weights out of the stacks.

    source scripts/env.sh
    python bench/decode_limits.py [--repeats 5]

knobs   ms per decode token at batch 1 (generate of 17 minus generate of 1 new tokens, over 16; medians
        of `--repeats`, bench_vs_hf.OurRows) in a fresh process per setting: none, each of MindSpore's
        launch settings (runtime.set_kernel_launch_capture / set_kernel_launch_group /
        dispatch_threads_num(1) / launch_blocking, MS_DEV_RUNTIME_CONF pipeline:False / async_launch:False,
        jit_level O0 / O1); a setting the CPU backend refuses prints its one-line error.
copies  GB/s of weights copied taking 2 of 8 experts out of a stacked [8, 1024, 512] weight, 12 weights
        per graph (as the decode step does per token): Gather on the 3-D stack and on a 2-D view,
        index_select, EmbeddingLookup, and Unstack (which copies all 8).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np


KNOBS = ("none", "kernel_launch_capture", "kernel_launch_group", "dispatch_threads_num_1", "launch_blocking",
         "runtime_conf_pipeline_off", "runtime_conf_async_launch_off", "jit_level_O0", "jit_level_O1")


def knob_worker(knob: str, repeats: int) -> None:
    if knob.startswith("runtime_conf_"):
        os.environ["MS_DEV_RUNTIME_CONF"] = {"runtime_conf_pipeline_off": "pipeline:False",
                                             "runtime_conf_async_launch_off": "async_launch:False"}[knob]
    import mindspore as ms
    from bench_vs_hf import DECODE_STEPS, OurRows, median_time
    rows = OurRows()
    try:
        if knob == "kernel_launch_capture":
            ms.runtime.set_kernel_launch_capture(True)
        elif knob == "kernel_launch_group":
            ms.runtime.set_kernel_launch_group(thread_num=2, kernel_group_num=8)
        elif knob == "dispatch_threads_num_1":
            ms.runtime.dispatch_threads_num(1)
        elif knob == "launch_blocking":
            ms.runtime.launch_blocking()
        elif knob.startswith("jit_level_"):
            ms.set_context(jit_config={"jit_level": knob[-2:]})
        rows.generate(1, 2)
    except RuntimeError as err:
        print(f"{knob}: refused: {str(err).strip().splitlines()[0][:160]}")
        return

    longer = median_time(lambda: rows.generate(1, DECODE_STEPS + 1), repeats)
    print(f"{knob}: {1e3 * (longer - median_time(lambda: rows.generate(1, 1), repeats)) / DECODE_STEPS:.1f} "
          "ms per token", flush=True)


def copies(repeats: int) -> None:
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
    from mindspore.ops import operations as P
    from bench_vs_hf import median_time
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(0)
    e, f, h, count = 8, 1024, 512, 12
    weights = [Parameter(Tensor(rng.random((e, f, h), dtype=np.float32)), name=f"w{i}") for i in range(count)]
    index = Tensor(np.array([3, 5], np.int32))

    class Copy(nn.Cell):
        def __init__(self, kind: str):
            super().__init__()
            self.weights = ParameterTuple(weights)
            self.kind = kind
            self.gather = ops.Gather()
            self.lookup = P.EmbeddingLookup()

        def construct(self, i):
            outs = ()
            for w in self.weights:
                if self.kind == "Gather, 3-D stack":
                    o = self.gather(w, i, 0)
                elif self.kind == "Gather, 2-D view":
                    o = self.gather(w.reshape(e, f * h), i, 0)
                elif self.kind == "EmbeddingLookup, 2-D view":
                    o = self.lookup(w.reshape(e, f * h), i, 0)
                elif self.kind == "index_select":
                    o = ops.index_select(w, 0, i)
                else:
                    o = ops.unstack(w)[3]
                outs += (o.reshape(-1)[0],)
            return outs

    for kind in ("Gather, 3-D stack", "Gather, 2-D view", "EmbeddingLookup, 2-D view", "index_select",
                 "Unstack (all 8)"):
        cell = Copy(kind)
        per_weight = median_time(lambda: cell(index)[0].asnumpy(), repeats) / count
        copied = (e if kind.startswith("Unstack") else 2) * f * h * 4
        print(f"copy {kind}: {1e3 * per_weight:.2f} ms per weight, {copied / per_weight / 1e9:.1f} GB/s copied",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--knob", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.knob:
        knob_worker(args.knob, args.repeats)
        return
    for knob in KNOBS:
        with tempfile.TemporaryDirectory(prefix="decode-limits-") as cwd:  # MindSpore's rank_0/ dumps land here
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--knob", knob, "--repeats",
                                   str(args.repeats)], capture_output=True, text=True, cwd=cwd)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(knob)]
        print(lines[-1] if lines else f"{knob}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
    copies(args.repeats)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
