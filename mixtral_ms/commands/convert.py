"""Convert Mixtral checkpoints between Hugging Face and mixtral-ms layouts (streaming, bit-exact).

  python scripts/convert_weight.py hf2ms --src HF_DIR --dst MS_DIR [--dtype bf16] [--shard-size 5GB] [--overwrite]
  python scripts/convert_weight.py ms2hf --src MS_DIR_OR_FILE --dst HF_DIR [--config config.json] [--dtype bf16]
  python scripts/convert_weight.py plan --src DIR [--dtype bf16]      (or: hf2ms/ms2hf ... --plan)

A cluster run's per-rank checkpoints (RUN_CKPT/rank_<i>/*.ckpt) with its strategy folder (one strategy file
per pipeline stage at least; docs/parallel.md, "Checkpoints of a cluster run"):
  python scripts/convert_weight.py ms2hf --src RUN_CKPT --strategy STRATEGY_DIR --config config.json --dst HF_DIR
  python scripts/convert_weight.py merge --src RUN_CKPT --strategy STRATEGY_DIR --config config.json --dst MS_DIR
  python scripts/convert_weight.py split --src MS_DIR_OR_CKPT --strategy STRATEGY_DIR --dst RUN_CKPT [--config ...]
  python scripts/convert_weight.py reshard --src RUN_CKPT --strategy A_DIR --dst-strategy B_DIR --config config.json
                                   --dst RUN_CKPT_B [--weights-only]

Bad input exits with status 2 and one line `error: ...` on stderr; nothing is left behind. Ctrl-C and
SIGTERM remove the partial output (exit 130 / 143); after a SIGKILL the next run to the same --dst removes
(or, for a killed --overwrite, restores) what was left. See docs/reliability.md.
"""
import argparse
import sys
import time


from mixtral_ms.checkpoint.convert import DEFAULT_SHARD, DTYPE_TAGS, hf2ms, merge, ms2hf, parse_size, plan
from mixtral_ms import cli


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
            p.add_argument("--strategy", help="a run's strategy folder: --src is then its folder of rank_<i>/ checkpoints")
    p = sub.add_parser("merge", help="per-rank checkpoints + strategy -> one mixtral-ms checkpoint folder")
    p.add_argument("--src", required=True)
    p.add_argument("--strategy", required=True)
    p.add_argument("--config", required=True, help="the model's config.json or its folder")
    p.add_argument("--dst", required=True)
    p.add_argument("--shard-size", default=str(DEFAULT_SHARD))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    for name in ("split", "reshard"):
        p = sub.add_parser(name)
        p.add_argument("--src", required=True)
        p.add_argument("--strategy", required=True, help="the strategy of --src (split: of --dst)")
        p.add_argument("--config", help="the model's config.json or its folder (default: --src)")
        p.add_argument("--dst", required=True, help="folder of rank_<i>/ checkpoints to write")
        p.add_argument("--devices", type=int, help="ranks to write (default: stages x devices per stage)")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--quiet", action="store_true")
        if name == "reshard":
            p.add_argument("--dst-strategy", required=True, help="the strategy folder of the layout to resume on")
            p.add_argument("--weights-only", action="store_true", help="drop optimizer state (fine-tuning, not resuming)")
    p = sub.add_parser("plan")
    p.add_argument("--src", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPE_TAGS))
    return cli.run(_main, parser.parse_args(argv))


def _main(args) -> int:
    if args.command in ("split", "reshard"):
        return _distributed(args)
    if args.command == "plan" or getattr(args, "plan", False):
        print(plan(args.src, args.dtype))
        return 0
    shard_size = parse_size(args.shard_size)
    progress = None if args.quiet else (lambda line: print(f"{args.command}: {line}", file=sys.stderr, flush=True))
    start = time.time()
    if args.command == "merge":
        result = merge(args.src, args.strategy, args.dst, args.config, args.overwrite, shard_size, progress)
    elif args.command == "hf2ms":
        result = hf2ms(args.src, args.dst, args.dtype, args.overwrite, shard_size, progress=progress,
                       allow_nonfinite=args.allow_nonfinite)
    else:
        result = ms2hf(args.src, args.dst, args.dtype, args.overwrite, shard_size, args.config, progress=progress,
                       allow_nonfinite=args.allow_nonfinite, strategy=args.strategy)
    took = time.time() - start
    print(f"{args.command}: {result['tensors']} tensors, {result['bytes'] / 2**20:.1f} MiB -> {args.dst} "
          f"in {took:.1f} s ({result['bytes'] / 2**20 / max(took, 1e-9):.0f} MiB/s)")
    return 0


def _distributed(args) -> int:
    """split / reshard: per-rank checkpoints written (mixtral_ms/checkpoint/distributed.py)."""
    from mixtral_ms.checkpoint.convert import config_of
    from mixtral_ms.checkpoint.distributed import read_strategy, reshard, split_checkpoint
    _, config = config_of(args.config or args.src)
    start = time.time()
    if args.command == "split":
        files = split_checkpoint(args.src, config, read_strategy(args.strategy), args.dst, args.overwrite, args.devices)
    else:
        progress = None if args.quiet else (lambda line: print(f"reshard: {line}", file=sys.stderr, flush=True))
        files = reshard(args.src, read_strategy(args.strategy), read_strategy(args.dst_strategy), config, args.dst,
                        not args.weights_only, args.overwrite, args.devices, progress)
    print(f"{args.command}: {len(files)} rank checkpoint(s) -> {args.dst} in {time.time() - start:.1f} s")
    return 0

