#!/usr/bin/env python
"""Conversion throughput and peak memory on a random Hugging Face checkpoint of >= 2 GB (bf16, sharded).

    python bench/bench_convert.py [--gb 2.2] [--workdir /tmp/mixtral-convert-bench] [--keep]

Writes bench/results/convert.json. Each run is `scripts/convert_weight.py` in its own process; its peak
RSS is that child's ru_maxrss from wait4() in a bare launcher process (see LAUNCHER: per child, unlike
getrusage(RUSAGE_CHILDREN), which keeps the maximum over every child waited for). Runs: hf2ms (dtype kept: byte ranges copied), ms2hf (back to the
Hugging Face layout, checked bit for bit against the original), and hf2ms --dtype fp16 (every element
converted in chunks). Goal: peak RSS under a quarter of the checkpoint size; the script exits 1 if missed.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from mixtral_ms.checkpoint.name_map import parameter_specs
from mixtral_ms.checkpoint.convert import write_sharded
from mixtral_ms.checkpoint.safetensors_io import open_checkpoint

HIDDEN, FFN, EXPERTS, VOCAB = 1024, 4096, 8, 32000


def make_checkpoint(folder: str, target_bytes: int, shard_bytes: int = 1 << 30) -> dict:
    """Random bf16 Mixtral with wide experts and few layers; layers added until the size reaches the target."""
    hf = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": VOCAB,
          "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": 8, "num_key_value_heads": 2,
          "num_local_experts": EXPERTS, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
          "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16"}
    per_layer = 2 * (3 * EXPERTS * FFN * HIDDEN + 2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 4
                     + EXPERTS * HIDDEN + 2 * HIDDEN)
    hf["num_hidden_layers"] = max(1, -(-(target_bytes - 2 * 2 * VOCAB * HIDDEN) // per_layer))
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    rng = np.random.default_rng(0)
    items = []
    for spec in parameter_specs(hf).values():
        shape = spec.shape if len(spec.sources) == 1 else spec.shape[1:]
        for src in spec.sources:  # finite bf16 patterns of magnitude ~1e-3..1, both signs
            items.append((src, "BF16", shape, lambda shape=shape: (
                rng.integers(0x3A00, 0x3F80, size=shape, dtype=np.uint16) | (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15))))
    total = write_sharded(folder, items, shard_bytes, {"format": "pt"})
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    return {"bytes": total, "layers": hf["num_hidden_layers"], "shards": len(shards), "tensors": len(items),
            "hidden_size": HIDDEN, "intermediate_size": FFN, "experts": EXPERTS,
            "largest_stacked_tensor_bytes": 2 * EXPERTS * FFN * HIDDEN}


# Linux carries a process's RSS high-water mark across exec (and a vfork child's is its parent's), so a
# child spawned by a big process reports at least the parent's peak. Each measured command is therefore
# spawned by this tiny launcher (a bare interpreter, ~10 MB), which reports its child's ru_maxrss.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def measure(cmd):
    """(wall seconds, peak RSS bytes of `cmd` alone, its stdout); raises on failure."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    wall = time.time() - start
    *cmd_err, last = proc.stderr.strip().splitlines() or [""]
    rss, code = map(int, last.split())
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {' '.join(cmd_err)}")
    return wall, rss, proc.stdout.strip()


def run(args):
    return measure([sys.executable, os.path.join(ROOT, "scripts", "convert_weight.py"), *args, "--quiet"])


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what the converter imports (interpreter + numpy)."""
    return measure([sys.executable, "-c", "import mixtral_ms.checkpoint.convert"])[1]


def bare_rss() -> int:
    return measure([sys.executable, "-c", "pass"])[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.2, help="checkpoint size in GiB (>= 2)")
    parser.add_argument("--workdir", default="/tmp/mixtral-convert-bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    parser.add_argument("--generate", metavar="DIR", help=argparse.SUPPRESS)  # internal: only make the checkpoint
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(make_checkpoint(args.generate, int(args.gb * 2**30))))
        return 0
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, ms_dir, back, ms16 = (os.path.join(args.workdir, d) for d in ("hf", "ms", "hf_back", "ms_fp16"))
    t = time.time()
    ckpt = json.loads(subprocess.run([sys.executable, __file__, "--generate", hf, "--gb", str(args.gb)],
                                     check=True, capture_output=True, text=True).stdout)
    total = ckpt["bytes"]
    print(f"generated {total / 2**30:.2f} GiB bf16 checkpoint ({ckpt['layers']} layers, {ckpt['shards']} shards) "
          f"in {time.time() - t:.1f} s")
    results = {"checkpoint": ckpt, "checkpoint_bytes": total, "dtype": "bf16",
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
               "bare_python_rss_MB": round(bare_rss() / 2**20, 1),
               "baseline_rss_MB": round(baseline_rss() / 2**20, 1)}
    runs = (("hf2ms", ["hf2ms", "--src", hf, "--dst", ms_dir, "--shard-size", "1GB"]),
            ("ms2hf", ["ms2hf", "--src", ms_dir, "--dst", back, "--shard-size", "1GB"]),
            ("hf2ms_to_fp16", ["hf2ms", "--src", hf, "--dst", ms16, "--shard-size", "1GB", "--dtype", "fp16"]))
    for name, cli in runs:
        wall, rss, line = run(cli)
        results[name] = {"wall_s": round(wall, 2), "MB_per_s": round(total / 1e6 / wall, 1),
                         "peak_rss_MB": round(rss / 2**20, 1), "rss_fraction_of_checkpoint": round(rss / total, 4)}
        print(f"{name}: {line}; peak RSS {rss / 2**20:.0f} MiB ({rss / total:.1%} of the checkpoint)")
        if name == "hf2ms_to_fp16":
            shutil.rmtree(ms16, ignore_errors=True)
    a, b = open_checkpoint(hf), open_checkpoint(back)
    results["round_trip_bit_exact"] = set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].read() == b[k].read() for k in a)
    results["goal_rss_under_quarter"] = all(results[d]["rss_fraction_of_checkpoint"] < 0.25
                                            for d in ("hf2ms", "ms2hf", "hf2ms_to_fp16"))
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "convert.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    ok = results["round_trip_bit_exact"] and results["goal_rss_under_quarter"]
    print("goal met: peak RSS < 1/4 of the checkpoint and bit-exact round trip" if ok else "GOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
