#!/usr/bin/env python
"""Train the bundled Llama-style SentencePiece BPE tokenizer from the corpus (same pieces and scores every run).

    python scripts/train_tokenizer.py [--input data/corpus/kjv_genesis_to_ruth.txt] [--vocab_size 2000]
"""
import argparse
import os
import shutil
import sys
import tempfile

import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", default=os.path.join(ROOT, "data", "corpus", "kjv_genesis_to_ruth.txt"))
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--output", default=os.path.join(ROOT, "data", "tokenizer", "tokenizer.model"))
    args = parser.parse_args()
    if not os.path.isfile(args.input):
        print(f"error: no corpus at {args.input}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            input=args.input, model_prefix=os.path.join(tmp, "tok"), model_type="bpe", vocab_size=args.vocab_size,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            split_digits=True, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=1 << 16, minloglevel=2)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        shutil.move(os.path.join(tmp, "tok.model"), args.output + ".tmp")
        os.replace(args.output + ".tmp", args.output)
    print(f"wrote {args.output} (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
