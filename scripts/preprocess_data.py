#!/usr/bin/env python
"""Tokenize text or instruction data into MindRecord samples of seq_length + 1 tokens.

  python scripts/preprocess_data.py --input data/corpus --format text --seq_length 128 --output runs/data/train.mindrecord
  python scripts/preprocess_data.py --input data/instruct/sample.jsonl --format alpaca --seq_length 128 --output runs/data/sft.mindrecord

Formats: text (one document per line), jsonl ({"text": ...}), alpaca ({"instruction", "input", "output"}),
chat ({"messages": [{"role", "content"}, ...]}); instruction formats use Mixtral-Instruct's [INST] template
with the prompt masked out of the loss.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mixtral_ms.data import FORMATS, DataError, preprocess  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True)
    parser.add_argument("--format", default="text", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "tokenizer", "tokenizer.model"))
    parser.add_argument("--seq_length", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        count = preprocess(args.input, args.format, args.tokenizer, args.seq_length, args.output, args.overwrite)
    except (DataError, OSError, UnicodeDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {count} samples of {args.seq_length + 1} tokens to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
