"""Host memory of loading a checkpoint on one rank: the whole model (what runner.build_model's load_weights
reads today) against the rank's slices alone (mixtral_ms/checkpoint/distributed.py read_rank_slices, safetensors
byte ranges), rank by rank, for a layout's real strategy files.

    python bench/dist_load_memory.py --strategy tests/fixtures/strategies/mixtral_8x7b_finetune_16p

makes a random bf16 mixtral-ms checkpoint (--hidden/--intermediate/--layers, default 2048/7168/2; 8 experts, vocab
32000; cached under --work), then
measures each load in a fresh process: peak RSS (ru_maxrss) minus the RSS after imports, with the bytes held.
Those strategy files (the figures in docs/parallel.md) are the dry run's of the shipped 16-device fine-tuning
layout at these shapes: tests/make_strategy_fixtures.py mixtral_8x7b_finetune_16p. Writes --json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_config(hidden: int, intermediate: int, layers: int) -> dict:
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 32000,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
            "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def make_checkpoint(folder: str, cfg: dict) -> None:
    """A random bf16 checkpoint in the converted layout (finite values), tensor by tensor."""
    import numpy as np
    from mixtral_ms.checkpoint.convert import MS_METADATA, write_checkpoint
    from mixtral_ms.checkpoint.name_map import parameter_specs
    rng = np.random.default_rng(0)

    def values(shape):
        return lambda: (rng.integers(0x3000, 0x3F00, size=shape, dtype=np.uint16) |
                        (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)).tobytes()
    items = [(name, "BF16", spec.shape, values(spec.shape)) for name, spec in parameter_specs(cfg).items()]
    config_json = os.path.join(os.path.dirname(folder), "config.json")
    with open(config_json, "w") as f:
        json.dump(cfg, f)
    write_checkpoint(config_json, folder, items, lambda tmp: __import__("shutil").copyfile(
        config_json, os.path.join(tmp, "config.json")), os.path.dirname(folder), metadata=MS_METADATA)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(args) -> dict:
    """One load in this process: 'full' (every tensor read whole, as load_weights holds them) or a rank."""
    from mixtral_ms.checkpoint.convert import config_of
    from mixtral_ms.checkpoint.distributed import open_complete, read_rank_slices, read_source_box, read_strategy
    _, config = config_of(args.checkpoint)
    strategy = read_strategy(args.strategy) if args.measure != "full" else None
    base = rss_kib()
    start = time.time()
    if args.measure == "full":
        held = {name: read_source_box(src, tuple(src[0].shape), tuple((0, d) for d in src[0].shape))
                for name, src in open_complete(args.checkpoint, config).items()}
    else:
        held = read_rank_slices(args.checkpoint, config, strategy, int(args.measure))
        held = {n: a for n, (_, a) in held.items()}
    took = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"load": args.measure, "held_bytes": int(sum(a.nbytes for a in held.values())),
            "peak_rss_above_imports_bytes": (peak - base) * 1024, "seconds": round(took, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/mixtral-dist-load")
    parser.add_argument("--ranks", help="comma-separated ranks (default: all)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "dist_load_memory.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    from mixtral_ms.checkpoint.distributed import read_strategy
    folder = os.path.join(args.work, f"h{args.hidden}-i{args.intermediate}-l{args.layers}", "ms")
    if not os.path.isdir(folder):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        make_checkpoint(folder, hf_config(args.hidden, args.intermediate, args.layers))
    strategy = read_strategy(args.strategy)
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else list(range(strategy.devices))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    rows = []
    for what in ["full"] + [str(r) for r in ranks]:
        out = subprocess.run([sys.executable, __file__, "--measure", what, "--checkpoint", folder,
                              "--strategy", args.strategy], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{'full load' if what == 'full' else 'rank ' + what:>10}: held {row['held_bytes'] / 2**20:8.1f} MiB, "
              f"peak RSS above imports {row['peak_rss_above_imports_bytes'] / 2**20:8.1f} MiB, {row['seconds']} s",
              flush=True)
    record = {"checkpoint_bytes": size, "shapes": hf_config(args.hidden, args.intermediate, args.layers),
              "strategy": os.path.abspath(args.strategy), "layout": strategy.describe(), "rows": rows}
    from mixtral_ms.outputs import write_json
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
