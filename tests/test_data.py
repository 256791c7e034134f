"""Data side of training: tokenizer, packing, instruction masking, MindRecord files and their bad inputs."""
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from conftest import ROOT
from mixtral_ms.run import data as D

TOKENIZER = os.path.join(ROOT, "data", "tokenizer", "tokenizer.model")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_cli = _script("preprocess_data")
tokenizer_cli = _script("train_tokenizer")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=TOKENIZER)


def read(path):
    import mindspore.dataset as ds
    rows = ds.MindDataset(path, shuffle=False).create_dict_iterator(num_epochs=1, output_numpy=True)
    return [{k: v.tolist() for k, v in row.items()} for row in rows]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ------------------------------------------------------------------------------------------ tokenizer

def test_bundled_tokenizer_is_llama_style(sp):
    assert sp.get_piece_size() == 2000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    text = "Line one\n\n  Ünïcode 2024 [INST] x [/INST] 😀"
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # identity normalisation + byte fallback: lossless, no <unk>
    assert 0 not in ids and sp.piece_to_id("<0x0A>") in ids
    assert sp.id_to_piece(sp.encode("2024")[1:]) == ["<0x32>", "<0x30>", "<0x32>", "<0x34>"]  # digits split


def test_tokenizer_training_reproduces_the_bundled_model(tmp_path):
    out = tmp_path / "tok.model"
    assert tokenizer_cli.main(["--output", str(out)]) == 0
    assert out.read_bytes() == open(TOKENIZER, "rb").read()
    assert tokenizer_cli.main(["--input", str(tmp_path / "none"), "--output", str(out)]) == 2


# ------------------------------------------------------------------------------------------ packing

def test_pack_exact_lengths_eos_between_docs_remainder_dropped():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]]
    samples = list(D.pack(docs, seq_length=4, bos=1, eos=2))
    stream = [t for d in docs for t in [1, *d, 2]]  # 19 tokens -> 3 samples of 5, 4 dropped
    assert [s.shape for s in samples] == [(5,)] * 3 and all(s.dtype == np.int32 for s in samples)
    assert np.concatenate(samples).tolist() == stream[:15]


def test_text_preprocess_packs_documents(tmp_path, sp):
    docs = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light.",
            "And there was light.", "And God saw the light, that it was good."]
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(docs[:2]) + "\n\n")
    (src / "b.txt").write_text("\n".join(docs[2:]) + "\n")
    (src / "skip.jsonl").write_text('{"text": "not read for --format text"}\n')
    out = str(tmp_path / "pt.mindrecord")
    stats = {}
    count = D.preprocess([str(src)], "text", TOKENIZER, 8, out, stats=stats)
    stream = [t for d in docs for t in [1, *sp.encode(d), 2]]
    assert count == len(stream) // 9 == stats["samples"] and stats["documents"] == 4
    rows = read(out)
    assert [list(r) for r in rows] == [["input_ids"]] * count
    assert all(len(r["input_ids"]) == 9 for r in rows)
    flat = [t for r in rows for t in r["input_ids"]]
    assert flat == stream[:9 * count]
    starts = [i for i, t in enumerate(flat) if t == 1]
    assert len(starts) == 4 and starts[0] == 0 and all(flat[i - 1] == 2 for i in starts[1:])  # </s><s> between docs
    assert D.mindrecord_info(out) == {"columns": ["input_ids"], "seq_length": 9, "num_samples": count}


def test_jsonl_and_paragraph_documents(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}, {"text": "c", "id": 3}])
    assert list(D.documents([src], "jsonl")) == ["a b", "c"]
    book = tmp_path / "book.txt"
    book.write_text("First para\nwrapped here.\n\nSecond\npara.\n")
    assert list(D.documents([str(book)], "text", "paragraph")) == ["First para wrapped here.", "Second para."]
    assert list(D.documents([str(book)], "text", "file")) == [book.read_text().strip()]
    assert len(list(D.documents([str(book)], "text", "line"))) == 4


# ------------------------------------------------------------------------------------------ instructions

def test_alpaca_masking_marks_exactly_the_prompt(sp):
    prompt_text = "Continue the passage.\n\nAnd God said"
    ids, labels = D.render_instruct([(prompt_text, "Let there be light.")], sp.encode, 1, 2)
    assert len(ids) == len(labels)
    boundary = labels.index(next(l for l in labels if l != D.IGNORE))
    assert all(l == D.IGNORE for l in labels[:boundary])
    assert labels[boundary:] == ids[boundary:]  # aligned, not shifted
    assert ids[0] == 1 and ids[-1] == 2
    assert sp.decode(ids[1:boundary]) == f"[INST] {prompt_text} [/INST]"
    assert sp.decode(ids[boundary:-1]) == "Let there be light."
    assert sp.decode(ids) == f"[INST] {prompt_text} [/INST] Let there be light."
    # the split tokenization equals tokenizing the whole rendered string at once
    assert ids[1:-1] == sp.encode(f"[INST] {prompt_text} [/INST] Let there be light.")


def test_multi_turn_chat_masks_every_prompt(sp):
    turns = D._chat_turns([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u1"},
                           {"role": "assistant", "content": "a one"}, {"role": "user", "content": "u2"},
                           {"role": "assistant", "content": "a two"}], "x")
    assert turns == [("Be brief.\n\nu1", "a one"), ("u2", "a two")]
    ids, labels = D.render_instruct(turns, sp.encode, 1, 2)
    # as with Mistral's tokenizer, the prefix space of the second `▁[INST]` shows when decoding
    assert sp.decode(ids) == "[INST] Be brief.\n\nu1 [/INST] a one [INST] u2 [/INST] a two"
    kept = [i for i, l in enumerate(labels) if l != D.IGNORE]
    spans, start = [], kept[0]
    for a, b in zip(kept, kept[1:] + [None]):
        if b != a + 1:
            spans.append((start, a + 1))
            start = b
    assert [sp.decode(ids[s:e]) for s, e in spans] == ["a one", "a two"]  # decode drops the </s>
    assert [ids[e - 1] for _, e in spans] == [2, 2]  # each answer's </s> is learned
    masked = [i for i, l in enumerate(labels) if l == D.IGNORE]
    assert sp.decode([ids[i] for i in masked]) == "[INST] Be brief.\n\nu1 [/INST] [INST] u2 [/INST]"


def test_sft_padding_truncation_and_skips(sp):
    stats = {}
    long_answer = "word " * 200
    examples = [[("short", "ok")], [("p", long_answer)], [("prompt " * 100, "never seen")]]
    out = list(D.sft_samples(examples, sp.encode, 15, 1, 2, stats=stats))
    assert len(out) == 2 and stats == {"truncated": 2, "skipped": 1}
    (ids, labels), (ids2, labels2) = out
    n = len(D.render_instruct(examples[0], sp.encode, 1, 2)[0])
    assert ids.shape == labels.shape == (16,) and ids[n:].tolist() == [0] * (16 - n)
    assert labels[n:].tolist() == [-100] * (16 - n) and labels[n - 1] == 2
    assert (labels2 != -100).any() and ids2[-1] != 0 and labels2[-1] == ids2[-1]


def test_sft_mindrecord_round_trip(tmp_path, sp):
    src = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Name the first book.", "input": "", "output": "Genesis."},
        {"instruction": "Continue.", "input": "In the beginning", "output": "God created the heaven."}])
    out = str(tmp_path / "sft.mindrecord")
    assert preprocess_cli.main(["--input", src, "--format", "alpaca", "--tokenizer", TOKENIZER,
                                "--seq_length", "32", "--output", out]) == 0
    rows = read(out)
    assert len(rows) == 2 and all(list(r) == ["input_ids", "labels"] for r in rows)
    for row, (prompt, answer) in zip(rows, [("Name the first book.", "Genesis."),
                                            ("Continue.\n\nIn the beginning", "God created the heaven.")]):
        ids, labels = np.array(row["input_ids"]), np.array(row["labels"])
        assert ids.shape == labels.shape == (33,)
        learn = labels != -100
        assert sp.decode(ids[learn].tolist()) == answer
        assert sp.decode(ids[~learn & (ids != 0)].tolist()) == f"[INST] {prompt} [/INST]"
    assert D.check_dataset(out, 32, ["input_ids", "labels"])["num_samples"] == 2
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "sft.mindrecord", "sft.mindrecord.db"]  # no temp left


def test_bundled_instruction_set_parses():
    path = os.path.join(ROOT, "data", "instruct", "sample.jsonl")
    examples = list(D.conversations([path], "alpaca"))
    assert 50 <= len(examples) <= 200 and all(a.strip() for [(p, a)] in examples)


# ------------------------------------------------------------------------------------------ files and errors

def test_overwrite_and_sequence_length_check(tmp_path, capsys):
    out = str(tmp_path / "pt.mindrecord")
    args = ["--input", os.path.join(ROOT, "data", "corpus"), "--tokenizer", TOKENIZER, "--seq_length", "256",
            "--output", out]
    assert preprocess_cli.main(args) == 0
    first = D.mindrecord_info(out)
    assert first["seq_length"] == 257 and first["num_samples"] > 500
    assert preprocess_cli.main(args) == 2
    assert capsys.readouterr().err.strip().endswith("exists; pass --overwrite to replace it")
    assert preprocess_cli.main(args[:-3] + ["128", "--output", out, "--overwrite"]) == 0
    assert D.mindrecord_info(out)["seq_length"] == 129
    with pytest.raises(D.DataError, match="holds samples of 129 tokens.*seq_length 256 needs 257"):
        D.check_dataset(out, 256)
    with pytest.raises(D.DataError, match="lacks column"):
        D.check_dataset(out, 128, ["input_ids", "labels"])
    with pytest.raises(D.DataError, match="no dataset"):
        D.check_dataset(str(tmp_path / "missing.mindrecord"), 128)


@pytest.mark.parametrize("case, fmt, message", [
    ("missing", "text", "no such file or folder"),
    ("badjson", "jsonl", r"badjson\.jsonl:3: malformed JSON"),
    ("notext", "jsonl", r"notext\.jsonl:1: record has no string field 'text'"),
    ("alpaca", "alpaca", r"alpaca\.jsonl:2: alpaca record needs a string 'output'"),
    ("chat", "chat", r"chat\.jsonl:1: messages must alternate user/assistant"),
    ("empty", "text", "zero samples"),
    ("tiny", "text", "zero samples"),
    ("unknown", "csv", "unknown format 'csv'"),
    ("notok", "text", "no tokenizer at"),
])
def test_bad_input_one_line_error_exit_2(tmp_path, capsys, case, fmt, message):
    files = {
        "badjson": '{"text": "a"}\n\n{"text": \n',
        "notext": '{"body": "a"}\n',
        "alpaca": '{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n',
        "chat": '{"messages": [{"role": "assistant", "content": "a"}]}\n',
        "empty": "\n\n",
        "tiny": "a few words\n",
        "unknown": "x\n",
        "notok": "x\n",
    }
    src = tmp_path / (f"{case}.jsonl" if fmt in ("jsonl", "alpaca", "chat") else f"{case}.txt")
    if case in files:
        src.write_text(files[case])
    out = tmp_path / "out.mindrecord"
    tokenizer = str(tmp_path / "none.model") if case == "notok" else TOKENIZER
    code = preprocess_cli.main(["--input", str(src), "--format", fmt, "--tokenizer", tokenizer,
                                "--seq_length", "64", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ------------------------------------------------------------------------------------------ held-out splits

def test_heldout_split_by_whole_chapters_never_trained_on(tmp_path, sp):
    import subprocess
    import sys
    from fractions import Fraction
    inputs = []
    for corpus in ("corpus/kjv_genesis_to_ruth.txt", "corpus_nt/kjv_matthew_to_revelation.txt"):  # both domains
        path = tmp_path / os.path.basename(corpus)
        path.write_text("\n".join(open(os.path.join(ROOT, "data", corpus)).read().splitlines()[:10]) + "\n")
        inputs += ["--input", path]
    chapters = [line for path in inputs[1::2] for line in path.read_text().splitlines()]
    out = tmp_path / "out" / "train.mindrecord"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "preprocess_data.py"), *map(str, inputs),
                          "--seq_length", "64", "--output", str(out), "--heldout_fraction", "0.25"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    held = [i for i in range(20) if D.is_heldout(i, Fraction(1, 4))]
    assert held == [3, 7, 11, 15, 19]  # every 4th chapter: exactly floor(20 * 0.25), spread over both domains
    heldout = tmp_path / "out" / "train_heldout.mindrecord"
    assert f"held-out samples to {heldout}" in run.stdout and "heldout_documents 5" in run.stdout
    for path, docs in ((out, [c for i, c in enumerate(chapters) if i not in held]),
                       (heldout, [chapters[i] for i in held])):
        stream = [t for d in docs for t in [1, *sp.encode(d), 2]]
        flat = [t for r in read(str(path)) for t in r["input_ids"]]
        assert flat == stream[:len(stream) // 65 * 65]  # exactly the pack of its own chapters
    train_text = " ".join(c for i, c in enumerate(chapters) if i not in held)
    assert not any(chapters[i][:200] in train_text for i in held)
    assert sorted(os.listdir(tmp_path / "out")) == ["train.mindrecord", "train.mindrecord.db",
                                                     "train_heldout.mindrecord", "train_heldout.mindrecord.db"]
    stats = {}  # deterministic: the library call gives the same samples
    D.preprocess([str(p) for p in inputs[1::2]], "text", TOKENIZER, 64, str(tmp_path / "again.mindrecord"),
                 stats=stats, heldout_fraction=0.25, heldout_output=str(tmp_path / "again_h.mindrecord"))
    assert read(str(tmp_path / "again.mindrecord")) == read(str(out))
    assert read(str(tmp_path / "again_h.mindrecord")) == read(str(heldout))
    assert (stats["documents"], stats["heldout_documents"], stats["heldout_samples"]) == \
        (15, 5, D.mindrecord_info(str(heldout))["num_samples"])


def test_heldout_split_bad_input_writes_nothing(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(["a long enough line of text for one sample " * 4] * 9 + ["short"]))
    (tmp_path / "old.mindrecord").write_text("previous")  # stands for an earlier output; must survive
    cases = [(["--heldout_fraction", 1.5], "must be in [0, 1)"),
             (["--heldout_fraction", 0.05], "holds out no document"),
             (["--heldout_fraction", 0.1], "held-out split (1 documents): the input gives zero samples"),
             (["--heldout_fraction", 0.5, "--heldout_output", tmp_path / "old.mindrecord"], "old.mindrecord exists"),
             (["--heldout_fraction", 0.5, "--heldout_output", tmp_path / "new.mindrecord"], "is the training output")]
    for extra, message in cases:
        output = tmp_path / ("new.mindrecord" if "is the training" in message else "train.mindrecord")
        code = preprocess_cli.main([str(a) for a in ["--input", tmp_path / "in.txt", "--seq_length", 16,
                                                     "--output", output, *extra]])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (extra, lines)
        assert sorted(os.listdir(tmp_path)) == ["in.txt", "old.mindrecord"]
    assert (tmp_path / "old.mindrecord").read_text() == "previous"
