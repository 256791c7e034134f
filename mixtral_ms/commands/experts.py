"""Expert surgery on Mixtral checkpoints (mixtral-ms or Hugging Face folders); see mixtral_ms/tools/surgery.py.

  python scripts/experts.py grow --src MIXTRAL --dst OUT --add 2 --init copy|copy-noise|random [--noise 0.01] [--seed 0]
  python scripts/experts.py extract --src MIXTRAL --dst OUT --experts 0,3,5      (or per layer: '0,3;1,2')
  python scripts/experts.py upcycle --src DENSE_MISTRAL --dst OUT --experts 8 [--top-k 2] [--seed 0]
                                    [--moe-layer-freq 2] [--first-k-dense 1]
  python scripts/experts.py mix --branches A B ... --dst OUT [--weights 0.5,0.5] [--router new|average|concat]

extract of a router_type rre model: exactly one domain group (e.g. 4,5,6,7 of 8 experts in 2 groups), which
becomes a model of rre_groups 1 routing that domain's tokens as the full model did; anything else is refused.
grow and mix refuse rre models (their domain groups would change size); mix refuses branches whose router_type
(or, without --top-k, num_experts_per_tok) differ.
grow: new expert E + j copies expert j mod E (weights and router row; copy-noise adds N(0, (noise * rms)^2)
to each copied tensor; random draws N(0, initializer_range)); top-k unchanged.
mix: per layer the branches' FFNs (dense Mistral branches) or experts (Mixtral branches) in branch order,
every other weight the weighted average; router rows new (random, seeded), concat (each branch's own) or
average (of the branches' rows). Output layout: --layout ms (stacked experts) or hf (per-expert tensors),
default the source's (hf for dense sources; ms for a training checkpoint file, which needs --config: the
run YAML or a config.json). The output holds config.json and surgery.json (where each expert came from).
Bad input exits with status 2 and one line `error: ...`; nothing is written (SIGINT/SIGTERM clean up too).
"""
import argparse
import sys


from mixtral_ms import cli  # first: signals are handled before anything heavy is imported


def _floats(text: str):
    from mixtral_ms.tools.surgery import SurgeryError
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise SurgeryError(f"--weights must be comma-separated numbers, got {text!r}") from None


def shard_size(text: str) -> int:
    """--shard-size as bytes; a bad size is bad input (one line)."""
    from mixtral_ms.checkpoint.convert import parse_size
    try:
        return parse_size(text)
    except ValueError as err:  # parse_size's own refusal, nothing else runs here
        raise cli.BadInput(f"--shard-size: {err}") from None


def parse_args(argv):
    from mixtral_ms.checkpoint.convert import DEFAULT_SHARD
    from mixtral_ms.tools.surgery import INITS, LAYOUTS, ROUTERS
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name) for name in ("grow", "extract", "upcycle", "mix")}
    for name, p in commands.items():
        if name == "mix":
            p.add_argument("--branches", nargs="+", required=True, help="branch folders (one seed, same shapes)")
        else:
            p.add_argument("--src", required=True)
        p.add_argument("--dst", required=True)
        p.add_argument("--config", help="config.json, its folder or the run YAML, for a checkpoint FILE source "
                                        "(.ckpt or .safetensors, e.g. runs/tiny/checkpoint/rank_0/x.ckpt)")
        p.add_argument("--layout", choices=LAYOUTS, help="ms: stacked experts, hf: per expert (default: the source's)")
        p.add_argument("--seed", type=int, default=0, help="for new router rows and new experts (default 0)")
        p.add_argument("--shard-size", default=str(DEFAULT_SHARD), help="largest output shard (default 5GB)")
        p.add_argument("--overwrite", action="store_true", help="replace a destination that holds a checkpoint")
        p.add_argument("--quiet", action="store_true", help="no per-shard progress on stderr")
    commands["grow"].add_argument("--add", type=int, required=True, help="experts (and router rows) to add per layer")
    commands["grow"].add_argument("--init", choices=INITS, default="copy")
    commands["grow"].add_argument("--noise", type=float, default=0.01, help="copy-noise: std relative to the rms")
    commands["extract"].add_argument("--experts", required=True, help="ids to keep: '0,3,5' or per layer '0,3;1,2'")
    commands["upcycle"].add_argument("--experts", type=int, required=True, help="copies of each FFN")
    commands["upcycle"].add_argument("--moe-layer-freq", type=int, default=1,
                                     help="only every k-th layer becomes MoE (GShard: 2); the others stay dense")
    commands["upcycle"].add_argument("--first-k-dense", type=int, default=0, help="the first n layers stay dense")
    for name in ("upcycle", "mix"):
        commands[name].add_argument("--top-k", type=int, help="num_experts_per_tok (default 2; mix of Mixtrals: "
                                                               "the branches')")
    commands["mix"].add_argument("--weights", help="per-branch averaging weights, e.g. 0.7,0.3 (default equal)")
    commands["mix"].add_argument("--router", choices=ROUTERS, default="new")
    return parser.parse_args(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    from mixtral_ms.tools.surgery import Model, parse_expert_lists, plan_extract, plan_grow, plan_mix, plan_upcycle, write
    if args.command == "mix":
        models = [Model(b, args.config) for b in args.branches]
        weights = _floats(args.weights) if args.weights else None
        plan = plan_mix(models, weights, args.router, args.top_k, args.seed)
    else:
        model = Model(args.src, args.config)
        models = [model]
        if args.command == "grow":
            plan = plan_grow(model, args.add, args.init, args.seed, args.noise)
        elif args.command == "extract":
            plan = plan_extract(model, parse_expert_lists(args.experts))
        else:  # an explicit --top-k 0 is refused (plan_upcycle), not taken for the default
            plan = plan_upcycle(model, args.experts, 2 if args.top_k is None else args.top_k, args.seed,
                                args.moe_layer_freq, args.first_k_dense)
    progress = None if args.quiet else (lambda line: print(f"{args.command}: {line}", file=sys.stderr, flush=True))
    result = write(plan, args.dst, args.layout or models[0].layout, args.overwrite, shard_size(args.shard_size),
                   progress)
    print(f"{args.command}: {result['experts']} experts per layer (top-{result['top_k']}), {result['tensors']} "
          f"tensors, {result['bytes'] / 2**20:.1f} MiB -> {args.dst}")
    return 0


def main(argv=None) -> int:
    """Exit status: 0, 2 for bad input (one line `error: ...`), 130 / 143 after SIGINT / SIGTERM."""
    return cli.run(_main, argv)

