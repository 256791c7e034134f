#!/usr/bin/env python
"""Convert Mixtral checkpoints between Hugging Face and mixtral-ms layouts (streaming, bit-exact).

  python scripts/convert_weight.py hf2ms --src HF_DIR --dst MS_DIR [--dtype bf16] [--shard-size 5GB] [--overwrite]
  python scripts/convert_weight.py ms2hf --src MS_DIR_OR_FILE --dst HF_DIR [--config config.json] [--dtype bf16]
  python scripts/convert_weight.py plan --src DIR [--dtype bf16]      (or: hf2ms/ms2hf ... --plan)

Bad input exits with status 2 and one line `error: ...` on stderr; nothing is left behind. Ctrl-C and
SIGTERM remove the partial output (exit 130 / 143); after a SIGKILL the next run to the same --dst removes
(or, for a killed --overwrite, restores) what was left. See docs/reliability.md.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixtral_ms.convert import DEFAULT_SHARD, DTYPE_TAGS, hf2ms, ms2hf, parse_size, plan  # noqa: E402
from mixtral_ms.outputs import exit_status, interrupt_on_sigterm  # noqa: E402
from mixtral_ms.safetensors_io import CheckpointError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hf2ms", "ms2hf"):
        p = sub.add_parser(name)
        p.add_argument("--src", required=True)
        p.add_argument("--dst", required=True)
        p.add_argument("--dtype", choices=sorted(DTYPE_TAGS), help="output dtype (default: as the source)")
        p.add_argument("--shard-size", default=str(DEFAULT_SHARD), help="largest output shard, e.g. 2GB (default 5GB)")
        p.add_argument("--overwrite", action="store_true", help="replace a destination that holds a checkpoint")
        p.add_argument("--plan", action="store_true", help="print the plan (headers only) and convert nothing")
        p.add_argument("--quiet", action="store_true", help="no per-shard progress on stderr")
        p.add_argument("--allow-nonfinite", action="store_true", help="convert NaN/inf weights instead of refusing")
        if name == "ms2hf":
            p.add_argument("--config", help="config.json or its folder (default: --src, or the folder of a --src file)")
    p = sub.add_parser("plan")
    p.add_argument("--src", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPE_TAGS))
    args = parser.parse_args(argv)
    interrupt_on_sigterm()
    try:
        if args.command == "plan" or args.plan:
            print(plan(args.src, args.dtype))
            return 0
        shard_size = parse_size(args.shard_size)
        progress = None if args.quiet else (lambda line: print(f"{args.command}: {line}", file=sys.stderr, flush=True))
        start = time.time()
        if args.command == "hf2ms":
            result = hf2ms(args.src, args.dst, args.dtype, args.overwrite, shard_size, progress=progress,
                           allow_nonfinite=args.allow_nonfinite)
        else:
            result = ms2hf(args.src, args.dst, args.dtype, args.overwrite, shard_size, args.config, progress=progress,
                           allow_nonfinite=args.allow_nonfinite)
        took = time.time() - start
        print(f"{args.command}: {result['tensors']} tensors, {result['bytes'] / 2**20:.1f} MiB -> {args.dst} "
              f"in {took:.1f} s ({result['bytes'] / 2**20 / max(took, 1e-9):.0f} MiB/s)")
        return 0
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:  # ConfigError is a ValueError
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the conversion removed its temp folder
        status, name = exit_status(err)
        print(f"error: interrupted ({name}); no output written", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
