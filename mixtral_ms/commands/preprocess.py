"""Tokenize text or instruction data into MindRecord samples of seq_length + 1 tokens for MindFormers.

  python scripts/preprocess_data.py --input data/corpus --format text --seq_length 128 \\
      --output runs/data/train.mindrecord
  python scripts/preprocess_data.py --input data/instruct/sample.jsonl --format alpaca --seq_length 128 \\
      --output runs/data/sft.mindrecord

Formats:
  text    plain UTF-8 files or folders of .txt; one document per line (--text_docs paragraph: per
          blank-line separated paragraph; file: per file). Packed as <s> doc </s> ... -> column input_ids.
  jsonl   {"text": ...} per line, packed the same way.
  alpaca  {"instruction", "input" (optional), "output"} per line.
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} per line.
The instruction formats render Mixtral-Instruct's `<s>[INST] prompt [/INST] answer</s>` template into
columns input_ids and labels (labels aligned with input_ids, -100 on prompt and padding; pad id 0).
Bad input prints one line `error: ...` and exits with status 2. The output is written to a hidden temp
folder beside it and renamed into place: Ctrl-C or SIGTERM leave nothing (exit 130 / 143), a killed run's
temp folder is removed by the next run; --overwrite replaces only a MindRecord file (see docs/reliability.md).
"""
import argparse
import os

from mixtral_ms import ROOT

from mixtral_ms import cli  # first: signals are handled before anything heavy is imported


def _main(argv=None) -> int:
    from mixtral_ms.run.data import FORMATS, TEXT_DOCS, heldout_path, preprocess
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="file or folder (repeatable)")
    parser.add_argument("--format", default="text", help=f"one of {', '.join(FORMATS)} (default text)")
    parser.add_argument("--text_docs", default="line", help=f"for --format text: {', '.join(TEXT_DOCS)}")
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "tokenizer", "tokenizer.model"))
    parser.add_argument("--seq_length", type=int, required=True,
                        help="the model's seq_length; samples hold seq_length + 1 tokens")
    parser.add_argument("--output", required=True, help="X.mindrecord (an X.mindrecord.db index goes beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--domain_id", type=int, help="also write a domain_ids column holding this id for every "
                                                      "token (the expert group of router_type rre)")
    parser.add_argument("--heldout_fraction", type=float, default=0.0,
                        help="hold out this share of whole documents (evenly spread), e.g. 0.1 (default 0)")
    parser.add_argument("--heldout_output", help="the held-out MindRecord (default: X_heldout.mindrecord beside X)")
    args = parser.parse_args(argv)
    stats = {}
    count = preprocess(args.input, args.format, args.tokenizer, args.seq_length, args.output,
                       args.overwrite, text_docs=args.text_docs, stats=stats, domain=args.domain_id,
                       heldout_fraction=args.heldout_fraction, heldout_output=args.heldout_output)
    extra = ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("samples", "heldout_samples") and v)
    print(f"wrote {count} samples of {args.seq_length + 1} tokens to {args.output}" + (f" ({extra})" if extra else ""))
    if args.heldout_fraction:
        heldout = args.heldout_output or heldout_path(args.output)
        print(f"wrote {stats['heldout_samples']} held-out samples to {heldout}")
    return 0


def main(argv=None) -> int:
    """Exit status: 0, 2 for bad input (one line `error: ...`), 130 / 143 after SIGINT / SIGTERM."""
    return cli.run(_main, argv)

