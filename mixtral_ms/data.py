"""Text -> MindRecord for MindFormers' `MindDataset`: packed pre-training samples and masked SFT samples.

Samples hold `seq_length + 1` tokens (MindFormers' convention); labels, when present, are aligned
with input_ids (not shifted: the model shifts), with -100 on prompt and padding positions.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

IGNORE = -100
FORMATS = ("text", "jsonl", "alpaca", "chat")


class DataError(ValueError):
    """Input data that cannot be turned into samples."""


def _files(paths: Sequence[str]) -> List[str]:
    out = []
    for path in paths:
        if os.path.isdir(path):
            out += sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                          if f.endswith((".txt", ".jsonl", ".json")))
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise DataError(f"no such file or folder: {path}")
    if not out:
        raise DataError(f"no input files under {list(paths)}")
    return out


def _jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield record


def documents(paths: Sequence[str], fmt: str) -> Iterator[str]:
    """Pre-training documents: one per non-empty line of text files, or each JSONL record's "text"."""
    for path in _files(paths):
        if fmt == "text":
            with open(path, encoding="utf-8") as f:
                yield from (line.strip() for line in f if line.strip())
        else:
            for record in _jsonl(path):
                if not isinstance(record.get("text"), str):
                    raise DataError(f"{path}: a record has no string field 'text'")
                yield record["text"]


def pack(token_docs: Iterable[List[int]], seq_length: int, bos: int, eos: int) -> Iterator[np.ndarray]:
    """Concatenate `<s> doc </s>` streams and cut them into samples of seq_length + 1 (remainder dropped)."""
    size = seq_length + 1
    buffer: List[int] = []
    for ids in token_docs:
        buffer += [bos, *ids, eos]
        while len(buffer) >= size:
            yield np.asarray(buffer[:size], np.int32)
            buffer = buffer[size:]


def conversations(paths: Sequence[str], fmt: str) -> Iterator[List[Tuple[str, str]]]:
    """(user, assistant) turns per example, from Alpaca records or chat `messages`."""
    for path in _files(paths):
        for number, record in enumerate(_jsonl(path), 1):
            if fmt == "alpaca":
                if not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
                    raise DataError(f"{path}: record {number} needs string 'instruction' and 'output'")
                prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
                yield [(prompt, record["output"])]
            else:
                messages = [m for m in record.get("messages", []) if m.get("role") != "system"]
                roles = [m.get("role") for m in messages]
                if not messages or roles != ["user", "assistant"] * (len(messages) // 2):
                    raise DataError(f"{path}: record {number} must alternate user/assistant messages")
                yield [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def render_instruct(turns: List[Tuple[str, str]], encode, bos: int, eos: int) -> Tuple[List[int], List[int]]:
    """Mixtral-Instruct: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`; labels only on answers."""
    ids, labels = [bos], [IGNORE]
    for user, assistant in turns:
        prompt = encode(f"[INST] {user} [/INST]")
        answer = encode(f" {assistant}") + [eos]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    return ids, labels


def sft_samples(examples: Iterable[List[Tuple[str, str]]], encode, seq_length: int, bos: int, eos: int,
                pad: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    size = seq_length + 1
    for turns in examples:
        ids, labels = render_instruct(turns, encode, bos, eos)
        ids, labels = ids[:size], labels[:size]
        if all(label == IGNORE for label in labels):
            continue  # the prompt alone fills the window: nothing to learn from
        fill = size - len(ids)
        yield (np.asarray(ids + [pad] * fill, np.int32), np.asarray(labels + [IGNORE] * fill, np.int32))


def write_mindrecord(output: str, columns: Dict[str, dict], samples: Iterable[Dict[str, np.ndarray]],
                     overwrite: bool = False) -> int:
    """Write samples to `output` (+ its `.db`) via a temp folder and rename; returns the sample count."""
    from mindspore.mindrecord import FileWriter
    targets = [output, output + ".db"]
    if any(os.path.exists(t) for t in targets) and not overwrite:
        raise DataError(f"{output} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mindrecord-", dir=parent)
    try:
        writer = FileWriter(os.path.join(tmp, os.path.basename(output)), shard_num=1, overwrite=True)
        writer.add_schema(columns, "mixtral_ms")
        count, batch = 0, []
        for sample in samples:
            batch.append(sample)
            if len(batch) == 1024:
                writer.write_raw_data(batch)
                count, batch = count + len(batch), []
        if batch:
            writer.write_raw_data(batch)
            count += len(batch)
        if count == 0:
            raise DataError("the input gives zero samples (too short for one sequence?)")
        writer.commit()
        for target in targets:
            os.replace(os.path.join(tmp, os.path.basename(target)), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return count


def mindrecord_info(path: str) -> Tuple[List[str], int, int]:
    """(column names, tokens per sample, number of samples) of a MindRecord written here."""
    import mindspore.dataset as ds
    if not os.path.isfile(path):
        raise DataError(f"no dataset at {path}")
    dataset = ds.MindDataset(path, shuffle=False)
    row = next(dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    return list(row), int(row["input_ids"].shape[-1]), dataset.get_dataset_size()


def check_dataset(path: str, seq_length: int) -> None:
    """Raise DataError unless samples hold seq_length + 1 tokens (the YAML's model seq_length)."""
    _, length, _ = mindrecord_info(path)
    if length != seq_length + 1:
        raise DataError(f"{path} holds samples of {length} tokens, but seq_length {seq_length} needs "
                        f"{seq_length + 1}; re-run preprocess_data.py with --seq_length {seq_length}")


def preprocess(inputs: Sequence[str], fmt: str, tokenizer_path: str, seq_length: int, output: str,
               overwrite: bool = False) -> int:
    """The whole pipeline; returns the number of samples written."""
    import sentencepiece as spm
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not os.path.isfile(tokenizer_path):
        raise DataError(f"no tokenizer at {tokenizer_path}")
    if seq_length < 2:
        raise DataError(f"seq_length must be at least 2, got {seq_length}")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    bos, eos = sp.bos_id(), sp.eos_id()
    pad = max(sp.pad_id(), 0)
    files = _files(inputs)  # fail early on a missing input, before anything is written
    if fmt in ("text", "jsonl"):
        samples = ({"input_ids": s} for s in pack((sp.encode(d) for d in documents(files, fmt)), seq_length, bos, eos))
        columns = {"input_ids": {"type": "int32", "shape": [-1]}}
    else:
        samples = ({"input_ids": i, "labels": l} for i, l in
                   sft_samples(conversations(files, fmt), sp.encode, seq_length, bos, eos, pad))
        columns = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
    return write_mindrecord(output, columns, samples, overwrite)
