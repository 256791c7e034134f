#!/usr/bin/env python
"""Conversion throughput and peak memory on a random Hugging Face checkpoint of >= 2 GB (bf16).

    python bench/bench_convert.py [--gb 2.2] [--workdir /tmp/mixtral-convert-bench]

Writes bench/results/convert.json. Each direction runs scripts/convert_weight.py in its own process;
its peak RSS comes from wait4(). The goal: peak RSS under a quarter of the checkpoint size.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mixtral_ms.hf_config import shape_config  # noqa: E402
from mixtral_ms.name_map import parameter_specs  # noqa: E402
from mixtral_ms.safetensors_io import write_safetensors  # noqa: E402


def make_checkpoint(folder: str, target_bytes: int) -> int:
    """Random bf16 Mixtral with wide experts; layers added until the size reaches the target."""
    hf = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 32000,
          "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 8, "num_key_value_heads": 2,
          "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rope_theta": 1e6,
          "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    per_layer = 2 * (3 * 8 * 4096 * 1024 + 4 * 1024 * 1024 + 8 * 1024 + 2 * 1024)
    hf["num_hidden_layers"] = max(1, -(-(target_bytes - 2 * 2 * 32000 * 1024) // per_layer))
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    rng = np.random.default_rng(0)
    items = []
    for spec in parameter_specs(shape_config(hf)).values():
        shape = spec.shape if len(spec.sources) == 1 else spec.shape[1:]
        for src in spec.sources:
            items.append((src, "BF16", shape,
                          lambda shape=shape: rng.integers(0x3000, 0x3F80, size=shape, dtype=np.uint16).tobytes()))
    shards, current, size, limit, weight_map, total = [], [], 0, 1 << 30, {}, 0
    for item in items:
        nbytes = 2 * int(np.prod(item[2]))
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
        total += nbytes
    shards.append(current)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, name), shard, {"format": "pt"})
        weight_map.update({item[0]: name for item in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def run(args):
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "convert_weight.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert failed: {err}")
    return wall, usage.ru_maxrss * 1024, out.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--workdir", default="/tmp/mixtral-convert-bench")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, ms_dir, back = (os.path.join(args.workdir, d) for d in ("hf", "ms", "hf_back"))
    total = make_checkpoint(hf, int(args.gb * 2**30))
    results = {"checkpoint_bytes": total, "dtype": "bf16"}
    for name, cli in (("hf2ms", ["hf2ms", "--src", hf, "--dst", ms_dir, "--shard-size", "1GB"]),
                      ("ms2hf", ["ms2hf", "--src", ms_dir, "--dst", back, "--shard-size", "1GB"])):
        wall, rss, line = run(cli)
        results[name] = {"wall_s": round(wall, 2), "MB_per_s": round(total / 2**20 / wall, 1),
                         "peak_rss_MB": round(rss / 2**20, 1), "rss_fraction_of_checkpoint": round(rss / total, 4)}
        print(f"{name}: {line}; peak RSS {rss / 2**20:.0f} MiB ({rss / total:.1%} of the checkpoint)")
    from mixtral_ms.safetensors_io import open_checkpoint
    a, b = open_checkpoint(hf), open_checkpoint(back)
    results["round_trip_bit_exact"] = set(a) == set(b) and all(a[k].read() == b[k].read() for k in a)
    results["goal_rss_under_quarter"] = all(results[d]["rss_fraction_of_checkpoint"] < 0.25 for d in ("hf2ms", "ms2hf"))
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "convert.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
