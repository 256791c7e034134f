#!/usr/bin/env python
"""Convert Mixtral checkpoints between Hugging Face and mixtral-ms layouts (streaming).

  python scripts/convert_weight.py hf2ms --src HF_DIR --dst MS_DIR [--dtype bf16] [--shard-size 2GB] [--overwrite]
  python scripts/convert_weight.py ms2hf --src MS_DIR_OR_FILE --dst HF_DIR [--config config.json] [--dtype bf16]
  python scripts/convert_weight.py plan --src HF_DIR
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixtral_ms.hf_config import ConfigError  # noqa: E402
from mixtral_ms.convert import DTYPE_TAGS, hf2ms, ms2hf, parse_size, plan  # noqa: E402
from mixtral_ms.safetensors_io import CheckpointError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hf2ms", "ms2hf"):
        p = sub.add_parser(name)
        p.add_argument("--src", required=True)
        p.add_argument("--dst", required=True)
        p.add_argument("--dtype", choices=sorted(DTYPE_TAGS))
        p.add_argument("--shard-size", default="2GB", type=parse_size)
        p.add_argument("--overwrite", action="store_true")
        if name == "ms2hf":
            p.add_argument("--config", help="config.json or its folder (default: --src, or the folder of a --src file)")
    sub.add_parser("plan").add_argument("--src", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            print(plan(args.src))
            return 0
        start = time.time()
        if args.command == "hf2ms":
            result = hf2ms(args.src, args.dst, args.dtype, args.overwrite, args.shard_size)
        else:
            result = ms2hf(args.src, args.dst, args.dtype, args.overwrite, args.shard_size, args.config)
        took = time.time() - start
        print(f"{args.command}: {result['tensors']} tensors, {result['bytes'] / 2**20:.1f} MiB -> {args.dst} "
              f"in {took:.1f} s ({result['bytes'] / 2**20 / max(took, 1e-9):.0f} MiB/s)")
        return 0
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
