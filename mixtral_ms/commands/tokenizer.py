"""Train the bundled Llama-style SentencePiece BPE tokenizer from the corpus (the same bytes every run).

    python scripts/train_tokenizer.py [--input data/corpus] [--vocab_size 2000] [--output data/tokenizer/tokenizer.model]

Llama settings: BPE, byte fallback (any UTF-8 text encodes, no <unk> in practice), digits split, identity
normalisation with whitespace kept (so "\\n\\n" in an instruction survives), a dummy prefix space,
<unk>=0, <s>=1, </s>=2, no pad piece (pad id -1; the data pipeline pads with 0 and masks the labels).
`[INST]` and `[/INST]` are single pieces (ids 3 and 4, as in Mistral's later tokenizers) so that the
Mixtral-Instruct template costs two tokens, not fifteen. Single-threaded, unshuffled: deterministic.
"""
import argparse
import os
import tempfile

from mixtral_ms import ROOT

from mixtral_ms import cli  # first: signals are handled before anything heavy is imported

INSTRUCT_SYMBOLS = ("[INST]", "[/INST]")


def corpus_files(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                            if name.endswith(".txt"))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no corpus at {path}")
    if not files:
        raise FileNotFoundError(f"no .txt files under {', '.join(paths)}")
    return sorted(files)


def train(files, vocab_size: int, output: str) -> None:
    import sentencepiece as spm
    from mixtral_ms.outputs import write_bytes
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spm.SentencePieceTrainer.train(
                input=",".join(files), model_prefix=os.path.join(tmp, "tok"), model_type="bpe",
                vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=1.0,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                unk_surface=" \u2047 ", user_defined_symbols=list(INSTRUCT_SYMBOLS),
                num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, seed_sentencepiece_size=1000000,
                max_sentence_length=1 << 16, minloglevel=2)
        except RuntimeError as err:  # the trainer's refusal of this corpus (e.g. a vocabulary it cannot fill)
            raise cli.BadInput(f"training the tokenizer failed: {str(err).strip().splitlines()[0]}") from None
        model = _portable(os.path.join(tmp, "tok.model"), files)
    write_bytes(output, model, "--output")  # whole or not at all; a symlink is written through


def _portable(path: str, files) -> bytes:
    """The model's bytes with the trainer's temp and absolute paths replaced by repo-relative names."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.extend(os.path.relpath(f, ROOT) if os.path.abspath(f).startswith(ROOT + os.sep)
                                    else os.path.basename(f) for f in files)
    proto.trainer_spec.model_prefix = "tokenizer"
    return proto.SerializeToString(deterministic=True)


def _main(argv=None) -> int:
    from mixtral_ms.outputs import file_target
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", help="text file or folder of .txt files (repeatable; "
                        "default data/corpus)")
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--output", default=os.path.join(ROOT, "data", "tokenizer", "tokenizer.model"))
    args = parser.parse_args(argv)
    minimum = 256 + 3 + len(INSTRUCT_SYMBOLS) + 1  # bytes, <unk> <s> </s>, [INST] [/INST], one merge
    if args.vocab_size < minimum:
        raise cli.BadInput(f"--vocab_size must be at least {minimum} (256 byte pieces plus specials)")
    file_target(args.output, "--output")  # a folder or an unwritable place: refused before training
    files = corpus_files(args.input or [os.path.join(ROOT, "data", "corpus")])
    train(files, args.vocab_size, args.output)
    print(f"wrote {args.output} (vocab {args.vocab_size}, from {len(files)} file(s))")
    return 0


def main(argv=None) -> int:
    """Exit status: 0, 2 for bad input (one line `error: ...`), 130 / 143 after SIGINT / SIGTERM."""
    return cli.run(_main, argv)

