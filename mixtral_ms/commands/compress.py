"""Smaller, cheaper Mixtrals: calibrate once, then prune, merge, densify, quantize or skip (docs/compression.md).

  python scripts/compress.py calibrate --model DIR --data X.mindrecord [--out FILE] [--max_tokens 32768]
  python scripts/compress.py prune    --model DIR --keep R --out DST [--calibration FILE]
  python scripts/compress.py merge    --model DIR --keep R --out DST [--calibration FILE]
  python scripts/compress.py densify  --model DIR --out DST [--calibration FILE]
  python scripts/compress.py quantize --model DIR --bits 8 [--group_size G] --out DST
  python scripts/compress.py skip     --model DIR --out DST [--calibration FILE]

--calibration defaults to calibrate's --out default, DIR.calibration.npz beside the model folder. Every
method writes a complete checkpoint folder (config.json, shards, compression.json) that
MixtralForCausalLM.from_pretrained loads. The MoE options (router bias, shared experts, dense layers of a
layer pattern) are carried: the methods act on the MoE layers, the rest is copied (docs/compression.md).
Bad input exits with status 2 and one line `error: ...` on stderr; nothing is written (temp folder +
rename; Ctrl-C and SIGTERM clean up).
"""
import argparse
import os
import sys


from mixtral_ms import cli  # first: signals are handled before anything heavy is imported


def default_calibration(model: str) -> str:
    return os.path.abspath(model).rstrip(os.sep) + ".calibration.npz"


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibrate", help="per-layer routing statistics and expert outputs on calibration text")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="MindRecord from scripts/preprocess_data.py")
    p.add_argument("--out", help="calibration file (default: MODEL.calibration.npz beside the model folder)")
    p.add_argument("--max_tokens", type=int, default=32768)
    p.add_argument("--sample_tokens", type=int, default=1024, help="tokens whose every expert output is kept (prune)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--overwrite", action="store_true")
    for name, text in (("prune", "keep the R experts per MoE layer whose removal changes the output least"),
                       ("merge", "cluster experts by mean output and merge each cluster into one"),
                       ("densify", "collapse the experts (and ungated shared experts) into one dense MLP "
                                   "(a MistralForCausalLM folder)"),
                       ("quantize", "int8 routed experts (weight only, per output channel or group)"),
                       ("skip", "dynamic skipping of the second expert (beta per MoE layer from calibration)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True)
        p.add_argument("--out", required=True, help="output checkpoint folder")
        if name in ("prune", "merge"):
            p.add_argument("--keep", type=int, required=True, help="experts per MoE layer to keep (top-k..E)")
        if name == "quantize":
            p.add_argument("--bits", type=int, required=True)
            p.add_argument("--group_size", type=int, help="inputs per scale (default: one scale per output channel)")
        else:
            p.add_argument("--calibration", help="calibration file (default: MODEL.calibration.npz)")
        p.add_argument("--shard-size", default=str(5 << 30))  # convert.DEFAULT_SHARD
        p.add_argument("--overwrite", action="store_true", help="replace a destination that holds a checkpoint")
    return parser.parse_args(argv)


def run(args) -> str:
    from mixtral_ms.tools.compress import CompressionError, methods
    from mixtral_ms.tools.compress.calibration import calibrate
    from mixtral_ms.tools.compress.source import SourceModel
    from mixtral_ms.outputs import refuse_overlap
    progress = lambda line: print(f"{args.command}: {line}", file=sys.stderr, flush=True)  # noqa: E731
    if args.command == "calibrate":
        out = args.out or default_calibration(args.model)
        meta = calibrate(args.model, args.data, out, args.max_tokens, args.sample_tokens, args.batch_size,
                         args.overwrite, progress)
        return f"calibrate: {meta['tokens']} tokens, {meta['sample_tokens']} sample tokens -> {out}"
    from mixtral_ms.checkpoint.convert import parse_size
    try:
        shard_size = parse_size(args.shard_size)
    except ValueError as err:  # parse_size's own refusal
        raise CompressionError(f"--shard-size: {err}") from None
    refuse_overlap([args.model], args.out)  # before any work: the output must not land in the model
    source = SourceModel(args.model)
    common = dict(overwrite=args.overwrite, shard_size=shard_size, progress=progress)
    if args.command == "quantize":
        result = methods.quantize(source, args.out, args.bits, args.group_size, **common)
    else:
        path = args.calibration or default_calibration(args.model)
        if args.command in ("prune", "merge"):
            result = getattr(methods, args.command)(source, path, args.keep, args.out, **common)
        else:
            result = getattr(methods, args.command)(source, path, args.out, **common)
    line = (f"{args.command}: {result['parameters']:,} parameters ({result['active_parameters']:,} active), "
            f"{result['bytes'] / 2**20:.2f} MiB -> {args.out}")
    if args.command == "skip":  # the mean over the MoE layers (a dense layer's entry is None)
        saved = [s for s in result["record"]["expert_flops_saved_on_sample"] if s is not None]
        line += f"; expert FLOPs saved on the calibration sample: {100 * sum(saved) / len(saved):.1f}%"
    return line


def main(argv=None) -> int:
    """Exit status: 0, 2 for bad input (one line `error: ...`), 130 / 143 after SIGINT / SIGTERM."""
    return cli.run(lambda argv: print(run(parse_args(argv))), argv, interrupted="interrupted ({signal}); nothing written")

